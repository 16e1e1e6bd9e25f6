"""The book's analyses with their default settings: what notebooks 02-04 run on the embedded pair, and
what the positive controls rerun, so that every verdict is reached by the same code at the same n.

`assess` runs, on one pair, the analyses the findings page's verdicts rest on (exact patching of the
residual stream and the block at every layer, the early and late windows, the LASSO on per-layer
features, optionally the low-rank reconstruction at the middle layer) and returns the verdicts
beside the tables they came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from . import verdicts
from .analysis import lasso_layers, low_rank_recovery, response_activations
from .analysis.windows import window_sweep
from .metrics import score
from .patching import patch_sweep


def exact_sweep(pair, encoded, *, site=("resid", "block"), batch_size: int = 8, run_dir=None, seed: int = 0,
                progress: bool = False):
    """The main exact sweep: ``resid`` and ``block`` (the paper's sites) at every layer, tuned -> base, all positions."""
    return patch_sweep(pair, encoded, site=list(site), direction="tuned_to_base", controls=[], batch_size=batch_size,
                       chunk_size=max(2, len(encoded)), run_dir=run_dir, seed=seed, progress=progress)


def early_late_windows(pair, encoded, *, batch_size: int = 8):
    """The own change of the first and of the last third of the layers, each as one window, tuned -> base."""
    third = pair.n_layers // 3
    return window_sweep(pair, encoded, [(0, third - 1), (pair.n_layers - third, pair.n_layers - 1)],
                        batch_size=batch_size)


def key_layer(n_layers: int) -> int:
    return n_layers // 2


@dataclass
class Assessment:
    verdicts: dict
    scores: pd.DataFrame
    sweep: object
    windows: pd.DataFrame
    lasso: dict = field(default_factory=dict)
    low_rank: object = None


def assess(pair, encoded, *, lasso_encoded=None, train_encoded=None, seed: int = 0,
           progress: bool = False) -> Assessment:
    """The findings page's verdicts on ``pair``: the signal, patching and the windows on ``encoded``, the
    LASSO on ``lasso_encoded`` (default ``encoded``), low rank at the middle layer with directions from
    ``train_encoded`` (skipped when None)."""
    L = pair.n_layers
    lasso_encoded = encoded if lasso_encoded is None else lasso_encoded
    scores = score(pair, lasso_encoded, progress=progress)
    sweep = exact_sweep(pair, encoded, seed=seed, progress=progress)
    windows = early_late_windows(pair, encoded)
    acts = response_activations(pair, lasso_encoded, progress=progress)
    gains = scores.set_index("id").loc[acts.ids, "reward_gain"].to_numpy()
    lasso = {m: lasso_layers(acts.distances_wide(m), gains, n_boot=100, seed=seed) for m in ("relative", "attribution")}
    found = {
        "signal": verdicts.signal(scores, seed=seed),
        "single_layer": verdicts.single_layer(sweep.pairs, L, seed=seed),
        "band": verdicts.band(sweep.pairs, L, seed=seed),
        "early_late": verdicts.early_late(windows, L, seed=seed),
        "lasso": verdicts.few_layers(lasso["relative"], L, feature="relative distances"),
        "lasso_attribution": verdicts.few_layers(lasso["attribution"], L, feature="attribution"),
    }
    low = None
    if train_encoded is not None:
        hidden = pair.base.config.hidden_size
        low = low_rank_recovery(pair, train_encoded, encoded, layer=key_layer(L),
                                ks=sorted({1, 2, 4, 8, 16, 64} & set(range(1, hidden))) + [hidden], n_random=2,
                                seed=seed, progress=progress)
        found["low_rank"] = verdicts.few_directions({key_layer(L): low}, seed=seed)
    return Assessment(found, scores, sweep, windows, lasso, low)
