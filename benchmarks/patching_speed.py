"""How fast is a layer sweep? The plain hook loop, the fast path and the FLOP lower bound, in one run.

    python benchmarks/patching_speed.py                 # SmolLM2, 16 pairs of ~100 tokens, resid
    python benchmarks/patching_speed.py --llama1b 2     # + a random Llama-3.2-1B-shaped pair, 2 pairs

Only ratios from one run count: timings move 10-20% between runs. The FLOP bound is one forward
of each model plus, for each layer, the layers after it (and the unembedding at response
positions), divided by the fp32 matmul rate measured here; it counts chosen and rejected as
separate sequences, as the issue defines it. The packed bound counts what the fast path computes:
each pair packed into one row, its shared prompt once. Two rates are measured: the peak rate (one
large square-ish product) and the rate of the model's own products (each weight shape of a decoder
layer at the sweep's batch rows, and the unembedding at its response rows) timed alone; the second
is what these products cost even with no other work around them.
"""

import argparse
import resource
import tempfile
import time

import numpy as np
import torch

from alignlib import encode_pairs, load_pair, load_preferences
from alignlib.data import collate, packed_length
from alignlib.hooks import capture, patch
from alignlib.metrics import pad_id
from alignlib.models import decoder_layers
from alignlib.patching import patch_sweep


def fastest(fn, repeats: int = 5) -> float:
    """The shortest of several timed calls (after one warm-up): a rate for a bound is the best seen."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_rate(dtype=torch.float32, n=2048, d=576, f=1536) -> float:
    a, b = torch.randn(n, d, dtype=dtype), torch.randn(d, f, dtype=dtype)
    return 2 * n * d * f / fastest(lambda: a @ b, 5 if dtype == torch.float32 else 1)


def model_matmul_rates(model, rows: int, response_rows: int) -> tuple[float, float]:
    """(decoder layer, unembedding) FLOP rates of the model's own weight shapes, each timed alone."""
    def rate(shapes, m):
        x = {k: torch.randn(m, k) for k, _ in shapes}
        ws = [torch.randn(n, k) for k, n in shapes]
        seconds = fastest(lambda: [torch.nn.functional.linear(x[w.shape[1]], w) for w in ws])
        return sum(2 * m * k * n for k, n in shapes) / seconds

    layer = [(p.shape[1], p.shape[0]) for p in decoder_layers(model)[0].parameters() if p.dim() == 2]
    head = model.get_output_embeddings().weight
    return rate(layer, rows), rate([(head.shape[1], head.shape[0])], response_rows)


def sweep_flops(model, encoded, kind: str = "fast") -> tuple[float, float]:
    """(decoder-layer FLOPs, unembedding FLOPs) of a full-layer resid sweep over ``encoded``.

    ``fast``: one clean forward of each model, then for each layer the layers after it, with the
    unembedding at response positions, chosen and rejected as separate sequences (the bound the
    issue defines). ``packed``: the same over packed pairs, prompt + chosen + rejected, which is
    what the fast path computes. ``plain``: a clean forward of each model and one whole forward
    per layer, with the unembedding at every position.
    """
    cfg = model.config
    layer_params = sum(p.numel() for p in decoder_layers(model)[0].parameters() if p.dim() == 2)
    head = cfg.hidden_size * cfg.vocab_size
    L = cfg.num_hidden_layers
    layers = heads = 0.0
    for e in encoded:
        P = e.chosen_start
        R = len(e.chosen) - P + len(e.rejected) - P
        rows = [P + R] if kind == "packed" else [len(e.chosen), len(e.rejected)]
        for T in rows:
            per_layer = 2 * layer_params * T + 4 * T * T * cfg.hidden_size
            if kind == "plain":
                layers += (2 + L) * L * per_layer
                heads += (2 + L) * 2 * head * T
            else:
                layers += 2 * L * per_layer + sum(L - 1 - l for l in range(L)) * per_layer
        if kind != "plain":
            heads += (2 + L) * 2 * head * R
    return layers, heads


def flop_bound(model, encoded, rate, head_rate=None, kind="fast") -> float:
    """Seconds the fast path's products take at the measured rate(s): its lower bound."""
    layers, heads = sweep_flops(model, encoded, kind)
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


def timed(fn, result: bool = False):
    t = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - t
    return (seconds, value) if result else seconds


def bf16_agreement(pair, encoded) -> None:
    """Score and sweep (every fifth layer and the last, resid) in bf16 and fp32; compare recoveries with fp32's CIs."""
    import copy

    from alignlib import ModelPair, score

    low = ModelPair(copy.deepcopy(pair.base).to(torch.bfloat16), copy.deepcopy(pair.tuned).to(torch.bfloat16),
                    pair.tokenizer, pair.name + "-bf16")
    t32, ref = timed(lambda: score(pair, encoded, progress=False), result=True)
    t16, got = timed(lambda: score(low, encoded, progress=False), result=True)
    cols = ["logp_chosen_base", "logp_rejected_base", "logp_chosen_tuned", "logp_rejected_tuned"]
    err = (got[cols] - ref[cols]).abs().to_numpy()
    print(f"\nbf16 vs fp32 on {len(encoded)} pairs: scoring {t16 / t32:.1f}x the fp32 time; summed response "
          f"log-prob off by {err.mean():.2f} nats on average (max {err.max():.2f}); reward gain off by up to "
          f"{(got.reward_gain - ref.reward_gain).abs().max():.2f} nats (fp32 gains: "
          f"{', '.join(f'{g:.2f}' for g in ref.reward_gain)})")
    layers = sorted(set(range(0, pair.n_layers, 5)) | {pair.n_layers - 1})
    kw = dict(layers=layers, controls=[], chunk_size=len(encoded), progress=False)
    t32, s32 = timed(lambda: patch_sweep(pair, encoded, **kw).summary.set_index("layer"), result=True)
    t16, s16 = timed(lambda: patch_sweep(low, encoded, **kw).summary.set_index("layer"), result=True)
    diff = (s16.recovery - s32.recovery).abs()
    width = s32.ci_high - s32.ci_low
    print(f"bf16 sweep ({len(layers)} layers, resid): {t16 / t32:.1f}x the fp32 time; per-layer recovery, fp32 [95% CI] "
          "against bf16:")
    for l in layers:
        print(f"  layer {l:2d}: {s32.recovery[l]:6.2f} [{s32.ci_low[l]:6.2f}, {s32.ci_high[l]:6.2f}]  bf16 "
              f"{s16.recovery[l]:6.2f}  |diff| {diff[l]:.2f}")
    print(f"largest |recovery difference| {diff.max():.2f} at layer {diff.idxmax()}; fp32 CI width there "
          f"{width[diff.idxmax()]:.2f}, median {width.median():.2f}; bf16 inside every fp32 CI: "
          f"{bool(((s16.recovery >= s32.ci_low) & (s16.recovery <= s32.ci_high)).all())}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--llama1b", type=int, default=0, help="also time this many pairs on a random 1B-shaped pair")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per batch (two per packed pair)")
    ap.add_argument("--skip-plain", action="store_true")
    ap.add_argument("--bf16", type=int, default=0,
                    help="pairs to score and sweep in bf16 against fp32 (0: skip; slow on CPUs without bf16 units)")
    args = ap.parse_args()

    pair = load_pair("smollm2")
    encoded = pick_pairs(pair.tokenizer, args.pairs)
    n_seq = 2 * len(encoded)
    lengths = [len(s) for e in encoded for s in (e.chosen, e.rejected)]
    batch_rows = args.batch_size // 2 * int(np.mean([packed_length(e) for e in encoded]))

    def rates():
        return (matmul_rate(), *model_matmul_rates(pair.base, batch_rows, batch_rows // 3))

    print(f"SmolLM2-135M, {len(encoded)} pairs, {n_seq} sequences of {np.mean(lengths):.0f} tokens "
          f"(min {min(lengths)}, max {max(lengths)}), {pair.n_layers} layers, site resid, fp32")
    before = rates()
    rows = []
    kw = dict(controls=[], batch_size=args.batch_size, chunk_size=len(encoded), progress=False)
    fast = timed(lambda: patch_sweep(pair, encoded, **kw))
    rows.append((f"fast path (packed pairs, resume, stacked layers, batch {args.batch_size})", fast))
    rows.append((f"plain hooks (packed pairs, batch {args.batch_size})",
                 timed(lambda: patch_sweep(pair, encoded, method="hooks", **kw))))
    if not args.skip_plain:
        rows.append(("plain hooks, batch 1, full logits", timed(lambda: plain_loop(pair, encoded))))
    rate, layer_rate, head_rate = np.maximum(before, rates())  # the fastest seen, before or after: tightest bound
    print(f"fp32 matmul rates, the best of before and after the timings: peak {rate / 1e9:.0f} GFLOP/s; the model's "
          f"own products timed alone, decoder layer {layer_rate / 1e9:.0f} GFLOP/s at {batch_rows} rows, "
          f"unembedding {head_rate / 1e9:.0f} GFLOP/s at {batch_rows // 3} rows; "
          f"bf16 {matmul_rate(torch.bfloat16) / 1e9:.1f} GFLOP/s")
    bound = flop_bound(pair.base, encoded, rate)
    own_bound = flop_bound(pair.base, encoded, layer_rate, head_rate)
    packed_bound = flop_bound(pair.base, encoded, layer_rate, head_rate, kind="packed")
    rows.append(("FLOP bound, packed pairs, model's own matmul rates", packed_bound))
    rows.append(("FLOP bound, separate sequences, model's own matmul rates", own_bound))
    rows.append(("FLOP bound, separate sequences, peak matmul rate", bound))
    flops = {k: sum(sweep_flops(pair.base, encoded, k)) for k in ("plain", "fast", "packed")}
    print(f"FLOPs of the plain loop / FLOPs of a resumed sweep: {flops['plain'] / flops['fast']:.2f} over separate "
          f"sequences, {flops['plain'] / flops['packed']:.2f} over packed pairs (what resuming can gain over the "
          "plain loop when both run their products equally fast)")
    print(f"\n{'method':64s} {'s/sequence':>10s} {'x peak bound':>12s} {'x own bound':>11s} {'x packed bound':>14s} "
          f"{'x fast':>7s}")
    for name, seconds in rows:
        print(f"{name:64s} {seconds / n_seq:10.2f} {seconds / bound:12.2f} {seconds / own_bound:11.2f} "
              f"{seconds / packed_bound:14.2f} {seconds / fast:7.2f}")

    if args.bf16:
        bf16_agreement(pair, encoded[: args.bf16])

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
            t = timed(lambda: patch_sweep(big, sub, controls=[], batch_size=args.batch_size, progress=False))
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
            print(f"\nrandom Llama-3.2-1B-shaped pair loaded from a folder: {t / (2 * len(sub)):.1f} s per sequence "
                  f"(fast path, fp32, {len(sub)} pairs), peak RSS {peak:.1f} GB")


if __name__ == "__main__":
    main()
