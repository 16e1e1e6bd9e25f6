"""`load_pair`: a base model and its tuned counterpart, from any source, as one checked `ModelPair`.

Each side may be a hub id, a local folder, a ``.gguf`` file or a loaded model; a built-in name
(`alignlib.builtin.NAMES`) brings both sides. Pairs that could not be compared position by position
(other architecture, depth, width or tokenizer) or that hold non-finite weights are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import builtin
from .models import ModelPair, PairError, as_dtype, check_compatible, check_finite, check_tokenizers, load_model


def load_pair(
    base: str | Path | nn.Module,
    tuned: str | Path | nn.Module | None = None,
    *,
    tokenizer: Any = None,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    device_map: str | dict | None = None,
    revision: str | None = None,
) -> ModelPair:
    """Load a base model and its tuned counterpart as a checked `ModelPair`.

    A built-in name given as ``base`` with ``tuned=None`` brings its own tuned side. For other
    sources ``tuned=None`` gives a base-only pair (scores and captures of the base only).
    ``tokenizer`` is needed only when both sides are loaded models. ``device_map`` (e.g.
    ``"auto"``) is passed to ``from_pretrained`` and overrides ``device``.
    """
    torch_dtype = as_dtype(dtype)
    if isinstance(base, str) and base in builtin.NAMES:
        if tuned is not None:
            raise PairError(f"built-in pair {base!r} brings its own tuned side; do not pass tuned=")
        base_model, tuned_model, tok = builtin.load(base)
        pair = ModelPair(base_model, tuned_model, tok, base)
    else:
        base_model, base_tok = load_model(base, dtype=torch_dtype, device_map=device_map, revision=revision)
        tok = tokenizer if tokenizer is not None else base_tok
        tuned_model = None
        if tuned is not None:
            tuned_model, tuned_tok = load_model(tuned, dtype=torch_dtype, device_map=device_map, revision=revision)
            if tokenizer is None and tuned_tok is not None and tok is not None:
                check_tokenizers(tok, tuned_tok)
            tok = tok if tok is not None else tuned_tok
        if tok is None:
            raise PairError("no tokenizer: pass tokenizer= when both sides are already-loaded models")
        pair = ModelPair(base_model, tuned_model, tok, _name(base, tuned))
    if pair.tuned is not None:
        check_compatible(pair.base, pair.tuned)
    for side, m in (("base", pair.base), ("tuned", pair.tuned)):
        if m is not None:
            check_finite(m, side)
            if device_map is None:
                m.to(device=device)
            m.to(dtype=torch_dtype)
            m.eval()
            m.requires_grad_(False)
    return pair


def _name(base, tuned) -> str:
    def short(x):
        return type(x).__name__ if isinstance(x, nn.Module) else Path(str(x)).name or str(x)

    return short(base) if tuned is None else f"{short(base)} vs {short(tuned)}"
