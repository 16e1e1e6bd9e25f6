"""The alignment signal: response log-probabilities, margins, reward gains and preference accuracy.

``logp_M(y | p)`` is the sum over response tokens of ``log softmax(M(p + y))`` at the previous
position (the mean over response tokens is reported beside it, never mixed with it). The margin is
chosen minus rejected; the reward gain is the tuned margin minus the base margin: DPO's implicit
reward margin with the base as reference and beta = 1. Each pair is one packed row
(`alignlib.data.PackedBatch`), scored by the same capture every other measurement reads.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .data import EncodedPair, PreferencePair, encode_pairs, length_batches, pack_pairs, packed_length, pad_id
from .models import ModelPair
from .stats import bootstrap_ci, mean


def encoded_pairs(pair: ModelPair, prefs, **kw) -> list[EncodedPair]:
    """``prefs`` tokenised for ``pair`` (already-encoded pairs pass through); an empty list is an error."""
    if len(prefs) == 0:
        raise ValueError("no preference pairs given")
    if all(isinstance(p, EncodedPair) for p in prefs):
        return list(prefs)
    return encode_pairs(pair.tokenizer, prefs, **kw)


def packed_batches(pair: ModelPair, encoded: Sequence[EncodedPair], batch_size: int):
    """(indices, `PackedBatch` on the models' device) of pairs of similar length, ``batch_size`` pairs each."""
    device = next(pair.base.parameters()).device
    for idx in length_batches([packed_length(e) for e in encoded], batch_size):
        yield idx, pack_pairs([encoded[i] for i in idx], pad_id(pair.tokenizer)).to(device)


def pair_logps(pair: ModelPair, encoded: Sequence[EncodedPair], batch_size: int = 8,
               progress: bool = False) -> dict[str, np.ndarray]:
    """Per model, (n, 2) summed (chosen, rejected) log-probs: one capture-free forward per batch."""
    from .forward import logprobs

    models = {"base": pair.base} if pair.tuned is None else pair.models
    out = {role: np.zeros((len(encoded), 2)) for role in models}
    batches = list(packed_batches(pair, encoded, batch_size))
    for idx, batch in tqdm(batches, desc="scoring", disable=not progress, leave=False):
        for role, model in models.items():
            with torch.inference_mode():
                out[role][idx] = logprobs(model, batch, what=f"{pair.name} {role} model").numpy()
    return out


def score(
    pair: ModelPair,
    prefs: Sequence[PreferencePair] | Sequence[EncodedPair],
    *,
    batch_size: int = 8,
    max_length: int = 1024,
    max_response_tokens: int | None = None,
    chat_template: bool = False,
    add_eos: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per pair: response log-probs under base (and tuned), margins and reward gain.

    Columns: ``id, n_chosen, n_rejected, prompt_truncated``; for each model M in base/tuned
    ``logp_chosen_M, logp_rejected_M`` (sums), ``mean_logp_chosen_M, mean_logp_rejected_M``,
    ``margin_M`` (sum) and ``margin_M_mean``; and ``reward_gain``, ``reward_gain_mean``.
    A base-only pair gives the base columns only. ``batch_size`` counts pairs (one packed row each).
    """
    encoded = encoded_pairs(pair, prefs, max_length=max_length, max_response_tokens=max_response_tokens,
                            chat_template=chat_template, add_eos=add_eos)
    table = pd.DataFrame({
        "id": [e.id for e in encoded],
        "n_chosen": [len(e.chosen) - e.chosen_start for e in encoded],
        "n_rejected": [len(e.rejected) - e.rejected_start for e in encoded],
        "prompt_truncated": [e.prompt_truncated for e in encoded],
    })
    for role, logp in pair_logps(pair, encoded, batch_size, progress).items():
        chosen, rejected = logp[:, 0], logp[:, 1]
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


def preference_accuracy(scores: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Share of pairs with a positive margin, per model and per length convention, with 95% BCa CIs.

    Summed margins favour shorter responses (HH-RLHF's chosen responses are shorter), so the
    length-normalised (mean) margin is reported beside the summed one.
    """
    rows = []
    for role in ("base", "tuned"):
        for length, col in (("sum", f"margin_{role}"), ("mean", f"margin_{role}_mean")):
            if col in scores:
                est, lo, hi = bootstrap_ci(mean, scores[col].to_numpy() > 0, n_boot=n_boot, seed=seed)
                rows.append(dict(model=role, length=length, accuracy=est, ci_low=lo, ci_high=hi, n=len(scores)))
    return pd.DataFrame(rows)
