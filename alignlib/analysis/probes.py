"""Linear probes per layer: can a linear read-out tell the chosen response from the rejected one?

The probe is **paired**: each pair gives one vector per layer, the chosen response's mean
activation minus the rejected one's (means over response tokens; the shared prompt carries no
label). A logistic regression without intercept learns a direction w with chosen preferred when
w . (h_c - h_r) > 0; each difference enters once as it is (label 1) and once negated (label 0), so
chance is exactly 0.5. An unpaired probe on single responses has to separate chosen from rejected
across pairs whose own content dominates every vector; with both responses of a pair held out
together it learns which pairs it saw and lands below chance on the others (anti-learning), which
is what the first version of this notebook showed. A length-only probe (the difference in response
length, the one non-semantic cue HH-RLHF is known to carry) is the baseline every layer must beat.
Folds are grouped by pair; accuracy is out-of-fold, with a BCa CI over pairs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..stats import bootstrap_ci, mean


def probe_layers(pooled: dict[str, np.ndarray], *, lengths: np.ndarray | None = None, n_splits: int = 5,
                 C: float = 1.0, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Out-of-fold paired-probe accuracy per model and layer, and the length-only baseline.

    pooled: model name -> array (n_layers, n_pairs, 2, hidden): response-mean activations of the
    (chosen, rejected) responses of each pair. lengths: (n_pairs, 2) response lengths in tokens, for
    the baseline (row ``model="length only"``, ``layer=-1``). Returns ``model, layer, accuracy,
    ci_low, ci_high, n_pairs``.
    """
    rows = []
    for role, acts in pooled.items():
        acts = np.asarray(acts, dtype=float)
        if acts.ndim != 4 or acts.shape[2] != 2:
            raise ValueError(f"{role}: expected (layers, pairs, 2, hidden), got {acts.shape}")
        for layer in range(acts.shape[0]):
            rows.append(dict(model=role, layer=layer, **_paired(acts[layer, :, 0] - acts[layer, :, 1], n_splits, C,
                                                                n_boot, seed)))
    if lengths is not None:
        diff = np.asarray(lengths, float)[:, :1] - np.asarray(lengths, float)[:, 1:]
        rows.append(dict(model="length only", layer=-1, **_paired(diff, n_splits, C, n_boot, seed)))
    return pd.DataFrame(rows)


def _paired(diff: np.ndarray, n_splits: int, C: float, n_boot: int, seed: int) -> dict:
    n_pairs = len(diff)
    if n_pairs < n_splits:
        raise ValueError(f"{n_pairs} pairs is fewer than n_splits={n_splits}")
    X = np.concatenate([diff, -diff])
    y = np.concatenate([np.ones(n_pairs), np.zeros(n_pairs)])
    groups = np.tile(np.arange(n_pairs), 2)
    correct = np.zeros(2 * n_pairs)
    for train, test in GroupKFold(n_splits).split(X, y, groups):
        clf = make_pipeline(StandardScaler(with_mean=False), LogisticRegression(C=C, fit_intercept=False, max_iter=2000))
        clf.fit(X[train], y[train])
        correct[test] = clf.predict(X[test]) == y[test]
    per_pair = correct.reshape(2, n_pairs).mean(0)
    accuracy, low, high = bootstrap_ci(mean, per_pair, n_boot=n_boot, seed=seed)
    return dict(accuracy=accuracy, ci_low=low, ci_high=high, n_pairs=n_pairs)
