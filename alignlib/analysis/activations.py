"""Response-token activations of both models from one capture each: distances, pooled means, deltas.

Everything the LASSO, low-rank and probe analyses need comes from one capture of each model per
packed batch, one forward of the tuned layers on the base's inputs and one backward of the base.
Per pair and layer, over the response tokens of both sides: the mean of ||h_T - h_B||
(``distance``), of ||h_T - h_B|| / ||h_B|| (``relative``), of cos(h_T, h_B) (``cosine``) and of
``local``: ||f_T(x_B) - f_B(x_B)|| / ||h_B||, the difference between what the tuned and the base
layer add to the *same* input x_B. The first three accumulate every earlier layer's change, so a
change made at one layer shows in every later layer's distance; ``local`` isolates the layer.

``attribution`` is signed and in nats: the first-order estimate of how much the tuned layer's own
change moves the base model's margin, the sum over every position of grad_{h_l} margin_B .
(f_T(x_B) - f_B(x_B)) (attribution patching of site ``own``; Nanda 2023, Syed et al. 2023). Summed
over layers it approximates the reward gain, so, unlike a distance, it can predict the gain linearly.

Also: per pair and layer the mean response activation of each side under each model (for
probes); and, at requested layers, every response token's difference h_T - h_B (for low rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..capture import capture, margin_gradients, own_change
from ..data import CHOSEN, REJECTED
from ..metrics import encoded_pairs, packed_batches
from ..models import ModelPair
from ..store import Entry, code_digest, sha1, shard_spec, wait_for

MEASURES = ("distance", "relative", "cosine", "local", "attribution")


@dataclass
class ResponseActivations:
    ids: list
    n_layers: int
    distances: pd.DataFrame  # id, layer, distance, relative, cosine, local, attribution
    pooled: dict  # model -> (n_layers, n_pairs, 2, hidden): response means of (chosen, rejected)
    deltas: dict = field(default_factory=dict)  # layer -> (tokens, hidden): h_T - h_B
    delta_pair: np.ndarray | None = None  # pair index of each delta row

    def distances_wide(self, measure: str = "distance") -> pd.DataFrame:
        """One row per pair (in ``ids`` order), one column per layer."""
        return self.distances.pivot(index="id", columns="layer", values=measure).loc[self.ids]


def response_activations(pair: ModelPair, prefs, *, keep_deltas=(), batch_size: int = 8, max_length: int = 512,
                         chat_template: bool = False, features: bool = True, run_dir=None, shard=None,
                         chunk_size: int = 64, progress: bool = True) -> ResponseActivations:
    """Capture both models once per batch and reduce to what the analyses need.

    ``features=False`` skips ``local`` and ``attribution`` (NaN), and the forward and backward they
    cost, when only distances, pooled means or deltas are wanted. With ``run_dir`` the pairs are
    captured in chunks of ``chunk_size``, each written there when finished (an interrupted capture
    resumes); ``shard=(i, n)`` (or ``"auto"``) captures every n-th chunk from the i-th, as in
    `patch_sweep`, and each process returns the whole result once the others' chunks are there.
    Batches then form within chunks, so the result equals the unchunked one to float rounding.
    """
    encoded = encoded_pairs(pair, prefs, max_length=max_length, chat_template=chat_template)
    rank, world = shard_spec(shard, run_dir)
    if run_dir is None:
        return _capture(pair, encoded, keep_deltas, batch_size, features, progress)
    config = dict(pair=pair.name, weights_sha1=pair.weights_sha1(), ids_sha1=sha1([e.id for e in encoded]),
                  tokens_sha1=sha1([[e.chosen, e.rejected] for e in encoded]), keep_deltas=sorted(keep_deltas),
                  batch_size=batch_size, features=features, chunk_size=chunk_size,
                  dtype=str(next(pair.base.parameters()).dtype))
    entry = Entry(run_dir, config, code_digest()).open()
    starts = range(0, len(encoded), chunk_size)
    parts = [entry.part(f"capture-chunk-{i:05d}") for i in range(len(starts))]
    for i, (start, part) in enumerate(zip(starts, parts)):
        if i % world == rank and not part.matches():
            part.save(_capture(pair, encoded[start:start + chunk_size], keep_deltas, batch_size, features, progress))
    wait_for(lambda: all(p.matches() for p in parts), entry.path)
    return _merge([p.load() for p in parts])


def _merge(parts: list[ResponseActivations]) -> ResponseActivations:
    """One result from the results of consecutive chunks of pairs."""
    offsets = np.cumsum([0] + [len(p.ids) for p in parts])[:-1]
    first = parts[0]
    return ResponseActivations(
        [i for p in parts for i in p.ids], first.n_layers, pd.concat([p.distances for p in parts], ignore_index=True),
        {role: np.concatenate([p.pooled[role] for p in parts], axis=1) for role in first.pooled},
        {l: np.concatenate([p.deltas[l] for p in parts]) for l in first.deltas},
        None if first.delta_pair is None else np.concatenate([p.delta_pair + o for p, o in zip(parts, offsets)]))


def _capture(pair: ModelPair, encoded: list, keep_deltas, batch_size: int, features: bool,
             progress: bool) -> ResponseActivations:
    """`response_activations` on encoded pairs, in one piece."""
    n, L = len(encoded), pair.n_layers
    hidden = pair.base.config.hidden_size
    pooled = {role: np.zeros((L, n, 2, hidden), dtype=np.float32) for role in ("base", "tuned")}
    means = np.zeros((4, L, n))  # distance, relative, cosine, local: means over response tokens
    attribution = np.zeros((L, n))
    deltas = {l: [] for l in keep_deltas}
    delta_pair = []
    batches = list(packed_batches(pair, encoded, batch_size))
    for idx, batch in tqdm(batches, desc="capturing", disable=not progress, leave=False):
        caps = {"tuned": capture(pair.tuned, batch, what=f"{pair.name} tuned model")}
        if features:  # the base's capture comes with its gradient, from one forward
            caps["base"], grads = margin_gradients(pair.base, batch, what=f"{pair.name} base model")
            grads = grads[False]
            own = own_change(pair.tuned, batch, caps["base"])
        else:
            caps["base"] = capture(pair.base, batch, what=f"{pair.name} base model")
        sides = [(batch.segment == side).cpu() for side in (CHOSEN, REJECTED)]
        response = (sides[0] | sides[1]).float()
        count = response.sum(1)
        if keep_deltas:
            rows = response.bool().nonzero()[:, 0]
            delta_pair.extend(np.asarray(idx)[rows.numpy()])
        for l in range(L):
            hb, ht = (caps[r].value("resid", l).float().cpu() for r in ("base", "tuned"))
            norm = hb.norm(dim=-1).clamp_min(1e-12)
            per_token = [(ht - hb).norm(dim=-1), (ht - hb).norm(dim=-1) / norm,
                         torch.nn.functional.cosine_similarity(ht, hb, dim=-1)]
            if features:
                change = own[l] - caps["base"].value("block", l)
                per_token.append(change.float().cpu().norm(dim=-1) / norm)
                attribution[l, idx] = (grads["resid", l] * change).sum((1, 2)).double().cpu().numpy()
            else:
                attribution[l, idx] = means[3, l, idx] = np.nan
            for m, x in enumerate(per_token):
                means[m, l, idx] = ((x * response).sum(1) / count).numpy()
            for s, side in enumerate(sides):
                w = side.float()[..., None] / side.sum(1)[:, None, None]
                pooled["base"][l, idx, s] = (hb * w).sum(1).numpy()
                pooled["tuned"][l, idx, s] = (ht * w).sum(1).numpy()
            if l in deltas:
                deltas[l].append((ht - hb)[response.bool()].numpy())
    distances = pd.DataFrame({"id": np.repeat([e.id for e in encoded], L), "layer": np.tile(np.arange(L), n),
                              **{m: v.T.reshape(-1) for m, v in zip(MEASURES, [*means, attribution])}})
    return ResponseActivations([e.id for e in encoded], L, distances, pooled,
                               {l: np.concatenate(v) for l, v in deltas.items()},
                               np.array(delta_pair) if keep_deltas else None)


def own_attribution(pair: ModelPair, prefs, tuned: dict, *, batch_size: int = 8, max_length: int = 512) -> pd.DataFrame:
    """For several tuned sides of one base (checkpoints along a run): each pair's reward gain and each
    layer's own-change attribution, the base's capture and gradient computed once per batch.

    tuned: name -> model. Columns ``model, id, layer, attribution, gain``.
    """
    encoded = encoded_pairs(pair, prefs, max_length=max_length)
    rows = []
    for idx, batch in packed_batches(pair, encoded, batch_size):
        base, grads = margin_gradients(pair.base, batch, what=f"{pair.name} base model")
        margin_base = (base.logp[:, 0] - base.logp[:, 1]).numpy()
        for name, model in tuned.items():
            own = own_change(model, batch, base)
            logp = capture(model, batch, what=f"{name} model").logp
            gain = (logp[:, 0] - logp[:, 1]).numpy() - margin_base
            for l in range(pair.n_layers):
                attr = (grads[False]["resid", l] * (own[l] - base.value("block", l))).sum((1, 2)).double().cpu()
                rows.append(pd.DataFrame(dict(model=name, id=[encoded[i].id for i in idx], layer=l,
                                              attribution=attr.numpy(), gain=gain)))
    return pd.concat(rows, ignore_index=True)
