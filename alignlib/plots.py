"""The standard figures, so every notebook draws them the same way. Each returns its Axes."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd


def _axes(ax):
    return ax if ax is not None else plt.subplots(figsize=(6.4, 3.6))[1]


def layer_profile(summary: pd.DataFrame, *, value: str = "recovery", by: str = "control", ax=None,
                  title: str | None = None):
    """A per-layer value with its CI band, one line per group (e.g. control or site)."""
    ax = _axes(ax)
    for name, g in summary.groupby(by, sort=False):
        g = g.sort_values("layer")
        line, = ax.plot(g.layer, g[value], marker="o", ms=3, label=str(name))
        if {"ci_low", "ci_high"} <= set(g.columns):
            ax.fill_between(g.layer, g.ci_low, g.ci_high, color=line.get_color(), alpha=0.2, lw=0)
    ax.axhline(0, color="0.6", lw=0.8)
    if value == "recovery":
        ax.axhline(1, color="0.6", lw=0.8, ls="--")
    ax.set(xlabel="layer", ylabel=value, title=title)
    ax.legend(frameon=False, fontsize="small")
    return ax


def lasso_path(path: pd.DataFrame, stability: pd.DataFrame | None = None, *, alpha: float | None = None, axes=None):
    """The regularisation path (coefficient per layer against alpha) and, beside it, selection stability."""
    if axes is None:
        _, axes = plt.subplots(1, 2 if stability is not None else 1, figsize=(10, 3.6), squeeze=False)
        axes = axes[0]
    ax = axes[0]
    for layer, g in path.groupby("layer"):
        ax.plot(g.alpha, g.coef, lw=1, label=str(layer) if (g.coef != 0).any() else None)
    ax.set_xscale("log")
    ax.invert_xaxis()
    if alpha is not None:
        ax.axvline(alpha, color="0.4", ls="--", lw=0.8)
    ax.set(xlabel="alpha (penalty)", ylabel="standardised coefficient", title="LASSO path")
    if stability is not None:
        axes[1].bar(stability.layer, stability.selection_frequency, color="C0")
        axes[1].axhline(0.9, color="0.4", ls="--", lw=0.8)
        axes[1].set(xlabel="layer", ylabel="selection frequency", ylim=(0, 1.02), title="stability selection")
    return axes


def recovery_vs_k(table: pd.DataFrame, *, value: str = "share_of_full", ax=None, title: str | None = None):
    """Recovered share against the number of directions k (log scale), principal vs random subspaces."""
    ax = _axes(ax)
    for basis, g in table.groupby("basis", sort=False):
        g = g.groupby("k", as_index=False)[[value, "share_ci_low", "share_ci_high"]].mean().sort_values("k")
        line, = ax.plot(g.k, g[value], marker="o", ms=3, label=f"{basis} directions")
        ax.fill_between(g.k, g.share_ci_low, g.share_ci_high, color=line.get_color(), alpha=0.2, lw=0)
    ax.axhline(0.9, color="0.6", ls="--", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="k (directions patched)", ylabel="share of full-rank effect", title=title)
    ax.legend(frameon=False, fontsize="small")
    return ax


def probe_accuracy(table: pd.DataFrame, *, ax=None, title: str | None = None):
    """Probe accuracy by layer with CI bands, one line per model."""
    ax = layer_profile(table, value="accuracy", by="model", ax=ax, title=title)
    ax.axhline(0.5, color="0.6", ls=":", lw=0.8)
    ax.set_ylim(0.3, 1.02)
    return ax
