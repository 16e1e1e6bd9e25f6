"""What the book's notebooks share: one call that sets a notebook up, cached steps, quoted results.

Each notebook calls `start` with its papermill parameters and gets the model pair, the preference
pairs, their encoding and the run's config (`Inputs`). Every expensive step goes through
`Inputs.cached` (stored in the run folder's store; with an empty ``run_dir`` it uses
``$ALIGNLIB_RUN_DIR``, which the tests point at a fresh folder per session, so nbval checks results
recomputed in that session, shared across its notebooks, never a cache from before; with neither it
always computes), and results reach the prose through `glue` and
`ci_text`, so the book quotes executed numbers, never typed ones.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .data import encode_pairs, load_preferences
from .pairs import load_pair
from .store import Store, sha1, versions

__all__ = ["Inputs", "start", "setup", "parse_rows", "reproduce", "ci_text", "glue", "glue_figure"]


@dataclass
class Inputs:
    """A notebook's model pair, preference pairs (valid, in source order), their encoding and config."""

    pair: Any
    prefs: Any
    encoded: list
    config: dict
    run_dir: str = ""
    parameters: dict = field(default_factory=dict)

    def cached(self, name: str, compute: Callable[[], Any], **extra) -> Any:
        """``compute()``, kept in the run folder under this run's config plus ``extra``."""
        if not self.run_dir:
            return compute()
        return Store(self.run_dir).cached(name, {**self.config, **extra}, compute)

    def folder(self, name: str, **extra) -> Path | None:
        """A folder for one step's resumable work (a sweep's chunks), keyed by config; None when not caching."""
        return Path(self.run_dir) / "sweeps" / f"{name}-{sha1({**self.config, **extra})[:10]}" if self.run_dir else None

    @property
    def record(self) -> dict:
        """The run's parameters and package versions (long lists abridged), shown at the top of a notebook."""
        def short(v):
            return f"{len(v)} items: {v[0]} .. {v[-1]}" if isinstance(v, (list, tuple)) and len(v) > 4 else v

        return {"parameters": {k: short(v) for k, v in self.parameters.items()}, "versions": versions()}


#: One colour per meaning across the book: tuned->base / tuned / real patch first, then the rest.
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f"]


def setup(seed: int) -> None:
    """Seed every generator and fix the figure style, so reruns give the same numbers and pictures."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    import matplotlib
    import transformers

    transformers.utils.logging.disable_progress_bar()  # weight-loading bars are noise in a rendered page
    matplotlib.rcParams.update({"figure.dpi": 100, "savefig.dpi": 100, "axes.spines.top": False,
                                "axes.spines.right": False, "svg.hashsalt": "alignlib",
                                "axes.prop_cycle": matplotlib.cycler(color=PALETTE)})


def parse_rows(rows: str) -> tuple[int, int | None]:
    """``"1000:1256"`` -> (1000, 1256); ``"1000:"`` -> (1000, None)."""
    try:
        start, _, stop = rows.partition(":")
        return int(start or 0), (int(stop) if stop else None)
    except ValueError:
        raise ValueError(f"rows must look like 'start:stop' (e.g. '1000:1256'), got {rows!r}") from None


def start(base: str, tuned: str, data: str, rows: str, n_pairs: int, *, max_length: int,
          max_response_tokens: int | None, seed: int, device: str = "cpu", dtype: str = "float32",
          run_dir: str = "", pair=None, **parameters) -> Inputs:
    """Seed, load the pair (or take ``pair``) and the first ``n_pairs`` valid pairs of ``data[rows]``, encode them.

    ``n_pairs`` 0 takes every valid pair in ``rows``; an empty ``run_dir`` falls back to ``$ALIGNLIB_RUN_DIR``.
    """
    setup(seed)
    run_dir = run_dir or os.environ.get("ALIGNLIB_RUN_DIR", "")
    pair = pair if pair is not None else load_pair(base, tuned or None, device=device, dtype=dtype)
    prefs = load_preferences(data, rows=parse_rows(rows))
    if n_pairs > len(prefs):
        raise ValueError(f"n_pairs={n_pairs}, but rows {rows!r} of {data!r} hold only {len(prefs)} valid pairs")
    prefs = prefs[:n_pairs] if n_pairs else prefs
    encoded = encode_pairs(pair.tokenizer, prefs, max_length=max_length, max_response_tokens=max_response_tokens)
    config = dict(pair=pair.name, data=data, rows=rows, ids=prefs.ids, max_length=max_length,
                  max_response_tokens=max_response_tokens, dtype=dtype)
    return Inputs(pair, prefs, encoded, config, run_dir,
                  dict(base=base, tuned=tuned, data=data, rows=rows, n_pairs=len(prefs), max_length=max_length,
                       max_response_tokens=max_response_tokens, seed=seed, device=device, dtype=dtype, **parameters))


def reproduce(notebook: str, **parameters) -> None:
    """Show a "how to reproduce this page" box: the papermill command that re-runs it (with ``parameters``)."""
    from IPython.display import Markdown, display

    extra = "".join(f" -p {k} {v}" for k, v in parameters.items())
    display(Markdown(
        f":::{{admonition}} How to reproduce this page\n:class: tip\n"
        f"`papermill notebooks/{notebook}.ipynb runs/{notebook}.ipynb --cwd notebooks{extra} -p run_dir ../runs/cache`"
        f"\n\nAny parameter of the first cell can be changed with `-p NAME VALUE`; "
        f"`papermill --help-notebook notebooks/{notebook}.ipynb` lists them.\n:::"))


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


def glue_figure(name: str, fig, alt: str = "") -> None:
    """Glue ``fig`` as an inline PNG ``<img>`` and close it: a page that pastes a figure from another
    document gets it this way (myst-nb copies a glued HTML output across documents, not a glued PNG)."""
    import base64
    import html
    import io

    import matplotlib.pyplot as plt
    from IPython.display import HTML

    png = io.BytesIO()
    fig.savefig(png, format="png", bbox_inches="tight")
    plt.close(fig)
    glue(name, HTML(f'<img alt="{html.escape(alt)}" style="max-width:100%" '
                    f'src="data:image/png;base64,{base64.b64encode(png.getvalue()).decode()}">'), display=False)
