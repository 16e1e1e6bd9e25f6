"""alignlib: where does preference tuning live inside a language model?

Measure the alignment signal of a base/tuned model pair on preference data, then localise it by
layer-wise causal patching and the analyses built on it.
"""

from .data import DropReport, PreferencePair, Preferences, PreferenceError, encode_pairs, load_preferences
from .metrics import bootstrap_ci, preference_accuracy, score
from .models import ModelPair, PairError, decoder_layers, final_norm, load_pair, sublayer

__all__ = [
    "DropReport", "ModelPair", "PairError", "PreferenceError", "PreferencePair", "Preferences",
    "bootstrap_ci", "decoder_layers", "encode_pairs", "final_norm", "load_pair", "load_preferences",
    "preference_accuracy", "score", "sublayer",
]
__version__ = "0.1.0"
