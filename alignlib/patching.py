"""Layer-wise causal patching between the two sides of a model pair, with controls.

For each layer l, run the receiver with a site of layer l set to the donor's value on the same
input, and measure how the preference margin moves:

    effect_l = margin(receiver[site_l <- donor]) - margin(receiver)
    recovery_l = mean(effect_l) / mean(margin(donor) - margin(receiver))

``tuned_to_base`` (receiver base, donor tuned) asks how much of the reward gain comes back;
``base_to_tuned`` (receiver tuned, donor base) how much of it is lost. Either way recovery is the
share of the way from the receiver's margin to the donor's. Every cell is also measured on the
margin of per-token means (``effect_per_token``), and summarised by `alignlib.stats` (BCa CIs, the
slope of effect on gain over all pairs, a band simultaneous over layers).

Controls replace the donor's value by: the receiver's own (``identity``: exactly 0), the donor's
value from another pair aligned on the response start (``shuffled``), the receiver's plus random
noise with the norm of the real difference at each position (``noise``), the receiver's mean value
over the chunk's tokens (``mean_ablation``) or zero (``zero_ablation``).

Methods, all returning the same tables:

- ``fast`` (default): one capture of both models per batch, then the receiver resumed from the
  patched layer, the patched streams of all layers stacked through each later layer
  (`hooks.resume_stacked`). When a row's first positions are not patched (``positions="response"``,
  offsets), only the positions from the first patched one on are recomputed (`hooks.Suffix`).
- ``hooks``: the plain reference, a whole forward per layer with a patching hook.
- ``attribution``: attribution patching (AtP), the first-order estimate of every cell from one
  forward and backward per model: effect ~ grad(margin) . (patched - own). A screen, to be
  confirmed by an exact method on the layers it ranks highest.

Each pair runs as one packed row, prompt + chosen + rejected (`alignlib.data.PackedBatch`).
Finished chunks are written to ``run_dir``; an interrupted sweep resumes with identical results,
and ``shard`` splits the chunks between processes that share the run folder (`torchrun`,
`accelerate launch`, a job array), each writing its own, merged when all are there.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from itertools import product
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import stats
from .capture import Capture, capture, margin_gradients, own_change
from .data import PROMPT
from .forward import hidden, pair_logprobs
from .hooks import SITES, Suffix, check_site, patch, resume_from, resume_stacked
from .metrics import encoded_pairs, packed_batches
from .models import ModelPair
from .store import Entry, code_digest, sha1, shard_spec, wait_for

DIRECTIONS = {"tuned_to_base": ("base", "tuned"), "base_to_tuned": ("tuned", "base")}  # receiver, donor
CONTROLS = ("identity", "shuffled", "noise", "mean_ablation", "zero_ablation")
POSITIONS = ("all", "prompt", "response")
METHODS = ("fast", "hooks", "attribution")
#: Most token rows that one stacked resume runs through a layer (streams x batch x length): bounds
#: memory; larger stacks were slower on a 2-core CPU (caches), one stream per stack barely slower.
STACK_TOKENS = 8192
KEYS = ["site", "direction", "control", "positions", "method", "layer"]


@dataclass
class Sweep:
    """``pairs``: one row per (cell, pair); ``summary``: one row per cell (`summarize`)."""

    pairs: pd.DataFrame
    summary: pd.DataFrame


def patch_sweep(
    pair: ModelPair,
    prefs,
    *,
    site: str | Sequence[str] = "resid",
    direction: str | Sequence[str] = "tuned_to_base",
    positions: str | Sequence[int] = "all",
    layers: Sequence[int] | None = None,
    controls: Sequence[str] = CONTROLS,
    method: str = "fast",
    subspaces: dict | None = None,
    batch_size: int = 8,
    chunk_size: int = 32,
    max_length: int = 1024,
    chat_template: bool = False,
    run_dir=None,
    shard: tuple[int, int] | str | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    progress: bool = True,
) -> Sweep:
    """Patch every requested (site, direction, layer) cell, the real patch and its controls.

    site: ``resid``, ``block``, ``attn``, ``mlp``, ``own`` or several; all reuse one capture per batch.
    positions: ``"all"``, ``"prompt"``, ``"response"``, or offsets from the response start
        (0 is the first response token, -1 the last prompt token, which predicts it).
    layers: decoder layer indices (default all). controls: any of `CONTROLS`; the real patch
        (control ``"patch"``) is always run. method: ``fast``, ``hooks`` or ``attribution``.
    subspaces: name -> orthonormal basis U (hidden, k): adds cells (control ``"subspace:<name>"``)
        that patch only the part of the difference inside span(U): receiver + (donor - receiver) U U^T.
    batch_size: pairs per forward (one packed row each). chunk_size: pairs per unit of work, written
        to ``run_dir`` and resumed; the pool that ``shuffled`` draws from and ``mean_ablation`` averages.
    shard: ``(i, n)`` computes every n-th chunk from the i-th (``"auto"``: from the ``RANK`` and
        ``WORLD_SIZE`` a launcher sets); needs ``run_dir``. Each shard waits for the others' chunks and
        returns the whole sweep, equal to one process's.
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
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    n_layers = pair.n_layers
    layers = list(range(n_layers)) if layers is None else [int(l) for l in layers]
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise ValueError(f"unknown layer(s) {bad}: the model has layers 0..{n_layers - 1}")
    positions = _check_positions(positions)
    encoded = encoded_pairs(pair, prefs, max_length=max_length, chat_template=chat_template)
    if "shuffled" in controls and len(encoded) < 2:
        raise ValueError("the shuffled control needs at least 2 pairs")
    subspaces = {f"subspace:{k}": torch.as_tensor(u, dtype=torch.float32) for k, u in (subspaces or {}).items()}
    cells = [(ctl, s, d, l) for ctl in ["patch", *controls, *subspaces] for s, d, l in product(sites, directions, layers)]
    chunks = _chunks(encoded, chunk_size)
    rank, world = shard_spec(shard, run_dir)

    entry = None
    if run_dir is not None:
        config = dict(pair=pair.name, weights_sha1=pair.weights_sha1(),
                      ids_sha1=sha1([e.id for e in encoded]), tokens_sha1=sha1([[e.chosen, e.rejected] for e in encoded]),
                      sites=sites, directions=directions, positions=positions, layers=layers, controls=list(controls),
                      method=method, batch_size=batch_size, chunk_size=chunk_size, seed=seed,
                      dtype=str(next(pair.base.parameters()).dtype),
                      subspaces={k: sha1(u.tolist()) for k, u in subspaces.items()})
        entry = Entry(run_dir, config, code_digest()).open()

    tables = {}
    bar = tqdm(total=len(chunks) * len(cells), desc=f"patch sweep ({method})", disable=not progress)
    for ci, chunk in enumerate(chunks):
        name = f"sweep-chunk-{ci:05d}"
        if entry is not None and entry.has(name):
            tables[ci] = entry.load_table(name)
        elif ci % world == rank:
            tables[ci] = _sweep_chunk(pair, chunk, cells, positions, method, batch_size, seed, ci, bar, subspaces)
            if entry is not None:
                entry.save_table(name, tables[ci])
            continue
        bar.update(len(cells))
    bar.close()
    if world > 1:
        names = [f"sweep-chunk-{i:05d}" for i in range(len(chunks))]
        wait_for(lambda: all(entry.has(n) for n in names), entry.path)
        tables = {i: entry.load_table(n) for i, n in enumerate(names)}
    per_pair = pd.concat([tables[i] for i in sorted(tables)], ignore_index=True)
    return Sweep(per_pair, summarize(per_pair, n_boot=n_boot, seed=seed))


def summarize(per_pair: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per cell: recovery (ratio of means) with its BCa CI and a band simultaneous over the
    cell's layers, the slope of effect on gain over pairs with its CI, and the per-token recovery."""
    rows = []
    for key, g in per_pair.groupby(KEYS, sort=False):
        e, gain = g["effect"].to_numpy(), g["gain"].to_numpy()
        rec, slope = stats.recovery(e, gain, n_boot=n_boot, seed=seed), stats.slope(e, gain, n_boot=n_boot, seed=seed)
        tok = stats.recovery(g["effect_per_token"].to_numpy(), g["gain_per_token"].to_numpy(), n_boot=n_boot, seed=seed)
        rows.append(dict(zip(KEYS, key), recovery=rec[0], ci_low=rec[1], ci_high=rec[2], slope=slope[0],
                         slope_low=slope[1], slope_high=slope[2], recovery_per_token=tok[0], per_token_low=tok[1],
                         per_token_high=tok[2], mean_effect=e.mean(), mean_gain=gain.mean(), n_pairs=len(g)))
    summary = pd.DataFrame(rows)
    summary["band_low"], summary["band_high"] = np.nan, np.nan
    for _, rows_ in summary.groupby(KEYS[:-1], sort=False):  # simultaneous over the layers of each curve
        cells = [per_pair.merge(rows_.loc[[i], KEYS], on=KEYS) for i in rows_.index]  # one layer each, pair order
        if len({len(c) for c in cells}) != 1:
            continue
        low, high = stats.simultaneous_band(np.stack([c.effect.to_numpy() for c in cells], 1),
                                            cells[0].gain.to_numpy(), n_boot=n_boot, seed=seed)
        summary.loc[rows_.index, "band_low"], summary.loc[rows_.index, "band_high"] = low, high
    return summary


def agreement(screen: pd.DataFrame, exact: pd.DataFrame, *, top: int = 3) -> pd.DataFrame:
    """How well attribution patching (``screen``) matches exact patching (``exact``), per site and direction.

    ``correlation``: across every (pair, layer) cell both measured; ``per_layer``: the median over
    layers of the correlation across pairs; ``top_overlap``: how many of the exact sweep's ``top``
    layers (largest mean effect) the screen also ranks among its ``top``; ``n_cells``.
    """
    keys = ["id", "site", "direction", "control", "positions", "layer"]
    both = exact.merge(screen, on=keys, suffixes=("_exact", "_screen"))
    rows = []
    for (site, direction), g in both.groupby(["site", "direction"], sort=False):
        per_layer = [np.corrcoef(c.effect_exact, c.effect_screen)[0, 1] for _, c in g.groupby("layer") if len(c) > 2]
        means = g.groupby("layer")[["effect_exact", "effect_screen"]].mean()
        k = min(top, len(means))
        overlap = len(set(means.effect_exact.nlargest(k).index) & set(means.effect_screen.nlargest(k).index))
        rows.append(dict(site=site, direction=direction, correlation=np.corrcoef(g.effect_exact, g.effect_screen)[0, 1],
                         per_layer=float(np.nanmedian(per_layer)) if per_layer else np.nan,
                         top_overlap=f"{overlap} of {k}", n_cells=len(g)))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# One chunk


class _Chunk:
    """A chunk of pairs, packed one pair per row in batches of similar length, each model captured once."""

    def __init__(self, pair, encoded, batch_size, sublayers, seed, index, *, kv=False, own=(), grads=()):
        self.n = len(encoded)
        self.pair = pair
        batches = list(packed_batches(pair, encoded, batch_size))
        self.batches = [idx for idx, _ in batches]
        self.packed = [b for _, b in batches]
        self.where = {i: (b, r) for b, idx in enumerate(self.batches) for r, i in enumerate(idx)}
        self.caps, self.grads = {}, {}
        for role, m in pair.models.items():  # the receivers' gradients come with their capture, one forward
            what = f"{pair.name} {role} model"
            if role in grads:
                self.caps[role], self.grads[role] = zip(*(margin_gradients(m, p, sublayers, what=what)
                                                          for p in self.packed))
            else:
                self.caps[role] = [capture(m, p, sublayers, kv=kv, what=what) for p in self.packed]
        # site "own": the donor's layers on the receiver's own inputs
        self.own = {donor: [own_change(pair.models[donor], p, c) for p, c in zip(self.packed, self.caps[recv])]
                    for recv, donor in (DIRECTIONS[d] for d in own)}
        # shuffled control: pair i takes the donor activations of pair i + shift (chosen from chosen, etc.)
        self.shift = int(np.random.default_rng([seed, index]).integers(1, self.n)) if self.n > 1 else 0

    def margins(self, logps) -> tuple[np.ndarray, np.ndarray]:
        """Per-pair (summed, per-token) margins from per-batch (chosen, rejected) log-prob sums."""
        out = np.zeros((2, self.n))
        for vals, idx, batch in zip(logps, self.batches, self.packed):
            lengths = torch.tensor(batch.spans, dtype=torch.float64)[:, 1:]
            out[0, idx] = (vals[:, 0] - vals[:, 1]).numpy()
            out[1, idx] = (vals[:, 0] / lengths[:, 0] - vals[:, 1] / lengths[:, 1]).numpy()
        return out[0], out[1]

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

    def donor_value(self, site, layer, recv, donor, b) -> torch.Tensor:
        if site == "own":
            return self.own[donor][b][layer]
        return self.caps[donor][b].value(site, layer)

    def control_value(self, control, site, layer, recv, donor, b, mask, gen, subspaces=None):
        """The value patched in for a control at batch ``b``, and the (possibly narrowed) mask."""
        own = self.caps[recv][b].value(site, layer)
        if control == "patch":
            return self.donor_value(site, layer, recv, donor, b), mask
        if control.startswith("subspace:"):
            u = subspaces[control].to(own.device, own.dtype)
            return own + ((self.donor_value(site, layer, recv, donor, b) - own) @ u) @ u.T, mask
        if control == "identity":
            return own, mask
        if control == "noise":
            diff = self.donor_value(site, layer, recv, donor, b) - own
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
                src_value = self.donor_value(site, layer, recv, donor, sb)[srow]
                (p, c, rej), (sp, sc, srej) = self.packed[b].spans[r], self.packed[sb].spans[srow]
                n_prompt = min(p, sp)  # the last n_prompt prompt tokens of each
                for to, frm, n in ((p - n_prompt, sp - n_prompt, n_prompt), (p, sp, min(c, sc)),
                                   (p + c, sp + sc, min(rej, srej))):
                    value[r, to : to + n] = src_value[frm : frm + n]
                    ok[r, to : to + n] = True
            return value, mask & ok
        raise ValueError(control)


@torch.inference_mode()  # a sweep never needs gradients (attribution takes its own, inside)
def _sweep_chunk(pair, encoded, cells, positions, method, batch_size, seed, chunk_index, bar,
                 subspaces=None) -> pd.DataFrame:
    sites = {c[1] for c in cells}
    own = sorted({c[2] for c in cells if c[1] == "own"})
    receivers = {DIRECTIONS[c[2]][0] for c in cells}
    chunk = _Chunk(pair, encoded, batch_size, sorted(sites & {"attn", "mlp"}), seed, chunk_index,
                   kv=method == "fast", own=own, grads=receivers if method == "attribution" else ())
    clean = {role: chunk.margins([c.logp for c in chunk.caps[role]]) for role in chunk.caps}
    groups: dict = {}  # (control, site, direction) -> layers: the cells one stacked resume can share
    for control, site, direction, layer in cells:
        groups.setdefault((control, site, direction), []).append(layer)
    rows = []
    for (control, site, direction), layers in groups.items():
        recv, donor = DIRECTIONS[direction]
        logps = {layer: [] for layer in layers}
        for b, batch in enumerate(chunk.packed):
            mask = chunk.position_mask(b, positions)
            values = {}
            for layer in layers:
                gen = torch.Generator().manual_seed(_cell_seed(seed, chunk_index, control, site, direction, layer, b))
                values[layer] = chunk.control_value(control, site, layer, recv, donor, b, mask, gen, subspaces)
            if method == "attribution":
                run = _attributed(chunk, site, recv, b, values)
            else:
                run = _patched(pair.models[recv], method, site, batch, chunk.caps[recv][b], values)
            for layer, logp in run.items():
                logps[layer].append(logp)
        for layer in layers:
            if method == "attribution":  # first-order effects, added onto the clean margins
                effect = np.zeros((2, chunk.n))
                for (s, t), idx in zip(logps[layer], chunk.batches):
                    effect[0, idx], effect[1, idx] = s, t
                patched = clean[recv][0] + effect[0], clean[recv][1] + effect[1]
            else:
                patched = chunk.margins(logps[layer])
            rows.append(pd.DataFrame(dict(
                id=[e.id for e in encoded], site=site, direction=direction, control=control,
                positions=_positions_name(positions), method=method, layer=layer, margin_patched=patched[0],
                margin_receiver=clean[recv][0], margin_donor=clean[donor][0], effect=patched[0] - clean[recv][0],
                gain=clean[donor][0] - clean[recv][0], effect_per_token=patched[1] - clean[recv][1],
                gain_per_token=clean[donor][1] - clean[recv][1])))
            bar.update(1)
    return pd.concat(rows, ignore_index=True)


def _patched(model, method, site, batch, R: Capture, values: dict) -> dict[int, torch.Tensor]:
    """(B, 2) patched log-probs of the receiver, for each layer l with ``site`` set to ``values[l] = (value, mask)``.

    ``hooks``: a whole forward per layer with a patching hook. ``fast``, ``attn``/``mlp``: resume at
    the layer itself with the sublayer patched inside it. ``fast``, stream sites: the patched streams
    of the given layers resume together, stacked, and only from each row's first patched position on
    when the positions before it are untouched (`Suffix`).
    """
    if method == "hooks" or site in ("attn", "mlp"):
        out = {}
        for layer, (value, mask) in values.items():
            with contextlib.ExitStack() as stack:
                if method == "fast":
                    stack.enter_context(resume_from(model, layer, R.input(layer)))
                stack.enter_context(patch(model, site, layer, value, mask))
                out[layer] = pair_logprobs(model, hidden(model, batch), batch)
        return out
    out = {}
    per_stack = max(1, STACK_TOKENS // batch.input_ids.numel())
    items = list(values.items())
    for i in range(0, len(items), per_stack):
        streams = {}
        union = torch.stack([mask for _, (_, mask) in items[i:i + per_stack]]).any(0)
        suffix = Suffix.build(model, batch, union, R.kv)  # None when every row is patched from its start
        for layer, (value, mask) in items[i:i + per_stack]:
            own = R.value("resid", layer)
            if site == "resid":
                stream = torch.where(mask[..., None], value.to(own.dtype), own)
            else:  # block, own: the donor's contribution replaces the receiver's own on top of the same input
                stream = own + torch.where(mask[..., None], value.to(own.dtype) - R.value("block", layer), 0)
            streams[layer] = stream if suffix is None else suffix.gather(stream)
        for layer, final in resume_stacked(model, R.calls, streams, suffix).items():
            full = final if suffix is None else suffix.scatter(R.final, final)
            out[layer] = pair_logprobs(model, full, batch)
    return out


def _attributed(chunk: _Chunk, site: str, recv: str, b: int, values: dict) -> dict[int, tuple]:
    """First-order effects (summed, per-token margin) per layer: grad . (value - own) over patched positions."""
    own_site = "resid" if site in ("resid", "block", "own") else site
    grads = chunk.grads[recv][b]
    out = {}
    for layer, (value, mask) in values.items():
        diff = (value - chunk.caps[recv][b].value(site, layer)) * mask[..., None]
        out[layer] = tuple(((grads[t][own_site, layer] * diff).sum((1, 2)).double().cpu().numpy()) if t in grads
                           else np.full(len(diff), np.nan) for t in (False, True))
    return out


def _positions_name(positions) -> str:
    return positions if isinstance(positions, str) else "offsets " + ",".join(map(str, positions))


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


__all__ = ["CONTROLS", "DIRECTIONS", "METHODS", "SITES", "Sweep", "agreement", "patch_sweep", "summarize"]
