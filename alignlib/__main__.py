"""Command line: score pairs, or run a patching sweep (split across processes by any launcher).

    python -m alignlib score --pair smollm2 --data hh-rlhf --rows 1000:1256 --out runs/score
    torchrun --nproc-per-node 4 -m alignlib sweep --pair smollm2 --rows 1000:1256 --run-dir runs/sweep
"""

from __future__ import annotations

import argparse
import os
import sys

from . import load_pair, load_preferences, patch_sweep, preference_accuracy, score
from .data import encode_pairs
from .notebook import parse_rows
from .store import Entry, code_digest, write_atomic


def _common(p):
    p.add_argument("--pair", default="smollm2", help="built-in pair name, or the base model (id, folder, .gguf)")
    p.add_argument("--tuned", default=None, help="the tuned model (id, folder, .gguf); omit for a built-in pair")
    p.add_argument("--data", default="hh-rlhf", help="'builtin', 'hh-rlhf', or a .jsonl/.csv path")
    p.add_argument("--rows", default="1000:1256", help="row range start:stop of the data source")
    p.add_argument("--max-length", type=int, default=32, help="tokens per sequence (prompt cut from the left)")
    p.add_argument("--max-response-tokens", type=int, default=16, help="responses cut to this many tokens")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per forward")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when a GPU is there, else cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignlib", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="score preference pairs under a model pair and save the table")
    _common(s)
    s.add_argument("--out", default="runs/score", help="folder for config, versions and results")
    w = sub.add_parser("sweep", help="a patching sweep; under torchrun/accelerate each process takes a shard")
    _common(w)
    w.add_argument("--site", nargs="+", default=["resid", "block"])
    w.add_argument("--direction", nargs="+", default=["tuned_to_base", "base_to_tuned"])
    w.add_argument("--positions", default="all")
    w.add_argument("--method", default="fast", choices=["fast", "hooks", "attribution"])
    w.add_argument("--controls", nargs="*", default=[])
    w.add_argument("--chunk-size", type=int, default=32)
    w.add_argument("--run-dir", required=True, help="shared folder: chunks, and the merged tables at the end")
    args = parser.parse_args(argv)

    device = args.device or _device()
    pair = load_pair(args.pair, args.tuned, dtype=args.dtype, device=device)
    prefs = load_preferences(args.data, rows=parse_rows(args.rows))
    encoded = encode_pairs(pair.tokenizer, prefs, max_length=args.max_length, max_response_tokens=args.max_response_tokens)
    if args.command == "score":
        config = {k: v for k, v in vars(args).items() if k not in ("out", "device")}
        entry = Entry(args.out, config, code_digest()).open(strict_config=False)
        table = score(pair, encoded, batch_size=args.batch_size)
        acc = preference_accuracy(table)
        write_atomic(entry.path / "scores.csv", table.to_csv(index=False, float_format="%.17g"))
        write_atomic(entry.path / "accuracy.csv", acc.to_csv(index=False, float_format="%.17g"))
        print(f"{pair.name}: {len(table)} pairs from {prefs.source} ({prefs.report})")
        print(acc.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
        print(f"results in {entry.path}")
        return 0
    sweep = patch_sweep(pair, encoded, site=args.site, direction=args.direction, positions=args.positions,
                        controls=args.controls, method=args.method, batch_size=args.batch_size,
                        chunk_size=args.chunk_size, run_dir=args.run_dir, shard="auto",
                        progress=int(os.environ.get("RANK", 0)) == 0)
    if int(os.environ.get("RANK", 0)) == 0:
        write_atomic(Entry(args.run_dir, {}, "").path / "summary.csv", sweep.summary.to_csv(index=False))
        print(f"{len(sweep.pairs)} (pair, cell) rows; summary in {args.run_dir}/summary.csv")
    return 0


def _device() -> str:
    import torch

    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    sys.exit(main())
