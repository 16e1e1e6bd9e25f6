"""Linear probes per layer: can a logistic regression tell the chosen response from the rejected one?

Each sequence is pooled to one vector per layer by the **mean over its response tokens** (the
prompt is shared by both sides of a pair, so prompt tokens carry no label information). Folds
are grouped by pair, so a pair's chosen and rejected sequences are never split across train and
test. Accuracy is out-of-fold, with a bootstrap CI over pairs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..metrics import bootstrap_ci


def probe_layers(pooled: dict[str, np.ndarray], *, n_splits: int = 5, C: float = 1.0, n_boot: int = 1000,
                 seed: int = 0) -> pd.DataFrame:
    """Out-of-fold probe accuracy per model and layer.

    pooled: model name -> array (n_layers, n_pairs, 2, hidden): response-mean activations of the
    (chosen, rejected) sequences of each pair. Returns ``model, layer, accuracy, ci_low, ci_high, n_pairs``.
    """
    rows = []
    for role, acts in pooled.items():
        acts = np.asarray(acts, dtype=float)
        if acts.ndim != 4 or acts.shape[2] != 2:
            raise ValueError(f"{role}: expected (layers, pairs, 2, hidden), got {acts.shape}")
        n_layers, n_pairs = acts.shape[:2]
        if n_pairs < n_splits:
            raise ValueError(f"{role}: {n_pairs} pairs is fewer than n_splits={n_splits}")
        y = np.tile([1, 0], n_pairs)
        groups = np.repeat(np.arange(n_pairs), 2)
        for layer in range(n_layers):
            X = acts[layer].reshape(2 * n_pairs, -1)
            correct = np.zeros(2 * n_pairs)
            for train, test in GroupKFold(n_splits).split(X, y, groups):
                clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
                clf.fit(X[train], y[train])
                correct[test] = clf.predict(X[test]) == y[test]
            accuracy, low, high = bootstrap_ci(np.mean, correct.reshape(n_pairs, 2).mean(1), n_boot=n_boot, seed=seed)
            rows.append(dict(model=role, layer=layer, accuracy=accuracy, ci_low=low, ci_high=high, n_pairs=n_pairs))
    return pd.DataFrame(rows)
