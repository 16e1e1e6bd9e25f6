"""Each analysis on planted truth, where the answer is known, and once end-to-end on the tiny pair."""

import dataclasses
import textwrap

import numpy as np
import pandas as pd
import pytest

from alignlib.analysis.activations import response_activations
from alignlib.analysis.lasso import lasso_layers
from alignlib.analysis.lowrank import delta_directions, low_rank_recovery
from alignlib.analysis.probes import probe_layers
from alignlib.store import StoreError
from alignlib.validation import planted_pair


def test_lasso_selects_exactly_the_two_planted_layers():
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.standard_normal((300, 30)))
    y = 2.0 * X[3] - 1.5 * X[17] + 0.5 * rng.standard_normal(300)
    res = lasso_layers(X, y, n_boot=100, seed=0)
    assert res.selected == [3, 17]
    stab = res.stability.set_index("layer").selection_frequency
    assert stab[3] >= 0.9 and stab[17] >= 0.9
    assert stab.drop([3, 17]).max() < 0.5
    assert res.fit.r2_test.iloc[0] > 0.8
    assert set(res.path.columns) == {"alpha", "layer", "coef"}


def test_lasso_rejects_misaligned_input():
    with pytest.raises(ValueError, match="do not align"):
        lasso_layers(pd.DataFrame(np.zeros((10, 3))), np.zeros(9))


def test_probe_finds_a_planted_direction_only_where_it_is():
    rng = np.random.default_rng(0)
    n_pairs, hidden = 120, 16
    acts = rng.standard_normal((3, n_pairs, 2, hidden))
    acts[1, :, 0, 5] += 6.0  # layer 1: chosen responses sit 6 sd further along direction 5
    res = probe_layers({"base": acts}).set_index("layer")
    assert res.accuracy[1] > 0.95
    assert abs(res.accuracy[0] - 0.5) < 0.15 and abs(res.accuracy[2] - 0.5) < 0.15
    assert (res.ci_low <= res.accuracy).all() and (res.accuracy <= res.ci_high).all()


def test_delta_directions_recover_a_planted_rank():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((32, 3)))[0]
    deltas = rng.standard_normal((500, 3)) @ basis.T
    directions, share = delta_directions(deltas)
    assert share[:3].sum() == pytest.approx(1.0, abs=1e-9)
    proj = directions[:, :3] @ directions[:, :3].T
    assert np.allclose(proj @ basis, basis, atol=1e-8)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_low_rank_recovery_on_a_planted_rank_change(tiny, builtin_prefs, rank):
    pair = planted_pair(tiny, layer=2, rank=rank, kind="rank", scale=1.0)
    res = low_rank_recovery(pair, builtin_prefs[:24], builtin_prefs[100:124], layer=2, ks=[1, 2, 4, 64],
                            n_boot=200, progress=False)
    assert res.spectrum.cumulative.iloc[rank - 1] == pytest.approx(1.0, abs=1e-6)
    pca = res.recovery[res.recovery.basis == "pca"].set_index("k").share_of_full
    rand = res.recovery[res.recovery.basis == "random"].groupby("k").share_of_full.mean()
    assert pca[rank] == pytest.approx(1.0, abs=1e-3)
    assert res.k90 == rank or (rank > 1 and pca[rank // 2] >= 0.9 and res.k90 < rank)
    assert abs(rand[rank]) < 0.5


def test_analyses_run_end_to_end_on_the_tiny_pair(tiny, builtin_prefs):
    from alignlib import score

    prefs = builtin_prefs[:40]
    acts = response_activations(tiny, prefs, progress=False)
    assert list(acts.distances.columns) == ["id", "layer", "distance", "relative", "cosine", "local", "attribution"]
    assert len(acts.distances) == 40 * tiny.n_layers
    assert (acts.distances.distance > 0).all() and (acts.distances.cosine <= 1 + 1e-6).all()
    gain = score(tiny, prefs, progress=False).set_index("id").reward_gain.loc[acts.ids]
    res = lasso_layers(acts.distances_wide(), gain.to_numpy(), n_boot=20)
    assert len(res.coefficients) == tiny.n_layers
    probes = probe_layers(acts.pooled)
    assert set(probes.model) == {"base", "tuned"} and len(probes) == 2 * tiny.n_layers


def test_activation_distances_are_zero_for_identical_models(tiny, builtin_prefs):
    from alignlib import ModelPair

    same = ModelPair(tiny.base, tiny.base, tiny.tokenizer, "same")
    acts = response_activations(same, builtin_prefs[:4], progress=False)
    assert (acts.distances.distance == 0).all()
    assert (acts.distances.attribution == 0).all()
    assert np.allclose(acts.distances.cosine, 1, atol=1e-6)


@pytest.mark.parametrize("layer", [0, 2])
def test_attribution_is_the_first_order_reward_gain_of_the_changed_layer(tiny, builtin_prefs, layer):
    # A small change to one layer: its attribution is exactly zero at every other layer, and at the
    # changed layer it is the reward gain to first order (the second-order rest is ~1e-3 of it).
    from alignlib import score

    prefs = builtin_prefs[:12]
    small = planted_pair(tiny, layer=layer, kind="weights", scale=1e-3)
    wide = response_activations(small, prefs, progress=False).distances_wide("attribution")
    gain = score(small, prefs, progress=False).set_index("id").reward_gain.loc[wide.index]
    assert (wide.drop(columns=layer).to_numpy() == 0).all()
    assert np.allclose(wide[layer], gain, rtol=1e-2, atol=1e-2 * gain.abs().max())


def test_margin_gradients_match_autograd_through_the_whole_model_and_leave_weights_alone(tiny, builtin_prefs):
    import torch

    from alignlib.capture import capture, margin_gradients
    from alignlib.data import encode_pairs, pack_pairs
    from alignlib.forward import hidden, token_logprobs, weighted_margin
    from alignlib.hooks import resume_from

    model = tiny.base
    batch = pack_pairs(encode_pairs(tiny.tokenizer, builtin_prefs[:3]), 0)
    cap, grads = margin_gradients(model, batch, sublayers=("attn",), per_token=True)
    # reference: the gradient of row 2's summed margin alone, taken by nudging the stream after layer 1
    plain = capture(model, batch)
    assert torch.equal(cap.value("resid", 1), plain.value("resid", 1)) and torch.equal(cap.logp, plain.logp)
    stream = plain.value("resid", 1).clone().requires_grad_(True)
    with torch.enable_grad(), resume_from(model, 2, stream):
        margin = weighted_margin(batch, token_logprobs(model, hidden(model, batch), batch))
        (expected,) = torch.autograd.grad(margin[2], stream)
    assert torch.allclose(grads[False]["resid", 1][2], expected[2], atol=1e-6)
    assert (expected[[0, 1]] == 0).all()  # rows of a packed batch do not interact
    assert ("attn", 3) in grads[True] and all(p.grad is None for p in model.parameters())


def test_planted_pairs_differ_only_where_planted(tiny):
    import torch

    from alignlib.models import decoder_layers

    pair = planted_pair(tiny, layer=1, kind="weights")
    for i, (a, b) in enumerate(zip(decoder_layers(pair.base), decoder_layers(pair.tuned))):
        same = all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
        assert same == (i != 1)
    with pytest.raises(ValueError, match="needs layer"):
        planted_pair(tiny, kind="weights")
    with pytest.raises(ValueError, match="unknown kind"):
        planted_pair(tiny, layer=0, kind="magic")


def test_lasso_with_patching_effects_as_the_target(tiny, builtin_prefs):
    from alignlib import patch_sweep

    prefs = builtin_prefs[:24]
    acts = response_activations(tiny, prefs, progress=False)
    sweep = patch_sweep(tiny, prefs, site="block", controls=[], chunk_size=24, progress=False)
    effects = sweep.pairs.pivot(index="id", columns="layer", values="effect").loc[acts.ids]
    res = lasso_layers(acts.distances_wide(), effects.sum(axis=1).to_numpy(), n_boot=20)
    assert len(res.stability) == tiny.n_layers


def test_standard_figures_draw_from_the_tables():
    import matplotlib

    matplotlib.use("Agg")
    from alignlib import plots

    summary = pd.DataFrame({"layer": [0, 1, 0, 1], "control": ["patch", "patch", "noise", "noise"],
                            "recovery": [0.1, 0.9, 0.0, 0.05], "ci_low": [0, 0.8, -0.1, 0], "ci_high": [0.2, 1, 0.1, 0.1]})
    assert len(plots.layer_profile(summary).get_lines()) >= 2
    path = pd.DataFrame({"alpha": [1, 0.1, 1, 0.1], "layer": [0, 0, 1, 1], "coef": [0, 0.5, 0, 0]})
    stab = pd.DataFrame({"layer": [0, 1], "selection_frequency": [1.0, 0.1]})
    assert len(plots.lasso_path(path, stab, alpha=0.1)) == 2
    table = pd.DataFrame({"basis": ["pca", "pca", "random", "random"], "k": [1, 2, 1, 2], "energy": [0.6, 0.9, 0.01, 0.02],
                          "share_of_full": [0.5, 1, 0.01, 0.02], "share_ci_low": [0.4, 0.9, 0, 0],
                          "share_ci_high": [0.6, 1.1, 0.05, 0.05]})
    assert len(plots.recovery_vs_k(table).get_lines()) >= 2
    assert len(plots.recovery_vs_k(table, x="energy").get_lines()) >= 3
    probes = pd.DataFrame({"model": ["base", "tuned", "length only"], "layer": [0, 0, -1], "accuracy": [0.6, 0.7, 0.55],
                           "ci_low": [0.5, 0.6, 0.5], "ci_high": [0.7, 0.8, 0.6]})
    assert plots.probe_accuracy(probes).get_ylim() == (0.3, 1.02)


SHARDED_CAPTURE = textwrap.dedent("""
    import os, sys
    from alignlib import load_pair, load_preferences
    from alignlib.analysis.activations import response_activations
    pair = load_pair("tiny")
    acts = response_activations(pair, load_preferences("builtin")[:12], keep_deltas=[1], max_length=256,
                                chunk_size=3, run_dir=sys.argv[1], shard="auto", progress=False)
    acts.distances.to_parquet(f"{sys.argv[1]}-rank{os.environ['RANK']}.parquet")
""")


def test_a_capture_split_across_two_processes_under_torchrun_equals_one_process(tiny, builtin_prefs, tmp_path,
                                                                                torchrun, monkeypatch):
    from alignlib.analysis import activations

    run = tmp_path / "run"
    torchrun(SHARDED_CAPTURE, run, port=29534)
    assert len(list(run.glob("capture-chunk-*"))) == 4
    kw = dict(keep_deltas=[1], max_length=256, chunk_size=3, progress=False)
    one = response_activations(tiny, builtin_prefs[:12], run_dir=tmp_path / "one", **kw)
    for rank in (0, 1):  # each process returns the whole capture, equal to one process's
        pd.testing.assert_frame_equal(pd.read_parquet(f"{run}-rank{rank}.parquet"), one.distances)
    whole = response_activations(tiny, builtin_prefs[:12], keep_deltas=[1], max_length=256, progress=False)

    def recompute(*args):
        raise AssertionError("a finished chunk was recomputed")

    monkeypatch.setattr(activations, "_capture", recompute)
    again = response_activations(tiny, builtin_prefs[:12], run_dir=run, **kw)  # read back, nothing recomputed
    pd.testing.assert_frame_equal(again.distances, one.distances)
    np.testing.assert_array_equal(again.deltas[1], one.deltas[1])
    np.testing.assert_array_equal(again.delta_pair, one.delta_pair)
    np.testing.assert_array_equal(again.pooled["tuned"], one.pooled["tuned"])
    other = dataclasses.replace(planted_pair(tiny, layer=1, seed=3), name=tiny.name)
    with pytest.raises(StoreError, match=r"differs in \['weights_sha1'\]"):  # other weights, same name: refused
        response_activations(other, builtin_prefs[:12], run_dir=run, **kw)
    assert whole.ids == one.ids
    np.testing.assert_allclose(one.distances_wide("relative").to_numpy(), whole.distances_wide("relative").to_numpy(),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(one.pooled["base"], whole.pooled["base"], rtol=1e-5, atol=1e-6)
    order = np.lexsort((np.arange(len(one.delta_pair)), one.delta_pair))  # deltas come batch by batch
    worder = np.lexsort((np.arange(len(whole.delta_pair)), whole.delta_pair))
    np.testing.assert_allclose(one.deltas[1][order], whole.deltas[1][worder], rtol=1e-4, atol=1e-5)
