"""Windows of layers: the shortest span of consecutive layers whose own change carries the gain.

A window [a, b] is patched by running the receiver with its layers a..b replaced by the donor's, from
the receiver's own input at layer a: every change those layers make, composed, and nothing that the
layers before a changed. One layer is the site ``own``; the whole depth gives the donor's decoder
layers on the receiver's embeddings and head. On a pair whose change is confined to a band of
layers, the band is the shortest window that carries all of the gain, exactly.

All windows of a 30-layer model are 465 forwards per pair, so `shortest_windows` screens them
first: attribution (the own change's first-order effect, additive over layers) ranks the windows of
each width, and only the best of each width is patched exactly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .. import stats
from ..capture import capture
from ..forward import hidden, pair_logprobs
from ..hooks import resume_from
from ..metrics import encoded_pairs, packed_batches
from ..models import ModelPair, decoder_layers
from ..patching import DIRECTIONS


@contextlib.contextmanager
def _layers_of(receiver, donor, a: int, b: int):
    """Inside the block, the receiver's layers a..b are the donor's (the same modules, not copies)."""
    layers, donors = decoder_layers(receiver), decoder_layers(donor)
    originals = [layers[i] for i in range(a, b + 1)]
    try:
        for i in range(a, b + 1):
            layers[i] = donors[i]
        yield
    finally:
        for i, layer in zip(range(a, b + 1), originals):
            layers[i] = layer


@torch.inference_mode()
def window_sweep(pair: ModelPair, prefs, windows, *, direction: str = "tuned_to_base", batch_size: int = 8,
                 max_length: int = 1024) -> pd.DataFrame:
    """Per (pair, window): the receiver's margin with its layers a..b taken from the donor.

    Columns ``id, a, b, width, direction, margin_patched, effect, gain, effect_per_token, gain_per_token``.
    """
    recv, donor = DIRECTIONS[direction]
    models = pair.models
    n_layers = pair.n_layers
    windows = [(int(a), int(b)) for a, b in windows]
    bad = [w for w in windows if not 0 <= w[0] <= w[1] < n_layers]
    if bad:
        raise ValueError(f"windows {bad} are not inside layers 0..{n_layers - 1}")
    encoded = encoded_pairs(pair, prefs, max_length=max_length)
    rows = []
    for idx, batch in packed_batches(pair, encoded, batch_size):
        caps = {r: capture(m, batch, what=f"{pair.name} {r} model") for r, m in models.items()}
        lengths = torch.tensor(batch.spans, dtype=torch.float64)[:, 1:]

        def margins(logp):
            return (logp[:, 0] - logp[:, 1]).numpy(), (logp[:, 0] / lengths[:, 0] - logp[:, 1] / lengths[:, 1]).numpy()

        clean = {r: margins(c.logp) for r, c in caps.items()}
        for a, b in windows:
            with _layers_of(models[recv], models[donor], a, b), resume_from(models[recv], a, caps[recv].input(a)):
                patched = margins(pair_logprobs(models[recv], hidden(models[recv], batch), batch))
            rows.append(pd.DataFrame(dict(
                id=[encoded[i].id for i in idx], a=a, b=b, width=b - a + 1, direction=direction,
                margin_patched=patched[0], effect=patched[0] - clean[recv][0], gain=clean[donor][0] - clean[recv][0],
                effect_per_token=patched[1] - clean[recv][1], gain_per_token=clean[donor][1] - clean[recv][1])))
    order = {e.id: i for i, e in enumerate(encoded)}
    table = pd.concat(rows, ignore_index=True)
    table["pair_index"] = table.id.map(order)
    return table.sort_values(["a", "b", "pair_index"]).drop(columns="pair_index").reset_index(drop=True)


def window_summary(table: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Recovery of each window (ratio of means) with its BCa CI, per-token too."""
    rows = []
    for (a, b, direction), g in table.groupby(["a", "b", "direction"], sort=False):
        rec = stats.recovery(g.effect.to_numpy(), g.gain.to_numpy(), n_boot=n_boot, seed=seed)
        tok = stats.recovery(g.effect_per_token.to_numpy(), g.gain_per_token.to_numpy(), n_boot=n_boot, seed=seed)
        rows.append(dict(a=a, b=b, width=b - a + 1, direction=direction, recovery=rec[0], ci_low=rec[1],
                         ci_high=rec[2], recovery_per_token=tok[0], per_token_low=tok[1], per_token_high=tok[2],
                         n_pairs=len(g)))
    return pd.DataFrame(rows)


@dataclass
class WindowResult:
    """``screen``: each width's best window by attribution; ``exact``: those windows patched exactly;
    ``answer``: per target share, the shortest window whose exact recovery reaches it."""

    screen: pd.DataFrame
    exact: pd.DataFrame
    answer: pd.DataFrame
    pairs: pd.DataFrame


def best_windows(attribution: pd.Series, n_layers: int, *, widths=None, per_width: int = 1) -> pd.DataFrame:
    """For each width (default every width), the window(s) with the largest summed first-order effect
    (``attribution``: per layer)."""
    value = np.asarray([attribution.get(l, 0.0) for l in range(n_layers)], float)
    cum = np.concatenate([[0.0], np.cumsum(value)])
    rows = []
    for w in sorted({int(w) for w in widths if 1 <= w <= n_layers}) if widths is not None else range(1, n_layers + 1):
        sums = np.array([cum[a + w] - cum[a] for a in range(n_layers - w + 1)])
        for a in np.argsort(-sums, kind="stable")[:per_width]:
            rows.append(dict(a=int(a), b=int(a + w - 1), width=w, attribution=float(sums[a])))
    return pd.DataFrame(rows)


def shortest_windows(pair: ModelPair, prefs, attribution: pd.Series, *, shares=(0.5, 0.8, 0.9), widths=None,
                     direction: str = "tuned_to_base", batch_size: int = 8, max_length: int = 1024,
                     n_boot: int = 2000, seed: int = 0) -> WindowResult:
    """The shortest window reaching each share of the gain: screened by ``attribution`` (mean own-change
    attribution per layer, e.g. from ``patch_sweep(site="own", method="attribution")``), confirmed exactly
    for each of ``widths`` (default every width).

    The windows are chosen on the same pairs they are confirmed on; their CIs are BCa over pairs.
    """
    screen = best_windows(attribution, pair.n_layers, widths=widths)
    table = window_sweep(pair, prefs, list(zip(screen.a, screen.b)), direction=direction, batch_size=batch_size,
                         max_length=max_length)
    exact = window_summary(table, n_boot=n_boot, seed=seed).merge(screen[["a", "b", "attribution"]], on=["a", "b"])
    rows = []
    for share in shares:
        hit = exact[exact.recovery >= share].sort_values(["width", "recovery"], ascending=[True, False])
        rows.append(dict(share=share, **(hit.iloc[0][["a", "b", "width", "recovery", "ci_low", "ci_high"]].to_dict()
                                         if len(hit) else dict(a=None, b=None, width=None, recovery=np.nan,
                                                               ci_low=np.nan, ci_high=np.nan))))
    return WindowResult(screen, exact, pd.DataFrame(rows), table)
