"""How fast is a layer sweep? The plain hook loop, the fast path and the FLOP lower bound, in one run.

    python benchmarks/patching_speed.py                 # SmolLM2, 16 pairs of ~100 tokens, resid
    python benchmarks/patching_speed.py --llama1b 2     # + a random Llama-3.2-1B-shaped pair, 2 pairs

Only ratios from one run count: timings move 10-20% between runs. The FLOP bound is one forward
of each model plus, for each layer, the layers after it (and the unembedding at response
positions), divided by the fp32 matmul rate measured here. Two rates are measured: the peak rate
(one large square-ish product) and the rate of the model's own products (each weight shape of a
decoder layer at the sweep's batch rows, and the unembedding at its response rows) timed alone;
the second bound is what these products cost even with no other work around them.
"""

import argparse
import resource
import tempfile
import time

import numpy as np
import torch

from alignlib import encode_pairs, load_pair, load_preferences
from alignlib.data import collate
from alignlib.hooks import capture, patch
from alignlib.metrics import pad_id
from alignlib.models import decoder_layers
from alignlib.patching import patch_sweep


def matmul_rate(dtype=torch.float32, n=2048, d=576, f=1536) -> float:
    a, b = torch.randn(n, d, dtype=dtype), torch.randn(d, f, dtype=dtype)
    for _ in range(2):
        a @ b
    reps = 10 if dtype == torch.float32 else 1
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n * d * f * reps / (time.perf_counter() - t)


def model_matmul_rates(model, rows: int, response_rows: int) -> tuple[float, float]:
    """(decoder layer, unembedding) FLOP rates of the model's own weight shapes, each timed alone."""
    def rate(shapes, m):
        x = {k: torch.randn(m, k) for k, _ in shapes}
        ws = [torch.randn(n, k) for k, n in shapes]
        for w in ws:
            torch.nn.functional.linear(x[w.shape[1]], w)
        t = time.perf_counter()
        for _ in range(3):
            for w in ws:
                torch.nn.functional.linear(x[w.shape[1]], w)
        return 3 * sum(2 * m * k * n for k, n in shapes) / (time.perf_counter() - t)

    layer = [(p.shape[1], p.shape[0]) for p in decoder_layers(model)[0].parameters() if p.dim() == 2]
    head = model.get_output_embeddings().weight
    return rate(layer, rows), rate([(head.shape[1], head.shape[0])], response_rows)


def sweep_flops(model, encoded, plain: bool = False) -> tuple[float, float]:
    """(decoder-layer FLOPs, unembedding FLOPs) of a full-layer resid sweep over ``encoded``.

    The fast path: one clean forward of each model, then for each layer the layers after it, with
    the unembedding at response positions. ``plain``: a clean forward of each model and one whole
    forward per layer, with the unembedding at every position.
    """
    cfg = model.config
    layer_params = sum(p.numel() for p in decoder_layers(model)[0].parameters() if p.dim() == 2)
    head = cfg.hidden_size * cfg.vocab_size
    L = cfg.num_hidden_layers
    layers = heads = 0.0
    for e in encoded:
        for ids, start in ((e.chosen, e.chosen_start), (e.rejected, e.rejected_start)):
            T, R = len(ids), len(ids) - start
            per_layer = 2 * layer_params * T + 4 * T * T * cfg.hidden_size
            if plain:
                layers += (2 + L) * L * per_layer
                heads += (2 + L) * 2 * head * T
            else:
                layers += 2 * L * per_layer + sum(L - 1 - l for l in range(L)) * per_layer
                heads += (2 + L) * 2 * head * R
    return layers, heads


def flop_bound(model, encoded, rate, head_rate=None) -> float:
    """Seconds the fast path's products take at the measured rate(s): its lower bound."""
    layers, heads = sweep_flops(model, encoded)
    return layers / rate + heads / (head_rate or rate)


def plain_loop(pair, encoded) -> None:
    """What people write first: one full forward per layer and sequence, with a hook, full logits."""
    pad = pad_id(pair.tokenizer)
    for e in encoded:
        for ids, start in ((e.chosen, e.chosen_start), (e.rejected, e.rejected_start)):
            batch = collate([(ids, start)], pad)
            with torch.no_grad(), capture(pair.tuned) as donor:
                pair.tuned(batch.input_ids).logits.log_softmax(-1)
            with torch.no_grad():
                pair.base(batch.input_ids).logits.log_softmax(-1)
                for l in range(pair.n_layers):
                    with patch(pair.base, "resid", l, donor["resid", l]):
                        pair.base(batch.input_ids).logits.log_softmax(-1)


def pick_pairs(tokenizer, n, target=100):
    prefs = load_preferences("hh-rlhf", rows=(1000, 1500))
    enc = encode_pairs(tokenizer, prefs, max_length=512)
    enc = sorted(enc, key=lambda e: abs(max(len(e.chosen), len(e.rejected)) - target))[:n]
    return enc


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--llama1b", type=int, default=0, help="also time this many pairs on a random 1B-shaped pair")
    ap.add_argument("--skip-plain", action="store_true")
    ap.add_argument("--bf16", type=int, default=0,
                    help="pairs to score in bf16 against fp32 (0: skip; useful only on CPUs or GPUs with bf16 units)")
    args = ap.parse_args()

    pair = load_pair("smollm2")
    encoded = pick_pairs(pair.tokenizer, args.pairs)
    n_seq = 2 * len(encoded)
    lengths = [len(s) for e in encoded for s in (e.chosen, e.rejected)]
    rate = matmul_rate()
    print(f"SmolLM2-135M, {len(encoded)} pairs, {n_seq} sequences of {np.mean(lengths):.0f} tokens "
          f"(min {min(lengths)}, max {max(lengths)}), {pair.n_layers} layers, site resid, fp32")
    print(f"matmul rate: fp32 {rate / 1e9:.0f} GFLOP/s, bf16 {matmul_rate(torch.bfloat16) / 1e9:.1f} GFLOP/s")
    rows = []
    bound = flop_bound(pair.base, encoded, rate)
    batch_rows = 16 * int(np.mean(lengths))
    layer_rate, head_rate = model_matmul_rates(pair.base, batch_rows, batch_rows // 2)
    own_bound = flop_bound(pair.base, encoded, layer_rate, head_rate)
    print(f"the model's own products, timed alone: decoder layer {layer_rate / 1e9:.0f} GFLOP/s at {batch_rows} rows, "
          f"unembedding {head_rate / 1e9:.0f} GFLOP/s at {batch_rows // 2} rows")
    fast = timed(lambda: patch_sweep(pair, encoded, controls=[], batch_size=16, chunk_size=len(encoded),
                                     progress=False))
    rows.append(("fast path (resume, stacked layers, batch 16, response-only unembedding)", fast))
    hooks = timed(lambda: patch_sweep(pair, encoded, controls=[], method="hooks", batch_size=16,
                                      chunk_size=len(encoded), progress=False))
    rows.append(("plain hooks, batch 16, response-only unembedding", hooks))
    if not args.skip_plain:
        rows.append(("plain hooks, batch 1, full logits", timed(lambda: plain_loop(pair, encoded))))
    rows.append(("FLOP lower bound, model's own matmul rates", own_bound))
    rows.append(("FLOP lower bound, peak matmul rate", bound))
    ratio = sum(sweep_flops(pair.base, encoded, plain=True)) / sum(sweep_flops(pair.base, encoded))
    print(f"FLOPs of the plain loop / FLOPs of the fast path: {ratio:.2f} (what an exact resume can gain "
          "over the plain loop when both run their products equally fast)")
    print(f"\n{'method':72s} {'s/sequence':>10s} {'x peak bound':>12s} {'x own bound':>11s} {'x fast':>7s}")
    for name, seconds in rows:
        print(f"{name:72s} {seconds / n_seq:10.2f} {seconds / bound:12.2f} {seconds / own_bound:11.2f} "
              f"{seconds / fast:7.2f}")

    if args.bf16:
        from alignlib import score

        sub = encoded[: args.bf16]
        t32 = timed(lambda: score(pair, sub, progress=False))
        ref = score(pair, sub, progress=False)
        for m in (pair.base, pair.tuned):
            m.to(torch.bfloat16)
        t16 = timed(lambda: score(pair, sub, progress=False))
        low = score(pair, sub, progress=False)
        for m in (pair.base, pair.tuned):
            m.to(torch.float32)
        cols = ["logp_chosen_base", "logp_rejected_base", "logp_chosen_tuned", "logp_rejected_tuned"]
        err = (low[cols] - ref[cols]).abs().to_numpy()
        gain_err = (low.reward_gain - ref.reward_gain).abs().max()
        print(f"\nbf16 vs fp32 on {len(sub)} pairs: scoring {t16 / t32:.1f}x the fp32 time; summed response "
              f"log-prob off by {err.mean():.2f} nats on average (max {err.max():.2f}); reward gain off by up to "
              f"{gain_err:.2f} nats (fp32 gains: {', '.join(f'{g:.2f}' for g in ref.reward_gain)})")

    if args.llama1b:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                          num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                          max_position_embeddings=2048, rope_theta=500000.0)
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            LlamaForCausalLM(cfg).save_pretrained(tmp)
            pair.tokenizer.save_pretrained(tmp)  # any tokenizer whose ids fit the vocabulary
            big = load_pair(tmp, tmp)
            sub = encoded[: args.llama1b]
            t = timed(lambda: patch_sweep(big, sub, controls=[], batch_size=16, progress=False))
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
            print(f"\nrandom Llama-3.2-1B-shaped pair loaded from a folder: {t / (2 * len(sub)):.1f} s per sequence "
                  f"(fast path, fp32, {len(sub)} pairs), peak RSS {peak:.1f} GB")


if __name__ == "__main__":
    main()
