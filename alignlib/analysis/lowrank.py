"""Low-rank reconstruction: how few directions of the activation difference recover the effect?

At a layer, take Delta = h_T - h_B over the response tokens of *training* pairs and find its
principal directions by an uncentred SVD (uncentred, so that a constant shift of the stream counts
as a direction too: the question is which directions reconstruct Delta itself). On *held-out*
pairs, patch the receiver with h_B + P_k Delta, where P_k projects onto the top-k directions, for
k = 1, 2, 4, ... up to full rank, through the patching engine, and report the share of the
full-rank effect that k directions recover, against several random k-dimensional subspaces, and
beside the share of Delta's energy each subspace holds (so that "the top directions carry the
effect" can be told from "the top directions carry most of Delta").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..stats import recovery
from ..patching import patch_sweep
from .activations import response_activations


@dataclass
class LowRankResult:
    """``recovery``: per (basis, draw, k), with ``energy``, the share of training Delta's energy in the subspace;
    ``spectrum``: share of Delta's energy per direction; ``k90``: smallest k whose principal directions recover
    90%; ``pairs``: per held-out pair and basis, the k-direction patch's effect beside the full patch's."""

    recovery: pd.DataFrame
    spectrum: pd.DataFrame
    k90: int | None
    pairs: pd.DataFrame | None = None


def delta_directions(deltas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(directions as columns, hidden x rank; share of ||Delta||^2 along each), by uncentred SVD."""
    _, s, vt = np.linalg.svd(np.asarray(deltas, dtype=np.float64), full_matrices=False)
    energy = s**2
    return vt.T, energy / energy.sum()


def default_ks(hidden: int) -> list[int]:
    ks = [2**i for i in range(int(np.log2(hidden)) + 1)]
    return ks + ([hidden] if ks[-1] != hidden else [])


def low_rank_recovery(pair, train_prefs, test_prefs, *, layer: int, direction: str = "tuned_to_base", ks=None,
                      n_random: int = 5, batch_size: int = 8, chunk_size: int = 16, max_length: int = 512,
                      n_boot: int = 1000, seed: int = 0, progress: bool = True) -> LowRankResult:
    """Recovery of the full-rank ``resid`` patch at ``layer`` by its top-k directions and by random ones."""
    acts = response_activations(pair, train_prefs, keep_deltas=[layer], batch_size=batch_size,
                                max_length=max_length, features=False, progress=progress)
    deltas = acts.deltas[layer].astype(np.float64)
    directions, share = delta_directions(deltas)
    hidden = directions.shape[0]
    ks = default_ks(hidden) if ks is None else sorted(set(ks))
    rng = np.random.default_rng(seed)
    bases = {}
    for k in ks:
        if k > directions.shape[1] and k < hidden:
            raise ValueError(f"k={k} exceeds the {directions.shape[1]} directions that training Delta spans")
        bases[f"pca-{k}"] = directions[:, :k] if k <= directions.shape[1] else np.eye(hidden)
        for j in range(n_random):
            q, _ = np.linalg.qr(rng.standard_normal((hidden, k)))
            bases[f"random{j}-{k}"] = q
    sweep = patch_sweep(pair, test_prefs, site="resid", direction=direction, layers=[layer], controls=[],
                        subspaces={name: torch.tensor(b, dtype=torch.float32) for name, b in bases.items()},
                        batch_size=batch_size, chunk_size=chunk_size, max_length=max_length, seed=seed,
                        progress=progress)
    per = sweep.pairs
    full = per[per.control == "patch"].set_index("id")
    rows, pairs = [], []
    for name in bases:
        cell = per[per.control == f"subspace:{name}"].set_index("id").loc[full.index]
        kind, k = name.rsplit("-", 1)
        pairs.append(pd.DataFrame({"id": full.index, "basis": "pca" if kind == "pca" else "random", "draw": kind,
                                   "k": int(k), "effect": cell.effect.to_numpy(), "full_effect": full.effect.to_numpy()}))
        share_est, lo, hi = recovery(cell.effect.to_numpy(), full.effect.to_numpy(), n_boot=n_boot, seed=seed)
        rec, rlo, rhi = recovery(cell.effect.to_numpy(), cell.gain.to_numpy(), n_boot=n_boot, seed=seed)
        energy = float(((deltas @ bases[name]) ** 2).sum() / (deltas**2).sum())
        rows.append(dict(basis="pca" if kind == "pca" else "random", draw=kind, k=int(k), energy=energy,
                         share_of_full=share_est,
                         share_ci_low=lo, share_ci_high=hi, recovery=rec, ci_low=rlo, ci_high=rhi))
    table = pd.DataFrame(rows)
    pca = table[table.basis == "pca"].sort_values("k")
    reached = pca[pca.share_of_full >= 0.9]
    spectrum = pd.DataFrame({"component": np.arange(1, len(share) + 1), "explained": share,
                             "cumulative": np.cumsum(share)})
    return LowRankResult(table, spectrum, int(reached.k.iloc[0]) if len(reached) else None,
                         pd.concat(pairs, ignore_index=True))
