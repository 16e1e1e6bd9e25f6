"""alignlib: where does preference tuning live inside a language model?

Measure the alignment signal of a base/tuned model pair on preference data, then localise it by
layer-wise causal patching and the analyses built on it.
"""

import warnings

# tqdm.auto (imported by transformers and datasets) warns in kernels without ipywidgets; alignlib's own
# progress bars are plain text, so the warning is noise in every notebook.
warnings.filterwarnings("ignore", message="IProgress not found")

from .data import DropReport, PreferenceError, PreferencePair, Preferences, encode_pairs, load_preferences
from .metrics import preference_accuracy, score
from .models import ModelPair, PairError, decoder_layers, final_norm, sublayer
from .pairs import load_pair
from .stats import bootstrap_ci, recovery, slope
from .patching import Sweep, patch_sweep
from .analysis import lasso_layers, low_rank_recovery, probe_layers, response_activations
from .validation import Validation, planted_pair, validate

__all__ = [
    "DropReport", "ModelPair", "PairError", "PreferenceError", "PreferencePair", "Preferences", "Sweep",
    "bootstrap_ci", "decoder_layers", "encode_pairs", "final_norm", "lasso_layers", "load_pair",
    "load_preferences", "low_rank_recovery", "patch_sweep", "planted_pair", "preference_accuracy",
    "probe_layers", "recovery", "response_activations", "score", "slope", "sublayer", "validate", "Validation",
]
__version__ = "0.1.0"
