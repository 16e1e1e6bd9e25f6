"""Transfer and steering along the directions that the low-rank analysis finds.

Transfer: do the principal directions of Delta = h_T - h_B at a layer, found on one set of pairs,
carry the patching effect on another set (another category of the built-in set, or HH-RLHF against
the built-in set)? `transfer` patches every test set with every set's directions.

Steering: add alpha * s * u to the base model's stream after the layer at every position, u a unit
direction (oriented along the mean of Delta) and s the stream's mean norm there, and measure how
each pair's margin moves, the share of pairs that move the preferred way, and the change in the mean
log-prob per response token (a fluency check: steering must not buy the margin by breaking the
model), against random unit directions with the same alpha.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .. import stats
from ..capture import capture
from ..forward import pair_logprobs
from ..hooks import resume_stacked
from ..metrics import encoded_pairs, packed_batches
from ..models import ModelPair
from ..patching import patch_sweep
from .activations import response_activations
from .lowrank import delta_directions


def transfer(pair: ModelPair, sets: dict, *, layer: int, ks=(1, 4, 16), n_random: int = 2, batch_size: int = 8,
             n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """For every (train set, test set) of named sets of pairs: the share of the full ``resid`` patch's
    effect on ``test`` recovered by the top-k principal directions of Delta found on ``train``, beside
    random k-dimensional subspaces. One capture per set finds its directions, one sweep per test set
    patches every set's. On the diagonal the directions were found on the very pairs they are tested on.

    Columns ``train, test, basis, k, share, share_low, share_high, n_pairs`` (BCa CIs over test pairs).
    """
    directions = {}
    for name, prefs in sets.items():
        acts = response_activations(pair, prefs, keep_deltas=[layer], batch_size=batch_size, features=False,
                                    progress=False)
        directions[name] = delta_directions(acts.deltas[layer])[0]
    hidden = pair.base.config.hidden_size
    rng = np.random.default_rng(seed)
    subspaces = {f"{name}|pca|{k}": u[:, :k] for name, u in directions.items() for k in ks if k <= u.shape[1]}
    subspaces.update({f"random{j}|random|{k}": np.linalg.qr(rng.standard_normal((hidden, k)))[0]
                      for j in range(n_random) for k in ks})
    rows = []
    for test_name, test in sets.items():
        per = patch_sweep(pair, test, site="resid", layers=[layer], controls=[], subspaces=subspaces,
                          batch_size=batch_size, chunk_size=max(2, len(test)), seed=seed, progress=False).pairs
        full = per[per.control == "patch"].set_index("id").effect
        for name in subspaces:
            cell = per[per.control == f"subspace:{name}"].set_index("id").effect.loc[full.index]
            train, basis, k = name.split("|")
            share = stats.recovery(cell.to_numpy(), full.to_numpy(), n_boot=n_boot, seed=seed)
            rows.append(dict(train=train if basis == "pca" else "random", test=test_name, basis=basis, k=int(k),
                             share=share[0], share_low=share[1], share_high=share[2], n_pairs=len(full)))
    table = pd.DataFrame(rows)
    return table.groupby(["train", "test", "basis", "k"], as_index=False, sort=False).mean(numeric_only=True)


def steering_direction(deltas: np.ndarray) -> np.ndarray:
    """The top principal direction of Delta, oriented so that the mean of Delta projects positively on it."""
    directions, _ = delta_directions(deltas)
    u = directions[:, 0]
    return u if float(np.mean(deltas, axis=0) @ u) >= 0 else -u


@torch.inference_mode()
def steer(pair: ModelPair, prefs, directions: dict, *, layer: int, alphas=(0.25, 0.5, 1.0), n_random: int = 5,
          batch_size: int = 8, max_length: int = 1024, seed: int = 0) -> pd.DataFrame:
    """Per (direction, alpha, pair): the base model's margin and mean response log-prob when steered.

    directions: name -> unit vector (hidden,); ``n_random`` random unit directions (``random0``...)
    are added. Columns ``direction, alpha, id, margin_change, logp_change, margin_base``.
    """
    model = pair.base
    hidden = model.config.hidden_size
    rng = np.random.default_rng(seed)
    vectors = {name: np.asarray(u, float) / np.linalg.norm(u) for name, u in directions.items()}
    for j in range(n_random):
        v = rng.standard_normal(hidden)
        vectors[f"random{j}"] = v / np.linalg.norm(v)
    encoded = encoded_pairs(pair, prefs, max_length=max_length)
    rows = []
    for idx, batch in packed_batches(pair, encoded, batch_size):
        cap = capture(model, batch, what=f"{pair.name} base model")
        stream = cap.value("resid", layer)
        scale = float(stream[batch.real].norm(dim=-1).mean())
        counts = torch.tensor(batch.spans, dtype=torch.float64)[:, 1:]
        clean = cap.logp
        for name, u in vectors.items():
            push = torch.as_tensor(u, dtype=stream.dtype, device=stream.device) * scale * batch.real[..., None]
            for alpha in alphas:
                final = resume_stacked(model, cap.calls, {layer: stream + alpha * push})[layer]
                logp = pair_logprobs(model, final, batch)
                rows.append(pd.DataFrame(dict(
                    direction=name, alpha=alpha, id=[encoded[i].id for i in idx],
                    margin_change=((logp[:, 0] - logp[:, 1]) - (clean[:, 0] - clean[:, 1])).numpy(),
                    logp_change=((logp - clean) / counts).mean(1).numpy(),
                    margin_base=(clean[:, 0] - clean[:, 1]).numpy())))
    return pd.concat(rows, ignore_index=True)


def steering_summary(table: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per (direction, alpha): mean margin change, share of pairs moved the preferred way, and the mean
    change in log-prob per response token, each with its BCa CI."""
    rows = []
    for (name, alpha), g in table.groupby(["direction", "alpha"], sort=False):
        m = stats.bootstrap_ci(stats.mean, g.margin_change, n_boot=n_boot, seed=seed)
        up = stats.bootstrap_ci(stats.mean, g.margin_change > 0, n_boot=n_boot, seed=seed)
        lp = stats.bootstrap_ci(stats.mean, g.logp_change, n_boot=n_boot, seed=seed)
        rows.append(dict(direction=name, kind="random" if name.startswith("random") else "found", alpha=alpha,
                         margin_change=m[0], margin_low=m[1], margin_high=m[2], share_up=up[0], share_low=up[1],
                         share_high=up[2], logp_change=lp[0], logp_low=lp[1], logp_high=lp[2], n_pairs=len(g)))
    return pd.DataFrame(rows)
