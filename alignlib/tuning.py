"""Make a preference-tuned counterpart of a base model by DPO.

Nobody publishes a preference-tuned SmolLM2-135M-Instruct and no hub is reachable offline, so the
embedded default pair's tuned side is made here, the way the field makes one: full fine-tuning
(not LoRA: a low-rank adapter would build low rank into the very thing the low-rank analysis
measures) with the DPO loss, the base as the frozen reference model. ``layers=`` trains only some
decoder layers, which plants a change whose location is known (`alignlib.validation`).

Why a small loop of our own rather than TRL's DPOTrainer: on a 2-core CPU every FLOP counts, and
the loop must reuse exactly the tokenisation and log-probs that `score` measures, so that the
implicit reward DPO raises is the reward gain the notebooks localise. It precomputes reference
log-probs once, runs each pair as one packed row (`alignlib.forward`), batches pairs of similar
length, projects to the vocabulary only at response positions, takes a tied embedding's gradient
sparse (the same gradient without a vocabulary-sized fill per step) and steps a fused AdamW. Its
loss equals TRL's on the same batch (tests/test_trl_parity.py).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from safetensors.torch import load_file, load_model, save_file, save_model
from transformers import get_linear_schedule_with_warmup

from .data import encode_pairs, length_batches, pack_pairs, packed_length, pad_id
from .forward import logprobs
from .hooks import check_layer
from .models import decoder_layers
from .store import atomic_dir


@dataclass(frozen=True)
class DPORecipe:
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


def make_tuned(base, tokenizer, prefs, recipe: DPORecipe = DPORecipe(), *, layers=None,
               checkpoints: "Checkpoints | None" = None, progress: bool = True):
    """Return (tuned model, training log) from DPO on ``prefs`` starting at, and referenced to, ``base``.

    ``layers``: decoder layers to train, every other weight frozen (None: full fine-tuning, the
    default; a subset plants a change whose location is known, see `alignlib.validation`).
    ``checkpoints``: where to keep the policy at chosen steps; a run interrupted after one resumes
    from the latest and ends exactly as an uninterrupted run. ``base`` itself is not modified. The
    log has one row per step: loss, mean implicit reward margin (beta-scaled) and the share of pairs
    in the batch whose margin is positive.
    """
    torch.manual_seed(recipe.seed)
    encoded = encode_pairs(tokenizer, prefs, max_length=recipe.max_length,
                           max_response_tokens=recipe.max_response_tokens)
    pad = pad_id(tokenizer)
    batches = length_batches([packed_length(e) for e in encoded], recipe.batch_size)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16_autocast)

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
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0, fused=True)
    total = recipe.epochs * len(batches)
    schedule = get_linear_schedule_with_warmup(optimizer, recipe.warmup_steps, total)
    done, log = checkpoints.resume(policy, optimizer, schedule) if checkpoints else (0, [])
    rng = random.Random(recipe.seed)
    bar = tqdm(total=total, initial=done, desc="DPO", disable=not progress)
    start = time.perf_counter() - (log[-1]["seconds"] if log else 0.0)
    for epoch in range(recipe.epochs):
        order = list(range(len(batches)))
        rng.shuffle(order)
        for i, b in enumerate(order):
            if epoch * len(batches) + i < done:  # finished before the checkpoint this run resumed from
                continue
            idx = batches[b]
            with autocast:
                logp = _pair_logprobs(policy, [encoded[i] for i in idx], pad)
            ref = torch.tensor([reference[i] for i in idx], dtype=logp.dtype)
            losses = dpo_loss(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], recipe.beta)
            loss = losses.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                margin = recipe.beta * ((logp[:, 0] - ref[:, 0]) - (logp[:, 1] - ref[:, 1]))
            log.append(dict(step=len(log), epoch=epoch, loss=loss.item(), reward_margin=margin.mean().item(),
                            reward_accuracy=(margin > 0).float().mean().item(), seconds=time.perf_counter() - start))
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if checkpoints and len(log) in checkpoints.steps:
                checkpoints.save(len(log), policy, optimizer, schedule, log)
    bar.close()
    embeddings.sparse = False
    policy.eval()
    policy.requires_grad_(False)
    return policy, pd.DataFrame(log)


@dataclass(frozen=True)
class Checkpoints:
    """Where a DPO run keeps its policy after chosen numbers of updates (``steps``).

    Weights, optimizer state and the log so far are written atomically as safetensors and JSON
    (nothing that runs code when read). Only the latest checkpoint keeps its optimizer state.
    """

    folder: Path
    steps: tuple = ()

    def path(self, step: int) -> Path:
        return Path(self.folder) / f"step-{step:06d}"

    def done(self) -> list[int]:
        return sorted(s for s in self.steps if (self.path(s) / "state.json").is_file())

    def load(self, step: int, model):
        """``model`` with the policy's weights after ``step`` updates."""
        load_model(model, self.path(step) / "model.safetensors")
        return model

    def save(self, step: int, policy, optimizer, schedule, log: list) -> None:
        with atomic_dir(self.path(step)) as tmp:
            save_model(policy, tmp / "model.safetensors")
            state = optimizer.state_dict()["state"]
            save_file({f"{i}.{k}": v.detach().clone() for i, st in state.items() for k, v in st.items()},
                      tmp / "optimizer.safetensors")
            (tmp / "state.json").write_text(json.dumps(dict(schedule=schedule.state_dict(), log=log), default=str))
        for earlier in self.done():
            if earlier < step:
                (self.path(earlier) / "optimizer.safetensors").unlink(missing_ok=True)

    def resume(self, policy, optimizer, schedule) -> tuple[int, list]:
        """(updates done, log so far) after restoring the latest checkpoint that can resume; (0, []) if none."""
        usable = [s for s in self.done() if (self.path(s) / "optimizer.safetensors").is_file()]
        if not usable:
            return 0, []
        step = usable[-1]
        self.load(step, policy)
        saved, tensors = json.loads((self.path(step) / "state.json").read_text()), load_file(
            self.path(step) / "optimizer.safetensors")
        state = {}
        for key, value in tensors.items():
            i, name = key.split(".", 1)
            state.setdefault(int(i), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
        schedule.load_state_dict(saved["schedule"])
        for group, lr in zip(optimizer.param_groups, schedule.get_last_lr()):  # the lr the next step uses
            group["lr"] = lr
        return step, saved["log"]


def _pair_logprobs(model, pairs, pad) -> torch.Tensor:
    """(n, 2) summed response log-probs of (chosen, rejected), each pair one packed row (shared prompt)."""
    return logprobs(model, pack_pairs(pairs, pad).to(next(model.parameters()).device), what="DPO policy")


#: How the loop runs; part of every built model's record, beside the code digest.
LOOP = "packed pairs, fused AdamW, linear warmup schedule"


def recipe_record(recipe: DPORecipe, **extra) -> dict:
    return {**dataclasses.asdict(recipe), "loop": LOOP, **extra}
