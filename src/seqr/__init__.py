"""seqr: unsupervised, secure, efficient routing over large libraries of LoRA adapters."""
from .bank import AdapterBank
from .layers import attach, detach, routing
from .library import LoraLibrary
from .models import ModelLoadError, load_model
from .stats import NormStats
from .trace import Trace
from .costs import Cost, costs

__all__ = ["AdapterBank", "LoraLibrary", "NormStats", "Cost", "costs", "attach", "detach", "routing", "Trace",
           "load_model", "ModelLoadError"]
__version__ = "0.1.0"
