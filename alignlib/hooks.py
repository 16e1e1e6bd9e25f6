"""Capture and patch activations at a site of a decoder layer, for any HF causal LM.

Sites (DESIGN.md section 1):

- ``resid``: the decoder layer's output hidden state (the residual stream after the layer);
- ``block``: the layer's own contribution, output minus input; patching adds the donor's
  contribution onto the receiver's input, i.e. output += donor_block - receiver_block;
- ``attn`` / ``mlp``: the attention / MLP sublayer outputs.

Every context manager removes its hooks (and restores swapped layers) even when the forward
raises. `resume_from` is the fast path: it runs a model from layer ``start`` on a given residual
stream, skipping the layers before it, so a patched run costs only the layers after the patch.
`resume_stacked` does the same for many streams that resume at different layers at once, running
each later layer once on all of them stacked along the batch.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterator

import torch
from torch import nn

from .models import decoder_layers, final_hidden, final_norm, sublayer

SITES = ("resid", "block", "attn", "mlp")

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
def capture(model: nn.Module, sites=("resid",), layers=None) -> Iterator[dict]:
    """Record activations during forwards inside the block: ``acts[site, layer]`` (B, T, H).

    Also records ``acts["input", 0]``, the input to the first decoder layer, so that the input to
    any layer is known exactly (``input`` of layer l > 0 is ``resid`` of layer l - 1).
    """
    all_layers = decoder_layers(model)
    layers = range(len(all_layers)) if layers is None else [check_layer(model, l) for l in layers]
    sites = [check_site(s) for s in sites]
    acts: dict = {}
    with _hooks() as handles:
        def first_input(module, args, kwargs):
            acts["input", 0] = _input_hidden(args, kwargs).detach()

        handles.append(all_layers[0].register_forward_pre_hook(first_input, with_kwargs=True))
        for l in layers:
            layer = all_layers[l]
            if "resid" in sites or "block" in sites:
                handles.append(layer.register_forward_hook(_layer_recorder(model, acts, l, sites), with_kwargs=True))
            for s in ("attn", "mlp"):
                if s in sites:
                    handles.append(sublayer(layer, s).register_forward_hook(_sub_recorder(acts, s, l)))
        yield acts


def _layer_recorder(model, acts, l, sites):
    def hook(module, args, kwargs, out):
        _RETURNS_TUPLE[model] = isinstance(out, tuple)
        h = _hidden(out).detach()
        if "resid" in sites:
            acts["resid", l] = h
        if "block" in sites:
            acts["block", l] = h - _input_hidden(args, kwargs).detach()
    return hook


def _sub_recorder(acts, s, l):
    def hook(module, args, out):
        acts[s, l] = _hidden(out).detach()
    return hook


@contextlib.contextmanager
def patch(model: nn.Module, site: str, layer: int, value: torch.Tensor, positions: torch.Tensor | None = None):
    """During forwards inside the block, set ``site`` of ``layer`` to ``value`` (B, T, H) at ``positions``.

    ``positions`` is a (B, T) boolean mask, or None for every position. For ``block`` the value is
    the contribution to add onto the layer's input in place of the receiver's own contribution.
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

    With the base model's layer inputs fed to the tuned model, each tuned layer's contribution is
    computed on exactly the base's input, which isolates what the layer itself changed from what it
    inherited from the layers before it.
    """
    layers = decoder_layers(model)
    with _hooks() as handles:
        for l, value in inputs.items():
            def feed(module, args, kwargs, value=value):
                if args:
                    return (value, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": value}

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
        with torch.no_grad(), capture(model, layers=[0]):
            final_hidden(model, torch.zeros((1, 1), dtype=torch.long, device=next(model.parameters()).device))
    return _RETURNS_TUPLE[model]


@contextlib.contextmanager
def resume_from(model: nn.Module, start: int, stream: torch.Tensor):
    """Inside the block, a forward skips layers ``< start`` and feeds ``stream`` into layer ``start``.

    Embeddings, masks and position encodings are still prepared by the model itself, so this works
    for any architecture whose layers pass the stream along. ``start`` equal to the number of layers
    is not supported here: apply `final_norm` to the stream directly.
    """
    layers = decoder_layers(model)
    if not 0 <= start < len(layers):
        raise ValueError(f"resume_from: start {start} out of range 0..{len(layers) - 1}")
    tuple_out = returns_tuple(model)
    originals = [layers[i] for i in range(start)]
    try:
        for i in range(start):
            layers[i] = _Skip(originals[i], tuple_out)

        def feed(module, args, kwargs):
            if args:
                return (stream, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": stream}

        with _hooks() as handles:
            handles.append(layers[start].register_forward_pre_hook(feed, with_kwargs=True))
            yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


@contextlib.contextmanager
def layer_calls(model: nn.Module) -> Iterator[dict]:
    """Record how a forward inside the block calls each decoder layer: ``calls[l] = (args, kwargs)``.

    The stream itself is left out; what remains (attention mask, position encodings, flags) is what
    `resume_stacked` needs to call the layers directly, exactly as the model does.
    """
    calls: dict = {}
    with _hooks() as handles:
        for l, layer in enumerate(decoder_layers(model)):
            def record(module, args, kwargs, l=l):
                calls[l] = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})
            handles.append(layer.register_forward_pre_hook(record, with_kwargs=True))
        yield calls


def resume_stacked(model: nn.Module, calls: dict, streams: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Final-normed hidden states after resuming the model from ``streams[l]``, the stream after layer l.

    Each later layer runs once on every stream that resumes before it, stacked along the batch: the
    same arithmetic per stream as `resume_from`, in one layer call per depth instead of one per
    (stream, depth). ``calls`` comes from `layer_calls` on a forward over the same batch; tensors in
    it with the batch as leading dimension are tiled to the stack.
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
            args, kwargs = calls[d]
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
        if key not in memo:
            memo[key] = value.repeat(k, *([1] * (value.dim() - 1)))
        return memo[key]
    if isinstance(value, dict):
        return {n: _tile(v, batch, k, memo) for n, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_tile(v, batch, k, memo) for v in value)
    return value


def stream_gradients(model: nn.Module, batch, rows_per_pass: int = 4) -> dict[int, torch.Tensor]:
    """``grads[l]`` (B, T, H): d(each row's summed response log-prob) / d(the stream after layer l).

    A padded `Batch`'s rows do not interact, so one backward of the summed log-probs gives every
    row's own gradient. The stream is made a graph leaf at the first layer, so this works with
    frozen weights and leaves every parameter's ``.grad`` untouched; ``rows_per_pass`` bounds the
    memory the backward needs.
    """
    from .metrics import token_logprobs

    layers = decoder_layers(model)
    out: dict[int, list] = {l: [] for l in range(len(layers))}
    for start in range(0, len(batch.input_ids), rows_per_pass):
        ids, mask, response = (t[start:start + rows_per_pass] for t in
                               (batch.input_ids, batch.attention_mask, batch.response_mask))
        streams: list = []
        with torch.enable_grad(), _hooks() as handles:
            def lead(module, args, kwargs):
                x = _input_hidden(args, kwargs).detach().requires_grad_(True)
                return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

            def keep(module, args, kwargs, output):
                streams.append(_hidden(output))

            handles.append(layers[0].register_forward_pre_hook(lead, with_kwargs=True))
            handles.extend(layer.register_forward_hook(keep, with_kwargs=True) for layer in layers)
            sums, _ = token_logprobs(model, final_hidden(model, ids, mask), ids, response)
            grads = torch.autograd.grad(sums.sum(), streams, allow_unused=True)
        for l, g in enumerate(grads):
            out[l].append(torch.zeros_like(streams[l]) if g is None else g.detach())
    return {l: torch.cat(v) for l, v in out.items()}
