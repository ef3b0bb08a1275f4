"""What every benchmark shares: machine facts and CPU contention, timing, JSON output, dtype options and
number formatting. Imported by each `seqr bench` subcommand; imports no benchmark."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch

from seqr.hf.dtypes import BY_NAME
from seqr.store.files import atomic_write_bytes


# --- machine facts and timing --------------------------------

def write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def machine_info() -> dict:
    cpu = platform.processor()
    if not cpu and Path("/proc/cpuinfo").exists():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else ""
    here = Path(__file__).parents[1] / "core"  # which version of the routers was timed
    sources = {f: hashlib.sha256((here / f).read_bytes()).hexdigest()[:12] for f in ("routers.py", "bank.py")}
    from seqr.hf.dtypes import key_cpu_flags

    return {"processor": cpu or platform.machine(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "cpu_flags": key_cpu_flags(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "load_avg_1min": load_avg(), "sources_sha256": sources}


def load_avg() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def cpu_snapshot() -> dict | None:
    """Machine-wide busy and total CPU seconds (from /proc/stat) and this process's own CPU seconds."""
    try:
        v = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    return {"busy": (sum(v) - v[3] - v[4]) / hz, "total": sum(v) / hz, "own": time.process_time()}


def other_cpu_share(start: dict | None, end: dict | None) -> float | None:
    """Share of the machine's CPU capacity that OTHER processes used between two snapshots (0 = idle)."""
    if start is None or end is None or end["total"] <= start["total"]:
        return None
    others = (end["busy"] - start["busy"]) - (end["own"] - start["own"])
    return max(0.0, others) / (end["total"] - start["total"])


def machine_line(info: dict) -> str:
    share = info.get("other_cpu_share")
    busy = "" if share is None else f", other processes used {share:.0%} of the CPUs during the run"
    flags = f" [{' '.join(info['cpu_flags']) or 'none of avx2/avx512f/avx512_bf16/amx_bf16'}]" if "cpu_flags" in info else ""
    return (f"machine: {info['processor']} ({info['machine']}){flags}, {info['cpu_count']} CPUs, torch {info['torch']}, "
            f"{info['threads']} threads{busy}")


def contention_note(info: dict) -> str | None:
    """A warning when other processes competed for the CPUs (measured from /proc/stat, not load averages,
    which lag and count the benchmark's own earlier work)."""
    share = info.get("other_cpu_share")
    if share is None or share < 0.05:
        return None
    return (f"WARNING: other processes used {share:.0%} of the CPUs during the run: multi-threaded timings of small "
            f"ops can be inflated many times over by threads waiting for descheduled peers. Rerun on an idle "
            f"machine, or compare with --threads 1.")


def timed(fn, repeats: int, warmup: int, budget_s: float | None = None) -> tuple[list[float], float]:
    """Run fn `warmup` times, then time it `repeats` times with perf_counter. Returns (seconds per timed call,
    seconds of the first call). A budget trims the repeats of a slow fn (at least one timed call)."""
    def once() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    warm = [once() for _ in range(warmup)]
    if budget_s and warm:
        repeats = max(1, min(repeats, int(budget_s // warm[0])))
    times = [once() for _ in range(repeats)]
    return times, (warm or times)[0]


MODEL_DTYPES = tuple(BY_NAME)  # what --dtypes measures, in this order (seqr.hf.dtypes' names: float32, bfloat16)


def dtype_list(text: str) -> list[str]:
    """argparse type of --dtypes: a comma list of float32, bfloat16 and/or auto (resolved by `resolve_dtypes`)."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in ("auto", *MODEL_DTYPES)]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown dtype {', '.join(map(repr, bad)) or repr(text)}; expected a comma "
                                         f"list of {', '.join(MODEL_DTYPES)} or auto")
    return names


def add_dtypes_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtypes", type=dtype_list, metavar="LIST", help="comma list of the base model's dtypes, each "
                   "measured on its own and compared only within itself: float32, bfloat16, auto (default auto: "
                   "float32, plus bfloat16 where the CPU/GPU multiplies it natively)")


def resolve_dtypes(names: list[str] | None) -> tuple[list[str], str | None]:
    """(the dtypes to measure, float32 first; a note when "auto" left bfloat16 out, saying why). None means auto:
    float32, plus bfloat16 where `seqr.hf.dtypes.native_bf16` says this machine multiplies it in hardware."""
    from seqr.hf.dtypes import native_bf16

    names = names or ["auto"]
    want, note = set(names) - {"auto"}, None
    if "auto" in names:
        native, why = native_bf16()
        want |= set(MODEL_DTYPES) if native else {"float32"}
        if "bfloat16" not in want:
            note = f"bfloat16 skipped: {why}; `--dtypes float32,bfloat16` forces it"
    return [d for d in MODEL_DTYPES if d in want], note


def num(x: float, digits: int = 4) -> str:
    """`digits` significant digits, without exponent notation for large values (56420, not 5.642e+04)."""
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def ratio(x: float | None) -> str:
    return "-" if x is None else f"{num(x, 3)}×"
