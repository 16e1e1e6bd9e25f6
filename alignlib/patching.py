"""Layer-wise causal patching between the two sides of a model pair, with controls.

For each layer l, run the receiver with a site of layer l set to the donor's value on the same
input, and measure how the preference margin moves:

    effect_l = margin(receiver[site_l <- donor]) - margin(receiver)
    recovery_l = mean(effect_l) / mean(margin(donor) - margin(receiver))

``tuned_to_base`` (receiver base, donor tuned) asks how much of the reward gain comes back;
``base_to_tuned`` (receiver tuned, donor base) how much of it is lost. Either way recovery is the
share of the way from the receiver's margin to the donor's.

Controls replace the donor's value by: the receiver's own (``identity``: exactly 0), the donor's
value from another pair aligned on the response start (``shuffled``), the receiver's plus random
noise with the norm of the real difference at each position (``noise``), the receiver's mean value
over the chunk's tokens (``mean_ablation``) or zero (``zero_ablation``).

Each pair runs as one packed sequence, prompt + chosen + rejected (`alignlib.data.PackedBatch`):
the rejected response attends to the prompt and itself only, so every token sees what it sees in its
own sequence, and the shared prompt is computed, and patched, once instead of twice.

The fast path (``method="fast"``) captures both models once per batch, then resumes the receiver
from the patched layer, so each patched run costs only the layers after it, and runs the patched
streams of all layers together, each later layer once on all of them stacked; it equals the plain
path (``method="hooks"``, a whole forward per layer with a hook) up to float rounding, and exactly
for the identity control. Finished chunks of pairs go to a run folder, so an interrupted sweep
resumes where it stopped and gives the same numbers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from itertools import product
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .data import PROMPT, EncodedPair, PackedBatch, encode_pairs, length_batches, pack_pairs, packed_length
from .hooks import SITES, capture, check_site, layer_calls, patch, resume_from, resume_stacked
from .metrics import packed_hidden, pad_id, pair_logprobs, recovery
from .models import ModelPair
from .runs import sha1
from .runs import RunFolder

DIRECTIONS = {"tuned_to_base": ("base", "tuned"), "base_to_tuned": ("tuned", "base")}  # receiver, donor
CONTROLS = ("identity", "shuffled", "noise", "mean_ablation", "zero_ablation")
POSITIONS = ("all", "prompt", "response")
#: Most token rows that one stacked resume runs through a layer (streams x batch x length): bounds
#: memory; larger stacks were slower on a 2-core CPU (caches), one stream per stack barely slower.
STACK_TOKENS = 8192


@dataclass
class Sweep:
    """``pairs``: one row per (site, direction, control, layer, pair); ``summary``: recovery per cell."""

    pairs: pd.DataFrame
    summary: pd.DataFrame


def patch_sweep(
    pair: ModelPair,
    prefs,
    *,
    site: str | Sequence[str] = "resid",
    direction: str | Sequence[str] = "tuned_to_base",
    positions: str | Iterable[int] = "all",
    layers: Sequence[int] | None = None,
    controls: Sequence[str] = ("identity", "shuffled", "noise"),
    subspaces: dict[str, torch.Tensor] | None = None,
    method: str = "fast",
    batch_size: int = 16,
    chunk_size: int = 16,
    max_length: int = 512,
    chat_template: bool = False,
    run_dir=None,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> Sweep:
    """Patch each layer of the receiver with the donor's activations; summarise recovery with CIs.

    site, direction: one name or several; all of them reuse one capture of both models per batch.
    positions: ``"all"``, ``"prompt"``, ``"response"``, or offsets from the response start
        (0 is the first response token, -1 the last prompt token, which predicts it).
    layers: decoder layer indices (default all). controls: any of `CONTROLS`; the real patch
        (control ``"patch"``) is always run.
    subspaces: name -> orthonormal basis U (hidden, k): adds cells (control ``"subspace:<name>"``)
        that patch only the part of the difference inside span(U): receiver + (donor - receiver) U U^T.
    batch_size: sequences per forward; a packed row holds both of a pair's, so a batch packs
        ``batch_size // 2`` pairs.
    chunk_size: pairs per unit of work; a chunk is the unit written to ``run_dir`` and resumed,
        the pool that ``shuffled`` draws other pairs from and ``mean_ablation`` averages over.
    """
    pair.require_tuned()
    sites = [check_site(s) for s in ([site] if isinstance(site, str) else site)]
    directions = [direction] if isinstance(direction, str) else list(direction)
    for d in directions:
        if d not in DIRECTIONS:
            raise ValueError(f"unknown direction {d!r}; choose from {tuple(DIRECTIONS)}")
    unknown = set(controls) - set(CONTROLS)
    if unknown:
        raise ValueError(f"unknown control(s) {sorted(unknown)}; choose from {CONTROLS}")
    if method not in ("fast", "hooks"):
        raise ValueError(f"unknown method {method!r}; use 'fast' or 'hooks'")
    n_layers = pair.n_layers
    layers = list(range(n_layers)) if layers is None else list(layers)
    bad = [l for l in layers if not isinstance(l, (int, np.integer)) or not 0 <= l < n_layers]
    if bad:
        raise ValueError(f"unknown layer(s) {bad}: the model has layers 0..{n_layers - 1}")
    positions = _check_positions(positions)
    encoded = prefs if prefs and isinstance(prefs[0], EncodedPair) else encode_pairs(
        pair.tokenizer, prefs, max_length=max_length, chat_template=chat_template)
    if len(encoded) == 0:
        raise ValueError("no preference pairs to patch")
    if "shuffled" in controls and len(encoded) < 2:
        raise ValueError("the shuffled control needs at least 2 pairs")
    chunks = _chunks(encoded, chunk_size)
    cells = [("patch", *c) for c in product(sites, directions, layers)]
    cells += [(ctl, *c) for ctl in controls for c in product(sites, directions, layers)]
    subspaces = {f"subspace:{k}": torch.as_tensor(u, dtype=torch.float32) for k, u in (subspaces or {}).items()}
    cells += [(name, *c) for name in subspaces for c in product(sites, directions, layers)]

    run = None
    if run_dir is not None:
        config = dict(pair=pair.name, weights_sha1={r: _fingerprint(m) for r, m in pair.models.items()}, ids_sha1=sha1([e.id for e in encoded]), tokens_sha1=sha1(
            [[e.chosen, e.rejected] for e in encoded]), sites=sites, directions=directions, positions=positions,
            layers=[int(l) for l in layers], controls=list(controls), method=method, batch_size=batch_size,
            chunk_size=chunk_size, seed=seed, layout="packed pairs", dtype=str(next(pair.base.parameters()).dtype),
            subspaces={k: sha1(u.tolist()) for k, u in subspaces.items()})
        run = RunFolder(run_dir, config)

    tables = []
    bar = tqdm(total=len(chunks) * len(cells), desc="patch sweep", disable=not progress)
    for ci, chunk in enumerate(chunks):
        name = f"sweep-chunk-{ci:05d}"
        if run is not None and run.has(name):
            tables.append(run.load(name))
            bar.update(len(cells))
            continue
        table = _sweep_chunk(pair, chunk, cells, positions, method, batch_size, seed, ci, bar, subspaces)
        if run is not None:
            run.save(name, table)
        tables.append(table)
    bar.close()
    per_pair = pd.concat(tables, ignore_index=True)
    summary = summarize(per_pair, n_boot=n_boot, seed=seed)
    if run is not None:
        run.save("sweep-summary", summary)
    return Sweep(per_pair, summary)


def summarize(per_pair: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Recovery (ratio of mean effect to mean gap) with a bootstrap CI for each (site, direction, control, layer)."""
    rows = []
    keys = ["site", "direction", "control", "layer"]
    for key, g in per_pair.groupby(keys, sort=False):
        est, lo, hi = recovery(g["effect"].to_numpy(), g["gain"].to_numpy(), n_boot=n_boot, seed=seed)
        rows.append(dict(zip(keys, key), recovery=est, ci_low=lo, ci_high=hi,
                         mean_effect=g["effect"].mean(), mean_gain=g["gain"].mean(), n_pairs=len(g)))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# One chunk


class _Captured:
    """One model's activations on one `PackedBatch`, and how it calls each layer there."""

    def __init__(self, model, batch: PackedBatch, sublayer_sites):
        sites = ["resid", *sublayer_sites]
        with torch.inference_mode(), capture(model, sites=sites) as acts, layer_calls(model) as calls:
            self.logp = pair_logprobs(model, packed_hidden(model, batch), batch)
        self.acts, self.calls = acts, calls

    def input(self, layer: int) -> torch.Tensor:
        return self.acts["input", 0] if layer == 0 else self.acts["resid", layer - 1]

    def value(self, site: str, layer: int) -> torch.Tensor:
        if site == "block":
            return self.acts["resid", layer] - self.input(layer)
        return self.acts[site, layer]


class _Chunk:
    """A chunk of pairs, packed one pair per row (`PackedBatch`) in batches of similar length, captured once."""

    def __init__(self, pair, encoded, batch_size, sublayer_sites, seed, index):
        n = self.n = len(encoded)
        self.batches = length_batches([packed_length(e) for e in encoded], max(1, batch_size // 2))
        device = next(pair.base.parameters()).device
        self.packed = [pack_pairs([encoded[i] for i in idx], pad_id(pair.tokenizer)).to(device) for idx in self.batches]
        self.where = {i: (b, r) for b, idx in enumerate(self.batches) for r, i in enumerate(idx)}
        self.caps = {role: [_Captured(m, p, sublayer_sites) for p in self.packed] for role, m in pair.models.items()}
        # shuffled control: pair i takes the donor activations of pair i + shift (chosen from chosen, etc.)
        self.shift = int(np.random.default_rng([seed, index]).integers(1, n)) if n > 1 else 0

    def margins(self, logps) -> np.ndarray:
        """Per-pair margins from per-batch (chosen, rejected) log-prob sums."""
        out = np.zeros(self.n)
        for vals, idx in zip(logps, self.batches):
            out[idx] = (vals[:, 0] - vals[:, 1]).numpy()
        return out

    def clean_margins(self, role) -> np.ndarray:
        return self.margins([c.logp for c in self.caps[role]])

    def position_mask(self, b, positions) -> torch.Tensor:
        batch = self.packed[b]
        if positions == "all":
            return batch.real
        if positions == "response":
            return batch.response
        if positions == "prompt":
            return batch.segment == PROMPT
        mask = torch.zeros_like(batch.real)
        for r, (p, c, rej) in enumerate(batch.spans):
            for off in positions:  # before the response: the shared prompt; from it: both responses
                if off < 0 and p + off >= 0:
                    mask[r, p + off] = True
                if 0 <= off < c:
                    mask[r, p + off] = True
                if 0 <= off < rej:
                    mask[r, p + c + off] = True
        return mask

    def control_value(self, control, site, layer, recv, donor, b, mask, gen, subspaces=None):
        """The value patched in for a control at batch ``b``, and the (possibly narrowed) mask."""
        own = self.caps[recv][b].value(site, layer)
        if control == "patch":
            return self.caps[donor][b].value(site, layer), mask
        if control.startswith("subspace:"):
            u = subspaces[control].to(own.device, own.dtype)
            diff = self.caps[donor][b].value(site, layer) - own
            return own + (diff @ u) @ u.T, mask
        if control == "identity":
            return own, mask
        if control == "noise":
            diff = self.caps[donor][b].value(site, layer) - own
            noise = torch.randn(own.shape, generator=gen, dtype=torch.float32).to(own.device, own.dtype)
            return own + noise / noise.norm(dim=-1, keepdim=True) * diff.norm(dim=-1, keepdim=True), mask
        if control == "zero_ablation":
            return torch.zeros_like(own), mask
        if control == "mean_ablation":  # over the tokens of both sequences: prompt tokens count twice
            weights = [(p.real.to(own.dtype) + (p.segment == PROMPT).to(own.dtype))[..., None] for p in self.packed]
            total = sum((c.value(site, layer) * w).sum((0, 1)) for c, w in zip(self.caps[recv], weights))
            return (total / sum(w.sum() for w in weights)).expand_as(own).clone(), mask
        if control == "shuffled":  # another pair's donor value, each segment aligned on the response start
            value, ok = own.clone(), torch.zeros_like(mask)
            for r, i in enumerate(self.batches[b]):
                sb, srow = self.where[(i + self.shift) % self.n]
                src_value = self.caps[donor][sb].value(site, layer)[srow]
                (p, c, rej), (sp, sc, srej) = self.packed[b].spans[r], self.packed[sb].spans[srow]
                n_prompt = min(p, sp)  # the last n_prompt prompt tokens of each
                for to, frm, n in ((p - n_prompt, sp - n_prompt, n_prompt), (p, sp, min(c, sc)),
                                   (p + c, sp + sc, min(rej, srej))):
                    value[r, to : to + n] = src_value[frm : frm + n]
                    ok[r, to : to + n] = True
            return value, mask & ok
        raise ValueError(control)


@torch.inference_mode()  # a sweep never needs gradients, whatever the weights' requires_grad
def _sweep_chunk(pair, encoded, cells, positions, method, batch_size, seed, chunk_index, bar,
                 subspaces=None) -> pd.DataFrame:
    sublayer_sites = sorted({c[1] for c in cells} & {"attn", "mlp"})
    chunk = _Chunk(pair, encoded, batch_size, sublayer_sites, seed, chunk_index)
    clean = {role: chunk.clean_margins(role) for role in chunk.caps}
    groups: dict = {}  # (control, site, direction) -> layers: the cells one stacked resume can share
    for control, site, direction, layer in cells:
        groups.setdefault((control, site, direction), []).append(layer)
    rows = []
    for (control, site, direction), layers in groups.items():
        recv, donor = DIRECTIONS[direction]
        model = pair.models[recv]
        logps = {layer: [] for layer in layers}
        for b, batch in enumerate(chunk.packed):
            stacked = method == "fast" and site in ("resid", "block")
            per_stack = max(1, STACK_TOKENS // batch.input_ids.numel()) if stacked else 1
            for i in range(0, len(layers), per_stack):
                values = {}
                for layer in layers[i:i + per_stack]:
                    gen = torch.Generator().manual_seed(_cell_seed(seed, chunk_index, control, site, direction, layer, b))
                    values[layer] = chunk.control_value(control, site, layer, recv, donor, b,
                                                        chunk.position_mask(b, positions), gen, subspaces)
                for layer, final in _run_patched(model, method, site, batch, chunk.caps[recv][b], values).items():
                    logps[layer].append(pair_logprobs(model, final, batch))
        for layer in layers:
            patched = chunk.margins(logps[layer])
            for i, e in enumerate(encoded):
                rows.append(dict(id=e.id, site=site, direction=direction, control=control, layer=layer,
                                 margin_patched=patched[i], margin_receiver=clean[recv][i],
                                 margin_donor=clean[donor][i], effect=patched[i] - clean[recv][i],
                                 gain=clean[donor][i] - clean[recv][i]))
            bar.update(1)
    return pd.DataFrame(rows)


@torch.inference_mode()
def _run_patched(model, method, site, batch: PackedBatch, R: _Captured, values: dict) -> dict[int, torch.Tensor]:
    """The receiver's final hidden states with ``site`` of each layer l set to ``values[l] = (value, mask)``.

    ``hooks``: a whole forward per layer with a patching hook. ``fast``, ``attn``/``mlp``: resume at
    the layer itself with the sublayer patched inside it. ``fast``, ``resid``/``block``: the patched
    streams of all the given layers resume together, stacked (`resume_stacked`).
    """
    if method == "hooks" or site in ("attn", "mlp"):
        out = {}
        for layer, (value, mask) in values.items():
            with contextlib.ExitStack() as stack:
                if method == "fast":
                    stack.enter_context(resume_from(model, layer, R.input(layer)))
                stack.enter_context(patch(model, site, layer, value, mask))
                out[layer] = packed_hidden(model, batch)
        return out
    streams = {}
    for layer, (value, mask) in values.items():
        own = R.acts["resid", layer]
        if site == "resid":
            streams[layer] = torch.where(mask[..., None], value.to(own.dtype), own)
        else:  # block: the donor's contribution replaces the receiver's own on top of the same input
            streams[layer] = own + torch.where(mask[..., None], value.to(own.dtype) - R.value("block", layer), 0)
    return resume_stacked(model, R.calls, streams)


def _check_positions(positions):
    if isinstance(positions, str):
        if positions not in POSITIONS:
            raise ValueError(f"unknown positions {positions!r}; use {POSITIONS} or offsets from the response start")
        return positions
    offsets = sorted({int(p) for p in positions})
    if not offsets:
        raise ValueError("positions: empty offset set")
    return offsets


def _chunks(encoded, chunk_size):
    """Split into balanced chunks of at least ``chunk_size`` pairs (so every chunk can shuffle)."""
    if chunk_size < 2:
        raise ValueError("chunk_size must be at least 2")
    k = max(1, len(encoded) // chunk_size)
    bounds = np.linspace(0, len(encoded), k + 1).round().astype(int)
    return [encoded[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _cell_seed(*parts) -> int:
    return int(sha1(list(parts))[:8], 16)


def _fingerprint(model) -> str:
    """A cheap identity for a model's weights, so a run folder is never resumed with other weights."""
    with torch.no_grad():
        return sha1([(n, list(p.shape), float(p.double().sum())) for n, p in model.named_parameters()])




__all__ = ["CONTROLS", "DIRECTIONS", "SITES", "Sweep", "patch_sweep", "summarize"]
