import numpy as np
import pytest

from alignlib import bootstrap_ci, encode_pairs, preference_accuracy, score
from tests.test_models import naive_logprob


def test_score_matches_one_sequence_at_a_time_with_padding_and_mixed_lengths(tiny, builtin_prefs):
    prefs = builtin_prefs[:12]
    encoded = encode_pairs(tiny.tokenizer, prefs)
    lengths = {len(e.chosen) for e in encoded} | {len(e.rejected) for e in encoded}
    assert len(lengths) > 5  # mixed lengths, so batches really are padded
    table = score(tiny, prefs, batch_size=5, progress=False)
    for role in ("base", "tuned"):
        model = getattr(tiny, role)
        for e, row in zip(encoded, table.to_dict("records")):
            c = naive_logprob(model, e.chosen, e.chosen_start)
            r = naive_logprob(model, e.rejected, e.rejected_start)
            assert row[f"logp_chosen_{role}"] == pytest.approx(c, rel=1e-5)
            assert row[f"logp_rejected_{role}"] == pytest.approx(r, rel=1e-5)
    # batch size and order do not change anything
    other = score(tiny, prefs, batch_size=1, progress=False)
    assert np.allclose(table.reward_gain, other.reward_gain, rtol=1e-5, atol=1e-5)


def test_packed_pairs_score_as_their_two_separate_sequences(tiny, builtin_prefs):
    """Prompt + chosen + rejected in one padded row, the rejected response masked off the chosen one
    and continuing the prompt's positions, gives each response the log-prob of its own sequence."""
    import dataclasses

    import torch

    from alignlib.data import pack_pairs
    from alignlib.forward import hidden, pair_logprobs

    encoded = encode_pairs(tiny.tokenizer, builtin_prefs[:10])
    batch = pack_pairs(encoded, 0)
    assert (~batch.real).any()  # padded rows
    with torch.no_grad():
        for model in (tiny.base, tiny.tuned):
            got = pair_logprobs(model, hidden(model, batch), batch)
            for e, (c, r) in zip(encoded, got.tolist()):
                assert c == pytest.approx(naive_logprob(model, e.chosen, e.chosen_start), rel=1e-5)
                assert r == pytest.approx(naive_logprob(model, e.rejected, e.rejected_start), rel=1e-5)
    e = encoded[0]
    with pytest.raises(ValueError, match="same prompt ids"):
        pack_pairs([dataclasses.replace(e, rejected=[e.rejected[0] + 1, *e.rejected[1:]])], 0)
    with pytest.raises(ValueError, match="no prompt token"):
        pack_pairs([dataclasses.replace(e, chosen=e.chosen[e.chosen_start:], rejected=e.rejected[e.rejected_start:],
                                        chosen_start=0, rejected_start=0)], 0)
    flash = type("Model", (), {"config": type("Config", (), {"_attn_implementation": "flash_attention_2"})()})()
    with pytest.raises(ValueError, match="4-D mask"):
        hidden(flash, batch)


def test_margins_gain_and_means_are_consistent(tiny, builtin_prefs):
    t = score(tiny, builtin_prefs[:8], progress=False)
    assert np.allclose(t.margin_base, t.logp_chosen_base - t.logp_rejected_base)
    assert np.allclose(t.reward_gain, t.margin_tuned - t.margin_base)
    assert np.allclose(t.mean_logp_chosen_tuned * t.n_chosen, t.logp_chosen_tuned)
    assert np.allclose(t.reward_gain_mean, t.margin_tuned_mean - t.margin_base_mean)
    assert list(t.id) == builtin_prefs.ids[:8]


def test_preference_accuracy_and_bootstrap():
    import pandas as pd

    t = pd.DataFrame({"margin_base": [1.0, -1, 2, 3], "margin_base_mean": [1.0, 1, 1, -1]})
    acc = preference_accuracy(t, n_boot=200)
    assert list(acc.accuracy) == [0.75, 0.75]
    assert (acc.ci_low <= acc.accuracy).all() and (acc.accuracy <= acc.ci_high).all()
    from alignlib.stats import mean, ratio_of_means

    est, lo, hi = bootstrap_ci(mean, np.ones(10))
    assert est == lo == hi == 1.0
    est, lo, hi = bootstrap_ci(ratio_of_means, np.arange(1, 50.0), np.arange(1, 50.0) * 2)
    assert est == lo == hi == pytest.approx(0.5)


def test_score_rejects_empty_input(tiny):
    with pytest.raises(ValueError, match="no preference pairs"):
        score(tiny, [])


FACTS = [
    ("What is the capital of France?", " The capital of France is Paris.", " The capital of France is Berlin."),
    ("How many days are in a week?", " There are seven days in a week.", " There are twelve days in a week."),
    ("What color is the sky on a clear day?", " The sky is blue on a clear day.", " The sky is green on a clear day."),
    ("What is 2 + 2?", " 2 + 2 = 4.", " 2 + 2 = 7."),
    ("Which planet do we live on?", " We live on Earth.", " We live on Jupiter."),
]


@pytest.mark.slow
def test_real_smollm2_prefers_right_answers_to_wrong_ones():
    from alignlib import load_pair, load_preferences
    from alignlib.models import smollm2_gguf

    pair = load_pair(str(smollm2_gguf()))  # the GGUF file itself: the base alone, no tuned side to build
    assert pair.n_layers == 30
    prefs = load_preferences([{"prompt": f"\n\nHuman: {q}\n\nAssistant:", "chosen": c, "rejected": r}
                              for q, c, r in FACTS])
    for chat in (False, True):
        t = score(pair, prefs, chat_template=chat, progress=False)
        assert (t.margin_base > 0).all(), t[["id", "margin_base"]]


def test_command_line_scores_into_a_run_folder(tmp_path, capsys):
    import json

    from alignlib.__main__ import main

    out = tmp_path / "run"
    assert main(["score", "--pair", "tiny", "--data", "builtin", "--rows", "0:6", "--max-length", "1024",
                 "--max-response-tokens", "1000", "--out", str(out)]) == 0
    assert "6 pairs from builtin" in capsys.readouterr().out
    record = json.loads((out / "entry.json").read_text())
    assert record["config"]["pair"] == "tiny" and "torch" in record["versions"]
    import pandas as pd

    assert len(pd.read_csv(out / "scores.csv")) == 6
