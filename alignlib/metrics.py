"""The alignment signal: response log-probabilities, margins, reward gains, accuracy, CIs.

``logp_M(y | p)`` is the sum over response tokens of ``log softmax(M(p + y))`` at the previous
position (the mean over response tokens is reported beside it, never mixed with it). The margin is
chosen minus rejected; the reward gain is the tuned margin minus the base margin: DPO's implicit
reward margin with the base as reference and beta = 1.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .data import (REJECTED, EncodedPair, PackedBatch, PreferencePair, collate, encode_pairs, length_batches,
                   sequences)
from .models import ModelPair, final_hidden, logits


def token_logprobs(model, final_hidden: torch.Tensor, input_ids: torch.Tensor,
                   response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence (sum, count) of response-token log-probs from final-normed hidden states.

    The vocabulary projection and log-softmax run only at the positions that predict a response
    token, which is most of the cost of a small model's forward pass.
    """
    target = response_mask[:, 1:]
    rows = target.nonzero()[:, 0]
    scores = torch.log_softmax(logits(model, final_hidden[:, :-1][target]).float(), dim=-1)
    picked = scores.gather(-1, input_ids[:, 1:][target][:, None])[:, 0]
    sums = torch.zeros(len(input_ids), dtype=torch.float64).index_add_(0, rows, picked.double())
    return sums, target.sum(1)


def packed_hidden(model, batch: PackedBatch) -> torch.Tensor:
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


def pair_logprobs(model, final_hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """(B, 2) summed (chosen, rejected) response log-probs of a `PackedBatch`, from final-normed states.

    Like `token_logprobs`, the vocabulary projection runs only at the positions that predict a
    response token.
    """
    rows, src, cols = batch.predictors()
    scores = torch.log_softmax(logits(model, final_hidden[rows, src]).float(), dim=-1)
    picked = scores.gather(-1, batch.input_ids[rows, cols][:, None])[:, 0]
    side = (batch.segment[rows, cols] == REJECTED).long()
    sums = torch.zeros(2 * len(batch.input_ids), dtype=torch.float64, device=picked.device)
    return sums.index_add_(0, 2 * rows + side, picked.double()).view(-1, 2).cpu()


@torch.inference_mode()
def sequence_logprobs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of response log-probs for each row of a padded `Batch`."""
    device = next(model.parameters()).device
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    hidden = final_hidden(model, ids, mask)
    sums, counts = token_logprobs(model, hidden, ids, batch.response_mask.to(device))
    return sums.cpu(), counts.cpu()


def score(
    pair: ModelPair,
    prefs: Sequence[PreferencePair] | Sequence[EncodedPair],
    *,
    batch_size: int = 8,
    max_length: int = 1024,
    chat_template: bool = False,
    add_eos: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per pair: response log-probs under base (and tuned), margins and reward gain.

    Columns: ``id, n_chosen, n_rejected, prompt_truncated``; for each model M in base/tuned
    ``logp_chosen_M, logp_rejected_M`` (sums), ``mean_logp_chosen_M, mean_logp_rejected_M``,
    ``margin_M`` (sum) and ``margin_M_mean``; and ``reward_gain``, ``reward_gain_mean``.
    A base-only pair gives the base columns only.
    """
    encoded = _encoded(pair, prefs, max_length=max_length, chat_template=chat_template, add_eos=add_eos)
    table = pd.DataFrame({
        "id": [e.id for e in encoded],
        "n_chosen": [len(e.chosen) - e.chosen_start for e in encoded],
        "n_rejected": [len(e.rejected) - e.rejected_start for e in encoded],
        "prompt_truncated": [e.prompt_truncated for e in encoded],
    })
    models = {"base": pair.base} if pair.tuned is None else pair.models
    for role, model in models.items():
        chosen, rejected = _score_model(model, encoded, pair.tokenizer, batch_size,
                                        desc=f"scoring {role}" if progress else None)
        table[f"logp_chosen_{role}"] = chosen
        table[f"logp_rejected_{role}"] = rejected
        table[f"mean_logp_chosen_{role}"] = chosen / table["n_chosen"]
        table[f"mean_logp_rejected_{role}"] = rejected / table["n_rejected"]
        table[f"margin_{role}"] = chosen - rejected
        table[f"margin_{role}_mean"] = table[f"mean_logp_chosen_{role}"] - table[f"mean_logp_rejected_{role}"]
    if pair.tuned is not None:
        table["reward_gain"] = table["margin_tuned"] - table["margin_base"]
        table["reward_gain_mean"] = table["margin_tuned_mean"] - table["margin_base_mean"]
    return table


def _encoded(pair, prefs, **kw) -> list[EncodedPair]:
    if len(prefs) == 0:
        raise ValueError("no preference pairs to score")
    if all(isinstance(p, EncodedPair) for p in prefs):
        return list(prefs)
    return encode_pairs(pair.tokenizer, prefs, **kw)


def _score_model(model, encoded: list[EncodedPair], tokenizer, batch_size: int, desc: str | None):
    """Sum log-probs of every chosen and rejected sequence, batched by length to limit padding."""
    seqs = sequences(encoded)
    out = np.zeros(len(seqs))
    pad = pad_id(tokenizer)
    for idx in tqdm(length_batches([len(ids) for ids, _ in seqs], batch_size), desc=desc, disable=desc is None,
                    leave=False):
        sums, _ = sequence_logprobs(model, collate([seqs[i] for i in idx], pad))
        out[idx] = sums.numpy()
    n = len(encoded)
    return out[:n], out[n:]


def pad_id(tokenizer) -> int:
    """Any valid id serves as padding: padded positions are masked and never scored."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


# --------------------------------------------------------------------------------------------
# Summaries with uncertainty


def bootstrap_ci(
    statistic: Callable[..., float], *columns: np.ndarray, n_boot: int = 2000, seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(estimate, low, high): percentile bootstrap over rows, resampling all columns together."""
    cols = [np.asarray(c, dtype=float) for c in columns]
    n = len(cols[0])
    if n == 0:
        raise ValueError("bootstrap over zero rows")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    stats = np.array([statistic(*(c[i] for c in cols)) for i in idx])
    alpha = (1 - level) / 2
    low, high = np.nanquantile(stats, [alpha, 1 - alpha])
    return float(statistic(*cols)), float(low), float(high)


def preference_accuracy(scores: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Share of pairs with a positive margin, per model and per length convention, with 95% CIs.

    Summed margins favour shorter responses (HH-RLHF's chosen responses are shorter), so the
    length-normalised (mean) margin is reported beside the summed one.
    """
    rows = []
    for role in ("base", "tuned"):
        for length, col in (("sum", f"margin_{role}"), ("mean", f"margin_{role}_mean")):
            if col in scores:
                est, lo, hi = bootstrap_ci(np.mean, scores[col].to_numpy() > 0, n_boot=n_boot, seed=seed)
                rows.append(dict(model=role, length=length, accuracy=est, ci_low=lo, ci_high=hi, n=len(scores)))
    return pd.DataFrame(rows)


def recovery(effect: np.ndarray, gain: np.ndarray, *, n_boot: int = 1000, seed: int = 0,
             level: float = 0.95) -> tuple[float, float, float]:
    """Recovered share ``mean(effect) / mean(gain)`` with a paired percentile bootstrap CI over pairs.

    A ratio of means, never a mean of per-pair ratios: pairs whose own gain is near zero would make
    per-pair ratios explode. Vectorised, since a sweep summarises hundreds of (layer, control) cells.
    """
    effect, gain = np.asarray(effect, float), np.asarray(gain, float)
    if len(effect) == 0:
        raise ValueError("recovery over zero pairs")
    idx = np.random.default_rng(seed).integers(0, len(effect), size=(n_boot, len(effect)))
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = effect[idx].mean(1) / gain[idx].mean(1)
        est = effect.mean() / gain.mean()
    alpha = (1 - level) / 2
    low, high = np.nanquantile(boot, [alpha, 1 - alpha]) if np.isfinite(boot).any() else (np.nan, np.nan)
    return float(est), float(low), float(high)
