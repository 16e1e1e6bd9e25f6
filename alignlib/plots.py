"""The standard figures, so every notebook draws them the same way, in the same colours. Each returns its Axes.

One colour per meaning across the book: the direction tuned->base (and the tuned model, and the
real patch) blue, base->tuned (and the base model) red, then the controls and sites in a fixed order.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

COLORS = {"tuned_to_base": "#1f77b4", "base_to_tuned": "#d62728", "tuned": "#1f77b4", "base": "#d62728",
          "patch": "#1f77b4", "identity": "#7f7f7f", "shuffled": "#ff7f0e", "noise": "#2ca02c",
          "mean_ablation": "#9467bd", "zero_ablation": "#8c564b", "resid": "#1f77b4", "block": "#2ca02c",
          "own": "#9467bd", "attn": "#ff7f0e", "mlp": "#8c564b", "all": "#1f77b4", "prompt": "#ff7f0e",
          "response": "#2ca02c", "pca": "#1f77b4", "random": "#7f7f7f", "length only": "#7f7f7f"}
LABELS = {"tuned_to_base": "tuned → base", "base_to_tuned": "base → tuned"}


def _axes(ax, size=(6.4, 3.4)):
    return ax if ax is not None else plt.subplots(figsize=size, layout="constrained")[1]


def layer_profile(summary: pd.DataFrame, *, value: str = "recovery", by: str = "control", ax=None,
                  title: str | None = None, band: bool = False, ylabel: str | None = None):
    """A per-layer value with its CI band (and, with ``band``, the band simultaneous over layers, dashed)."""
    ax = _axes(ax)
    low, high = {"recovery": ("ci_low", "ci_high"), "slope": ("slope_low", "slope_high"),
                 "recovery_per_token": ("per_token_low", "per_token_high")}.get(value, ("ci_low", "ci_high"))
    for name, g in summary.groupby(by, sort=False):
        g = g.sort_values("layer")
        line, = ax.plot(g.layer, g[value], marker="o", ms=3, label=LABELS.get(name, str(name)), color=COLORS.get(name))
        if {low, high} <= set(g.columns):
            ax.fill_between(g.layer, g[low], g[high], color=line.get_color(), alpha=0.2, lw=0)
        if band and {"band_low", "band_high"} <= set(g.columns):
            ax.plot(g.layer, g.band_low, ls="--", lw=0.8, color=line.get_color())
            ax.plot(g.layer, g.band_high, ls="--", lw=0.8, color=line.get_color())
    ax.axhline(0, color="0.6", lw=0.8)
    if value.startswith("recovery") or value == "slope":
        ax.axhline(1, color="0.6", lw=0.8, ls=":")
    ax.set(xlabel="layer", ylabel=ylabel or value.replace("_", " "), title=title)
    ax.legend(frameon=False, fontsize="small")
    return ax


def pair_heatmap(pairs: pd.DataFrame, *, site: str = "block", direction: str = "tuned_to_base", ax=None,
                 title: str | None = None):
    """Each pair's patched effect (nats) by layer, pairs sorted by their reward gain (largest on top)."""
    cell = pairs[(pairs.site == site) & (pairs.direction == direction) & (pairs.control == "patch")
                 & (pairs.positions == "all")]
    wide = cell.pivot_table(index="id", columns="layer", values="effect")
    gains = cell.groupby("id").gain.first().loc[wide.index].sort_values(ascending=False)
    wide = wide.loc[gains.index]
    ax = _axes(ax, (6.4, 4.2))
    lim = float(np.nanquantile(np.abs(wide.to_numpy()), 0.98)) or 1.0
    image = ax.imshow(wide.to_numpy(), aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, label="effect on the margin (nats)")
    ax.set(xlabel="layer", ylabel="pairs, by reward gain (largest on top)", yticks=[], title=title)
    return ax


def agreement(screen: pd.DataFrame, exact: pd.DataFrame, *, ax=None, title: str | None = None):
    """Attribution patching's estimate against the exact effect, one point per (pair, layer), per site."""
    keys = ["id", "site", "direction", "layer", "control", "positions"]
    both = exact.merge(screen, on=keys, suffixes=("_exact", "_atp"))
    ax = _axes(ax, (4.6, 4.2))
    for site, g in both.groupby("site", sort=False):
        ax.scatter(g.effect_exact, g.effect_atp, s=4, alpha=0.4, color=COLORS.get(site), label=site)
    lim = float(np.nanquantile(np.abs(both[["effect_exact", "effect_atp"]].to_numpy()), 0.99))
    ax.plot([-lim, lim], [-lim, lim], color="0.5", lw=0.8, ls="--")
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xlabel="exact effect (nats)", ylabel="attribution estimate (nats)",
           title=title)
    ax.legend(frameon=False, fontsize="small", markerscale=3)
    return ax


def lasso_path(path: pd.DataFrame, stability: pd.DataFrame | None = None, *, alpha: float | None = None, axes=None):
    """The regularisation path (coefficient per layer against alpha) and, beside it, selection stability."""
    if axes is None:
        _, axes = plt.subplots(1, 2 if stability is not None else 1, figsize=(10, 3.4), squeeze=False,
                               layout="constrained")
        axes = axes[0]
    ax = axes[0]
    for layer, g in path.groupby("layer"):
        ax.plot(g.alpha, g.coef, lw=1, label=str(layer) if (g.coef != 0).any() else None)
    ax.set_xscale("log")
    ax.invert_xaxis()
    if alpha is not None:
        ax.axvline(alpha, color="0.4", ls="--", lw=0.8)
    ax.set(xlabel="penalty α (log scale)", ylabel="standardised coefficient", title="LASSO path")
    if stability is not None:
        axes[1].bar(stability.layer, stability.selection_frequency, color=COLORS["tuned"])
        axes[1].axhline(0.9, color="0.4", ls="--", lw=0.8)
        axes[1].set(xlabel="layer", ylabel="selection frequency", ylim=(0, 1.02), title="stability selection")
    return axes


def recovery_vs_k(table: pd.DataFrame, *, x: str = "k", ax=None, title: str | None = None):
    """Share of the full patch's effect recovered against k (or against the share of Delta's energy,
    ``x="energy"``): principal directions against random subspaces (mean over draws, CI band)."""
    ax = _axes(ax)
    for basis, g in table.groupby("basis", sort=False):
        g = g.groupby("k", as_index=False)[["share_of_full", "share_ci_low", "share_ci_high", "energy"]].mean()
        g = g.sort_values(x)
        line, = ax.plot(g[x], g.share_of_full, marker="o", ms=3, label=f"{basis} directions", color=COLORS.get(basis))
        ax.fill_between(g[x], g.share_ci_low, g.share_ci_high, color=line.get_color(), alpha=0.2, lw=0)
    ax.axhline(0.9, color="0.6", ls="--", lw=0.8)
    if x == "k":
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k, directions patched (log scale)")
    else:
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls=":")
        ax.set_xlabel("share of Δ's energy in the subspace")
    ax.set(ylabel="share of the full patch's effect", title=title)
    ax.legend(frameon=False, fontsize="small")
    return ax


def probe_accuracy(table: pd.DataFrame, *, ax=None, title: str | None = None):
    """Paired-probe accuracy by layer with CI bands, one line per model, and the length-only baseline."""
    layers = table[table.layer >= 0]
    ax = layer_profile(layers, value="accuracy", by="model", ax=ax, title=title, ylabel="out-of-fold accuracy")
    baseline = table[table.model == "length only"]
    if len(baseline):
        b = baseline.iloc[0]
        ax.axhspan(b.ci_low, b.ci_high, color=COLORS["length only"], alpha=0.15, lw=0)
        ax.axhline(b.accuracy, color=COLORS["length only"], ls="--", lw=0.8, label="length only")
    ax.axhline(0.5, color="0.6", ls=":", lw=0.8)
    ax.set_ylim(0.3, 1.02)
    ax.legend(frameon=False, fontsize="small")
    return ax
