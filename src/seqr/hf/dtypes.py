"""The compute dtype of the base model: float32, bfloat16, or "auto" (bf16 where this machine multiplies it natively).

Only the *base model's* weights and activations take this dtype. What seqr owns stays float32 whatever it is:
trainable B and the optimizer state, the routing math (z = A x, scores, the masked argmax), the norm statistics,
and the answer log-probabilities.

"auto" picks bfloat16 only where bf16 matmuls run in hardware: a CUDA device that supports bf16, or a CPU with
AVX512-BF16 or AMX-BF16. Elsewhere (e.g. an AVX2-only CPU, where torch emulates bf16 and a matmul measured ~77x
slower than fp32) it picks float32.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

CHOICES = ("auto", "float32", "bfloat16")  # what --dtype takes
BY_NAME = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 dot products
KEY_CPU_FLAGS = ("avx2", "avx512f", *CPU_BF16_FLAGS)  # what every result records of the CPU it ran on


@functools.lru_cache(maxsize=1)
def native_bf16() -> tuple[bool, str]:
    """(whether this machine multiplies bf16 in hardware, a few words on why)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        ok = torch.cuda.is_bf16_supported()
        return ok, f"CUDA device {name} {'supports' if ok else 'lacks'} bf16"
    flags = _cpu_flags()
    have = [f for f in CPU_BF16_FLAGS if f in flags]
    cap = torch.backends.cpu.get_cpu_capability()
    if have:
        return True, f"the CPU has {'/'.join(have)}"
    return False, f"the CPU lacks {' and '.join(CPU_BF16_FLAGS)} (torch CPU capability {cap}): bf16 would be emulated"


def key_cpu_flags() -> list[str]:
    """The CPU's flags among KEY_CPU_FLAGS (what decides the fast paths), sorted."""
    return sorted(set(KEY_CPU_FLAGS) & _cpu_flags())


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


def choose(spec: str | torch.dtype | None) -> tuple[torch.dtype, str]:
    """(dtype, reason) for "auto", "float32", "bfloat16" or a torch dtype; None means float32."""
    if spec is None:
        return torch.float32, "the default"
    if isinstance(spec, torch.dtype):
        return spec, "asked for"
    if spec == "auto":
        ok, why = native_bf16()
        return (torch.bfloat16 if ok else torch.float32), f"auto: {why}"
    if spec in BY_NAME:
        return BY_NAME[spec], "asked for"
    raise ValueError(f"dtype must be one of {list(CHOICES)}, got {spec!r}")


def say_choice(spec, what: str = "seqr") -> torch.dtype:
    """`choose`, telling stderr which dtype was chosen and why."""
    dtype, why = choose(spec)
    print(f"{what}: base model in {name(dtype)} ({why})", file=sys.stderr, flush=True)
    return dtype


def name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def add_arg(p: argparse.ArgumentParser, default: str = "auto") -> None:
    """The --dtype option every verb that runs the base model shares."""
    p.add_argument("--dtype", choices=CHOICES, default=default,
                   help="the base model's dtype: auto = bfloat16 where the CPU/GPU multiplies it natively "
                        "(AVX512-BF16, AMX or a bf16 CUDA device), else float32; adapters, routing math and norm "
                        f"stats stay float32 (default {default})")
