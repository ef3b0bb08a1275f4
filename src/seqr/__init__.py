"""seqr: unsupervised, secure, efficient routing over large libraries of LoRA adapters."""
from .bank import AdapterBank
from .library import LoraLibrary
from .stats import NormStats
from .costs import Cost, costs

__all__ = ["AdapterBank", "LoraLibrary", "NormStats", "Cost", "costs"]
__version__ = "0.1.0"
