"""Planted pairs: tuned sides whose difference from the base is known, to validate the method.

A method that claims to localise preference tuning should find it where it was put. These
builders make such pairs from any base model:

- ``kind="weights"``: only decoder layer ``layer`` differs (every weight moved by a seeded relative
  perturbation of size ``scale``);
- ``kind="rank"``: layer ``layer``'s MLP output gains a rank-``rank`` change (its output projection
  W becomes W + A B^T), so the tuned stream differs from the base's at that layer only inside the
  ``rank``-dimensional span of A;
- ``kind="diffuse"``: every decoder layer moves a little (the same relative size each), so no single
  layer should be reported as the place where the pair differs.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .models import ModelPair, decoder_layers, sublayer

KINDS = ("weights", "rank", "diffuse")


def planted_pair(pair: ModelPair, *, layer: int | None = None, rank: int | None = None, kind: str = "weights",
                 scale: float = 0.3, seed: int = 0) -> ModelPair:
    """A copy of ``pair.base`` changed in a known way, paired with the base (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")
    layers = decoder_layers(pair.base)
    if kind != "diffuse" and (layer is None or not 0 <= layer < len(layers)):
        raise ValueError(f"kind={kind!r} needs layer in 0..{len(layers) - 1}, got {layer!r}")
    if kind == "rank" and (rank is None or rank < 1):
        raise ValueError("kind='rank' needs rank >= 1")
    tuned = copy.deepcopy(pair.base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if kind == "weights":
            _perturb(decoder_layers(tuned)[layer], scale, gen)
        elif kind == "diffuse":
            for block in decoder_layers(tuned):
                _perturb(block, scale / len(layers) ** 0.5, gen)
        else:
            out = _output_projection(sublayer(decoder_layers(tuned)[layer], "mlp"))
            w = out.weight
            a = torch.randn(w.shape[0], rank, generator=gen)
            b = torch.randn(w.shape[1], rank, generator=gen)
            change = a @ b.T
            w.add_((scale * w.norm() / change.norm() * change).to(w.dtype))
    name = f"{pair.name}:planted-{kind}" + (f"-layer{layer}" if layer is not None else "") + (
        f"-rank{rank}" if rank else "")
    return ModelPair(pair.base, tuned, pair.tokenizer, name)


def _perturb(module: nn.Module, scale: float, gen: torch.Generator) -> None:
    for p in module.parameters():
        p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=gen).to(p.dtype))


def _output_projection(mlp: nn.Module) -> nn.Linear:
    """The MLP's last linear layer (the one that writes into the residual stream)."""
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(mlp).__name__}: no nn.Linear output projection to plant a low-rank change in")
    return linears[-1]
