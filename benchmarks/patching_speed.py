"""How fast is a layer sweep? Every patching method side by side, with the FLOP bound, in one run.

    pip install -r benchmarks/requirements-bench.txt          # nnsight, for the community anchor row only
    python benchmarks/patching_speed.py                       # SmolLM2 pair, 16 HH-RLHF pairs at 32/16 tokens
    python benchmarks/patching_speed.py --max-length 112 --response-tokens 48    # longer prompts
    python benchmarks/patching_speed.py --pair tiny --data builtin --pairs 4     # a quick check of the script
    python benchmarks/patching_speed.py --only "4 sites"   # only the AtP-against-exact rows
    python benchmarks/patching_speed.py --llama1b 2 --bf16 4  # + a random Llama-3.2-1B-shaped pair; bf16 vs fp32

Pairs: HH-RLHF harmless-base rows 1000-1255 (the notebooks' analysis rows; $ALIGNLIB_HH_RLHF, by default
the local copy beside the checkout), the first ``--pairs`` valid ones, encoded as the notebooks encode
them (``--max-length`` tokens per sequence, responses cut to ``--response-tokens``). Rows, all
receiver base, donor tuned, no controls:

1. plain loop: ``patch_sweep(method="hooks", batch_size=1)``, a whole forward per layer and pair;
2. nnsight: what the community writes (one trace per layer, the receiver's layer output set to the
   donor's, the response log-probs from the full logits; both sequences of a pair in one trace),
   nnsight pinned in requirements-bench.txt; the row is skipped, saying why, if it cannot run;
3. fast exact (``method="fast"``, the default);
4. response positions: fast (recomputes only from the first response token on) against the hooks
   path at batch 8, which recomputes everything; all-positions fast is row 3;
5. attribution patching (AtP) over every layer and four sites from one backward, against fast
   exact over the same cells, with the agreement of their per-pair effects.

What counts: each method runs in its own fresh process (the pair loaded, one warm-up on 2 pairs), and
its time is the shortest of up to 3 timed sweeps (repeated only while they total under 10 s). The
summary's bootstrap CIs are not timed (stubbed out): only the patching. Only ratios from one run
count: timings move 10-20% between runs. "x plain" compares time per cell (layer x site). Peak RSS
is the process's high-water mark over the timed sweeps (reset after loading and warm-up, via
/proc/self/clear_refs), and "+GB" its rise over what the loaded process already held. "max |d
effect|" checks exactness: the largest difference, in nats, from a reference exact row on the same
cells. Targets (the issue): AtP over all layers x 4 sites >= 8x faster than fast exact over the same;
response-position exact >= 1.8x faster than all-position exact.

The FLOP bound of exact patching is one forward of each model plus, for each cell, the layers after
the patched one (for ``attn``, the patched layer's MLP too; for response positions, only the response
rows, attending to the whole sequence) and the unembedding at response positions, divided by the
fp32 matmul rate measured here. "x bound" counts chosen and rejected as separate sequences, as the
issue defines it; "x packed bound" counts what the fast path computes, each pair packed into one row
with its prompt once. AtP rows are set against the bound of the exact cells they estimate. Two rates:
the peak rate (one large product) and the rate of the model's own products (each weight shape of a
decoder layer at the sweep's batch rows, and the unembedding at its response rows) timed alone.
"""

import argparse
import multiprocessing
import os
import re
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import torch

from alignlib import encode_pairs, load_pair, load_preferences, patch_sweep
from alignlib.data import packed_length, pad_id
from alignlib.models import decoder_layers, sublayer
from alignlib.patching import agreement
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()  # "Loading weights" bars, once per process

HH_RLHF = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf/harmless-base-dev.jsonl.gz"
if HH_RLHF.exists():
    os.environ.setdefault("ALIGNLIB_HH_RLHF", str(HH_RLHF))
SITES = ["resid", "block", "attn", "mlp"]
ROWS = [  # (name, kind, patch_sweep keywords, reference row for the exactness check)
    ("plain loop: hooks, batch 1", "sweep", dict(method="hooks", batch_size=1), None),
    ("nnsight loop, one trace per layer", "nnsight", {}, "plain loop: hooks, batch 1"),
    ("fast exact (default)", "sweep", {}, "plain loop: hooks, batch 1"),
    ("fast exact, response positions (reuse)", "sweep", dict(positions="response"), "hooks b8, response positions"),
    ("hooks b8, response positions", "sweep", dict(method="hooks", positions="response"), None),
    ("fast exact, 4 sites", "sweep", dict(site=SITES), None),
    ("attribution (AtP), 4 sites", "sweep", dict(method="attribution", site=SITES), None),
]


# --------------------------------------------------------------------------------------------
# Inputs and the measured methods (each runs in a fresh process)


def load_inputs(args):
    """(pair, encoded pairs, layers, what was dropped from the rows); the drop warnings are not repeated per process."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pair = load_pair(args.pair)
        prefs = load_preferences("hh-rlhf", rows=(1000, 1256)) if args.data == "hh-rlhf" else load_preferences("builtin")
    if len(prefs) < args.pairs:
        raise SystemExit(f"--pairs {args.pairs}: the data hold only {len(prefs)} valid pairs")
    encoded = encode_pairs(pair.tokenizer, prefs[: args.pairs], max_length=args.max_length,
                           max_response_tokens=args.response_tokens)
    layers = list(range(pair.n_layers)) if args.layers == "all" else [int(l) for l in args.layers.split(",")]
    return pair, encoded, sorted(layers), prefs.report


def sweep(pair, encoded, layers, **kw) -> pd.DataFrame:
    """A patch_sweep's per-pair table; its summary (bootstrap CIs, not patching) is stubbed out."""
    with mock.patch("alignlib.patching.summarize"):
        return patch_sweep(pair, encoded, layers=layers, controls=[], chunk_size=max(2, len(encoded)),
                           progress=False, **kw).pairs


def nnsight_loop(pair, encoded, layers) -> pd.DataFrame:
    """Plain nnsight activation patching: per pair (chosen and rejected right-padded into one batch),
    one trace of the donor saving every layer's output and one clean trace of the receiver, then one
    trace per layer with that layer's output set to the donor's; the margin from the full logits."""
    import nnsight

    base, tuned = nnsight.NNsight(pair.base), nnsight.NNsight(pair.tuned)
    pad, rows = pad_id(pair.tokenizer), []
    for e in encoded:
        seqs, width = (e.chosen, e.rejected), max(len(e.chosen), len(e.rejected))
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        scored = mask[:, 1:].clone()
        scored[:, : e.chosen_start - 1] = 0  # position t scores token t + 1: only response tokens count

        def margin(logits):
            logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0] * scored
            return (logp[0].sum() - logp[1].sum()).item()

        with torch.no_grad():
            with tuned.trace(ids, attention_mask=mask, use_cache=False):
                donor = nnsight.save([tuned.model.layers[l].output for l in layers])
            with base.trace(ids, attention_mask=mask, use_cache=False):
                clean = base.lm_head.output.save()
            clean = margin(clean)
            for l, value in zip(layers, donor):
                with base.trace(ids, attention_mask=mask, use_cache=False):
                    base.model.layers[l].output = value
                    logits = base.lm_head.output.save()
                rows.append(dict(id=e.id, site="resid", positions="all", layer=l, effect=margin(logits) - clean))
    return pd.DataFrame(rows)


def why(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"


def rss_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def measure(args, kind: str, kw: dict) -> dict:
    """Time one method in this (fresh) process: warm up on 2 pairs, then the shortest of up to 3 sweeps."""
    pair, encoded, layers, _ = load_inputs(args)
    if kind == "nnsight":
        try:
            import nnsight

            run = lambda enc: nnsight_loop(pair, enc, layers)  # noqa: E731
            run(encoded[:2])
        except Exception as err:  # not installed, or not working with this transformers
            version = getattr(locals().get("nnsight"), "__version__", "not installed")
            return dict(skipped=f"nnsight {version}: {why(err)}")
    else:
        run = lambda enc: sweep(pair, enc, layers, **kw)  # noqa: E731
        run(encoded[:2])
    Path("/proc/self/clear_refs").write_text("5")  # restart the RSS high-water mark here
    before, times = rss_kb("VmRSS"), []
    while not times or (len(times) < 3 and sum(times) < 10):
        start = time.perf_counter()
        table = run(encoded)
        times.append(time.perf_counter() - start)
    return dict(seconds=min(times), runs=len(times), peak=rss_kb("VmHWM") / 1e6, rise=(rss_kb("VmHWM") - before) / 1e6,
                pairs=table)


def in_fresh_process(fn, *a):
    """Run ``fn(*a)`` in a new spawned process: its own memory high-water mark, no state from other methods."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *a).result()


# --------------------------------------------------------------------------------------------
# The FLOP bound and the matmul rates


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


def sweep_flops(model, encoded, layers, sites=("resid",), positions="all", kind="separate") -> tuple[float, float]:
    """(decoder-layer FLOPs, unembedding FLOPs) of exact patching of ``sites`` x ``layers`` over ``encoded``.

    ``separate``: one clean forward of each model, then per cell the layers after the patched one (for
    ``attn`` the patched layer's MLP too), at every position or (``positions="response"``) only at the
    response rows, and the unembedding at response positions; chosen and rejected as separate
    sequences (the bound the issue defines). ``packed``: the same over packed pairs, prompt + chosen +
    rejected, which is what the fast path computes. ``plain``: a clean forward of each model and one
    whole forward per cell, with the unembedding at every position.
    """
    cfg = model.config
    first = decoder_layers(model)[0]
    params = {s: sum(p.numel() for p in sublayer(first, s).parameters() if p.dim() == 2) for s in ("attn", "mlp")}
    head, H, L = cfg.hidden_size * cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers

    def rows_through(n, S, T, attn=True, mlp=True):  # n layers at S query rows attending to T positions
        return n * (2 * S * (params["attn"] * attn + params["mlp"] * mlp) + 4 * S * T * H * attn)

    body = heads = 0.0
    for e in encoded:
        P = e.chosen_start
        R = len(e.chosen) - P + len(e.rejected) - P
        for T in [P + R] if kind == "packed" else [len(e.chosen), len(e.rejected)]:
            S = T - P if positions == "response" else T
            body += rows_through(2 * L, T, T)
            for site in sites:
                for l in layers:
                    if kind == "plain":
                        body += rows_through(L, T, T)
                    else:
                        body += rows_through(L - 1 - l, S, T) + rows_through(site == "attn", S, T, attn=False)
            if kind == "plain":
                heads += (2 + len(sites) * len(layers)) * 2 * head * T
        if kind != "plain":
            heads += (2 + len(sites) * len(layers)) * 2 * head * R
    return body, heads


def flop_bound(model, encoded, layers, sites, positions, rate, head_rate=None, kind="separate") -> float:
    """Seconds exact patching's products take at the measured rate(s): its lower bound."""
    body, heads = sweep_flops(model, encoded, layers, sites, positions, kind)
    return body / rate + heads / (head_rate or rate)


# --------------------------------------------------------------------------------------------
# Extras: bf16 against fp32, a random Llama-3.2-1B-shaped pair


def timed(fn, result: bool = False):
    t = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - t
    return (seconds, value) if result else seconds


def bf16_agreement(args) -> None:
    """Score and sweep (every fifth layer and the last, resid) in bf16 and fp32; compare recoveries with fp32's CIs."""
    import copy

    from alignlib import ModelPair, score

    pair, encoded, *_ = load_inputs(args)
    encoded = encoded[: args.bf16]
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
    print(f"bf16 sweep ({len(layers)} layers, resid): {t16 / t32:.1f}x the fp32 time; per-layer recovery, fp32 "
          "[95% CI] against bf16:")
    for l in layers:
        print(f"  layer {l:2d}: {s32.recovery[l]:6.2f} [{s32.ci_low[l]:6.2f}, {s32.ci_high[l]:6.2f}]  bf16 "
              f"{s16.recovery[l]:6.2f}  |diff| {diff[l]:.2f}")
    print(f"largest |recovery difference| {diff.max():.2f} at layer {diff.idxmax()}; fp32 CI width there "
          f"{width[diff.idxmax()]:.2f}, median {width.median():.2f}; bf16 inside every fp32 CI: "
          f"{bool(((s16.recovery >= s32.ci_low) & (s16.recovery <= s32.ci_high)).all())}", flush=True)


def llama1b(args) -> None:
    """The fast path on a random Llama-3.2-1B-shaped pair loaded from a folder (both sides the same weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    pair, encoded, *_ = load_inputs(args)
    cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                      max_position_embeddings=2048, rope_theta=500000.0)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(tmp)
        pair.tokenizer.save_pretrained(tmp)  # any tokenizer whose ids fit the vocabulary
        big = load_pair(tmp, tmp)
    sub = encoded[: args.llama1b]
    t = timed(lambda: sweep(big, sub, None))
    print(f"\nrandom Llama-3.2-1B-shaped pair loaded from a folder: {t / len(sub):.1f} s per pair, "
          f"{t / (2 * len(sub)):.1f} s per sequence (fast path, resid, fp32, {len(sub)} pairs, cold), "
          f"peak RSS {rss_kb('VmHWM') / 1e6:.1f} GB", flush=True)


# --------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--layers", default="all", help="comma-separated decoder layers (default all)")
    ap.add_argument("--max-length", type=int, default=32, help="tokens per sequence (the notebooks: 32)")
    ap.add_argument("--response-tokens", type=int, default=16, help="responses cut to this many tokens (16)")
    ap.add_argument("--pair", default="smollm2", help="a built-in pair (smollm2, tiny, ...)")
    ap.add_argument("--data", default="hh-rlhf", choices=["hh-rlhf", "builtin"])
    ap.add_argument("--llama1b", type=int, default=0, help="also time this many pairs on a random 1B-shaped pair")
    ap.add_argument("--bf16", type=int, default=0,
                    help="pairs to score and sweep in bf16 against fp32 (0: skip; slow on CPUs without bf16 units)")
    ap.add_argument("--only", default="", help="run only the rows whose name contains one of these comma-separated "
                                               "words (e.g. '4 sites' for the AtP comparison)")
    args = ap.parse_args()

    pair, encoded, layers, dropped = load_inputs(args)
    n = len(encoded)
    lengths = [len(s) for e in encoded for s in (e.chosen, e.rejected)]
    prompts = [e.chosen_start for e in encoded]
    batch_rows = min(8, n) * int(np.mean([packed_length(e) for e in encoded]))
    print(f"{pair.name}: {n} pairs ({args.data}), sequences of {np.mean(lengths):.0f} tokens (min {min(lengths)}, "
          f"max {max(lengths)}; --max-length {args.max_length}, --response-tokens {args.response_tokens}), prompts of "
          f"{np.mean(prompts):.0f}, packed rows of {np.mean([packed_length(e) for e in encoded]):.0f}; "
          f"{len(layers)} of {pair.n_layers} layers; fp32; torch threads {torch.get_num_threads()}; rows: "
          f"{dropped}", flush=True)

    def rates():
        return (matmul_rate(), *model_matmul_rates(pair.base, batch_rows, max(1, batch_rows // 3)))

    before = rates()
    results = {}
    for name, kind, kw, _ in ROWS:
        if args.only and not any(word in name for word in args.only.split(",")):
            results[name] = r = dict(skipped="not asked for (--only)")
        else:
            try:
                results[name] = r = in_fresh_process(measure, args, kind, kw)
            except Exception as err:  # a method that fails is reported, not the end of the run
                results[name] = r = dict(skipped=f"failed: {why(err)}")
        print(f"  {name}: " + (r["skipped"] if "skipped" in r else f"{r['seconds']:.2f} s (best of {r['runs']})"),
              flush=True)
    rate, layer_rate, head_rate = np.maximum(before, rates())  # the fastest seen, before or after: tightest bound
    print(f"fp32 matmul rates, the best of before and after the timings: peak {rate / 1e9:.0f} GFLOP/s; the model's "
          f"own products timed alone, decoder layer {layer_rate / 1e9:.0f} GFLOP/s at {batch_rows} rows, "
          f"unembedding {head_rate / 1e9:.0f} GFLOP/s at {max(1, batch_rows // 3)} rows")
    flops = {k: sum(sweep_flops(pair.base, encoded, layers, kind=k)) for k in ("plain", "separate", "packed")}
    print(f"FLOPs of the plain loop / FLOPs of a resumed sweep: {flops['plain'] / flops['separate']:.2f} over separate "
          f"sequences, {flops['plain'] / flops['packed']:.2f} over packed pairs (what resuming can gain over the "
          "plain loop when both run their products equally fast)")

    plain = results[ROWS[0][0]]
    table = []
    for name, kind, kw, ref in ROWS:
        r = results[name]
        sites = kw.get("site", ["resid"])
        sites = [sites] if isinstance(sites, str) else sites
        positions = kw.get("positions", "all")
        cells = len(sites) * len(layers)
        row = dict(method=name, cells=f"{len(layers)} x {len(sites)}, {positions}")
        if "skipped" in r:
            table.append(row)
            continue
        bound = {k: flop_bound(pair.base, encoded, layers, sites, positions, *rs, kind=k) for k, rs in
                 (("peak", (rate,)), ("separate", (layer_rate, head_rate)), ("packed", (layer_rate, head_rate)))}
        s = r["seconds"]
        diff = np.nan
        if ref is not None and "pairs" in results[ref]:
            both = r["pairs"].merge(results[ref]["pairs"], on=["id", "site", "positions", "layer"])
            diff = (both.effect_x - both.effect_y).abs().max()
        row.update({"s/pair": s / n, "s/seq": s / (2 * n), "x plain": s / cells / (plain.get("seconds", np.nan) / len(layers)),
                    "x bound": s / bound["peak"], "x own-rate bound": s / bound["separate"],
                    "x packed bound": s / bound["packed"], "peak RSS GB": r["peak"], "+MB": 1e3 * r["rise"],
                    "max |d effect|": diff})
        table.append(row)
    table = pd.DataFrame(table).set_index("method")
    fmt = {c: (lambda v: f"{v:.3g}") for c in table.columns[1:]}
    fmt.update({"peak RSS GB": "{:.2f}".format, "+MB": "{:.0f}".format, "max |d effect|": "{:.1e}".format})
    print("\n" + table.to_string(formatters=fmt, na_rep="-"))
    skipped = [f"{name}: {results[name]['skipped']}" for name, *_ in ROWS if "skipped" in results[name]]
    if skipped:
        print("skipped: " + "; ".join(skipped))
    wrong = table["max |d effect|"][table["max |d effect|"] > 1e-3]
    for name, d in wrong.items():
        print(f"NOT EXACT: {name} differs from {dict((r[0], r[3]) for r in ROWS)[name]} by up to {d:.3g} nats")

    sec = {name: r.get("seconds", np.nan) for name, r in results.items()}
    atp = sec["fast exact, 4 sites"] / sec["attribution (AtP), 4 sites"]
    response = sec["fast exact (default)"] / sec["fast exact, response positions (reuse)"]
    reuse = sec["hooks b8, response positions"] / sec["fast exact, response positions (reuse)"]
    print(f"\ntarget: AtP over {len(layers)} layers x 4 sites from one backward >= 8x faster than fast exact over the "
          f"same: {atp:.1f}x ({'met' if atp >= 8 else 'NOT met'})")
    ceiling = (sum(sweep_flops(pair.base, encoded, layers, kind="packed"))
               / sum(sweep_flops(pair.base, encoded, layers, positions="response", kind="packed")))
    print(f"target: response-position exact >= 1.8x faster than all-position exact: {response:.2f}x "
          f"({'met' if response >= 1.8 else 'NOT met'}; the FLOP ratio of the two on packed pairs, its ceiling "
          f"when both run their products equally fast: {ceiling:.2f}x); against the hooks path at batch 8 on "
          f"response positions (no reuse): {reuse:.2f}x")
    screen, exact = (results[k].get("pairs") for k in ("attribution (AtP), 4 sites", "fast exact, 4 sites"))
    agree = agreement(screen, exact) if screen is not None and exact is not None else pd.DataFrame()
    print("\nAtP against exact (correlation of per-pair effects across pairs and layers; per_layer: median over "
          "layers of the correlation across pairs; top_overlap: of the exact top-3 layers by mean effect):\n"
          + agree.to_string(index=False, float_format=lambda v: f"{v:.3f}"), flush=True)

    if args.bf16:
        in_fresh_process(bf16_agreement, args)
    if args.llama1b:
        in_fresh_process(llama1b, args)


if __name__ == "__main__":
    main()
