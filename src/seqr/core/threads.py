"""`one_thread`: run a stretch of tiny CPU ops on one intra-op thread."""
from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def one_thread(device: torch.device | str = "cpu"):
    """Tiny ops (a (8, 576) x (576, 8) product, one adapter's QR, a few-row cat) cost more in a two-thread
    parallel region than they compute: 30-40 us against 7 us on one thread (timed on vLLM's engine thread), and a
    library change's per-layer bank updates took 0.15 s instead of 0.28 s at N=100 (two contended cores). On CPU
    the block runs on one intra-op thread, then the count is restored. `torch._C.set_num_threads` is the setter
    itself: vLLM's CPU worker makes `torch.set_num_threads` a no-op once it has bound its threads."""
    if torch.compiler.is_compiling():  # a compiled graph (fused kernels) sets no thread count mid-graph
        yield
        return
    threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or threads == 1:
        yield
        return
    torch._C.set_num_threads(1)
    try:
        yield
    finally:
        torch._C.set_num_threads(threads)
