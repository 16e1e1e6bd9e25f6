"""What the book's notebooks share: loading their inputs from parameters, caching, reporting.

Each notebook calls `load_inputs` with its papermill parameters, wraps every expensive step in
`cached` (a no-op when ``run_dir`` is empty, so nbval always recomputes), and states its results
with `ci_text` and `glue` so that the book's prose quotes executed numbers, never typed ones.
"""

from __future__ import annotations

import hashlib
import pickle
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .data import encode_pairs, load_preferences
from .models import load_pair
from .runs import sha1, versions, write_atomic

__all__ = ["setup", "parse_rows", "load_inputs", "encode", "cached", "run_subdir", "ci_text", "glue", "record"]


def setup(seed: int) -> None:
    """Seed every generator and fix the figure style, so reruns give the same numbers and pictures."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    import matplotlib
    import transformers

    transformers.utils.logging.disable_progress_bar()  # weight-loading bars are noise in a rendered page
    matplotlib.rcParams.update({"figure.dpi": 100, "savefig.dpi": 100, "axes.spines.top": False,
                                "axes.spines.right": False, "svg.hashsalt": "alignlib"})


def parse_rows(rows: str) -> tuple[int, int | None]:
    """``"1000:1256"`` -> (1000, 1256); ``"1000:"`` -> (1000, None)."""
    try:
        start, _, stop = rows.partition(":")
        return int(start or 0), (int(stop) if stop else None)
    except ValueError:
        raise ValueError(f"rows must look like 'start:stop' (e.g. '1000:1256'), got {rows!r}") from None


def load_inputs(base: str, tuned: str, data: str, rows: str, n_pairs: int, *, device: str = "cpu",
                dtype: str = "float32"):
    """The model pair and the first ``n_pairs`` valid preference pairs of ``data[rows]``."""
    pair = load_pair(base, tuned or None, device=device, dtype=dtype)
    prefs = load_preferences(data, rows=parse_rows(rows))
    if n_pairs > len(prefs):
        raise ValueError(f"n_pairs={n_pairs}, but rows {rows!r} of {data!r} hold only {len(prefs)} valid pairs")
    return pair, prefs[:n_pairs]


def encode(pair, prefs, max_length: int, max_response_tokens: int):
    """Tokenise pairs with the notebooks' shared length policy (prompt cut from the left, response cut and counted)."""
    return encode_pairs(pair.tokenizer, prefs, max_length=max_length, max_response_tokens=max_response_tokens)


def run_subdir(run_dir: str, name: str, config: dict) -> Path | None:
    """A folder for one step's resumable work, keyed by its config (None when not caching)."""
    return Path(run_dir) / f"{name}-{sha1(config)[:10]}" if run_dir else None


def cached(run_dir: str, name: str, config: dict, compute: Callable[[], Any]) -> Any:
    """``compute()``, stored in ``run_dir`` with its config, and reused while the config and alignlib's code match.

    With an empty ``run_dir`` it always computes (nbval re-executes the notebooks this way, so the
    regression test checks recomputed results, never a cache).
    """
    if not run_dir:
        return compute()
    folder = Path(run_dir)
    key = sha1({"config": config, "code": code_digest()})[:10]
    path = folder / f"{name}-{key}.pkl"
    if path.is_file():
        with open(path, "rb") as f:
            return pickle.load(f)
    value = compute()
    write_atomic(path, pickle.dumps(value))
    write_atomic(folder / f"{name}-{key}.json", _json({"config": config, "versions": versions()}))
    return value


def code_digest() -> str:
    """A digest of alignlib's source: a cached result computed by other code is not reused."""
    h = hashlib.sha1()
    for f in sorted(Path(__file__).parent.rglob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()


def _json(obj) -> str:
    import json

    return json.dumps(obj, indent=2, sort_keys=True, default=str)


def ci_text(estimate: float, low: float, high: float, digits: int = 2, unit: str = "") -> str:
    """``"0.53 (95% CI 0.31 to 0.74)"``: an estimate never travels without its interval."""
    f = f"{{:.{digits}f}}"
    u = f" {unit}" if unit else ""
    return f"{f.format(estimate)}{u} (95% CI {f.format(low)} to {f.format(high)})"


def glue(name: str, value, display: bool = False):
    """myst-nb's glue (so the book can quote the value); a plain no-op outside a notebook kernel."""
    try:
        from myst_nb import glue as _glue
    except ImportError:  # pragma: no cover - myst-nb comes with jupyter-book
        return value
    _glue(name, value, display=display)
    return value


def record(**parameters) -> dict:
    """The run's parameters and package versions, shown at the top of every notebook (long lists abridged)."""
    def short(v):
        if isinstance(v, (list, tuple)) and len(v) > 4:
            return f"{len(v)} items: {v[0]} .. {v[-1]}"
        return v

    return {"parameters": {k: short(v) for k, v in parameters.items()}, "versions": versions()}
