import copy
import math

import pandas as pd
import pytest
import torch

from alignlib import ModelPair, score
from alignlib.builtin import tiny_model, tiny_tokenizer
from alignlib.store import Store
from alignlib.tuning import DPORecipe, dpo_loss, make_tuned


def test_dpo_loss_on_a_hand_worked_example():
    # policy moved chosen up by 1 and rejected down by 1 nat relative to the reference:
    # margin = (-1 - -2) - (-3 - -2) = 2; beta * margin = 1; loss = -log sigmoid(1) = log(1 + e^-1)
    loss = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-7)
    # at the reference the loss is log 2 whatever beta is
    zero = dpo_loss(torch.tensor([-5.0]), torch.tensor([-7.0]), torch.tensor([-5.0]), torch.tensor([-7.0]), 3.0)
    assert zero.item() == pytest.approx(math.log(2))


def test_a_short_dpo_run_raises_the_margin_of_its_training_pairs(tiny, builtin_prefs):
    prefs = builtin_prefs[:24]
    before = [p.clone() for p in tiny.base.parameters()]
    tuned, log = make_tuned(tiny.base, tiny.tokenizer, prefs,
                            DPORecipe(lr=1e-3, epochs=3, batch_size=8, warmup_steps=1), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, tiny.base.parameters()))  # the base is untouched
    table = score(ModelPair(tiny.base, tuned, tiny.tokenizer, "t"), prefs, progress=False)
    assert table.reward_gain.mean() > 1.0
    assert (table.reward_gain > 0).mean() > 0.75
    # the first step's policy is the reference: the packed training forward agrees with the reference pass
    assert log.reward_margin.iloc[0] == pytest.approx(0.0, abs=1e-5)
    assert log.loss.iloc[0] == pytest.approx(math.log(2), abs=1e-5)
    assert log.loss.iloc[-3:].mean() < log.loss.iloc[:3].mean()
    assert list(log.columns) == ["step", "epoch", "loss", "reward_margin", "reward_accuracy", "seconds"]


def test_the_sparse_embedding_gradient_of_the_loop_is_the_dense_one(tiny, builtin_prefs):
    """The loop takes the (tied) embedding's gradient sparse to save a vocabulary-sized fill per step."""
    from alignlib.data import encode_pairs, pad_id
    from alignlib.tuning import _pair_logprobs

    encoded = encode_pairs(tiny.tokenizer, builtin_prefs[:8], max_length=128)
    grads = []
    for sparse in (False, True):
        model = copy.deepcopy(tiny.base).requires_grad_(True)
        model.get_input_embeddings().sparse = sparse
        _pair_logprobs(model, encoded, pad_id(tiny.tokenizer)).sum().backward()
        grads.append(model.get_input_embeddings().weight.grad)
    assert not grads[1].is_sparse  # the tied output projection's dense gradient absorbs it
    # the same sums in another order: equal to float32 rounding of the largest entries
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-6 * grads[0].abs().max().item())
    tuned, _ = make_tuned(tiny.base, tiny.tokenizer, builtin_prefs[:8], DPORecipe(batch_size=8), progress=False)
    assert not tuned.get_input_embeddings().sparse


def test_dpo_trains_a_model_with_untied_embeddings(tiny, builtin_prefs):
    """Untied input embeddings keep a dense gradient (the fused optimizer takes no sparse one) and train."""
    from transformers import LlamaForCausalLM

    config = copy.deepcopy(tiny.base.config)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    assert base.get_output_embeddings().weight is not base.get_input_embeddings().weight
    tuned, log = make_tuned(base, tiny.tokenizer, builtin_prefs[:8], DPORecipe(batch_size=4, warmup_steps=1),
                            progress=False)
    moved = (tuned.get_input_embeddings().weight - base.get_input_embeddings().weight).abs().max()
    assert torch.isfinite(torch.tensor(log.loss.to_numpy())).all() and moved > 0


def test_dpo_is_deterministic(tiny, builtin_prefs):
    cfg = DPORecipe(lr=1e-3, epochs=1, batch_size=8)
    a, _ = make_tuned(tiny.base, tiny.tokenizer, builtin_prefs[:16], cfg, progress=False)
    b, _ = make_tuned(tiny.base, tiny.tokenizer, builtin_prefs[:16], cfg, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


@pytest.fixture()
def scratch_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNLIB_CACHE", str(tmp_path))
    return tmp_path


def test_store_loads_rebuilds_on_config_or_code_change_and_recovers_from_corruption(scratch_cache, capsys):
    tok = tiny_tokenizer()
    builds = []

    def build(seed):
        def run():
            builds.append(seed)
            return tiny_model(tok, seed=seed), tok, pd.DataFrame({"step": [0]})
        return run

    store = Store()
    first, _ = store.model("m", {"seed": 1}, "code-a", build(1), progress=False)
    again, _ = store.model("m", {"seed": 1}, "code-a", build(1), progress=False)
    assert builds == [1]  # the second load did not rebuild
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters()))
    assert len(list((scratch_cache / "models").glob("m-*/training_log.csv"))) == 1

    store.model("m", {"seed": 1}, "code-b", build(1), progress=False)  # other code: rebuilt, old entry retired
    assert builds == [1, 1] and "computed by other code" in capsys.readouterr().err
    assert len(list((scratch_cache / "models").glob("m-*"))) == 1
    changed, _ = store.model("m", {"seed": 2}, "code-b", build(2), progress=False)
    assert builds == [1, 1, 2]

    entry = store.entry("models", "m", {"seed": 2}, "code-b")
    next(entry.path.glob("*.safetensors")).write_bytes(b"not a safetensors file")
    rebuilt, _ = store.model("m", {"seed": 2}, "code-b", build(2), progress=False)
    assert builds == [1, 1, 2, 2] and "unreadable" in capsys.readouterr().err
    assert all(torch.equal(a, b) for a, b in zip(changed.parameters(), rebuilt.parameters()))


def test_tiny_pair_is_really_preference_tuned(tiny, builtin_prefs):
    table = score(tiny, builtin_prefs, progress=False)
    assert table.reward_gain.mean() > 0
    assert (table.margin_tuned > 0).mean() > (table.margin_base > 0).mean()


def test_smollm2_training_rows_never_overlap_the_analysis_rows():
    from alignlib.builtin import smollm2_pair

    with pytest.raises(ValueError, match="rows from 1000 on are for analysis"):
        smollm2_pair(rows=(900, 1100))


def test_the_smollm2_builds_have_their_own_store_entries():
    from alignlib.builtin import BAND, NAMES, PLANTED_DPO, PLANTED_ROWS, SMOLLM2_DPO, SMOLLM2_DPO_LONG, smollm2_entry
    from alignlib.store import sha1

    assert {"smollm2", "smollm2-long", "smollm2-band", "smollm2-diffuse"} <= set(NAMES)
    assert smollm2_entry(SMOLLM2_DPO)[0] == "smollm2-dpo"
    assert smollm2_entry(SMOLLM2_DPO_LONG)[0] == "smollm2-dpo-long"
    assert smollm2_entry(PLANTED_DPO, PLANTED_ROWS, layers=BAND)[0] == "smollm2-band"
    assert smollm2_entry(PLANTED_DPO, PLANTED_ROWS, layers="all")[0] == "smollm2-diffuse"
    other, record = smollm2_entry(SMOLLM2_DPO_LONG, rows=(0, 300))  # any other build: a hashed entry
    assert other == f"smollm2-dpo-{sha1(record)[:10]}"
    assert SMOLLM2_DPO_LONG.max_length > SMOLLM2_DPO.max_length


def test_tiny_base_builds_identically_from_scratch(monkeypatch):
    """Two fresh builds (tokenizer training, seeded init, LM training) give bit-identical weights.

    The LM phase is shortened to a few steps: every step runs the same code, so determinism over a
    few steps is determinism over all of them.
    """
    from alignlib import builtin

    monkeypatch.setitem(builtin.TINY_LM, "steps", 5)
    tok_a, tok_b = builtin.tiny_tokenizer(), builtin.tiny_tokenizer()
    assert tok_a.get_vocab() == tok_b.get_vocab()
    a, b = builtin.tiny_pretrained(tok_a), builtin.tiny_pretrained(tok_b)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in
                   zip(a.state_dict().values(), builtin.tiny_model(tok_a, seed=builtin.TINY_SEED).state_dict().values()))
