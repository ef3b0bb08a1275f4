"""seqr: unsupervised, secure, efficient routing over large libraries of LoRA adapters."""
from .bank import AdapterBank
from .stats import NormStats

__all__ = ["AdapterBank", "NormStats"]
__version__ = "0.1.0"
