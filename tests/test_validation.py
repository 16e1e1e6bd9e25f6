"""The whole pipeline on planted pairs from the tiny model, held to the known answer."""

import pytest
import torch

from alignlib import lasso_layers, planted_pair, response_activations, score, validate
from alignlib.builtin import TINY_DPO
from alignlib.models import decoder_layers


@pytest.fixture(scope="module")
def split(builtin_prefs):
    return builtin_prefs[:48], builtin_prefs[48:112]


@pytest.fixture(scope="module")
def dpo_layer1(tiny, split):
    return planted_pair(tiny, layer=1, kind="dpo", prefs=split[1], dpo=TINY_DPO)


def test_dpo_with_frozen_layers_changes_only_the_planted_layer(tiny, dpo_layer1):
    changed = [any(not torch.equal(a, b) for a, b in zip(lb.parameters(), lt.parameters()))
               for lb, lt in zip(decoder_layers(tiny.base), decoder_layers(dpo_layer1.tuned))]
    assert changed == [False, True, False, False]
    rest_b = [p for n, p in tiny.base.named_parameters() if ".layers." not in n]
    rest_t = [p for n, p in dpo_layer1.tuned.named_parameters() if ".layers." not in n]
    assert all(torch.equal(a, b) for a, b in zip(rest_b, rest_t))


def test_patching_localises_a_dpo_planted_layer_exactly(dpo_layer1, split):
    result = validate(dpo_layer1, split[0], layer=1, lasso_measures=())
    patching = result.checks
    assert patching.passed.all(), patching[~patching.passed].to_string()
    block = result.summary.query("site == 'block' and direction == 'tuned_to_base'").set_index("layer").recovery
    assert block[0] == 0.0 and abs(block[1] - 1) < 1e-5
    # the DPO change is a real preference change: the planted pair has a positive mean gain
    assert result.summary.mean_gain.iloc[0] > 0


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_low_rank_check_finds_the_planted_rank(tiny, split, rank):
    planted = planted_pair(tiny, layer=2, rank=rank, kind="rank")
    checks = validate(planted, split[0], layer=2, rank=rank, train_prefs=split[1],
                      lasso_measures=("attribution",)).checks
    assert checks.passed.all(), checks[~checks.passed].to_string()
    assert checks.check.str.startswith("LASSO on attribution").sum() == 1


def test_every_check_passes_on_a_perturbed_layer(tiny, split):
    planted = planted_pair(tiny, layer=2, kind="weights")
    checks = validate(planted, split[0], layer=2, lasso_measures=("attribution",)).checks
    assert checks.passed.all(), checks[~checks.passed].to_string()


def test_diffuse_pair_is_not_reported_as_localised(tiny, split):
    checks = validate(planted_pair(tiny, kind="diffuse"), split[0], layer=None).checks
    assert checks.passed.all(), checks[~checks.passed].to_string()


def test_local_distance_is_nonzero_only_at_the_planted_layer(dpo_layer1, split):
    wide = response_activations(dpo_layer1, split[0], progress=False).distances_wide("local")
    assert (wide[[0, 2, 3]].to_numpy() == 0).all()
    assert (wide[1].to_numpy() > 0).all()
    # while the paper's stream distances carry the change into every later layer
    relative = response_activations(dpo_layer1, split[0], progress=False).distances_wide("relative")
    assert (relative[0].to_numpy() == 0).all() and (relative[[2, 3]].to_numpy() > 0).all()


def test_lasso_on_local_distances_never_selects_an_unchanged_layer(dpo_layer1, split):
    # Whether layer 1 reaches 90% stability is reported, not asserted (notebook 06 shows it does not);
    # but with local distances, exactly zero at every other layer, no other layer can be picked.
    features = response_activations(dpo_layer1, split[0], progress=False).distances_wide("local")
    gains = score(dpo_layer1, split[0], progress=False).set_index("id").loc[features.index, "reward_gain"]
    freq = lasso_layers(features, gains, n_boot=50).stability.set_index("layer").selection_frequency
    assert (freq[[0, 2, 3]] == 0).all()


def test_lasso_on_attribution_selects_the_dpo_planted_layer_in_90_percent_of_resamples(dpo_layer1, split):
    # The signed, first-order feature predicts the gain linearly, so the LASSO finds the planted layer.
    features = response_activations(dpo_layer1, split[0], progress=False).distances_wide("attribution")
    gains = score(dpo_layer1, split[0], progress=False).set_index("id").loc[features.index, "reward_gain"]
    freq = lasso_layers(features, gains, n_boot=50).stability.set_index("layer").selection_frequency
    assert freq[1] >= 0.9 and (freq[[0, 2, 3]] == 0).all()


def test_planted_pair_refuses_bad_requests(tiny):
    with pytest.raises(ValueError, match="needs prefs"):
        planted_pair(tiny, layer=1, kind="dpo")
    with pytest.raises(ValueError, match="unknown kind"):
        planted_pair(tiny, layer=1, kind="everywhere")
    with pytest.raises(ValueError, match="layer in 0..3"):
        planted_pair(tiny, layer=7, kind="weights")


def test_validate_refuses_a_rank_check_without_training_pairs(tiny, split):
    planted = planted_pair(tiny, layer=2, rank=1, kind="rank")
    with pytest.raises(ValueError, match="train_prefs"):
        validate(planted, split[0], layer=2, rank=1)
