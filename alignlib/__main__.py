"""Command line: ``python -m alignlib score --pair smollm2 --data builtin --out runs/main``."""

from __future__ import annotations

import argparse
import sys

from . import load_pair, load_preferences, preference_accuracy, score
from .runs import RunFolder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignlib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="score preference pairs under a model pair and save the table")
    s.add_argument("--pair", default="smollm2", help="built-in pair name, or the base model (id, folder, .gguf)")
    s.add_argument("--tuned", default=None, help="the tuned model (id, folder, .gguf); omit for a built-in pair")
    s.add_argument("--data", default="builtin", help="'builtin', 'hh-rlhf', or a .jsonl/.csv path")
    s.add_argument("--rows", default=None, help="row range start:stop of the data source")
    s.add_argument("--max-length", type=int, default=512)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--dtype", default="float32")
    s.add_argument("--out", default="runs/score", help="run folder for config, versions and results")
    args = parser.parse_args(argv)

    rows = tuple(int(x) for x in args.rows.split(":")) if args.rows else None
    run = RunFolder(args.out, {k: v for k, v in vars(args).items() if k != "out"})
    prefs = load_preferences(args.data, rows=rows)
    pair = load_pair(args.pair, args.tuned, dtype=args.dtype)
    table = score(pair, prefs, max_length=args.max_length, batch_size=args.batch_size)
    run.save("scores", table)
    acc = preference_accuracy(table)
    run.save("accuracy", acc)
    print(f"{pair.name}: {len(table)} pairs from {prefs.source} ({prefs.report})")
    print(acc.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"results in {run.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
