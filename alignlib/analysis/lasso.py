"""LASSO over layers: which few layers' activation distances explain the reward gain?

Regress a per-pair target (reward gain, or a patching effect) on per-layer features (activation
distances between the models), standardised, with the penalty chosen by k-fold cross-validation.
The penalty is the largest one within one standard error of the best CV error (the "1-SE rule"):
the plain CV minimum is known to let in noise features with tiny coefficients, and the question
here is exactly which layers are needed. Held-out R^2 is measured on a split the fit never saw.

Stability selection (Meinshausen and Buehlmann 2010): the LASSO path is refitted on random halves of
the training pairs, and each layer's selection frequency is the largest, over penalties from the
chosen one up to the sparsest, of the share of halves in which it is selected. A layer selected in
at least 90% is stable; with p layers and q selected per fit on average, the expected number of
falsely stable layers is at most q^2 / ((2 * 0.9 - 1) p).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.linear_model import Lasso, LassoCV, lasso_path
from sklearn.metrics import r2_score
from sklearn.model_selection import KFold, train_test_split
from sklearn.preprocessing import StandardScaler


@dataclass
class LassoResult:
    """``coefficients``: per layer; ``path``: (alpha, layer, coef); ``stability``: selection share; ``fit``: one row."""

    coefficients: pd.DataFrame
    path: pd.DataFrame
    stability: pd.DataFrame
    fit: pd.DataFrame

    @property
    def selected(self) -> list:
        return self.coefficients.loc[self.coefficients.nonzero, "layer"].tolist()


def lasso_layers(features: pd.DataFrame, target, *, n_splits: int = 5, test_size: float = 0.25, n_boot: int = 100,
                 alpha_rule: str = "1se", seed: int = 0) -> LassoResult:
    """Fit ``target ~ sum_l beta_l * feature_l`` with LASSO.

    features: one row per pair, one column per layer (e.g. `distances_wide(...)`); target: one value
    per row, aligned with ``features``. ``alpha_rule``: ``"1se"`` (default) or ``"min"``. ``n_boot``:
    the random halves of stability selection.
    """
    X = np.asarray(features, dtype=float)
    y = np.asarray(target, dtype=float)
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(f"features {X.shape} and target {y.shape} do not align")
    if alpha_rule not in ("1se", "min"):
        raise ValueError("alpha_rule must be '1se' or 'min'")
    layers = list(features.columns) if isinstance(features, pd.DataFrame) else list(range(X.shape[1]))
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=test_size, random_state=seed)
    scaler = StandardScaler().fit(X_train)
    Z_train, Z_test = scaler.transform(X_train), scaler.transform(X_test)
    cv = LassoCV(cv=KFold(n_splits, shuffle=True, random_state=seed), random_state=seed, max_iter=50_000).fit(Z_train, y_train)
    alpha = cv.alpha_ if alpha_rule == "min" else _one_se_alpha(cv)
    model = Lasso(alpha=alpha, max_iter=50_000).fit(Z_train, y_train)
    coefficients = pd.DataFrame({"layer": layers, "coef": model.coef_, "nonzero": model.coef_ != 0})
    alphas, coefs, _ = lasso_path(Z_train, y_train, alphas=cv.alphas_, max_iter=50_000)
    path = pd.DataFrame([(a, layers[j], coefs[j, i]) for i, a in enumerate(alphas) for j in range(len(layers))],
                        columns=["alpha", "layer", "coef"])
    grid = cv.alphas_[cv.alphas_ >= alpha]  # from the chosen penalty up to the sparsest
    rng = np.random.default_rng(seed)
    picks = np.zeros((len(grid), len(layers)))
    half = len(Z_train) // 2
    for _ in range(n_boot):
        idx = rng.choice(len(Z_train), half, replace=False)
        sub = StandardScaler().fit_transform(X_train[idx])
        _, coefs, _ = lasso_path(sub, y_train[idx] - y_train[idx].mean(), alphas=grid, max_iter=50_000)
        picks += (coefs != 0).T
    frequency = (picks / n_boot).max(axis=0)
    stability = pd.DataFrame({"layer": layers, "selection_frequency": frequency})
    fit = pd.DataFrame([dict(alpha=alpha, alpha_rule=alpha_rule, alpha_min=cv.alpha_, alpha_max=float(grid.max()),
                             r2_train=r2_score(y_train, model.predict(Z_train)),
                             r2_test=r2_score(y_test, model.predict(Z_test)),
                             n_train=len(y_train), n_test=len(y_test), n_selected=int(coefficients.nonzero.sum()))])
    return LassoResult(coefficients, path, stability, fit)


def _one_se_alpha(cv: LassoCV) -> float:
    """The largest alpha whose mean CV error is within one standard error of the minimum."""
    mean = cv.mse_path_.mean(axis=1)
    se = cv.mse_path_.std(axis=1, ddof=1) / np.sqrt(cv.mse_path_.shape[1])
    best = int(np.argmin(mean))
    ok = np.where(mean <= mean[best] + se[best])[0]
    return float(cv.alphas_[ok].max())
