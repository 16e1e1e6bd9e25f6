"""Each verdict rule on planted truth at the scale it is applied to (30 layers, 64 pairs), and its support."""

import numpy as np
import pandas as pd
import pytest

from alignlib import lasso_layers, verdicts

L, N = 30, 64


def sweep(recovery_by_site: dict, *, noise: float = 0.3, seed: int = 0) -> pd.DataFrame:
    """A per-pair sweep table whose mean recovery per (site, layer) is planted, with per-pair noise."""
    rng = np.random.default_rng(seed)
    gains = rng.gamma(2.0, 1.0, N)  # positive on average, spread like a real gain
    rows = []
    for site, curve in recovery_by_site.items():
        for layer, r in enumerate(curve):
            effect = r * gains + noise * rng.standard_normal(N)
            rows.append(pd.DataFrame(dict(id=[f"p{i}" for i in range(N)], site=site, direction="tuned_to_base",
                                          control="patch", positions="all", layer=layer, effect=effect, gain=gains)))
    return pd.concat(rows, ignore_index=True)


def band_curve(a, b):
    return np.clip((np.arange(L) - a + 1) / (b - a + 1), 0, 1)


def test_the_band_rule_finds_a_planted_mid_band_and_not_a_ramp_or_an_early_band():
    assert verdicts.band(sweep({"resid": band_curve(12, 17)}), L).outcome == "holds"
    assert verdicts.band(sweep({"resid": band_curve(0, 29)}), L).outcome == "does not hold"  # diffuse
    assert verdicts.band(sweep({"resid": band_curve(2, 6)}), L).outcome == "does not hold"  # short but early


def test_the_single_layer_rule_needs_one_mid_layer_with_most_of_the_gain():
    one = np.zeros(L)
    one[15] = 0.9
    assert verdicts.single_layer(sweep({"block": one}), L).outcome == "holds"
    spread = np.where((np.arange(L) >= 12) & (np.arange(L) <= 17), 1 / 6, 0.0)
    assert verdicts.single_layer(sweep({"block": spread}), L).outcome == "does not hold"


def test_early_late_windows():
    def windows(early, late, seed=0):
        rng = np.random.default_rng(seed)
        gains = rng.gamma(2.0, 1.0, N)
        return pd.concat([pd.DataFrame(dict(id=range(N), a=a, b=b, direction="tuned_to_base",
                                            effect=r * gains + 0.1 * rng.standard_normal(N), gain=gains))
                          for (a, b), r in (((0, 9), early), ((20, 29), late))])

    assert verdicts.early_late(windows(0.0, 0.02), L).outcome == "holds"
    assert verdicts.early_late(windows(0.4, 0.02), L).outcome == "does not hold"
    with pytest.raises(ValueError, match="needs the window"):
        verdicts.early_late(windows(0, 0).query("a == 0"), L)


def test_a_verdict_on_its_threshold_is_unstable_not_a_pass_or_a_fail():
    rng = np.random.default_rng(0)
    scores = pd.DataFrame({"reward_gain": rng.standard_normal(N) + 0.25, "reward_gain_mean": rng.standard_normal(N) + 0.25})
    v = verdicts.signal(scores)
    assert 0.2 < v.support < 0.9 and v.outcome == "unstable"
    clear = verdicts.signal(scores.assign(reward_gain=scores.reward_gain + 1, reward_gain_mean=scores.reward_gain_mean + 1))
    assert clear.outcome == "holds" and clear.support >= 0.99


def test_the_lasso_rule_on_planted_layers():
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.standard_normal((254, L)))
    y = 2.0 * X[14] - 1.5 * X[16] + 0.5 * rng.standard_normal(254)
    assert verdicts.few_layers(lasso_layers(X, y, seed=0), L).outcome == "holds"
    noise = lasso_layers(X, rng.standard_normal(254), seed=0)
    assert verdicts.few_layers(noise, L).outcome == "does not hold"
