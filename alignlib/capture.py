"""One capture of a model on a packed batch: what every measurement reads.

`capture(model, batch)` runs one forward and returns a `Capture`: the stream into every layer and
out of the last, sublayer outputs when asked, how each layer was called (to resume it), the final
hidden states and each pair's (chosen, rejected) log-probs. `Capture.input` and `Capture.value` are
the one place where "the input of layer l" and "block = output - input" are defined. Around it:
`own_change` (what another model's layers add to this capture's inputs) and `margin_gradients`
(the gradient of each pair's margin with respect to every site, for attribution).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch

from .data import PackedBatch
from .forward import hidden, pair_logprobs, token_logprobs, weighted_margin
from .hooks import check_site, feed_inputs, record, record_kv
from .models import decoder_layers, final_hidden


@dataclass
class Capture:
    """One model's forward over a `PackedBatch`."""

    stream: list  # L + 1 tensors (B, T, H): stream[l] enters layer l, stream[L] leaves the last layer
    sub: dict  # (site, l) -> (B, T, H), for the sublayer sites asked for
    calls: dict  # l -> (args, kwargs) of the layer call, without the stream
    final: torch.Tensor  # (B, T, H) final-normed hidden states
    logp: torch.Tensor  # (B, 2) summed (chosen, rejected) log-probs, float64
    kv: dict = field(default_factory=dict)  # l -> (keys, values) entering attention, when asked for

    @property
    def n_layers(self) -> int:
        return len(self.stream) - 1

    def input(self, layer: int) -> torch.Tensor:
        return self.stream[layer]

    def value(self, site: str, layer: int) -> torch.Tensor:
        """The site's activation: ``resid`` the layer's output, ``block`` output minus input, a sublayer's output."""
        if site == "resid":
            return self.stream[layer + 1]
        if site in ("block", "own"):
            return self.stream[layer + 1] - self.stream[layer]
        return self.sub[check_site(site), layer]


@torch.inference_mode()
def capture(model, batch: PackedBatch, sublayers=(), *, kv: bool = False, what: str = "model") -> Capture:
    """One forward of ``model`` over ``batch``, recording every layer (and ``sublayers``: attn, mlp)."""
    with contextlib.ExitStack() as stack:
        rec = stack.enter_context(record(model, sublayers))
        keys = stack.enter_context(record_kv(model)) if kv else {}
        final = hidden(model, batch)
    sub = {k: v for k, v in rec.items() if isinstance(k, tuple)}
    return Capture(rec["stream"], sub, rec["calls"], final, pair_logprobs(model, final, batch, what=what), dict(keys))


@torch.inference_mode()
def own_change(model, batch: PackedBatch, receiver: Capture) -> list[torch.Tensor]:
    """Per layer l, what ``model``'s layer l adds to the receiver's own input there: f_l(x_l) - x_l.

    Its difference from the receiver's own contribution is the layer's own change (site ``own``),
    free of everything the layers before it changed.
    """
    L = receiver.n_layers
    inputs = {l: receiver.input(l) for l in range(L)}
    with feed_inputs(model, inputs), record(model) as rec:
        final_hidden(model, batch.input_ids, batch.attention_mask(next(model.parameters()).dtype), batch.position_ids)
    return [rec["stream"][l + 1] - inputs[l] for l in range(L)]


def margin_gradients(model, batch: PackedBatch, sublayers=(), *, per_token: bool = False,
                     what: str = "model") -> tuple[Capture, dict]:
    """One forward and backward: the capture, and ``grads[per_token][site, l]``, d(each pair's margin) /
    d(the site's activation), (B, T, H).

    ``grads[False]`` is for the summed margin; ``grads[True]`` (with ``per_token``, one more backward)
    for the margin of per-token means. Rows of a packed batch do not interact, so one backward of the
    summed margins gives every pair its own gradient. The stream is made a graph leaf at the first
    layer, so weights stay frozen and no ``.grad`` is touched. ``resid`` stands for every site that
    adds onto the stream after the layer (``block``, ``own``): they share its gradient.
    """
    batch = dataclasses.replace(batch, input_ids=batch.input_ids.clone(), position_ids=batch.position_ids.clone(),
                                segment=batch.segment.clone())  # ordinary tensors, even if made in inference mode
    with torch.inference_mode(False), torch.enable_grad(), record(model, sublayers, grad=True) as rec:
        final = hidden(model, batch)
        picked = token_logprobs(model, final, batch, what=what)
        tensors = {("resid", l): rec["stream"][l + 1] for l in range(len(decoder_layers(model)))}
        tensors.update({k: v for k, v in rec.items() if isinstance(k, tuple) and k[0] in sublayers})
        names = list(tensors)
        out = {}
        for weighting in ((False, True) if per_token else (False,)):
            grads = torch.autograd.grad(weighted_margin(batch, picked, weighting).sum(), [tensors[n] for n in names],
                                        retain_graph=per_token and not weighting, allow_unused=True)
            out[weighting] = {n: (torch.zeros_like(tensors[n]) if g is None else g.detach())
                              for n, g in zip(names, grads)}
    with torch.no_grad():
        cap = Capture([t.detach() for t in rec["stream"]], {k: v.detach() for k, v in rec.items()
                                                           if isinstance(k, tuple) and k[0] in sublayers},
                      rec["calls"], final.detach(), pair_logprobs(model, final.detach(), batch, what=what))
    return cap, out
