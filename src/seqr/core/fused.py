"""SEQR's routing step for a few tokens as one compiled CPU call (fused_seqr.cpp), the eager step's fast path.

A decode step routes a handful of tokens through every adapted module: the eager step (core/step.py) runs ~30 tiny
tensor ops per module, each costing more in dispatch than it computes (SmolLM2 inside vLLM: ~12 ms of a ~46 ms
step at 8 tokens). `seqr_step` does the same work in one call: z = A x, the calibrated norms, the masked argmax
and the chosen adapters' updates (a large prefill's tokens split over torch's threads). The extension is built
once per venv and CPU with torch's own `cpp_extension` (the system's C++ compiler and ninja, cached under torch's
extensions dir); where it cannot be built the eager step runs instead (`available()` says which, `SEQR_FUSED=0`
turns the fast path off).

Taken only where it is exact: SEQR with a shared A, z-scored or raw norms (not the percentile score), float32
compute on CPU, at most `rt.GATHER_TOKENS` tokens or `FUSED_WORK` token-adapter scores, eager (a compiled graph
fuses the eager step itself).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

from seqr.core import routers as rt

# Up to this many (token, adapter) scores per part the fused step beats the eager one at any T (1 or 2 threads,
# SmolLM2's qkv at N=10: 148 vs 576 us at T=64, 649 vs 1371 us at T=256); beyond it, and past GATHER_TOKENS tokens,
# the eager step's Gram form scores many tokens for less.
FUSED_WORK = 8192
# Tokens are split over torch's intra-op threads only where each thread gets this many multiply-adds (about 50
# prefill tokens of SmolLM2's qkv_proj): inside vLLM's worker a parallel region costs tens of microseconds, so a
# decode step's few tokens stay on one thread (splitting them measured 8.44 against 9.24 requests/s under `seqr bench
# serve`, N = 10, the adapter-free server 11.3 / 11.1 beside them). 0: always one thread.
PARALLEL_WORK = 1 << 20
_HALF_OR_FLOAT = (torch.float32, torch.bfloat16, torch.float16)
_SOURCE = Path(__file__).with_name("fused_seqr.cpp")
_lock = threading.Lock()
_module = None  # the built extension, False once building failed
_error: str | None = None


def _load():
    global _module, _error
    if _module is not None:  # built (or failed) already: no lock on the per-layer path
        return _module
    with _lock:
        if _module is None:
            try:
                from torch.utils import cpp_extension

                _ninja_on_path()
                src = _SOURCE.read_text()
                env = hashlib.sha1(f"{sys.prefix}|{torch.__version__}|{_cpu_flags()}".encode()).hexdigest()[:10]
                _module = cpp_extension.load_inline(
                    name=f"seqr_fused_{env}", cpp_sources=[src], functions=["seqr_step", "seqr_step_into"],
                    extra_cflags=["-O3", "-march=native"], verbose=False)
            except Exception as e:  # no compiler, no ninja: the eager step serves, said once
                _module, _error = False, f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
                warnings.warn(f"seqr: the fused SEQR step could not be built ({_error}); routing runs eagerly",
                              RuntimeWarning, stacklevel=3)
    return _module


def _cpu_flags() -> str:
    """The CPU's feature flags: the build is -march=native, so a cache shared with another CPU is not reused."""
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        import platform

        return platform.processor() or platform.machine()


def _ninja_on_path() -> None:
    """torch's cpp_extension runs `ninja` from PATH: the `ninja` wheel's binary sits in the venv's bin, which is
    not on PATH when the venv's python is run without activating it."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def enabled() -> bool:
    """The fast path is wanted (not turned off with SEQR_FUSED=0)."""
    return os.environ.get("SEQR_FUSED", "1") != "0"


def available() -> bool:
    """The extension is built (building it on first call) and not turned off."""
    return enabled() and bool(_load())


def build_error() -> str | None:
    """Why the extension could not be built, or None."""
    return _error


def args_of(bank) -> tuple | None:
    """The kernel's arguments for an AdapterBank or a PackedBank (At (n, P r), R stacks, offsets, B's), or None
    where the fused step does not apply to it: no shared A, ranks that differ between parts, a percentile score,
    a compute dtype other than float32. A PackedBank's are made once (its banks do not change under it)."""
    cached = getattr(bank, "_fused_args", False)
    if cached is not False:
        return cached
    banks = getattr(bank, "banks", [bank])
    args = None
    if all(b.shared_a for b in banks) and len({b.shape[3] for b in banks}) == 1:
        factors = [b.seqr_factors() for b in banks]  # [(R (r, N r), offsets (N,) or None, percentile or None)]
        At = bank.At if hasattr(bank, "banks") else bank._cast(torch.float32)[2]  # (n, P r)
        if all(f[2] is None and f[0].dtype == torch.float32 for f in factors) and At.dtype == torch.float32:
            empty = torch.empty(0)
            args = (At.contiguous(), [f[0].contiguous() for f in factors],
                    [empty if f[1] is None else f[1].float().contiguous() for f in factors],
                    [b._cast(torch.float32)[1].contiguous() for b in banks])  # B^T (N, r, m): the eager step's, no copy
    if hasattr(bank, "banks"):
        bank._fused_args = args
    return args


def _serves(T: int, N: int, device: torch.device) -> bool:
    """The fused step serves T tokens over N adapters on `device`: CPU, at most GATHER_TOKENS tokens or FUSED_WORK
    scores, built and wanted."""
    return device.type == "cpu" and 0 < T and (T <= rt.GATHER_TOKENS or T * N <= FUSED_WORK) and available()


def flags(mask: torch.Tensor | None, has: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's (mask, has) arguments (see `seqr_step`): made once per forward by a caller that routes many
    layers under the same masks (vLLM's SetRouting), rather than once per layer."""
    empty = torch.empty(0)
    return empty if mask is None else mask.contiguous(), empty if has is None else has.contiguous()


def _refuse_empty(empty_sets: int) -> None:
    if empty_sets:
        raise ValueError("masked_argmax_: a token's allowed set is empty, so no adapter can be chosen")


def seqr_step(xf: torch.Tensor, args: tuple, mask: torch.Tensor | None, has: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(idx (T, P), update (T, sum m_p) float32, z (T, P r)) of tokens xf (T, n) float32 routed by SEQR among the
    adapters of bool `mask` ((T, N), (1, N) or None: all), with `args` from `args_of`; `has` (T,) bool: tokens
    that carry a set (the others may take any adapter and get no update; None: all do). None where the fused
    step does not apply to these tokens (see the module's docstring): the caller runs the eager step."""
    if xf.dtype != torch.float32 or not _serves(xf.shape[0], args[3][0].shape[0], xf.device):  # N: B^T (N, r, m)
        return None
    idx, upd, z, empty_sets = _module.seqr_step(xf.contiguous(), *args, *flags(mask, has), PARALLEL_WORK)
    _refuse_empty(empty_sets)
    return idx, upd, z


def prepare(mask: torch.Tensor | None, has: torch.Tensor | None, T: int, N: int, device) -> tuple | None:
    """Once per forward, for a caller that routes many layers of T tokens over N adapters under the same masks
    (vLLM's SetRouting): the kernel's (mask, has) arguments where the fused step serves these tokens (CPU, few
    enough, built and wanted), else None. Then `step_into_prepared` per layer checks almost nothing: a decode
    step's routed layers run with the caches cold (the base model's weights stream through them in between), where
    every Python-side check costs microseconds (`scripts/vllm_routing_cost.py --into --cold`)."""
    return flags(mask, has) if _serves(T, N, device) else None


def step_into_prepared(x: torch.Tensor, y: torch.Tensor, args: tuple, prepared: tuple) -> torch.Tensor:
    """`seqr_step_into` with this forward's `prepare`d masks, for x (T, n) of the model's half or float32 dtype with
    contiguous rows and y (T, sum m_p) contiguous (the kernel refuses other layouts): idx (T, P)."""
    idx, empty_sets = _module.seqr_step_into(x, y, *args, *prepared, PARALLEL_WORK)
    _refuse_empty(empty_sets)
    return idx


def seqr_step_into(x: torch.Tensor, y: torch.Tensor, args: tuple, mask: torch.Tensor | None = None,
                   has: torch.Tensor | None = None) -> torch.Tensor | None:
    """`seqr_step` on tokens x (T, n) in the model's dtype (read as float32, the compute dtype), their updates added
    to the layer's output y (T, sum m_p) in place, rounded once to y's dtype as (y + update).to(y.dtype) would.
    Returns idx (T, P), or None (y untouched) where the fused step does not apply."""
    if not (x.dtype in _HALF_OR_FLOAT and y.dtype in _HALF_OR_FLOAT and x.dim() == 2 and x.stride(1) == 1
            and y.dim() == 2 and y.is_contiguous() and y.shape[0] == x.shape[0] and y.device == x.device
            and _serves(x.shape[0], args[3][0].shape[0], x.device)):
        return None
    return step_into_prepared(x, y, args, flags(mask, has))
