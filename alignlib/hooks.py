"""The mechanics of intervening on a decoder layer of any HF causal LM: record, patch, feed, resume.

Sites (DESIGN.md section 1): ``resid`` (the layer's output stream), ``block`` (its contribution,
output minus input: patching adds the donor's contribution onto the receiver's input), ``attn`` and
``mlp`` (the sublayer outputs), and ``own`` (patched like ``block``, with the donor layer's
contribution computed on the receiver's own input).

Every context manager removes its hooks (and restores swapped layers) even when the forward raises.
`resume_from` runs a model from layer ``start`` on a given stream; `resume_stacked` resumes many
streams that start at different layers at once, each later layer running once on all of them
stacked. With a `Suffix`, a resumed run recomputes only each row's positions from its first patched
one on: the earlier positions are unchanged in every layer, so their keys and values come from the
capture (`record_kv`) instead of being computed again.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .data import PackedBatch, additive
from .models import decoder_layers, final_hidden, final_norm, sublayer

SITES = ("resid", "block", "attn", "mlp", "own")

# Whether a model's decoder layers return a tuple (older/other HF models) or a bare tensor.
_RETURNS_TUPLE: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def check_site(site: str) -> str:
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; choose from {SITES}")
    return site


def check_layer(model: nn.Module, layer: int) -> int:
    n = len(decoder_layers(model))
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(f"unknown layer {layer!r}: the model has layers 0..{n - 1}")
    return layer


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


def _with_hidden(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


def _input_hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _with_input(args, kwargs, value):
    return ((value, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": value})


def _where(mask: torch.Tensor | None, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` at masked positions (B, T), ``old`` elsewhere; all positions when mask is None."""
    if mask is None:
        return new.to(old.dtype)
    return torch.where(mask.to(old.device)[..., None], new.to(old.dtype), old)


@contextlib.contextmanager
def _hooks() -> Iterator[list]:
    handles: list = []
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def record(model: nn.Module, sublayers=(), *, grad: bool = False) -> Iterator[dict]:
    """Record a forward inside the block: ``rec["stream"][l]`` is the input of layer l (the last entry
    the final layer's output), ``rec[site, l]`` the output of sublayer ``site`` and ``rec["calls"][l]``
    how layer l was called (everything but the stream: what `resume_stacked` needs).

    ``grad=True`` makes the stream into layer 0 a graph leaf and keeps every recorded tensor in the
    graph, so gradients with respect to them can be taken with frozen weights.
    """
    layers = decoder_layers(model)
    rec: dict = {"stream": [None] * (len(layers) + 1), "calls": {}}
    keep = (lambda t: t) if grad else (lambda t: t.detach())
    with _hooks() as handles:
        def first(module, args, kwargs):
            if grad:
                x = _input_hidden(args, kwargs).detach().requires_grad_(True)
                rec["stream"][0] = x
                return _with_input(args, kwargs, x)
            rec["stream"][0] = _input_hidden(args, kwargs).detach()

        handles.append(layers[0].register_forward_pre_hook(first, with_kwargs=True))
        for l, layer in enumerate(layers):
            def calls(module, args, kwargs, l=l):
                rec["calls"][l] = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})

            def output(module, args, kwargs, out, l=l):
                _RETURNS_TUPLE[model] = isinstance(out, tuple)
                rec["stream"][l + 1] = keep(_hidden(out))

            handles.append(layer.register_forward_pre_hook(calls, with_kwargs=True))
            handles.append(layer.register_forward_hook(output, with_kwargs=True))
            for site in sublayers:
                def sub(module, args, out, site=site, l=l):
                    rec[site, l] = keep(_hidden(out))
                handles.append(sublayer(layer, site).register_forward_hook(sub))
        yield rec


@contextlib.contextmanager
def patch(model: nn.Module, site: str, layer: int, value: torch.Tensor, positions: torch.Tensor | None = None):
    """During forwards inside the block, set ``site`` of ``layer`` to ``value`` (B, T, H) at ``positions``.

    ``positions`` is a (B, T) boolean mask, or None for every position. For ``block`` and ``own`` the
    value is the contribution to add onto the layer's input in place of the receiver's own.
    """
    check_site(site)
    target = decoder_layers(model)[check_layer(model, layer)]
    with _hooks() as handles:
        if site in ("attn", "mlp"):
            def sub_hook(module, args, out):
                return _with_hidden(out, _where(positions, value, _hidden(out)))

            handles.append(sublayer(target, site).register_forward_hook(sub_hook))
        else:
            def layer_hook(module, args, kwargs, out):
                h = _hidden(out)
                if site == "resid":
                    return _with_hidden(out, _where(positions, value, h))
                own = h - _input_hidden(args, kwargs)
                return _with_hidden(out, h + _where(positions, value - own, torch.zeros_like(h)))

            handles.append(target.register_forward_hook(layer_hook, with_kwargs=True))
        yield


@contextlib.contextmanager
def feed_inputs(model: nn.Module, inputs: dict[int, torch.Tensor]):
    """Inside the block, every layer ``l`` in ``inputs`` reads ``inputs[l]`` instead of the stream.

    With the receiver's layer inputs fed to the donor, each donor layer's contribution is computed on
    exactly the receiver's input: what the layer itself changed, not what it inherited.
    """
    layers = decoder_layers(model)
    with _hooks() as handles:
        for l, value in inputs.items():
            def feed(module, args, kwargs, value=value):
                return _with_input(args, kwargs, value)

            handles.append(layers[check_layer(model, l)].register_forward_pre_hook(feed, with_kwargs=True))
        yield


class _Skip(nn.Module):
    """Stands in for a decoder layer that `resume_from` skips: passes the stream through unchanged."""

    def __init__(self, layer: nn.Module, returns_tuple: bool):
        super().__init__()
        self.returns_tuple = returns_tuple
        object.__setattr__(self, "_layer", layer)  # not a submodule: no parameters, no state_dict

    def __getattr__(self, name):  # model loops may read layer attributes (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.returns_tuple else hidden_states


def returns_tuple(model: nn.Module) -> bool:
    """Whether the model's decoder layers return tuples; learned from one tiny forward if unknown."""
    if model not in _RETURNS_TUPLE:
        with torch.no_grad(), record(model):
            final_hidden(model, torch.zeros((1, 1), dtype=torch.long, device=next(model.parameters()).device))
    return _RETURNS_TUPLE[model]


@contextlib.contextmanager
def resume_from(model: nn.Module, start: int, stream: torch.Tensor):
    """Inside the block, a forward skips layers ``< start`` and feeds ``stream`` into layer ``start``.

    Embeddings, masks and position encodings are still prepared by the model itself, so this works
    for any architecture whose layers pass the stream along.
    """
    layers = decoder_layers(model)
    if not 0 <= start < len(layers):
        raise ValueError(f"resume_from: start {start} out of range 0..{len(layers) - 1}")
    tuple_out = returns_tuple(model)
    originals = [layers[i] for i in range(start)]
    try:
        for i in range(start):
            layers[i] = _Skip(originals[i], tuple_out)
        with feed_inputs(model, {start: stream}):
            yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


def resume_stacked(model: nn.Module, calls: dict, streams: dict[int, torch.Tensor],
                   suffix: "Suffix | None" = None) -> dict[int, torch.Tensor]:
    """Final-normed hidden states after resuming the model from ``streams[l]``, the stream after layer l.

    Each later layer runs once on every stream that resumes before it, stacked along the batch: the
    same arithmetic per stream as `resume_from`, in one layer call per depth instead of one per
    (stream, depth). ``calls`` comes from `record` on a forward over the same batch. With a
    ``suffix`` the streams hold only the suffix positions (`Suffix.gather`), and so do the outputs.
    """
    layers = decoder_layers(model)
    n = len(layers)
    for l in streams:
        if not 0 <= l < n:
            raise ValueError(f"resume_stacked: layer {l} out of range 0..{n - 1}")
    batch = next(iter(streams.values())).shape[0]
    order: list[int] = []
    h = None
    tiled: dict = {}
    for d in range(min(streams) + 1, n + 1):
        if d - 1 in streams:
            h = streams[d - 1] if h is None else torch.cat([h, streams[d - 1]])
            order.append(d - 1)
        if d < n:
            args, kwargs = calls[d] if suffix is None else suffix.call(calls[d], d)
            k = len(order)
            h = _hidden(layers[d](h, *_tile(args, batch, k, tiled), **_tile(kwargs, batch, k, tiled)))
    return dict(zip(order, final_norm(model)(h).split(batch)))


def _tile(value, batch: int, k: int, memo: dict):
    """``value`` with every batch-leading tensor (2-D or more) repeated ``k`` times along the batch."""
    if k == 1:
        return value
    if isinstance(value, torch.Tensor):
        if value.dim() < 2 or value.shape[0] != batch:
            return value
        key = (id(value), k)
        if key not in memo or memo[key][0] is not value:  # the memo holds the value: its id cannot be reused
            memo[key] = (value, value.repeat(k, *([1] * (value.dim() - 1))))
        return memo[key][1]
    if isinstance(value, dict):
        return {n: _tile(v, batch, k, memo) for n, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_tile(v, batch, k, memo) for v in value)
    return value


# --------------------------------------------------------------------------------------------
# Prompt reuse: resume only the positions from the first patched one on


def _cache_kwarg(layer: nn.Module) -> str | None:
    """The name under which a decoder layer takes its key/value cache (None: it takes none)."""
    params = inspect.signature(layer.forward).parameters
    return next((name for name in ("cache", "past_key_values", "past_key_value") if name in params), None)


class _KVRecorder:
    """Passed to every layer as its cache: keeps each layer's keys and values and changes nothing."""

    def __init__(self):
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key, value, layer_idx, *args, **kwargs):
        self.kv[layer_idx] = (key.detach(), value.detach())
        return key, value


@contextlib.contextmanager
def record_kv(model: nn.Module) -> Iterator[dict]:
    """Inside the block, each attention's keys and values (as they enter attention: after any rotary
    embedding) are kept in the yielded dict, by layer index. Empty when the architecture has no
    standard cache argument, which turns prompt reuse off."""
    layers = decoder_layers(model)
    name = _cache_kwarg(layers[0])
    recorder = _KVRecorder()
    with _hooks() as handles:
        if name is not None:
            def inject(module, args, kwargs):
                return args, {**kwargs, name: recorder}
            handles.extend(layer.register_forward_pre_hook(inject, with_kwargs=True) for layer in layers)
        yield recorder.kv


class _PrefixCache:
    """A cache that puts the recorded prefix keys and values before each layer's new ones (no state)."""

    def __init__(self, kv: dict, prefix: int, batch: int):
        self.kv, self.prefix, self.batch = kv, prefix, batch

    def update(self, key, value, layer_idx, *args, **kwargs):
        k, v = (t[:, :, : self.prefix] for t in self.kv[layer_idx])
        reps = key.shape[0] // self.batch
        return torch.cat([k.repeat(reps, 1, 1, 1), key], 2), torch.cat([v.repeat(reps, 1, 1, 1), value], 2)


@dataclass
class Suffix:
    """Each row's positions from its first patched one on, left-aligned: all a resumed run recomputes.

    Built from a batch, the patched positions and the receiver's recorded keys and values. The
    positions before a row's first patched one see the same inputs in every layer, so they are not
    recomputed: each later layer attends to their recorded keys and values instead.
    """

    index: torch.Tensor  # (B, S): original position of each suffix slot
    valid: torch.Tensor  # (B, S): slot holds a real position
    mask: torch.Tensor  # (B, 1, S, P + S) additive: suffix queries against prefix then suffix keys
    cache: _PrefixCache
    cache_name: str

    @classmethod
    def build(cls, model: nn.Module, batch: PackedBatch, patched: torch.Tensor, kv: dict) -> "Suffix | None":
        """None when there is nothing to save (a row patched from its first position) or no ``kv``."""
        name = _cache_kwarg(decoder_layers(model)[0])
        real = batch.real
        lengths = real.sum(1)
        first = torch.where(patched.any(1), patched.float().argmax(1), lengths)
        if not kv or name is None or int(first.min()) == 0:
            return None
        prefix, width = int(first.max()), int((lengths - first).max())
        slots = torch.arange(max(width, 1), device=real.device)
        index = first[:, None] + slots[None]
        valid = index < lengths[:, None]
        index = index.clamp(max=real.shape[1] - 1)
        ok = batch.allowed()
        rows = torch.arange(len(ok), device=ok.device)[:, None, None]
        to_prefix = ok[rows, index[:, :, None], torch.arange(prefix, device=ok.device)[None, None]]
        to_prefix &= torch.arange(prefix, device=ok.device)[None, None] < first[:, None, None]
        to_suffix = ok[rows, index[:, :, None], index[:, None, :]] & valid[:, None, :]
        to_suffix |= torch.eye(index.shape[1], dtype=torch.bool, device=ok.device)  # padding slots see themselves
        mask = additive(torch.cat([to_prefix, to_suffix], 2), next(model.parameters()).dtype)[:, None]
        return cls(index, valid, mask, _PrefixCache(kv, prefix, len(index)), name)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (B, S, ...): the suffix positions of each row."""
        idx = self.index.view(*self.index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
        return x.gather(1, idx)

    def scatter(self, full: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        """``full`` (B, T, H) with its suffix positions taken from ``part`` (B, S, H)."""
        out = full.clone()
        rows, slots = self.valid.nonzero(as_tuple=True)
        out[rows, self.index[rows, slots]] = part[rows, slots].to(out.dtype)
        return out

    def call(self, call: tuple, layer: int) -> tuple:
        """A recorded layer call restricted to the suffix: mask, positions and the prefix cache."""
        args, kwargs = call
        if args:
            raise ValueError("prompt reuse needs layers called with keyword arguments")
        out = {}
        for key, value in kwargs.items():
            if key == "attention_mask":
                out[key] = self.mask
            elif key in ("position_ids", "cache_position") and isinstance(value, torch.Tensor) and value.dim() == 2:
                out[key] = self.gather(value)
            elif key == "position_embeddings":
                out[key] = tuple(self.gather(t.expand(len(self.index), *t.shape[1:])) for t in value)
            elif key in (self.cache_name, "use_cache") or not isinstance(value, torch.Tensor):
                out[key] = value
            else:
                raise ValueError(f"prompt reuse does not know how to restrict the layer argument {key!r}")
        out[self.cache_name] = self.cache
        return (), out
