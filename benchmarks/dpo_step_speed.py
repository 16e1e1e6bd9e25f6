"""Packed DPO tokens per second for SmolLM2 on this machine, by batch size: where a build's time goes.

    python benchmarks/dpo_step_speed.py [--pairs 48] [--train-length 40] [--response-tokens 20] [--batch-sizes 16 4 8 4]

Runs the DPO loop's own pieces (reference pass, packed forward and backward, gradient clip, fused
AdamW step) on the same HH-RLHF training pairs at each batch size, after one warm-up step, and
prints the seconds each piece took. The learning rate is tiny, so the model barely moves between
batch sizes; repeating a batch size shows the run-to-run noise. Needs HH-RLHF (hub, or $ALIGNLIB_HH_RLHF).
"""

import argparse
import time

import torch

from alignlib import load_preferences
from alignlib.data import encode_pairs, length_batches, packed_length
from alignlib.metrics import pad_id
from alignlib.models import load_gguf, smollm2_gguf
from alignlib.tuning import _pair_logprobs, dpo_loss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--train-length", type=int, default=40)
    ap.add_argument("--response-tokens", type=int, default=20)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 4, 8, 4])
    args = ap.parse_args()
    model, tok = load_gguf(smollm2_gguf())
    pairs = encode_pairs(tok, load_preferences("hh-rlhf", rows=(0, 200)), max_length=args.train_length,
                         max_response_tokens=args.response_tokens)
    pad = pad_id(tok)
    embeddings = model.get_input_embeddings()
    embeddings.sparse = model.get_output_embeddings().weight is embeddings.weight  # as make_tuned does
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-9, weight_decay=0.0, fused=True)

    def step(idx):
        logp = _pair_logprobs(model, [pairs[i] for i in idx], pad)
        loss = dpo_loss(logp[:, 0], logp[:, 1], logp[:, 0].detach(), logp[:, 1].detach(), 0.1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return time.perf_counter() - t

    step(length_batches([packed_length(p) for p in pairs], 4)[0])  # warm-up: optimizer state, allocator
    for bs in args.batch_sizes:
        # the shortest `--pairs` pairs, the same ones at every batch size
        batches = length_batches([packed_length(p) for p in pairs], bs)[:max(1, args.pairs // bs)]
        tokens = sum(packed_length(pairs[i]) for idx in batches for i in idx)
        t = time.perf_counter()
        with torch.inference_mode():
            for idx in batches:
                _pair_logprobs(model, [pairs[i] for i in idx], pad)
        reference = time.perf_counter() - t
        t = time.perf_counter()
        update = sum(step(idx) for idx in batches)
        train = time.perf_counter() - t
        print(f"batch {bs:2d}: {len(batches)} steps, {tokens} packed tokens; reference pass {reference:.1f} s, "
              f"forward+backward {train - update:.1f} s, clip+AdamW {update:.1f} s ({update / len(batches):.2f} s/step); "
              f"{tokens / (train + reference):.0f} tokens/s all-in", flush=True)


if __name__ == "__main__":
    main()
