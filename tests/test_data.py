import csv
import json

import pytest

from alignlib import PreferenceError, encode_pairs, load_preferences
from alignlib.data import ASSISTANT, dialogue_messages, split_dialogue


def test_builtin_set_is_large_diverse_and_clean(builtin_prefs):
    assert len(builtin_prefs) >= 300
    assert len(builtin_prefs.report) == 0
    assert len(set(builtin_prefs.ids)) == len(builtin_prefs)
    rows = [json.loads(l) for l in open(load_preferences.__globals__["_builtin_path"]())]
    cats = {r["category"] for r in rows}
    assert {"harmful_refusal", "factual", "tone", "honesty"} <= cats
    for p in builtin_prefs:
        assert p.prompt.endswith(ASSISTANT) and p.chosen != p.rejected


def test_hh_rlhf_local_copy_drops_exactly_the_bad_rows(hh_file, monkeypatch):
    monkeypatch.setenv("ALIGNLIB_HH_RLHF", str(hh_file))
    with pytest.warns(UserWarning, match="dropped 5 rows"):
        prefs = load_preferences("hh-rlhf")
    # The real rows: 4 have an empty chosen response, 1 has chosen/rejected with different prompts.
    assert prefs.report.counts() == {"empty response": 4, "differing prompts": 1}
    assert len(prefs) == 1495
    dropped = {row for row, _, _ in prefs.report.dropped}
    assert "hh-rlhf/harmless-base/test/1254" in dropped
    p = prefs[0]
    assert p.prompt.endswith(ASSISTANT) and ASSISTANT not in p.chosen and ASSISTANT not in p.rejected


def test_hh_rlhf_row_range_keeps_source_row_numbers(hh_file, monkeypatch):
    monkeypatch.setenv("ALIGNLIB_HH_RLHF", str(hh_file))
    prefs = load_preferences("hh-rlhf", rows=(1000, 1010))
    assert prefs.ids[0] == "hh-rlhf/harmless-base/test/1000"
    assert len(prefs) == 10
    with pytest.raises(ValueError, match="has 1500 rows"):
        load_preferences("hh-rlhf", rows=(1000, 2000))


def test_hh_rlhf_strict_names_the_row(hh_file, monkeypatch):
    monkeypatch.setenv("ALIGNLIB_HH_RLHF", str(hh_file))
    with pytest.raises(PreferenceError, match="hh-rlhf/harmless-base/test/86: empty chosen"):
        load_preferences("hh-rlhf", rows=(0, 100), strict=True)


def test_hh_rlhf_env_folder_layout(hh_file, monkeypatch, tmp_path):
    (tmp_path / "harmless-base").mkdir()
    (tmp_path / "harmless-base" / "test.jsonl.gz").write_bytes(hh_file.read_bytes())
    monkeypatch.setenv("ALIGNLIB_HH_RLHF", str(tmp_path))
    assert len(load_preferences("hh-rlhf", rows=(0, 5))) == 5
    with pytest.raises(FileNotFoundError, match="helpful-base/test"):
        load_preferences("hh-rlhf", subset="helpful-base")


def test_hub_and_local_give_the_same_rows(hh_file, monkeypatch):
    """The hub path (through `datasets`) is exercised offline by serving the local file as the hub."""
    import datasets

    calls = []
    real_load = datasets.load_dataset

    def fake_hub(name, data_dir=None, split=None, **kw):
        calls.append((name, data_dir, split))
        return real_load("json", data_files=str(hh_file), split="train")

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    monkeypatch.delenv("ALIGNLIB_HH_RLHF", raising=False)
    hub = load_preferences("hh-rlhf", rows=(1000, 1100))
    assert calls == [("Anthropic/hh-rlhf", "harmless-base", "test")]
    monkeypatch.setenv("ALIGNLIB_HH_RLHF", str(hh_file))
    local = load_preferences("hh-rlhf", rows=(1000, 1100))
    assert hub.pairs == local.pairs


GOOD = {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " Hello!", "rejected": " Go away."}


@pytest.mark.parametrize("row, reason", [
    ({"prompt": GOOD["prompt"], "chosen": " a"}, "missing field"),
    ({**GOOD, "chosen": 3}, "wrong type"),
    ({**GOOD, "rejected": "   "}, "empty response"),
    ({**GOOD, "rejected": GOOD["chosen"]}, "identical responses"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}, "differing prompts"),
    ({"chosen": "no turns", "rejected": "no turns either"}, "no assistant turn"),
    ("not a mapping", "wrong type"),
])
def test_each_invalid_row_is_dropped_with_its_reason_or_raised(row, reason):
    with pytest.warns(UserWarning, match=reason):
        prefs = load_preferences([GOOD, row])
    assert len(prefs) == 1 and prefs.report.counts() == {reason: 1}
    with pytest.raises(PreferenceError, match="memory/1"):
        load_preferences([GOOD, row], strict=True)


def test_over_long_pairs_by_characters():
    long = {**GOOD, "rejected": " x" * 500}
    with pytest.warns(UserWarning, match="over-long"):
        prefs = load_preferences([GOOD, long], max_chars=200)
    assert prefs.report.counts() == {"over-long": 1}


def test_no_valid_rows_is_an_error():
    with pytest.raises(PreferenceError, match="no valid preference pairs"), pytest.warns(UserWarning):
        load_preferences([{**GOOD, "chosen": ""}])


def test_jsonl_and_csv_files(tmp_path):
    rows = [dict(GOOD, id=f"r{i}") for i in range(3)]
    jl = tmp_path / "p.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    cs = tmp_path / "p.csv"
    with open(cs, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    a, b = load_preferences(jl), load_preferences(cs)
    assert a.pairs == b.pairs and a.ids == ["r0", "r1", "r2"]
    hh = tmp_path / "hh.jsonl"
    hh.write_text(json.dumps({"chosen": GOOD["prompt"] + " yes", "rejected": GOOD["prompt"] + " no"}))
    assert load_preferences(hh)[0].prompt == GOOD["prompt"]
    with pytest.raises(FileNotFoundError):
        load_preferences(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json")
    with pytest.raises(PreferenceError, match="line 1"):
        load_preferences(bad)


def test_split_dialogue_uses_the_last_assistant_turn():
    prompt, response = split_dialogue("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d")
    assert prompt == "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:" and response == " d"
    assert dialogue_messages(prompt) == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]


def test_encoding_shares_prompt_ids_and_truncates_the_prompt_from_the_left(tiny, builtin_prefs):
    tok = tiny.tokenizer
    pairs = builtin_prefs[:20]
    full = encode_pairs(tok, pairs, max_length=4096)
    for e, p in zip(full, pairs):
        assert e.chosen[: e.chosen_start] == e.rejected[: e.rejected_start]
        assert e.chosen[e.chosen_start:] == tok(p.chosen, add_special_tokens=False)["input_ids"]
        assert e.prompt_truncated == 0
    e = full[0]
    longest = max(len(e.chosen) - e.chosen_start, len(e.rejected) - e.rejected_start)
    cut = encode_pairs(tok, pairs[:1], max_length=longest + 3)[0]
    assert max(len(cut.chosen), len(cut.rejected)) == longest + 3
    assert cut.chosen[: cut.chosen_start] == e.chosen[: e.chosen_start][-3:]  # the prompt's end survives
    assert cut.chosen[cut.chosen_start:] == e.chosen[e.chosen_start:]  # the response is never cut
    assert cut.prompt_truncated == e.chosen_start - 3
    with pytest.raises(PreferenceError, match="does not fit max_length"):
        encode_pairs(tok, pairs[:1], max_length=longest)


def test_eos_option(tiny, builtin_prefs):
    e = encode_pairs(tiny.tokenizer, builtin_prefs[:1], add_eos=True)[0]
    assert e.chosen[-1] == tiny.tokenizer.eos_token_id


def test_an_empty_file_and_one_without_the_columns_name_the_problem(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(PreferenceError, match=r"empty.jsonl holds no rows; expected rows with columns prompt, "
                                              r"chosen, rejected \(or HH-style whole dialogues"):
        load_preferences(empty)
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("question,good,bad\nq,a,b\n")
    with pytest.raises(PreferenceError, match=r"wrong.csv has no 'chosen' or 'rejected' column \(it has \['bad', "
                                              r"'good', 'question'\]\); expected columns prompt, chosen, rejected"):
        load_preferences(wrong)
    half = tmp_path / "half.jsonl"
    half.write_text(json.dumps({"prompt": "p", "chosen": " a"}) + "\n")
    with pytest.raises(PreferenceError, match="has no 'rejected' column"):
        load_preferences(half)
