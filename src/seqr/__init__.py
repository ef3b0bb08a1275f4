"""seqr: unsupervised, secure, efficient routing over large libraries of LoRA adapters."""
from .bank import AdapterBank
from .layers import attach, detach, routing
from .library import LoraLibrary
from .stats import NormStats
from .trace import Trace
from .costs import Cost, costs

__all__ = ["AdapterBank", "LoraLibrary", "NormStats", "Cost", "costs", "attach", "detach", "routing", "Trace"]
__version__ = "0.1.0"
