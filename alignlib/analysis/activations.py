"""Response-token activations of both models from one capture pass: distances, pooled means, deltas.

Everything the LASSO, low-rank and probe analyses need comes from one forward of each model per
batch, plus one more of the tuned model: per pair and layer the mean over response tokens (of both
the chosen and the rejected sequence) of ||h_T - h_B|| (``distance``), of ||h_T - h_B|| / ||h_B||
(``relative``), of cos(h_T, h_B) (``cosine``) and of ``local``: ||f_T(x_B) - f_B(x_B)|| / ||h_B||,
the difference between what the tuned and the base layer add to the *same* input x_B (the base's
input to that layer). The first three accumulate every earlier layer's change, so a change made at
one layer shows in every later layer's distance; ``local`` isolates the layer itself.

``attribution`` is signed and in nats: the first-order estimate of how much the tuned layer's own
change moves the base model's margin, sum over every position of grad_{h_l} logp_B . (f_T(x_B) -
f_B(x_B)), chosen minus rejected (attribution patching, Nanda 2023; Syed et al. 2023). Summed
over layers it approximates the reward gain, so, unlike a distance, it can predict the gain
linearly; it costs one more forward and backward of the base.

Also: per sequence and layer the mean response activation of each model (for probes); and, at
requested layers, every response token's difference h_T - h_B (for the low-rank analysis).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ..data import EncodedPair, collate, encode_pairs, length_batches, sequences
from ..hooks import capture, feed_inputs, stream_gradients
from ..metrics import pad_id
from ..models import ModelPair, final_hidden


@dataclass
class ResponseActivations:
    ids: list[str]
    n_layers: int
    distances: pd.DataFrame  # id, layer, distance, relative, cosine, local, attribution
    pooled: dict[str, np.ndarray]  # model -> (n_layers, n_pairs, 2, hidden): response means of (chosen, rejected)
    deltas: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> (tokens, hidden): h_T - h_B
    delta_pair: np.ndarray | None = None  # pair index of each delta row

    def distances_wide(self, measure: str = "distance") -> pd.DataFrame:
        """One row per pair (in ``ids`` order), one column per layer."""
        wide = self.distances.pivot(index="id", columns="layer", values=measure)
        return wide.loc[self.ids]


def response_activations(pair: ModelPair, prefs, *, keep_deltas=(), batch_size: int = 16, max_length: int = 512,
                         chat_template: bool = False, progress: bool = True) -> ResponseActivations:
    """Capture both models once per batch and reduce to what the analyses need."""
    encoded = prefs if len(prefs) and isinstance(prefs[0], EncodedPair) else encode_pairs(
        pair.tokenizer, prefs, max_length=max_length, chat_template=chat_template)
    n, L = len(encoded), pair.n_layers
    device = next(pair.base.parameters()).device
    seqs = sequences(encoded)
    hidden = pair.base.config.hidden_size
    pooled = {role: np.zeros((L, n, 2, hidden), dtype=np.float32) for role in ("base", "tuned")}
    sums = np.zeros((4, L, n))  # distance, relative, cosine, local summed over response tokens
    attribution = np.zeros((L, n))  # chosen minus rejected, summed over every position
    counts = np.zeros(n)
    deltas = {l: [] for l in keep_deltas}
    delta_pair = []
    for idx in tqdm(length_batches([len(ids) for ids, _ in seqs], batch_size), desc="capturing",
                    disable=not progress):
        batch = collate([seqs[i] for i in idx], pad_id(pair.tokenizer)).to(device)
        acts = {}
        for role, model in pair.models.items():
            with torch.inference_mode(), capture(model) as a:
                final_hidden(model, batch.input_ids, batch.attention_mask)
            acts[role] = a
        base_inputs = {l: acts["base"]["input", 0] if l == 0 else acts["base"]["resid", l - 1] for l in range(L)}
        with torch.inference_mode(), capture(pair.tuned, sites=("block",)) as local, \
                feed_inputs(pair.tuned, base_inputs):
            final_hidden(pair.tuned, batch.input_ids, batch.attention_mask)
        grads = stream_gradients(pair.base, batch)
        mask = batch.response_mask.cpu()
        real = batch.attention_mask.cpu().bool()
        for r, seq in enumerate(idx):
            p, m = seq % n, mask[r]
            counts[p] += int(m.sum())
            if keep_deltas:
                delta_pair.extend([p] * int(m.sum()))
        for l in range(L):
            hb, ht = acts["base"]["resid", l].float().cpu(), acts["tuned"]["resid", l].float().cpu()
            d = ht - hb
            dist = d.norm(dim=-1)
            rel = dist / hb.norm(dim=-1).clamp_min(1e-12)
            cos = torch.nn.functional.cosine_similarity(ht, hb, dim=-1)
            own = acts["base"]["resid", l].float().cpu() - base_inputs[l].float().cpu()
            change = local["block", l].float().cpu() - own
            loc = change.norm(dim=-1) / hb.norm(dim=-1).clamp_min(1e-12)
            attr = ((grads[l].float().cpu() * change).sum(-1) * real).sum(-1).double()
            for r, seq in enumerate(idx):
                p, side, m = seq % n, seq // n, mask[r]
                sums[0, l, p] += dist[r, m].sum().item()
                sums[1, l, p] += rel[r, m].sum().item()
                sums[2, l, p] += cos[r, m].sum().item()
                sums[3, l, p] += loc[r, m].sum().item()
                attribution[l, p] += attr[r].item() if side == 0 else -attr[r].item()
                pooled["base"][l, p, side] = hb[r, m].mean(0).numpy()
                pooled["tuned"][l, p, side] = ht[r, m].mean(0).numpy()
                if l in deltas:
                    deltas[l].append(d[r, m].numpy())
    means = sums / counts
    distances = pd.DataFrame([dict(id=encoded[p].id, layer=l, distance=means[0, l, p], relative=means[1, l, p],
                                   cosine=means[2, l, p], local=means[3, l, p], attribution=attribution[l, p])
                              for p in range(n) for l in range(L)])
    return ResponseActivations([e.id for e in encoded], L, distances, pooled,
                               {l: np.concatenate(v) for l, v in deltas.items()},
                               np.array(delta_pair) if keep_deltas else None)
