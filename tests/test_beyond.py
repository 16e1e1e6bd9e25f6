"""The analyses beyond the paper, each on planted truth: the window is the planted band, own changes add
up, a planted direction transfers and steers while a random one does not, checkpoints resume exactly
and a planted band's change stays in the band all along training."""

import copy

import numpy as np
import pytest
import torch

from alignlib import patch_sweep, planted_pair
from alignlib.analysis.steering import steer, steering_direction, steering_summary, transfer
from alignlib.analysis.windows import shortest_windows, window_sweep, window_summary
from alignlib.builtin import TINY_DPO
from alignlib.models import decoder_layers
from alignlib.tuning import Checkpoints, DPORecipe, make_tuned


@pytest.fixture(scope="module")
def split(builtin_prefs):
    return builtin_prefs[:32], builtin_prefs[100:164]


@pytest.fixture(scope="module")
def band(tiny, split):
    return planted_pair(tiny, kind="dpo", layers=[1, 2], prefs=split[1], dpo=TINY_DPO)


def test_the_shortest_window_carrying_the_gain_is_the_planted_band(band, split):
    test = split[0]
    screen = patch_sweep(band, test, site="own", method="attribution", controls=[], chunk_size=32, progress=False)
    attribution = screen.summary.set_index("layer").mean_effect
    found = shortest_windows(band, test, attribution, shares=(0.9,), seed=0)
    assert (found.answer.a.iloc[0], found.answer.b.iloc[0]) == (1, 2)
    exact = window_summary(window_sweep(band, test, [(1, 2), (0, 3), (1, 1), (2, 3)])).set_index(["a", "b"])
    assert exact.recovery[1, 2] == pytest.approx(1, abs=1e-5) and exact.recovery[0, 3] == pytest.approx(1, abs=1e-5)
    assert abs(exact.recovery[1, 1] - 1) > 0.05  # one layer of the band is not the band


def test_own_changes_add_up_to_the_gain_to_first_order(tiny, split):
    ratios = []
    for scale in (0.04, 0.02, 0.01):
        planted = planted_pair(tiny, kind="diffuse", scale=scale, seed=0)
        own = patch_sweep(planted, split[0][:16], site="own", controls=[], chunk_size=16, progress=False).pairs
        gain = own.groupby("id").gain.first()
        ratios.append(float(np.abs(gain - own.groupby("id").effect.sum()).mean() / np.abs(gain).mean()))
    assert ratios[0] < 0.2 and ratios[0] / ratios[1] > 1.6 and ratios[1] / ratios[2] > 1.6, ratios
    one = planted_pair(tiny, kind="weights", layer=2, seed=0)  # one changed layer: its own change is the gain
    own = patch_sweep(one, split[0][:8], site="own", controls=[], chunk_size=8, progress=False).pairs
    np.testing.assert_allclose(own.groupby("id").effect.sum(), own.groupby("id").gain.first(), rtol=1e-5, atol=1e-5)


def test_a_planted_direction_transfers_to_other_pairs_and_a_random_one_does_not(tiny, split):
    planted = planted_pair(tiny, kind="rank", layer=2, rank=1, scale=1.0)
    table = transfer(planted, {"a": split[0][:16], "b": split[1][:16]}, layer=2, ks=(1,), n_boot=200)
    across = table.query("basis == 'pca' and train != test")
    assert (across.share > 0.95).all()
    assert (table.query("basis == 'random'").share.abs() < 0.3).all()


def test_steering_along_a_planted_shift_reproduces_the_tuned_margins_and_a_random_direction_does_not(tiny, split):
    """A tuned model that adds a constant vector c after layer 2 (a bias on its MLP's output projection):
    the direction found from Delta is c, and steering the base by c reproduces the tuned margins exactly."""
    from alignlib import ModelPair, response_activations
    from alignlib.capture import capture
    from alignlib.metrics import encoded_pairs, packed_batches

    test = split[0][:16]
    (_, batch), = packed_batches(tiny, encoded_pairs(tiny, test), len(test))
    s = float(capture(tiny.base, batch).value("resid", 2)[batch.real].norm(dim=-1).mean())
    c = torch.randn(tiny.base.config.hidden_size, generator=torch.Generator().manual_seed(0))
    c = 0.5 * s * c / c.norm()
    shifted = {}
    for sign in (1, -1):  # orient c so that it raises the margins on average: "the preferred way"
        tuned = copy.deepcopy(tiny.base)
        tuned.model.layers[2].mlp.down_proj.bias = torch.nn.Parameter(sign * c.clone())
        shifted[sign] = ModelPair(tiny.base, tuned, tiny.tokenizer, "tiny:shifted")
    gains = {sign: patch_sweep(p, test, layers=[2], controls=[], progress=False).pairs.groupby("id").gain.first()
             for sign, p in shifted.items()}
    sign = 1 if gains[1].mean() > 0 else -1
    planted, gain = shifted[sign], gains[sign]
    deltas = response_activations(planted, split[1][:16], keep_deltas=[2], features=False, progress=False).deltas[2]
    u = steering_direction(deltas)
    assert float(u @ (sign * c).numpy()) / float(c.norm()) == pytest.approx(1, abs=1e-4)
    table = steer(planted, test, {"found": u}, layer=2, alphas=(0.5,), n_random=5, batch_size=len(test))
    found = table.query("direction == 'found'").set_index("id").margin_change
    np.testing.assert_allclose(found.loc[gain.index], gain, rtol=1e-3, atol=1e-3)
    summary = steering_summary(table, n_boot=500).set_index("direction")
    assert summary.margin_change["found"] == pytest.approx(gain.mean(), rel=1e-3) and gain.mean() > 0
    for _, g in table.query("direction != 'found'").groupby("direction"):
        assert abs(np.corrcoef(g.set_index("id").margin_change.loc[gain.index], gain)[0, 1]) < 0.9


def test_checkpoints_resume_exactly_and_a_band_stays_in_the_band(tiny, builtin_prefs, tmp_path):
    recipe = DPORecipe(lr=1e-3, epochs=2, batch_size=8, warmup_steps=2, max_length=128, max_response_tokens=32)
    prefs = builtin_prefs[:48]
    full, log = make_tuned(tiny.base, tiny.tokenizer, prefs, recipe, layers=[1, 2], progress=False)
    saved = Checkpoints(tmp_path, (3, 7))

    class Stop(Exception):
        pass

    original = Checkpoints.save

    def save_then_stop(self, step, *args):
        original(self, step, *args)
        if step == 7:
            raise Stop

    Checkpoints.save = save_then_stop
    try:
        with pytest.raises(Stop):
            make_tuned(tiny.base, tiny.tokenizer, prefs, recipe, layers=[1, 2], checkpoints=saved, progress=False)
    finally:
        Checkpoints.save = original
    assert saved.done() == [3, 7] and not (saved.path(3) / "optimizer.safetensors").exists()
    resumed, log2 = make_tuned(tiny.base, tiny.tokenizer, prefs, recipe, layers=[1, 2], checkpoints=saved,
                               progress=False)
    assert all(torch.equal(a, b) for a, b in zip(full.parameters(), resumed.parameters()))
    assert list(log2.loss) == list(log.loss)
    for step in saved.done():  # the planted band's change is in the band at every checkpoint
        model = saved.load(step, copy.deepcopy(tiny.base))
        moved = [any(not torch.equal(a, b) for a, b in zip(lb.parameters(), lm.parameters()))
                 for lb, lm in zip(decoder_layers(tiny.base), decoder_layers(model))]
        assert moved == [False, True, True, False]
