"""Make a preference-tuned counterpart of a base model by DPO, and cache it.

Nobody publishes a preference-tuned SmolLM2-135M-Instruct and no hub is reachable offline, so the
embedded default pair's tuned side is made here, the way the field makes one: full fine-tuning
(not LoRA: a low-rank adapter would build low rank into the very thing the low-rank analysis
measures) with the DPO loss, the base as the frozen reference model.

The embedded pair is trained on Anthropic HH-RLHF harmless-base **test** rows 0-999 (see
`alignlib.builtin`) and every analysis uses rows from 1000 on, never the training rows. The test
split is used because the train split is not available offline here (the project's local copy
holds test rows only); hub users get the very same rows.

Why a small DPO loop of our own rather than TRL's DPOTrainer: on a 2-core CPU every FLOP counts,
and the loop must reuse exactly the tokenisation and response masks that `score` measures, so that
the implicit reward DPO raises is the reward gain the notebooks localise. The loop precomputes
reference log-probs once, runs each pair as one packed row (prompt, chosen, rejected: the shared
prompt is computed once, as in `alignlib.patching`), batches pairs of similar length together,
projects to the vocabulary only at response positions and steps a fused AdamW; the loss is tested
against a hand-worked example.

Cost, measured on the project's 2-core CPU (fp32 matmuls at ~85-150 GFLOP/s depending on the day,
no native bf16): a forward and backward pass over one token of SmolLM2-135M costs ~1 GFLOP with the
reference pass, matmuls are three quarters of the time, and build time is proportional to the
packed tokens at a given batch size, at a speed that varies by up to a third from day to day.
Batches of 8 pairs run ~25% faster per token than batches of 4: larger matmuls, and half as many
optimizer steps over 135M parameters (~0.25 s each). One epoch over rows 0-999 holds ~44,000 packed
tokens at 32 tokens per sequence (the embedded recipe, batch 8: 9.2 minutes as measured), ~55,000
at 40 and ~108,000 at 96 (``smollm2-long``, batch 4: 21 minutes as measured, on a faster day). A
tied embedding's gradient is taken sparse: the same gradient, without a zero-fill the size of the
vocabulary at every step.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import time
import warnings
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .cache import atomic_dir, cache_dir
from .data import encode_pairs, length_batches, pack_pairs, packed_length
from .metrics import packed_hidden, pad_id, pair_logprobs
from .hooks import check_layer
from .models import decoder_layers
from .runs import versions


@dataclass(frozen=True)
class DPOConfig:
    """Everything that determines a tuned model; a change to any field rebuilds the cache."""

    beta: float = 0.1
    lr: float = 5e-5
    epochs: int = 1
    batch_size: int = 8
    max_length: int = 160  # tokens per sequence; the prompt is cut from the left to fit
    max_response_tokens: int = 96  # responses cut to their first N tokens for training only
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    bf16_autocast: bool = False  # faster only on CPUs with native bf16 matmuls; 70x slower without
    seed: int = 0


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> torch.Tensor:
    """Per-pair DPO loss: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin)


def make_tuned(base, tokenizer, prefs, config: DPOConfig = DPOConfig(), *, layers=None, progress: bool = True):
    """Return (tuned model, training log) from DPO on ``prefs`` starting at, and referenced to, ``base``.

    ``layers``: decoder layers to train, every other weight frozen (None: full fine-tuning, the
    default; a subset plants a change whose location is known, see `alignlib.validation`).
    ``base`` itself is not modified. The log has one row per step: loss, mean implicit reward
    margin (beta-scaled) and the share of pairs in the batch whose margin is positive.
    """
    torch.manual_seed(config.seed)
    encoded = encode_pairs(tokenizer, prefs, max_length=config.max_length,
                           max_response_tokens=config.max_response_tokens)
    pad = pad_id(tokenizer)
    batches = length_batches([packed_length(e) for e in encoded], config.batch_size)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16_autocast)

    reference = {}
    base.eval()
    with torch.inference_mode(), autocast:
        for idx in tqdm(batches, desc="reference log-probs", disable=not progress, leave=False):
            reference.update(zip(idx, _pair_logprobs(base, [encoded[i] for i in idx], pad).tolist()))

    policy = copy.deepcopy(base)
    if layers is None:
        policy.requires_grad_(True)
    else:
        policy.requires_grad_(False)
        blocks = decoder_layers(policy)
        for l in layers:
            blocks[check_layer(policy, l)].requires_grad_(True)
    policy.train()
    embeddings, output = policy.get_input_embeddings(), policy.get_output_embeddings()
    # Tied embeddings: taking the lookup's gradient sparse gives the same gradient (the output projection's
    # dense one absorbs it) without a vocabulary-sized zero-fill per step. Untied, it would reach the optimizer.
    embeddings.sparse = output is not None and output.weight is embeddings.weight
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0, fused=True)
    total = config.epochs * len(batches)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, config.warmup_steps)) * max(0.0, 1 - s / total))
    rng = random.Random(config.seed)
    log = []
    bar = tqdm(total=total, desc="DPO", disable=not progress)
    start = time.perf_counter()
    for epoch in range(config.epochs):
        order = list(range(len(batches)))
        rng.shuffle(order)
        for b in order:
            idx = batches[b]
            with autocast:
                logp = _pair_logprobs(policy, [encoded[i] for i in idx], pad)
            ref = torch.tensor([reference[i] for i in idx], dtype=logp.dtype)
            losses = dpo_loss(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], config.beta)
            loss = losses.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                margin = config.beta * ((logp[:, 0] - ref[:, 0]) - (logp[:, 1] - ref[:, 1]))
            log.append(dict(step=len(log), epoch=epoch, loss=loss.item(), reward_margin=margin.mean().item(),
                            reward_accuracy=(margin > 0).float().mean().item(), seconds=time.perf_counter() - start))
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    embeddings.sparse = False
    policy.eval()
    policy.requires_grad_(False)
    return policy, pd.DataFrame(log)


def _pair_logprobs(model, pairs, pad) -> torch.Tensor:
    """(n, 2) summed response log-probs of (chosen, rejected), each pair one packed row (shared prompt)."""
    batch = pack_pairs(pairs, pad).to(next(model.parameters()).device)
    return pair_logprobs(model, packed_hidden(model, batch), batch)


# --------------------------------------------------------------------------------------------
# Cache


def cached_model(name: str, config: dict, build, *, progress: bool = True):
    """Load model ``name`` from the cache if it was built with ``config``; else ``build()`` and save it.

    ``build()`` returns (model, tokenizer, log DataFrame or None). A cache entry with another config
    is rebuilt; an unreadable one is reported and rebuilt, never trusted.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_dir() / "tuned" / name
    record = json.loads(json.dumps(config, default=str))
    if (folder / "alignlib.json").is_file():
        try:
            saved = json.loads((folder / "alignlib.json").read_text())
            if saved.get("config") == record:
                model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
                return model.eval(), AutoTokenizer.from_pretrained(str(folder))
            reason = "its config changed"
        except Exception as err:  # a corrupt or partial entry: say so and rebuild
            reason = f"it is unreadable ({type(err).__name__}: {str(err)[:200]})"
        warnings.warn(f"rebuilding cached model {name!r} at {folder}: {reason}", stacklevel=2)
    if progress:
        print(f"building {name!r} (cached at {folder}); this happens once", flush=True)
    start = time.perf_counter()
    model, tokenizer, log = build()
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if log is not None:
            log.to_csv(tmp / "training_log.csv", index=False)
        meta = dict(config=record, versions=versions(), build_seconds=round(time.perf_counter() - start, 1))
        (tmp / "alignlib.json").write_text(json.dumps(meta, indent=2))
    return model.eval(), tokenizer


def cache_record(name: str) -> dict | None:
    """The record saved with cached model ``name`` (config, package versions, build seconds), or None."""
    path = cache_dir() / "tuned" / name / "alignlib.json"
    return json.loads(path.read_text()) if path.is_file() else None


#: How the loop runs; part of every cache record, so that models built by an older loop are rebuilt.
LOOP = "packed pairs, fused AdamW"


def config_record(config: DPOConfig, **extra) -> dict:
    return {**dataclasses.asdict(config), "loop": LOOP, **extra}
