"""Analyses on top of captures and patching: LASSO over layers, low-rank reconstruction, probes."""

from .activations import ResponseActivations, response_activations
from .lasso import LassoResult, lasso_layers
from .lowrank import LowRankResult, delta_directions, low_rank_recovery
from .probes import probe_layers

__all__ = ["LassoResult", "LowRankResult", "ResponseActivations", "delta_directions", "lasso_layers",
           "low_rank_recovery", "probe_layers", "response_activations"]
