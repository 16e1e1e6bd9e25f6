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
from alignlib.capture import capture
from alignlib.data import encode_pairs, pack_pairs
from alignlib.forward import hidden, pair_logprobs
from alignlib.hooks import patch, record, resume_from, resume_stacked
from alignlib.models import decoder_layers, final_norm
from alignlib.patching import CONTROLS, patch_sweep

SITES = ["resid", "block", "attn", "mlp", "own"]
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
        assert len(ident) == len(prefs) * len(SITES) * 2 * tiny.n_layers
        assert (ident.effect == 0).all()
        assert (ident.margin_patched == ident.margin_receiver).all()


def test_fast_path_equals_plain_hook_path(tiny, prefs):
    kw = dict(site=SITES, direction=BOTH, controls=CONTROLS, chunk_size=3, batch_size=4, progress=False)
    fast = patch_sweep(tiny, prefs, **kw).pairs
    plain = patch_sweep(tiny, prefs, method="hooks", **kw).pairs
    np.testing.assert_allclose(fast.margin_patched, plain.margin_patched, rtol=1e-4, atol=1e-4)


def test_stacked_resume_equals_one_resume_per_layer(tiny, builtin_prefs):
    """Running every later layer once on all patched streams stacked gives each stream's own resume."""
    batch = pack_pairs(encode_pairs(tiny.tokenizer, builtin_prefs[:3]), 0)
    assert (~batch.real).any()  # padded: the attention mask must be tiled with the streams
    cap = capture(tiny.base, batch)
    gen = torch.Generator().manual_seed(0)
    streams = {l: cap.value("resid", l) + 0.1 * torch.randn(cap.value("resid", l).shape, generator=gen)
               for l in range(tiny.n_layers)}
    with torch.no_grad():
        stacked = resume_stacked(tiny.base, cap.calls, streams)
        for l, stream in streams.items():
            if l + 1 < tiny.n_layers:
                with resume_from(tiny.base, l + 1, stream):
                    one = hidden(tiny.base, batch)
            else:
                one = final_norm(tiny.base)(stream)
            torch.testing.assert_close(stacked[l][batch.real], one[batch.real], rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="out of range"):
            resume_stacked(tiny.base, cap.calls, {tiny.n_layers: streams[0]})


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
    sw = patch_sweep(tiny, prefs, layers=[last], controls=[], chunk_size=6, batch_size=6, progress=False)
    batch = pack_pairs(encode_pairs(tiny.tokenizer, prefs), 0)
    donor = capture(tiny.tuned, batch).value("resid", last)
    with torch.no_grad():
        logp = pair_logprobs(tiny.base, final_norm(tiny.base)(donor), batch)
    np.testing.assert_allclose(sw.pairs.margin_patched, (logp[:, 0] - logp[:, 1]).numpy(), rtol=1e-5)


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
    from alignlib.patching import _Chunk

    copies = [builtin_prefs[0]] * 4
    sw = patch_sweep(tiny, copies, site=["resid", "block"], controls=["shuffled"], chunk_size=4,
                     progress=False).pairs
    real, shuffled = sw[sw.control == "patch"], sw[sw.control == "shuffled"]
    np.testing.assert_allclose(shuffled.margin_patched, real.margin_patched, rtol=1e-6, atol=1e-6)

    encoded = encode_pairs(tiny.tokenizer, builtin_prefs[:5])
    chunk = _Chunk(tiny, encoded, 8, [], 0, 0)
    for layer in range(tiny.n_layers):  # the mean over every token of the ten separate sequences
        tokens = []
        for e in encoded:
            for ids in (e.chosen, e.rejected):
                with torch.no_grad(), record(tiny.base) as rec:
                    tiny.base(torch.tensor([ids]))
                tokens.append(rec["stream"][layer + 1][0])
        value, _ = chunk.control_value("mean_ablation", "resid", layer, "base", "tuned", 0,
                                       chunk.position_mask(0, "all"), None)
        torch.testing.assert_close(value[0, 0], torch.cat(tokens).mean(0), rtol=1e-5, atol=1e-5)


def test_summary_is_a_ratio_of_means_with_a_ci(tiny, prefs):
    sw = patch_sweep(tiny, prefs, controls=[], progress=False, n_boot=300)
    for row in sw.summary.itertuples():
        cell = sw.pairs[sw.pairs.layer == row.layer]
        assert row.recovery == pytest.approx(cell.effect.mean() / cell.gain.mean())
        assert row.ci_low <= row.ci_high
    assert set(sw.summary.columns) >= {"site", "direction", "control", "positions", "method", "layer", "recovery",
                                       "ci_low", "ci_high", "band_low", "band_high", "slope", "recovery_per_token"}
    assert (sw.summary.band_low <= sw.summary.recovery).all() and (sw.summary.recovery <= sw.summary.band_high).all()


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
        with patch(tiny.base, "resid", 1, torch.zeros(1, 3, 64)), record(tiny.base, ["attn", "mlp"]):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        with resume_from(tiny.base, 2, torch.zeros(1, 3, 64)):
            raise RuntimeError("boom")
    assert [dict(l._forward_hooks) for l in layers] == before
    assert all(type(l).__name__ == "LlamaDecoderLayer" for l in layers)


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from alignlib import load_pair, load_preferences
    from alignlib import store
    from alignlib.patching import patch_sweep
    saved = []
    real_save = store.Entry.save_table
    def save_then_die(self, name, table):
        real_save(self, name, table)
        saved.append(name)
        if len(saved) == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 right after the second chunk is on disk
    store.Entry.save_table = save_then_die
    pair = load_pair("tiny")
    patch_sweep(pair, load_preferences("builtin")[:8], site=["resid", "block"], chunk_size=2,
                run_dir=sys.argv[1], progress=False)
""")


def test_a_sweep_killed_by_sigkill_resumes_without_recomputing(tiny, builtin_prefs, tmp_path, monkeypatch):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(run)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert sorted(p.name for p in run.glob("sweep-chunk-*")) == ["sweep-chunk-00000.parquet", "sweep-chunk-00001.parquet"]
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


def test_prompt_reuse_equals_the_plain_path(tiny, prefs):
    """Patching response positions (or offsets) recomputes only the positions from the first patched one
    on, reusing the prompt's recorded keys and values: equal to the plain path to float rounding."""
    from alignlib.hooks import Suffix

    for positions in ("response", [0, 1], [-1, 2]):
        kw = dict(site=["resid", "block", "own"], direction=BOTH, positions=positions, controls=["noise"],
                  chunk_size=3, batch_size=3, progress=False)
        fast = patch_sweep(tiny, prefs, **kw).pairs
        plain = patch_sweep(tiny, prefs, method="hooks", **kw).pairs
        np.testing.assert_allclose(fast.margin_patched, plain.margin_patched, rtol=1e-5, atol=1e-5)
    batch = pack_pairs(encode_pairs(tiny.tokenizer, prefs[:3]), 0)
    cap = capture(tiny.base, batch, kv=True)
    assert Suffix.build(tiny.base, batch, batch.response, cap.kv) is not None  # the fast path really reused
    assert Suffix.build(tiny.base, batch, batch.real, cap.kv) is None  # nothing to reuse: plain resume


def test_own_site_is_exactly_the_layers_own_change(tiny, prefs):
    pair = one_layer_pair(tiny, 2)
    own = patch_sweep(pair, prefs, site="own", direction=BOTH, controls=[], chunk_size=3, progress=False).pairs
    for layer, cell in own.groupby("layer"):
        if layer == 2:  # the only change, on the receiver's own input: the donor's run from there on
            np.testing.assert_allclose(cell.margin_patched, cell.margin_donor, rtol=1e-6, atol=1e-5)
        else:  # identical layers add the same to the same input
            assert (cell.effect == 0).all()


@pytest.mark.parametrize("site", ["resid", "block", "own", "attn", "mlp"])
def test_attribution_patching_is_exact_to_first_order(tiny, prefs, site):
    """On a change of size eps, attribution patching's error against exact patching is O(eps^2) while the
    effect is O(eps): halving the change halves the relative error."""
    errors = []
    for scale in (2e-2, 1e-2, 5e-3):
        pair = one_layer_pair(tiny, 1, scale=scale)
        kw = dict(site=site, layers=[1, 2], controls=[], chunk_size=6, progress=False)
        exact = patch_sweep(pair, prefs, **kw).pairs
        atp = patch_sweep(pair, prefs, method="attribution", **kw).pairs
        assert list(atp.columns) == list(exact.columns) and len(atp) == len(exact)
        e, a = exact.effect.to_numpy(), atp.effect.to_numpy()
        errors.append(np.abs(a - e).max() / np.abs(e).max())
    assert errors[0] < 0.1 and 1.6 < errors[0] / errors[1] < 2.5 and 1.6 < errors[1] / errors[2] < 2.5, errors


def test_score_margins_are_a_sweeps_clean_margins_by_construction(tiny, prefs):
    from alignlib import score

    table = score(tiny, prefs, batch_size=4, progress=False).set_index("id")
    sweep = patch_sweep(tiny, prefs, site="resid", direction=BOTH, layers=[0], controls=[], batch_size=4,
                        chunk_size=len(prefs), progress=False).pairs
    for direction, receiver in (("tuned_to_base", "base"), ("base_to_tuned", "tuned")):
        clean = sweep[sweep.direction == direction].set_index("id").margin_receiver
        assert np.array_equal(clean.to_numpy(), table.loc[clean.index, f"margin_{receiver}"].to_numpy())


def test_a_run_folder_from_other_code_is_recomputed(tiny, prefs, tmp_path, capsys):
    import json

    run = tmp_path / "run"
    kw = dict(site="resid", controls=[], chunk_size=3, progress=False, run_dir=run)
    first = patch_sweep(tiny, prefs, **kw)
    record = json.loads((run / "entry.json").read_text())
    record["code"] = "an older alignlib"  # as if hooks.py or patching.py had changed since
    (run / "entry.json").write_text(json.dumps(record))
    (run / "sweep-chunk-00000.parquet").write_bytes(b"stale")
    again = patch_sweep(tiny, prefs, **kw)
    assert "computed by other code" in capsys.readouterr().err
    pd.testing.assert_frame_equal(first.pairs, again.pairs)


SHARDED = textwrap.dedent("""
    import sys
    from alignlib.__main__ import main
    main(["sweep", "--pair", "tiny", "--data", "builtin", "--rows", "0:12", "--max-length", "256",
          "--max-response-tokens", "32", "--chunk-size", "3", "--run-dir", sys.argv[1]])
""")


def test_a_sweep_split_across_two_processes_under_torchrun_equals_one_process(tiny, builtin_prefs, tmp_path,
                                                                              torchrun):
    from alignlib.data import encode_pairs

    run = tmp_path / "run"
    torchrun(SHARDED, run, port=29533)
    merged = pd.read_csv(run / "summary.csv")
    encoded = encode_pairs(tiny.tokenizer, builtin_prefs[:12], max_length=256, max_response_tokens=32)
    one = patch_sweep(tiny, encoded, site=["resid", "block"], direction=BOTH, controls=[], chunk_size=3,
                      progress=False)
    np.testing.assert_array_equal(merged.recovery.to_numpy(), one.summary.recovery.to_numpy())
    chunks = sorted(run.glob("sweep-chunk-*.parquet"))
    assert len(chunks) == 4
    together = pd.concat([pd.read_parquet(c) for c in chunks], ignore_index=True)
    pd.testing.assert_frame_equal(together, one.pairs)
