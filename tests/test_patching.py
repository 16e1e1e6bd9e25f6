"""Invariants of layer-wise patching, held to tight tolerances on the tiny pair (and SmolLM2, slow)."""

import copy
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

from alignlib import ModelPair, PairError, load_pair
from alignlib.hooks import capture, layer_calls, patch, resume_from, resume_stacked
from alignlib.metrics import token_logprobs
from alignlib.models import decoder_layers, final_norm
from alignlib.patching import CONTROLS, patch_sweep

SITES = ["resid", "block", "attn", "mlp"]
BOTH = ["tuned_to_base", "base_to_tuned"]


def one_layer_pair(pair: ModelPair, k: int, scale: float = 0.3, seed: int = 0) -> ModelPair:
    """A pair whose tuned side is the base with only decoder layer k changed."""
    tuned = copy.deepcopy(pair.base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in decoder_layers(tuned)[k].parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=gen))
    return ModelPair(pair.base, tuned, pair.tokenizer, f"one-layer-{k}")


@pytest.fixture(scope="module")
def prefs(builtin_prefs):
    return builtin_prefs[:6]


def test_identity_patch_changes_nothing_at_every_site_and_direction(tiny, prefs):
    for method in ("fast", "hooks"):
        sw = patch_sweep(tiny, prefs, site=SITES, direction=BOTH, controls=["identity"], method=method,
                         chunk_size=3, progress=False)
        ident = sw.pairs.query("control == 'identity'")
        assert len(ident) == len(prefs) * 4 * 2 * tiny.n_layers
        assert (ident.effect == 0).all()
        assert (ident.margin_patched == ident.margin_receiver).all()


def test_fast_path_equals_plain_hook_path(tiny, prefs):
    kw = dict(site=SITES, direction=BOTH, controls=CONTROLS, chunk_size=3, batch_size=4, progress=False)
    fast = patch_sweep(tiny, prefs, **kw).pairs
    plain = patch_sweep(tiny, prefs, method="hooks", **kw).pairs
    np.testing.assert_allclose(fast.margin_patched, plain.margin_patched, rtol=1e-4, atol=1e-4)


def test_stacked_resume_equals_one_resume_per_layer(tiny, builtin_prefs):
    """Running every later layer once on all patched streams stacked gives each stream's own resume."""
    from alignlib.data import collate, encode_pairs, sequences
    from alignlib.models import final_hidden

    seqs = sequences(encode_pairs(tiny.tokenizer, builtin_prefs[:3]))
    batch = collate(seqs, 0)  # padded: the attention mask must be tiled with the streams
    assert (batch.attention_mask == 0).any()
    with torch.no_grad(), capture(tiny.base) as acts, layer_calls(tiny.base) as calls:
        final_hidden(tiny.base, batch.input_ids, batch.attention_mask)
    gen = torch.Generator().manual_seed(0)
    streams = {l: acts["resid", l] + 0.1 * torch.randn(acts["resid", l].shape, generator=gen)
               for l in range(tiny.n_layers)}
    with torch.no_grad():
        stacked = resume_stacked(tiny.base, calls, streams)
        for l, stream in streams.items():
            if l + 1 < tiny.n_layers:
                with resume_from(tiny.base, l + 1, stream):
                    one = final_hidden(tiny.base, batch.input_ids, batch.attention_mask)
            else:
                one = final_norm(tiny.base)(stream)
            real = batch.attention_mask.bool()
            torch.testing.assert_close(stacked[l][real], one[real], rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="out of range"):
            resume_stacked(tiny.base, calls, {tiny.n_layers: streams[0]})


def test_stack_size_does_not_change_a_sweep(tiny, prefs, monkeypatch):
    import alignlib.patching as patching

    kw = dict(site=["resid", "block"], direction=BOTH, controls=["identity", "noise"], chunk_size=3,
              progress=False)
    monkeypatch.setattr(patching, "STACK_TOKENS", 1)  # one stream per stack: plain resumes
    single = patch_sweep(tiny, prefs, **kw).pairs
    monkeypatch.setattr(patching, "STACK_TOKENS", 10**9)  # every layer in one stack
    stacked = patch_sweep(tiny, prefs, **kw).pairs
    np.testing.assert_allclose(stacked.margin_patched, single.margin_patched, rtol=1e-5, atol=1e-5)
    assert (stacked[stacked.control == "identity"].effect == 0).all()


def test_last_layer_resid_gives_the_donor_stream_through_the_receivers_head(tiny, prefs):
    """tuned->base resid at the last layer = the tuned model's last-layer output, passed through the
    base's final norm and unembedding. (Equal to the tuned log-probs when the two share norm and head.)"""
    last = tiny.n_layers - 1
    sw = patch_sweep(tiny, prefs, layers=[last], controls=[], chunk_size=3, progress=False)
    from alignlib.data import collate, encode_pairs
    from alignlib.metrics import pad_id

    expected = []
    for e in encode_pairs(tiny.tokenizer, prefs):
        logp = []
        for ids, start in ((e.chosen, e.chosen_start), (e.rejected, e.rejected_start)):
            batch = collate([(ids, start)], pad_id(tiny.tokenizer))
            with torch.no_grad(), capture(tiny.tuned, layers=[last]) as acts:
                tiny.tuned(batch.input_ids)
            h = final_norm(tiny.base)(acts["resid", last])
            logp.append(token_logprobs(tiny.base, h, batch.input_ids, batch.response_mask)[0].item())
        expected.append(logp[0] - logp[1])
    np.testing.assert_allclose(sw.pairs.margin_patched, expected, rtol=1e-5)


@pytest.mark.parametrize("k", [0, 2, 3])
def test_a_pair_that_differs_in_one_layer_is_localized_to_it(tiny, prefs, k):
    pair = one_layer_pair(tiny, k)
    sw = patch_sweep(pair, prefs, site=["resid", "block"], direction=BOTH, controls=[], chunk_size=3,
                     progress=False)
    s = sw.summary.set_index(["site", "direction", "layer"]).recovery
    p = sw.pairs
    for d in BOTH:
        for layer in range(tiny.n_layers):
            cell = p[(p.direction == d) & (p.layer == layer)]
            resid, block = cell[cell.site == "resid"], cell[cell.site == "block"]
            if layer < k:  # nothing differs yet: the patch is a no-op, bit for bit
                assert (resid.effect == 0).all() and (block.effect == 0).all()
            else:  # from k on the patched run is the donor's run
                np.testing.assert_allclose(resid.margin_patched, resid.margin_donor, rtol=1e-6, atol=1e-6)
                assert s["resid", d, layer] == pytest.approx(1, abs=1e-6)
            if layer == k:
                np.testing.assert_allclose(block.margin_patched, block.margin_donor, rtol=1e-6, atol=1e-6)
                assert s["block", d, layer] == pytest.approx(1, abs=1e-5)  # in + (out - in): one rounding


def test_positions_at_the_last_layer_add_up(tiny, prefs):
    """At the last layer each position's log-prob depends on its own stream only: effects are additive."""
    last = tiny.n_layers - 1
    eff = {pos: patch_sweep(tiny, prefs, layers=[last], positions=pos, controls=[], progress=False).pairs.effect
           for pos in ("all", "prompt", "response")}
    np.testing.assert_allclose(eff["all"], eff["prompt"] + eff["response"], rtol=1e-4, atol=1e-4)
    # ...and of the prompt positions only the last one predicts a response token.
    only_last_prompt = patch_sweep(tiny, prefs, layers=[last], positions=[-1], controls=[], progress=False)
    np.testing.assert_allclose(only_last_prompt.pairs.effect, eff["prompt"], rtol=1e-5, atol=1e-6)
    assert (eff["prompt"] != 0).any()


def test_controls_on_identical_models(tiny, prefs):
    """With tuned == base the real patch and the noise control do nothing; a shuffled donor does."""
    same = ModelPair(tiny.base, tiny.base, tiny.tokenizer, "same")
    sw = patch_sweep(same, prefs, site=["resid", "block"], controls=CONTROLS, chunk_size=3, progress=False).pairs
    for control in ("patch", "identity", "noise"):
        assert (sw[sw.control == control].effect == 0).all(), control
    assert (sw[(sw.control == "shuffled") & (sw.layer == 0)].effect != 0).all()
    assert (sw[sw.control == "zero_ablation"].effect != 0).any()


def test_shuffled_and_mean_ablation_keep_their_meaning_on_packed_pairs(tiny, builtin_prefs):
    """Packing computes the shared prompt once; the controls still mean what they mean on separate sequences.

    A chunk of copies of one pair: the shuffled donor (another pair, each part aligned on the
    response start) is the pair's own donor, so shuffled equals the real patch. Mean ablation averages
    over the tokens of both sequences, the prompt's counted twice, as on separate sequences.
    """
    from alignlib.data import collate, encode_pairs, sequences
    from alignlib.models import final_hidden
    from alignlib.patching import _Chunk

    copies = [builtin_prefs[0]] * 4
    sw = patch_sweep(tiny, copies, site=["resid", "block"], controls=["shuffled"], chunk_size=4,
                     progress=False).pairs
    real, shuffled = sw[sw.control == "patch"], sw[sw.control == "shuffled"]
    np.testing.assert_allclose(shuffled.margin_patched, real.margin_patched, rtol=1e-6, atol=1e-6)

    encoded = encode_pairs(tiny.tokenizer, builtin_prefs[:5])
    chunk = _Chunk(tiny, encoded, 4, [], 0, 0)
    batch = collate(sequences(encoded), 0)
    with torch.no_grad(), capture(tiny.base) as acts:
        final_hidden(tiny.base, batch.input_ids, batch.attention_mask)
    real_tokens = batch.attention_mask.bool()
    for layer in range(tiny.n_layers):
        value, _ = chunk.control_value("mean_ablation", "resid", layer, "base", "tuned", 0,
                                       chunk.position_mask(0, "all"), None)
        torch.testing.assert_close(value[0, 0], acts["resid", layer][real_tokens].mean(0), rtol=1e-5, atol=1e-5)


def test_summary_is_a_ratio_of_means_with_a_ci(tiny, prefs):
    sw = patch_sweep(tiny, prefs, controls=[], progress=False, n_boot=300)
    for row in sw.summary.itertuples():
        cell = sw.pairs[sw.pairs.layer == row.layer]
        assert row.recovery == pytest.approx(cell.effect.mean() / cell.gain.mean())
        assert row.ci_low <= row.ci_high
    assert set(sw.summary.columns) >= {"site", "direction", "control", "layer", "recovery", "ci_low", "ci_high"}


def test_bad_arguments_get_clear_errors(tiny, prefs):
    with pytest.raises(ValueError, match="unknown site 'embed'"):
        patch_sweep(tiny, prefs, site="embed")
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \[4\]: the model has layers 0..3"):
        patch_sweep(tiny, prefs, layers=[4])
    with pytest.raises(ValueError, match="unknown direction"):
        patch_sweep(tiny, prefs, direction="sideways")
    with pytest.raises(ValueError, match="unknown control"):
        patch_sweep(tiny, prefs, controls=["magic"])
    with pytest.raises(ValueError, match="unknown positions"):
        patch_sweep(tiny, prefs, positions="middle")
    with pytest.raises(PairError, match="no tuned side"):
        patch_sweep(ModelPair(tiny.base, None, tiny.tokenizer, "base-only"), prefs)
    with pytest.raises(ValueError, match="no preference pairs"):
        patch_sweep(tiny, [])


def test_hooks_are_removed_even_when_the_forward_raises(tiny):
    layers = decoder_layers(tiny.base)
    before = [dict(l._forward_hooks) for l in layers]
    with pytest.raises(RuntimeError):
        with patch(tiny.base, "resid", 1, torch.zeros(1, 3, 64)), capture(tiny.base, sites=SITES):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        with resume_from(tiny.base, 2, torch.zeros(1, 3, 64)):
            raise RuntimeError("boom")
    assert [dict(l._forward_hooks) for l in layers] == before
    assert all(type(l).__name__ == "LlamaDecoderLayer" for l in layers)


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from alignlib import load_pair, load_preferences
    from alignlib import runs
    from alignlib.patching import patch_sweep
    saved = []
    real_save = runs.RunFolder.save
    def save_then_die(self, name, table):
        real_save(self, name, table)
        saved.append(name)
        if len(saved) == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 right after the second chunk is on disk
    runs.RunFolder.save = save_then_die
    pair = load_pair("tiny")
    patch_sweep(pair, load_preferences("builtin")[:8], site=["resid", "block"], chunk_size=2,
                run_dir=sys.argv[1], progress=False)
""")


def test_a_sweep_killed_by_sigkill_resumes_without_recomputing(tiny, builtin_prefs, tmp_path, monkeypatch):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(run)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert sorted(p.name for p in run.glob("sweep-chunk-*.csv")) == ["sweep-chunk-00000.csv", "sweep-chunk-00001.csv"]
    assert not list(run.glob(".*"))  # no half-written files left behind

    import alignlib.patching as patching

    computed = []
    real_chunk = patching._sweep_chunk
    monkeypatch.setattr(patching, "_sweep_chunk", lambda *a, **k: computed.append(1) or real_chunk(*a, **k))
    kw = dict(site=["resid", "block"], chunk_size=2, progress=False)
    resumed = patch_sweep(tiny, builtin_prefs[:8], run_dir=run, **kw)
    assert len(computed) == 2  # only the two chunks that were not finished
    fresh = patch_sweep(tiny, builtin_prefs[:8], **kw)
    pd.testing.assert_frame_equal(resumed.pairs, fresh.pairs)
    pd.testing.assert_frame_equal(resumed.summary, fresh.summary)
    with pytest.raises(ValueError, match="another config"):
        patch_sweep(tiny, builtin_prefs[:8], run_dir=run, site="resid", chunk_size=2, progress=False)
    other = ModelPair(tiny.base, tiny.base, tiny.tokenizer, tiny.name)  # same name, other weights
    with pytest.raises(ValueError, match="weights_sha1"):
        patch_sweep(other, builtin_prefs[:8], run_dir=run, **kw)


@pytest.mark.slow
def test_fast_path_equals_plain_path_on_smollm2_with_padding():
    from alignlib import load_preferences
    from alignlib.models import smollm2_gguf

    base = load_pair(str(smollm2_gguf()))
    pair = one_layer_pair(base, 12, scale=0.05)
    prefs = load_preferences("builtin")[:3]
    kw = dict(site=SITES, layers=[0, 12, 29], controls=["identity"], batch_size=6, chunk_size=3, progress=False)
    fast = patch_sweep(pair, prefs, **kw).pairs
    plain = patch_sweep(pair, prefs, method="hooks", **kw).pairs
    np.testing.assert_allclose(fast.margin_patched, plain.margin_patched, rtol=1e-4, atol=1e-4)
    assert (fast[fast.control == "identity"].effect == 0).all()
    r = fast[(fast.control == "patch") & (fast.site == "resid")]
    assert (r[r.layer < 12].effect == 0).all()
    np.testing.assert_allclose(r[r.layer >= 12].margin_patched, r[r.layer >= 12].margin_donor, rtol=1e-5, atol=1e-4)


def test_a_sweep_works_on_models_whose_weights_require_grad(tiny, prefs):
    # A ModelPair built by hand from freshly loaded models (weights requiring grad, as from_pretrained
    # leaves them) sweeps like one from load_pair, with the same numbers.
    base, tuned = copy.deepcopy(tiny.base).requires_grad_(True), copy.deepcopy(tiny.tuned).requires_grad_(True)
    kw = dict(site="resid", controls=[], chunk_size=3, progress=False)
    by_hand = patch_sweep(ModelPair(base, tuned, tiny.tokenizer, "by hand"), prefs, **kw).pairs
    loaded = patch_sweep(tiny, prefs, **kw).pairs
    assert np.array_equal(by_hand.effect.to_numpy(), loaded.effect.to_numpy())
    assert all(p.grad is None for p in base.parameters())
