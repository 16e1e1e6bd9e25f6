"""The statistics hold at the n the notebooks use: coverage near nominal, a corrected peak that stays quiet under the null."""

import numpy as np
import pytest

from alignlib import stats


def simulated(rng, n, layers=1, share=0.4):
    """Pairs with skewed gains (mean 1, sd ~3) and effects carrying ``share`` of each pair's gain plus noise."""
    gain = rng.gamma(0.4, 2.5, n)
    effect = share * gain[:, None] + rng.standard_normal((n, layers)) * 1.5
    return effect, gain


@pytest.mark.parametrize("n", [16, 64])
def test_bca_recovery_interval_covers_near_its_nominal_level(n):
    rng = np.random.default_rng(1)
    truth = 0.4  # E[effect] / E[gain] by construction
    hits = []
    for _ in range(300):
        effect, gain = simulated(rng, n)
        _, lo, hi = stats.recovery(effect[:, 0], gain, n_boot=999, seed=int(rng.integers(1e9)))
        hits.append(lo <= truth <= hi)
    coverage = np.mean(hits)
    assert 0.90 <= coverage <= 0.985, coverage  # nominal 0.95; 300 draws: +-0.025 is two standard errors


def test_slope_interval_covers_near_its_nominal_level():
    rng = np.random.default_rng(2)
    hits = []
    for _ in range(300):
        gain = rng.standard_normal(64) * 3 + 1  # negative gains too: the slope uses every pair
        effect = 0.3 * gain + rng.standard_normal(64)
        _, lo, hi = stats.slope(effect, gain, n_boot=999, seed=int(rng.integers(1e9)))
        hits.append(lo <= 0.3 <= hi)
    assert 0.90 <= np.mean(hits) <= 0.985, np.mean(hits)


def test_simultaneous_band_covers_every_layer_at_once():
    rng = np.random.default_rng(3)
    hits = []
    for _ in range(100):
        effect, gain = simulated(rng, 64, layers=30)
        low, high = stats.simultaneous_band(effect, gain, seed=int(rng.integers(1e9)))
        hits.append(np.all((low <= 0.4) & (0.4 <= high)))
    assert 0.90 <= np.mean(hits) <= 0.995, np.mean(hits)  # all 30 layers covered together, nominal 0.95


def test_max_t_peak_is_not_significant_on_null_pairs_but_the_uncorrected_one_often_is():
    rng = np.random.default_rng(4)
    corrected, naive = [], []
    for _ in range(200):
        effects = rng.standard_normal((64, 30)) + 0.6 * rng.standard_normal((64, 1))  # correlated layers, mean 0
        p = stats.max_t_test(effects, n_perm=999, seed=int(rng.integers(1e9)))
        corrected.append(p.min() < 0.05)
        t = effects.mean(0) / (effects.std(0, ddof=1) / 8)
        naive.append(t.max() > 1.645)  # the best of 30 layers at an uncorrected one-sided 5%
    assert np.mean(corrected) <= 0.08, np.mean(corrected)  # nominal 0.05
    assert np.mean(naive) >= 0.3  # why the correction is needed


def test_max_t_finds_a_real_peak():
    rng = np.random.default_rng(5)
    effects = rng.standard_normal((64, 30))
    effects[:, 14] += 0.8
    p = stats.max_t_test(effects, n_perm=1999, seed=0)
    assert p[14] < 0.01 and np.argmin(p) == 14
