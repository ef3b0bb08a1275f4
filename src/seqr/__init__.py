"""seqr: unsupervised, secure, efficient routing over large libraries of LoRA adapters."""
from seqr.core.bank import AdapterBank
from seqr.hf.layers import attach, detach, routing
from seqr.store.library import LoraLibrary
from seqr.hf.models import ModelLoadError, load_model
from seqr.core.stats import NormStats
from seqr.core.trace import Trace
from seqr.core.costs import Cost, costs

__all__ = ["AdapterBank", "LoraLibrary", "NormStats", "Cost", "costs", "attach", "detach", "routing", "Trace",
           "load_model", "ModelLoadError"]
__version__ = "0.1.0"
