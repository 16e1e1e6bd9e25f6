"""The store: one keying rule (config + code), atomic writes, and values read back without running code."""

import json

import numpy as np
import pandas as pd
import pytest

from alignlib.notebook import Inputs
from alignlib.store import Entry, Store, StoreError, code_digest


def test_cached_reuses_a_value_only_with_the_same_config_and_code(tmp_path, capsys):
    calls = []

    def compute():
        calls.append(1)
        return {"value": len(calls)}

    store = Store(tmp_path)
    assert store.cached("step", {"a": 1}, compute, code="c1") == {"value": 1}
    assert store.cached("step", {"a": 1}, compute, code="c1") == {"value": 1}  # reused, not recomputed
    assert store.cached("step", {"a": 2}, compute, code="c1") == {"value": 2}  # another config recomputes
    assert store.cached("step", {"a": 2}, compute, code="c2") == {"value": 3}  # other code recomputes...
    assert "computed by other code" in capsys.readouterr().err  # ...with a one-line notice
    assert len(list((tmp_path / "steps").glob("step-*"))) == 2  # the stale entry of config a=2 is gone
    inputs = Inputs(None, None, [], {"a": 1}, run_dir="")
    assert inputs.cached("step", compute) == {"value": 4}  # no run folder: always computed
    assert not list(tmp_path.rglob(".*"))  # no half-written files


def test_values_round_trip_exactly_and_without_pickle(tmp_path):
    from alignlib.analysis.lasso import LassoResult

    frame = pd.DataFrame({"layer": [0, 1], "coef": [0.1, 1 / 3], "nonzero": [False, True]})
    wide = pd.DataFrame(np.arange(6.0).reshape(2, 3), index=pd.Index(["a", "b"], name="id"), columns=[0, 1, 2])
    value = {"result": LassoResult(frame, frame, frame, frame), "wide": wide, "series": wide[1],
             "arrays": {3: np.float32([1.5, np.nan]), 7: np.arange(4)}, "items": (1, "x", None, 2.5), "ids": ["p"]}
    entry = Store(tmp_path).entry("steps", "v", {}, "c")
    entry.save(value)
    back = entry.load()
    pd.testing.assert_frame_equal(back["result"].coefficients, frame)
    pd.testing.assert_frame_equal(back["wide"], wide)
    pd.testing.assert_series_equal(back["series"], wide[1])
    np.testing.assert_array_equal(back["arrays"][3], value["arrays"][3])
    assert back["arrays"][7].dtype == value["arrays"][7].dtype and back["items"] == value["items"]
    suffixes = {p.suffix for p in entry.path.iterdir()}
    assert suffixes <= {".json", ".parquet", ".npy"}  # nothing that runs code when read


def test_a_stored_value_naming_a_foreign_class_is_refused(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class Foreign:
        x: int

    entry = Store(tmp_path).entry("steps", "v", {}, "c")
    with pytest.raises(TypeError, match="only alignlib's result classes"):
        entry.save(Foreign(1))
    entry.save({"x": 1})
    (entry.path / "value.json").write_text(json.dumps({"$dataclass": "os:system", "fields": {}}))
    with pytest.raises(StoreError, match="not an alignlib result class"):
        entry.load()


def test_a_run_folder_refuses_another_config_and_recomputes_for_other_code(tmp_path, capsys):
    Entry(tmp_path / "run", {"a": 1}, "c1").open().save_table("t", pd.DataFrame({"x": [1]}))
    with pytest.raises(StoreError, match=r"another config \(differs in \['a'\]\)"):
        Entry(tmp_path / "run", {"a": 2}, "c1").open()
    entry = Entry(tmp_path / "run", {"a": 1}, "c2").open()
    assert not entry.has("t") and "computed by other code" in capsys.readouterr().err


def test_code_digest_follows_the_source():
    from alignlib import data

    assert code_digest() == code_digest() and code_digest("data") != code_digest("forward")
    assert code_digest(data.pack_pairs) != code_digest(data.encode_pairs)
