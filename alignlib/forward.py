"""The packed forward and the response log-probs that every measurement and the DPO loop share.

A `PackedBatch` (`alignlib.data`) holds each preference pair as one row, prompt + chosen + rejected.
`hidden` runs a model's backbone on it with its 4-D mask and position ids; `pair_logprobs` turns
final hidden states into each pair's (chosen, rejected) summed log-probs, projecting to the
vocabulary only at the positions that predict a response token (most of a small model's cost).
A non-finite log-prob is an error that names the model and the pairs, never a silent NaN.
"""

from __future__ import annotations

import torch

from .data import REJECTED, PackedBatch
from .models import final_hidden, logits


def hidden(model, batch: PackedBatch) -> torch.Tensor:
    """Final-normed hidden states of a `PackedBatch`: its 4-D mask and position ids passed to the model."""
    impl = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"packed pairs need an attention implementation that takes a 4-D mask (sdpa or eager), "
                         f"not {impl!r}; load the model with attn_implementation='sdpa'")
    window = getattr(model.config, "sliding_window", None)
    if window and batch.input_ids.shape[1] > window:  # a 4-D mask replaces the model's sliding-window mask
        raise ValueError(f"packed rows of {batch.input_ids.shape[1]} tokens exceed the model's sliding window "
                         f"({window}); lower max_length")
    mask = batch.attention_mask(next(model.parameters()).dtype)
    return final_hidden(model, batch.input_ids, mask, batch.position_ids)


def pair_logprobs(model, final: torch.Tensor, batch: PackedBatch, *, what: str = "model") -> torch.Tensor:
    """(B, 2) float64 summed (chosen, rejected) response log-probs from final-normed hidden states."""
    picked = token_logprobs(model, final, batch, what=what)
    rows, _, cols = batch.predictors
    side = (batch.segment[rows, cols] == REJECTED).long()
    sums = torch.zeros(2 * len(batch.spans), dtype=torch.float64, device=picked.device)
    return sums.index_add_(0, 2 * rows + side, picked.double()).view(-1, 2).cpu()


def token_logprobs(model, final: torch.Tensor, batch: PackedBatch, *, what: str = "model") -> torch.Tensor:
    """The log-prob of every response token of ``batch``, in the order of `PackedBatch.predictors`."""
    rows, src, cols = batch.predictors
    scores = torch.log_softmax(logits(model, final[rows, src]).float(), dim=-1)
    picked = scores.gather(-1, batch.input_ids[rows, cols][:, None])[:, 0]
    if not torch.isfinite(picked).all():
        bad = sorted({batch.ids[r] for r in rows[~torch.isfinite(picked)].tolist()})
        raise FloatingPointError(f"{what}: non-finite log-probs on pairs {bad[:5]}; its weights or activations "
                                 "hold NaN or inf (load_pair checks the weights of the models it loads)")
    return picked


def weighted_margin(batch: PackedBatch, picked: torch.Tensor, per_token: bool = False) -> torch.Tensor:
    """Per-row margin (chosen minus rejected) from `token_logprobs`: summed, or each side's mean (differentiable)."""
    rows, _, cols = batch.predictors
    side = batch.segment[rows, cols] == REJECTED
    weight = torch.where(side, -1.0, 1.0).to(picked.dtype)
    if per_token:
        lengths = torch.tensor(batch.spans, dtype=picked.dtype, device=picked.device)[:, 1:]
        weight = weight / torch.where(side, lengths[rows, 1], lengths[rows, 0])
    return torch.zeros(len(batch.spans), dtype=picked.dtype, device=picked.device).index_add_(0, rows, weight * picked)


def logprobs(model, batch: PackedBatch, *, what: str = "model") -> torch.Tensor:
    """(B, 2) summed (chosen, rejected) log-probs of a packed batch: one forward."""
    return pair_logprobs(model, hidden(model, batch), batch, what=what)
