"""Planted pairs: tuned sides whose difference from the base is known, to validate the method.

A method that claims to localise preference tuning should find it where it was put. These
builders make such pairs from any base model:

- ``kind="weights"``: only decoder layer ``layer`` differs (every weight moved by a seeded relative
  perturbation of size ``scale``);
- ``kind="rank"``: layer ``layer``'s MLP output gains a rank-``rank`` change (its output projection
  W becomes W + c A B^T, A and B with orthonormal columns: ``rank`` equally strong directions),
  so the tuned stream differs from the base's at that layer only inside the ``rank``-dimensional
  span of A;
- ``kind="dpo"``: DPO on ``prefs`` with every weight frozen except decoder layer ``layer``'s (or
  those of a list of layers, a band), so the change is learnt the way real tuning learns it, but
  only in a known place;
- ``kind="diffuse"``: every decoder layer moves a little (the same relative size each), so no single
  layer should be reported as the place where the pair differs.

`validate` runs the analysis pipeline (patching, LASSO, low-rank) on such a pair and checks each
result against the known answer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from .models import ModelPair, decoder_layers, sublayer

KINDS = ("weights", "rank", "dpo", "diffuse")


def planted_pair(pair: ModelPair, *, layer: int | None = None, rank: int | None = None, kind: str = "weights",
                 scale: float = 0.3, seed: int = 0, prefs=None, dpo=None, layers=None) -> ModelPair:
    """A copy of ``pair.base`` changed in a known way, paired with the base (see the module docstring).

    ``prefs``, ``dpo`` (a `DPORecipe`) and ``layers`` (a band, instead of one ``layer``) are used by
    ``kind="dpo"`` only.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")
    band = [layer] if layers is None else list(layers)
    n = len(decoder_layers(pair.base))
    if kind != "diffuse" and (not band or any(l is None or not 0 <= l < n for l in band)):
        raise ValueError(f"kind={kind!r} needs layer in 0..{n - 1}, got {layer if layers is None else layers!r}")
    if kind == "rank" and (rank is None or rank < 1):
        raise ValueError("kind='rank' needs rank >= 1")
    if kind == "dpo":
        if prefs is None:
            raise ValueError("kind='dpo' needs prefs= (the preference pairs to tune layer k on)")
        from .tuning import DPORecipe, make_tuned

        tuned, _ = make_tuned(pair.base, pair.tokenizer, prefs, dpo or DPORecipe(seed=seed), layers=band,
                              progress=False)
        where = f"layer{band[0]}" if len(band) == 1 else f"layers{band[0]}-{band[-1]}"
        return ModelPair(pair.base, tuned, pair.tokenizer, f"{pair.name}:planted-dpo-{where}")
    tuned = copy.deepcopy(pair.base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if kind == "weights":
            _perturb(decoder_layers(tuned)[layer], scale, gen)
        elif kind == "diffuse":
            for block in decoder_layers(tuned):
                _perturb(block, scale / n ** 0.5, gen)
        else:
            out = _output_projection(sublayer(decoder_layers(tuned)[layer], "mlp"))
            w = out.weight
            # Orthonormal factors: r directions of equal strength, so the change is rank r in every
            # direction (Gaussian factors leave some directions much weaker than others).
            a = torch.linalg.qr(torch.randn(w.shape[0], rank, generator=gen)).Q
            b = torch.linalg.qr(torch.randn(w.shape[1], rank, generator=gen)).Q
            change = a @ b.T
            w.add_((scale * w.norm() / change.norm() * change).to(w.dtype))
    name = f"{pair.name}:planted-{kind}" + (f"-layer{layer}" if layer is not None else "") + (
        f"-rank{rank}" if rank else "")
    return ModelPair(pair.base, tuned, pair.tokenizer, name)


def _effect_size(per_pair: pd.DataFrame, site: str, direction: str) -> pd.Series:
    """Mean |effect| per layer: how much patching the layer moves each pair's margin, whatever the sign."""
    cell = per_pair[(per_pair.site == site) & (per_pair.direction == direction) & (per_pair.control == "patch")]
    return cell.effect.abs().groupby(cell.layer).mean()


def _perturb(module: nn.Module, scale: float, gen: torch.Generator) -> None:
    for p in module.parameters():
        p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=gen).to(p.dtype))


def _output_projection(mlp: nn.Module) -> nn.Linear:
    """The MLP's last linear layer (the one that writes into the residual stream)."""
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(mlp).__name__}: no nn.Linear output projection to plant a low-rank change in")
    return linears[-1]


# --------------------------------------------------------------------------------------------
# The pipeline against the known answer


@dataclass
class Validation:
    """``checks``: one row per check (``analysis, measure, check, expected, measured, passed``); ``summary``: the sweep;
    ``gains``: each pair's reward gain; ``features``: the LASSO's features per measure (pairs x layers)."""

    checks: pd.DataFrame
    summary: pd.DataFrame
    gains: pd.Series = field(default_factory=pd.Series)
    features: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.checks.passed.all())


def validate(planted: ModelPair, prefs, *, layer: int | None, rank: int | None = None, train_prefs=None,
             lasso_measures=("attribution", "local", "relative"), max_length: int = 512, n_boot: int = 200,
             tolerance: float = 0.02, seed: int = 0) -> Validation:
    """Run patching, LASSO and (for rank pairs) low-rank on a planted pair, and check each against the truth.

    layer: the planted layer (None for a diffuse pair, where the check is that no layer dominates).
    rank: the planted rank, for the low-rank check; it needs ``train_prefs`` (other pairs) to find
    the directions. lasso_measures: the per-layer features the LASSO is tried on (see
    `response_activations`): ``attribution`` is signed and predicts the gain linearly, the
    distances are the paper's kind of feature. ``Validation.checks`` has one row per check.
    """
    from .analysis import lasso_layers, low_rank_recovery, response_activations
    from .patching import patch_sweep

    if rank is not None and train_prefs is None:
        raise ValueError("the low-rank check needs train_prefs= (pairs to find the directions on)")

    sweep = patch_sweep(planted, prefs, site=["resid", "block"], direction=["tuned_to_base", "base_to_tuned"],
                        controls=[], max_length=max_length, n_boot=n_boot, seed=seed, progress=False)
    s = sweep.summary
    rows = []

    def add(analysis, measure, check, expected, measured, passed):
        rows.append(dict(analysis=analysis, measure=measure, check=check, expected=expected, measured=measured,
                         passed=bool(passed)))

    def curve(site, direction):
        return s[(s.site == site) & (s.direction == direction)].set_index("layer").recovery.sort_index()

    if layer is None:
        # Recovery ratios are meaningless when the mean gain is near zero (random changes carry no
        # preference), so dominance is judged on the size of each block's effect instead.
        size = _effect_size(sweep.pairs, "block", "tuned_to_base")
        share = size / size.sum()
        add("patching", "block", "no single block dominates (largest share of summed |effect| < 0.5)", "< 0.5",
            f"{share.max():.3f} at layer {int(share.idxmax())}", share.max() < 0.5)
    else:
        for direction in ("tuned_to_base", "base_to_tuned"):
            b, r = curve("block", direction), curve("resid", direction)
            arrow = direction.replace("_to_", " -> ")
            before = float(np.abs(b[b.index < layer]).max()) if layer > 0 else 0.0
            add("patching", f"block {arrow}", f"block ({arrow}): recovery 1 at layer {layer}", "1", f"{b[layer]:.4f}",
                abs(b[layer] - 1) < tolerance)
            add("patching", f"block {arrow}", f"block ({arrow}): recovery 0 before layer {layer}", "0", f"{before:.4f}",
                before < tolerance)
            size = _effect_size(sweep.pairs, "block", direction)  # by size: ratios mislead when the mean gain is ~0
            add("patching", f"block {arrow}", f"block ({arrow}): largest effect at layer {layer}", str(layer),
                str(int(size.idxmax())), int(size.idxmax()) == layer)
            r_before = float(np.abs(r[r.index < layer]).max()) if layer > 0 else 0.0
            r_after = float(np.abs(r[r.index >= layer] - 1).max())
            add("patching", f"resid {arrow}", f"resid ({arrow}): 0 before layer {layer}", "0", f"{r_before:.4f}",
                r_before < tolerance)
            add("patching", f"resid {arrow}", f"resid ({arrow}): 1 from layer {layer} on", "1",
                f"max |r - 1| = {r_after:.4f}", r_after < tolerance)

    gains = sweep.pairs.query("direction == 'tuned_to_base'").groupby("id", sort=False).gain.first()
    features = {}
    if lasso_measures:
        acts = response_activations(planted, prefs, max_length=max_length, progress=False)
        features = {m: acts.distances_wide(m).loc[gains.index] for m in lasso_measures}
    for measure in lasso_measures:
        lasso = lasso_layers(features[measure], gains.to_numpy(), n_boot=n_boot, seed=seed)
        stability = lasso.stability.set_index("layer").selection_frequency
        if layer is None:
            # Dominant: selected in >= 90% of resamples and carrying at least half of the summed |coef|.
            coef = lasso.coefficients.set_index("layer").coef.abs()
            share = coef / coef.sum() if coef.sum() > 0 else coef
            dominant = [l for l in coef.index if stability[l] >= 0.9 and share[l] >= 0.5]
            add("LASSO", measure, f"LASSO on {measure}: no single dominant layer (stable in >= 90% and >= half of |coef|)",
                "none",
                str(dominant) if dominant else f"none ({int((stability >= 0.9).sum())} stable layers)",
                not dominant)
        else:
            add("LASSO", measure, f"LASSO on {measure}: layer {layer} selected in >= 90% of half-samples", ">= 0.90",
                f"{stability[layer]:.2f}", stability[layer] >= 0.9)

    if rank is not None:
        ks = sorted({1, 2, 4, 8, rank, max(1, rank // 2)})
        low = low_rank_recovery(planted, train_prefs, prefs, layer=layer, ks=ks, n_boot=n_boot, seed=seed,
                                max_length=max_length, progress=False)
        # Pair by pair, the share of the full patch's effect that k directions reproduce (1 - SSE / SS):
        # a ratio of mean effects misleads when a planted change's mean gain is near zero.
        pca = low.pairs.query("basis == 'pca'").groupby("k").apply(
            lambda g: 1 - ((g.effect - g.full_effect) ** 2).sum() / (g.full_effect ** 2).sum(), include_groups=False)
        add("low-rank", "resid", f"low-rank: >= 0.9 of the full effect at k = {rank} (pair by pair)", ">= 0.9",
            f"{pca[rank]:.3f}", pca[rank] >= 0.9)
        below = pca[pca.index < rank]
        add("low-rank", "resid", f"low-rank: < 0.9 for every k < {rank} (pair by pair)", "< 0.9",
            f"{below.max():.3f}" if len(below) else "no k < r", (below < 0.9).all())
    return Validation(pd.DataFrame(rows), s, gains, features)
