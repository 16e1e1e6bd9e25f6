"""Scored pairs per second for SmolLM2 on this machine (base and tuned side each score every pair).

    python benchmarks/scoring_speed.py [--source builtin|hh-rlhf] [--pairs 64] [--batch-size 8]
"""

import argparse
import time

import numpy as np

from alignlib import encode_pairs, load_pair, load_preferences, score


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="builtin")
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    args = ap.parse_args()
    pair = load_pair("smollm2")
    rows = (1000, 1000 + args.pairs) if args.source == "hh-rlhf" else (0, args.pairs)
    prefs = load_preferences(args.source, rows=rows)
    enc = encode_pairs(pair.tokenizer, prefs, max_length=args.max_length)
    tokens = np.mean([len(e.chosen) + len(e.rejected) for e in enc]) / 2
    score(pair, enc[:2], progress=False)  # warm-up
    t = time.perf_counter()
    score(pair, enc, batch_size=args.batch_size, progress=False)
    dt = time.perf_counter() - t
    print(f"{pair.name}: {len(enc)} pairs from {prefs.source} ({tokens:.0f} tokens per sequence), "
          f"batch {args.batch_size}: {len(enc) / dt:.2f} pairs/s under both models ({dt:.1f} s)")


if __name__ == "__main__":
    main()
