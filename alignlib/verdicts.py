"""The rules that decide whether each of the paper's claims holds on a pair: named, documented, tested.

Each rule takes the tables an analysis returns and gives a `Verdict`: the claim, the rule in words,
the outcome, the evidence (estimates with CIs and n) and its ``support``, the share of bootstrap
resamples of the pairs in which the rule reaches the same outcome. A verdict whose support is below
`STABLE` is reported as unstable, not as a pass or a fail: a checked fact must not sit on a knife
edge that the last bits of floating-point arithmetic could flip. The same rules run on the
embedded pair and on the positive controls (`alignlib.builtin`'s planted band and its diffuse
counterpart), so the controls show what each rule can detect at the n it is applied with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from . import stats

#: Support (share of bootstrap resamples agreeing) from which a verdict counts as stable.
STABLE = 0.9
N_SUPPORT = 1000


@dataclass
class Verdict:
    claim: str
    rule: str
    holds: bool
    evidence: str
    n: int
    support: float

    @property
    def stable(self) -> bool:
        return self.support >= STABLE

    @property
    def outcome(self) -> str:
        """``holds`` / ``does not hold``, or ``unstable`` when resamples of the pairs disagree too often."""
        if not self.stable:
            return "unstable"
        return "holds" if self.holds else "does not hold"

    def row(self) -> dict:
        return {**asdict(self), "outcome": self.outcome}


def table(verdicts: dict) -> pd.DataFrame:
    """One row per verdict, for the notebooks and the findings page."""
    return pd.DataFrame([dict(name=k, **v.row()) for k, v in verdicts.items()])


def _support(decide, columns: list[np.ndarray], observed: bool, seed: int) -> float:
    """Share of bootstrap resamples of the pairs (rows of every column together) where ``decide`` agrees."""
    n = len(columns[0])
    idx = np.random.default_rng(seed).integers(0, n, size=(N_SUPPORT, n))
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.mean([decide(*(c[i] for c in columns)) == observed for i in idx]))


def signal(scores: pd.DataFrame, *, seed: int = 0) -> Verdict:
    """Tuning leaves a measurable preference signal: the mean reward gain, summed and per token, both
    with 95% BCa CIs above 0."""
    g, t = scores.reward_gain.to_numpy(), scores.reward_gain_mean.to_numpy()
    gain, tok = stats.bootstrap_ci(stats.mean, g, seed=seed), stats.bootstrap_ci(stats.mean, t, seed=seed)
    positive = float(np.mean(g > 0))
    holds = gain[1] > 0 and tok[1] > 0

    def decide(g, t):  # a resample's one-sided 97.5% bound by the t approximation (BCa per resample is too slow)
        n = len(g)
        return bool(g.mean() - 1.96 * g.std(ddof=1) / np.sqrt(n) > 0 and t.mean() - 1.96 * t.std(ddof=1) / np.sqrt(n) > 0)

    return Verdict("Tuning leaves a measurable preference signal",
                   "mean reward gain, summed and per token, both with 95% BCa CIs above 0", holds,
                   f"gain {_ci(gain)} nats; per token {_ci(tok, 3)} nats; positive for {100 * positive:.0f}% of pairs",
                   len(g), _support(decide, [g, t], holds, seed))


def single_layer(pairs: pd.DataFrame, n_layers: int, *, seed: int = 0) -> Verdict:
    """The paper's claim per layer: one mid-depth block carries most of the gain. Rule: the block
    (tuned -> base, all positions) with the largest recovery has a simultaneous 95% lower bound
    (over all layers) of at least 0.5, and lies in the middle third of depth."""
    effects, gains = _curve(pairs, "block")
    low, _ = stats.simultaneous_band(effects, gains, seed=seed)
    rec = effects.mean(0) / gains.mean()
    peak = int(np.argmax(rec))
    holds = bool(low[peak] >= 0.5 and _middle(peak, n_layers))
    se = _se(effects, gains)
    crit = float((rec[peak] - low[peak]) / se[peak]) if se[peak] > 0 else 0.0  # the band's critical value

    def decide(e, g):
        r, s = e.mean(0) / g.mean(), _se(e, g)
        p = int(np.argmax(r))
        return bool(r[p] - crit * s[p] >= 0.5 and _middle(p, n_layers))

    return Verdict("One mid-depth layer carries most of the gain (patching)",
                   "the block (tuned→base) with the largest recovery has a simultaneous 95% lower bound ≥ 0.5 "
                   "and lies in the middle third of depth", holds,
                   f"largest block recovery {rec[peak]:.2f} at layer {peak} of {n_layers} "
                   f"(simultaneous 95% lower bound {low[peak]:.2f})", len(gains),
                   _support(decide, [effects, gains], holds, seed))


def band(pairs: pd.DataFrame, n_layers: int, *, low: float = 0.1, high: float = 0.9, seed: int = 0) -> Verdict:
    """The gain is carried by a short mid-depth band. Rule: the residual-stream recovery (tuned ->
    base, all positions) first reaches ``low`` and first reaches ``high`` within at most L/5 layers of
    each other, both inside the middle third of depth."""
    effects, gains = _curve(pairs, "resid")

    def window(e, g):
        r = e.mean(0) / g.mean()
        above_low, above_high = np.flatnonzero(r >= low), np.flatnonzero(r >= high)
        if not len(above_high):
            return None
        return int(above_low[0]), int(above_high[0])

    def decide(e, g):
        w = window(e, g)
        return bool(w is not None and w[1] - w[0] + 1 <= n_layers / 5 and _middle(w[0], n_layers)
                    and _middle(w[1], n_layers))

    w = window(effects, gains)
    holds = decide(effects, gains)
    rec = effects.mean(0) / gains.mean()
    where = (f"recovery first ≥ {low} at layer {w[0]} and ≥ {high} at layer {w[1]}" if w else
             f"recovery never reaches {high} (largest {rec.max():.2f}, at layer {int(rec.argmax())})")
    return Verdict("The gain is carried by a short mid-depth band of layers (patching)",
                   f"residual-stream recovery (tuned→base) rises from {low} to {high} within at most L/5 layers, "
                   "all in the middle third of depth", holds, where, len(gains),
                   _support(decide, [effects, gains], holds, seed))


def early_late(windows: pd.DataFrame, n_layers: int, *, limit: float = 0.2, seed: int = 0) -> Verdict:
    """The paper's "early and late layers are largely unaffected". Rule: the own change of the first
    third of the layers, and that of the last third (each patched as one window, tuned -> base),
    each recover less than ``limit`` of the gain: both upper bounds of 97.5% BCa CIs (95% jointly)."""
    third = n_layers // 3
    parts = {"early": (0, third - 1), "late": (n_layers - third, n_layers - 1)}
    cells, ups = {}, {}
    for name, (a, b) in parts.items():
        g = windows[(windows.a == a) & (windows.b == b) & (windows.direction == "tuned_to_base")]
        if g.empty:
            raise ValueError(f"early_late needs the window ({a}, {b}) in the window table")
        cells[name] = (g.effect.to_numpy(), g.gain.to_numpy())
        ups[name] = stats.recovery(*cells[name], level=0.975, seed=seed)
    holds = all(ci[2] < limit for ci in ups.values())

    def decide(e1, e2, g):
        r = [e.mean() / g.mean() for e in (e1, e2)]
        se = [((e - g * ri) / g.mean()).std(ddof=1) / np.sqrt(len(g)) for e, ri in zip((e1, e2), r)]
        return bool(all(ri + 2.24 * s < limit for ri, s in zip(r, se)))

    (e1, g1), (e2, _) = cells["early"], cells["late"]
    return Verdict("Early and late layers are largely unaffected",
                   f"the own change of the first third of the layers and that of the last third, each patched as "
                   f"one window (tuned→base), each recover less than {limit} of the gain (upper bounds of 97.5% CIs)",
                   holds, "; ".join(f"{k} layers {parts[k][0]}-{parts[k][1]}: {_ci(v)}" for k, v in ups.items()),
                   len(g1), _support(decide, [e1, e2, g1], holds, seed))


def few_layers(result, n_layers: int, *, feature: str = "relative") -> Verdict:
    """The paper's LASSO claim: few layers carry non-zero coefficients. Rule: 1 to L/5 layers non-zero,
    at least one of them stable (selected in >= 90% of half-samples), and a positive held-out R^2.
    Support: stability selection's own resampling, the share of a selected layer's half-samples."""
    fit = result.fit.iloc[0]
    selected = result.selected
    stability = result.stability.set_index("layer").selection_frequency
    stable = [l for l in selected if stability[l] >= 0.9]
    shape_ok = bool(1 <= len(selected) <= n_layers / 5 and fit.r2_test > 0)
    holds = bool(shape_ok and stable)
    # when the outcome hinges on stability, its support is the half-samples agreeing with it
    best = float(stability[selected].max()) if selected else 0.0
    support = (best if holds else 1 - best) if shape_ok else 1.0
    return Verdict(f"Few layers carry non-zero LASSO coefficients ({feature})",
                   "1 to L/5 layers non-zero, at least one selected in ≥ 90% of half-samples, held-out R² > 0", holds,
                   f"non-zero layers: {', '.join(map(str, selected)) or 'none'}; stable: "
                   f"{', '.join(map(str, stable)) or 'none'}; held-out R² {fit.r2_test:.2f}", int(fit.n_train + fit.n_test),
                   support)


def few_directions(results: dict, *, k_max: int = 16, seed: int = 0) -> Verdict:
    """A few directions recover nearly the whole effect. Rule: at some key layer, the top-k principal
    directions with k <= ``k_max`` recover at least 90% of the full patch's effect, while random
    subspaces of the same k recover at most half as much (mean over draws)."""
    def hit(pairs):
        shares = {}
        for (basis, k), g in pairs.groupby(["basis", "k"]):
            shares[basis, k] = g.effect.sum() / g.full_effect.sum()
        for k in sorted({k for b, k in shares if b == "pca" and k <= k_max}):
            if shares["pca", k] >= 0.9 and shares.get(("random", k), 0.0) <= 0.5 * shares["pca", k]:
                return k
        return None

    found = {layer: hit(r.pairs) for layer, r in results.items()}
    holds = any(k is not None for k in found.values())
    evidence = "; ".join(f"layer {l}: " + (f"{k} directions" if k else "no k ≤ 16") for l, k in found.items())

    def decide(*cols):  # resample the held-out pairs of every layer together
        return any(hit(r.pairs[r.pairs.id.isin(set(cols[0]))].merge(pd.DataFrame({"id": cols[0]}), on="id")) is not None
                   for r in results.values())

    ids = np.asarray(next(iter(results.values())).pairs.id.unique())
    support = _support(decide, [ids], holds, seed) if len(ids) else 0.0
    return Verdict("A few directions recover nearly the whole effect (low rank)",
                   f"at some key layer ≤ {k_max} principal directions recover ≥ 90% of the full patch's effect and "
                   "random subspaces of the same size at most half of that", holds, evidence, len(ids), support)


def _curve(pairs: pd.DataFrame, site: str):
    cell = pairs[(pairs.site == site) & (pairs.direction == "tuned_to_base") & (pairs.control == "patch")
                 & (pairs.positions == "all")]
    if cell.empty:
        raise ValueError(f"no exact tuned_to_base {site} patch at all positions in the sweep")
    wide = cell.pivot_table(index="id", columns="layer", values="effect", sort=False)
    gains = cell.groupby("id", sort=False).gain.first().loc[wide.index]
    return wide.to_numpy(), gains.to_numpy()


def _se(effects, gains):
    """Each layer's standard error of the recovery, from its per-pair influence values."""
    r = effects.mean(0) / gains.mean()
    return ((effects - gains[:, None] * r) / gains.mean()).std(0, ddof=1) / np.sqrt(len(gains))


def _middle(layer: int, n_layers: int) -> bool:
    return n_layers / 3 <= layer < 2 * n_layers / 3


def _ci(ci, digits: int = 2) -> str:
    f = f"{{:.{digits}f}}"
    return f"{f.format(ci[0])} (95% CI {f.format(ci[1])} to {f.format(ci[2])})"
