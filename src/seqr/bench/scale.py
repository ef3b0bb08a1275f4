"""`seqr bench scale`: what N adapters cost as N grows: memory, load, changes, decode, routing share.

For each N (--sizes), in a fresh process (resident memory only grows within one), on the float32 base model: N
random shared-A rank-r adapters on q/k/v/o (seeded; calibrated with stand-in stats) are saved as a library
(float16 files) and then measured:

  formula        A + B + packed Grams in float32, n r + N (m r + r(r+1)/2) numbers per layer (the tensors routing needs)
  rss_*          the process's resident growth after LoraLibrary.load, attach, a first forward, over the process with
                 the model loaded and run once (the library is built and saved by another process, as a server
                 loads a saved library); anon_forward_mib: the anonymous part of the growth after the forward (the
                 rest is file-backed pages of shared code a first use faults in, e.g. libtorch kernels)
  load_s         LoraLibrary.load of the saved library: the manifest and every file's header (files mapped, not read)
  attach_s       seqr.attach on it: its first use, where every file is read, verified and stacked, and the banks built
  add_s / remove_s   lib.add / lib.remove of one adapter on the bound library (its file and the manifest written),
                 medians of 3 (add_first_s: the first add, which may grow the banks' stores);
                 (add_write_s / remove_write_s: of which in the atomic file writes, the adapter's file and the
                 manifest); reattach_s: detach + attach afterwards, what a serving engine does before its next batch
  decode ms/token    greedy decoding (prompt P tokens, G steps timed) at batch 1 and 8: untouched, SEQR per token
                 (the paper) and SEQR at its default granularity (once per request), interleaved, medians of --repeats
  routing_share  1 - (a prefill forward with every token on one fixed adapter) / (the same forward routed by SEQR)

Writes scale.json, scale.md and scale.png to --out. --resident float16 holds A and B in half precision.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from seqr.bench.common import cpu_snapshot, machine_info, machine_line, other_cpu_share, write_json
from seqr.store import files

SIZES = [10, 100, 1000, 5000]
QUICK_SIZES = [4, 16]
TARGETS = {"rss_forward_x": 1.15, "rss_forward_x_half": 0.6, "change_s": 0.1, "decode_b1_x": 1.3}


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def anon_mib() -> float:
    """The process's anonymous (private, not file-backed) resident memory: what the library's tensors and objects
    take, without the file-backed pages of shared code (e.g. libtorch kernels) that a first use faults in."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _settle() -> float:
    from seqr.core.memory import trim_heap

    gc.collect()
    trim_heap()
    return rss_mib()


def random_library(layers: dict, N: int, rank: int, seed: int = 0):
    """N random shared-A adapters (B ~ 0.01 N(0, 1), seeded) with stand-in stats, unsaved."""
    from seqr.core.stats import NormStats
    from seqr.silo.train import shared_a
    from seqr.store.library import LibraryMeta, LoraLibrary

    A = {layer: shared_a(layer, (rank, n), 0) for layer, (m, n) in layers.items()}
    lib = LoraLibrary(LibraryMeta(rank=rank, layers=layers, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                  a_seed=0), A)
    g = torch.Generator().manual_seed(seed)
    stats = {layer: NormStats(count=10, mean=1.0, m2=2.0) for layer in layers}
    for i in range(N):
        lib.add(f"a{i}", {layer: torch.randn(m, rank, generator=g) * 0.01 for layer, (m, n) in layers.items()},
                stats=stats)
    return lib


def formula_mib(layers: dict, N: int, rank: int) -> float:
    return sum(n * rank + N * (m * rank + rank * (rank + 1) // 2) for m, n in layers.values()) * 4 / 2**20


def _decode_ms(model, ids, steps: int) -> float:
    from seqr.bench.generate import decode
    from seqr.hf.compat import forward_params, cache_kw

    with torch.no_grad():
        _, seconds = decode(model, ids, steps, cache_kw(forward_params(model)))
    return 1000 * seconds / steps


def _timed_decode(model, lib, ids, steps: int, repeats: int) -> dict:
    """ms per generated token, interleaved rounds: the untouched model, SEQR at its default granularity (one adapter
    per request, chosen by a probe prefill) and per token (the paper); the model leaves attached per token."""
    from seqr import attach, detach

    times = {"untouched": [], "seqr_request": [], "seqr": []}
    for _ in range(repeats):
        detach(model)
        times["untouched"].append(_decode_ms(model, ids, steps))
        attach(model, lib)  # the default: once per request
        times["seqr_request"].append(_decode_ms(model, ids, steps))
        detach(model)
        attach(model, lib, granularity="token")  # the paper's per-token routing: the scale it must hold
        times["seqr"].append(_decode_ms(model, ids, steps))
    return {k: statistics.median(v) for k, v in times.items()}


def _routing_share(model, ids, repeats: int) -> float:
    from seqr import routing

    t = {"fixed": [], "seqr": []}
    for _ in range(repeats):
        for kind, opts in (("fixed", {"adapter": "a0"}), ("seqr", {})):
            with torch.no_grad(), routing(model, **opts):
                t0 = time.perf_counter()
                model(input_ids=ids)
                t[kind].append(time.perf_counter() - t0)
    return 1 - statistics.median(t["fixed"]) / statistics.median(t["seqr"])


def _changes(model, lib, layers: dict, rank: int, rounds: int = 3) -> dict:
    """`rounds` adds of one adapter, then as many removes, each followed by a reattach: the median seconds of each,
    of their file writes, and the first add's (which may grow the banks' stores: amortised O(1), not O(1))."""
    from seqr import attach, detach

    one = random_library(layers, 1, rank, seed=99)
    B, t = one.adapter_weights("a0")[1], {k: [] for k in ("add", "add_write", "reattach_add", "remove",
                                                           "remove_write", "reattach_remove")}
    with _timed_writes() as took:
        for op in ["add"] * rounds + ["remove"] * rounds:
            name = f"extra{len(t[op])}"
            t0 = time.perf_counter()
            lib.add(name, B, stats=one.stats("a0")) if op == "add" else lib.remove(name)
            t[op].append(time.perf_counter() - t0)
            t[f"{op}_write"].append(took())
            t0 = time.perf_counter()
            detach(model)
            attach(model, lib, granularity="token")
            t[f"reattach_{op}"].append(time.perf_counter() - t0)
    return {"add_first_s": t["add"][0], **{f"{k}_s": statistics.median(v) for k, v in t.items()}}


@contextlib.contextmanager
def _timed_writes():
    """Inside the block, time the store's atomic file writes (the adapter's file, the manifest): yields take(),
    which returns the seconds spent in them so far and restarts the count."""
    from seqr.store import files

    spent, originals = [0.0], (files.atomic_write_json, files.atomic_write_bytes)

    def timed(fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t0
        return run

    def take() -> float:
        total, spent[0] = spent[0], 0.0
        return total

    files.atomic_write_json, files.atomic_write_bytes = map(timed, originals)
    try:
        yield take
    finally:
        files.atomic_write_json, files.atomic_write_bytes = originals


def _children_cpu_s() -> float:
    import resource

    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


def child(a) -> dict:
    """One N, measured in this (fresh) process."""
    from seqr import attach
    from seqr.hf.models import load_model
    from seqr.store.library import LoraLibrary

    torch.manual_seed(0)
    model, tok = load_model(a.model, dtype="float32")
    layers = {n: (m.out_features, m.in_features) for n, m in model.named_modules()
              if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) and isinstance(m, torch.nn.Linear)}
    vocab = model.config.vocab_size
    ids = {b: torch.randint(0, vocab, (b, a.prompt), generator=torch.Generator().manual_seed(b)) for b in (1, 8)}
    with torch.no_grad():
        model(input_ids=ids[8])
    N, out = a.child, {"N": a.child, "formula_mib": formula_mib(layers, a.child, a.rank)}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        files.atomic_write_json(Path(tmp) / "layers.json", layers)
        subprocess.run([sys.executable, "-m", "seqr.cli", "bench", "scale", "--child", str(N), "--build", tmp,
                        "--rank", str(a.rank)], check=True)  # another process: as a server loads a saved library
        out["build_save_s"] = time.perf_counter() - t0
        base, base_anon = _settle(), anon_mib()
        t0 = time.perf_counter()
        lib = LoraLibrary.load(Path(tmp) / "lib", resident_dtype=a.resident)
        out["load_s"] = time.perf_counter() - t0
        out["rss_load_mib"] = _settle() - base
        t0 = time.perf_counter()
        attach(model, lib, granularity="token")
        out["attach_s"] = time.perf_counter() - t0
        out["rss_attach_mib"] = _settle() - base
        with torch.no_grad():
            model(input_ids=ids[8])
        out["rss_forward_mib"] = _settle() - base
        out["anon_forward_mib"] = anon_mib() - base_anon
        out["decode_ms"] = {str(b): _timed_decode(model, lib, ids[b], a.new_tokens, a.repeats) for b in (1, 8)}
        out["routing_share"] = _routing_share(model, ids[8], a.repeats)
        out.update(_changes(model, lib, layers, a.rank))
    return out


def markdown(rows: list[dict], resident: str) -> str:
    lines = ["| N | formula MiB | resident after load / attach / forward MiB | × formula | load / attach s | add / remove s "
             "(file writes) | reattach s | decode b1 ms per token / per request (× untouched) | decode b8 ms per "
             "token / per request (× untouched) | routing share |",
             "|---:|---:|---|---:|---:|---|---|---|---|---:|"]
    for r in rows:
        d1, d8 = r["decode_ms"]["1"], r["decode_ms"]["8"]
        lines.append(
            f"| {r['N']} | {r['formula_mib']:.1f} | {r['rss_load_mib']:.0f} / {r['rss_attach_mib']:.0f} / "
            f"{r['rss_forward_mib']:.0f} | {_ratio_cell(r)} | {_load_cell(r)} | "
            f"{r['add_s']:.3f} / {r['remove_s']:.3f} ({r['add_write_s']:.3f} / {r['remove_write_s']:.3f}; first add "
            f"{r['add_first_s']:.3f}) | "
            f"{r['reattach_add_s']:.2f} / {r['reattach_remove_s']:.2f} | {_decode_cell(d1)} | {_decode_cell(d8)} | "
            f"{100 * r['routing_share']:.0f}% |")
    return "\n".join(lines) + f"\n\nresident dtype: {resident}; files stored float16.\n"


def _ratio_cell(r: dict) -> str:
    """'resident after forward / formula' (then its anonymous part: absent in runs before it was measured)."""
    cell = f"{r['rss_forward_mib'] / r['formula_mib']:.2f}×"
    return cell + (f" (anon. {r['anon_forward_mib'] / r['formula_mib']:.2f}×)" if "anon_forward_mib" in r else "")


def _load_cell(r: dict) -> str:
    """'load s / attach s' (attach: absent in runs before it was timed)."""
    return f"{r['load_s']:.2f}" + (f" / {r['attach_s']:.2f}" if "attach_s" in r else "")


def _decode_cell(d: dict) -> str:
    """'per-token ms (x) / per-request ms (x)' of one batch size (per request: absent in runs before it was timed)."""
    cell = f"{d['seqr']:.1f} ({d['seqr'] / d['untouched']:.2f}×)"
    if "seqr_request" in d:
        cell += f" / {d['seqr_request']:.1f} ({d['seqr_request'] / d['untouched']:.2f}×)"
    return cell


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ns = [r["N"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(Ns, [r["formula_mib"] for r in rows], "k--", label="formula (A + B + G, fp32)")
    for key, label in (("rss_load_mib", "after load"), ("rss_attach_mib", "after attach"),
                       ("rss_forward_mib", "after a forward")):
        ax1.plot(Ns, [r[key] for r in rows], "o-", label=label)
    ax1.set(xscale="log", yscale="log", xlabel="adapters N", ylabel="resident growth (MiB)", title="Memory")
    ax1.legend(fontsize=8)
    for b, style in (("1", "o-"), ("8", "s-")):
        ax2.plot(Ns, [r["decode_ms"][b]["seqr"] for r in rows], style, label=f"SEQR per token, batch {b}")
        if all("seqr_request" in r["decode_ms"][b] for r in rows):
            ax2.plot(Ns, [r["decode_ms"][b]["seqr_request"] for r in rows], style.replace("-", "--"),
                     label=f"SEQR per request, batch {b}")
        ax2.plot(Ns, [r["decode_ms"][b]["untouched"] for r in rows], style.replace("-", ":"), alpha=0.6,
                 label=f"untouched, batch {b}")
    ax2.set(xscale="log", xlabel="adapters N", ylabel="ms per generated token", title="Decode")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_scale_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default=None, help=f"comma-separated N (default {SIZES}; --quick {QUICK_SIZES})")
    p.add_argument("--model", default="smollm2-135m-instruct", help="base model (float32)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--resident", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="dtype A and B are held in (LoraLibrary.load(resident_dtype=))")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=16, help="decode steps timed")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (medians)")
    p.add_argument("--out", default="bench-out/scale", help="output dir (scale.json, scale.md, scale.png)")
    p.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, 1 round")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--build", help=argparse.SUPPRESS)


def build(a) -> None:
    """Save `--child` random adapters over the layers in `--build`/layers.json as `--build`/lib (float16 files)."""
    layers = {k: tuple(v) for k, v in files.read_json(Path(a.build) / "layers.json", "layers").items()}
    random_library(layers, a.child, a.rank).save(Path(a.build) / "lib", dtype="float16")


def cmd_scale(a, p) -> int:
    if a.build is not None:
        build(a)
        return 0
    if a.child is not None:
        print(json.dumps(child(a)))
        return 0
    try:
        sizes = [int(x) for x in (a.sizes or ",".join(map(str, QUICK_SIZES if a.quick else SIZES))).split(",")]
    except ValueError:
        p.error(f"--sizes must be comma-separated integers, got {a.sizes!r}")
    if not sizes or min(sizes) < 1 or a.rank < 1 or a.repeats < 1:
        p.error(f"--sizes, --rank and --repeats must be positive, got {sizes}, {a.rank}, {a.repeats}")
    repeats = 1 if a.quick else a.repeats
    rows, start, kids = [], cpu_snapshot(), _children_cpu_s()
    for N in sizes:
        cmd = [sys.executable, "-m", "seqr.cli", "bench", "scale", "--child", str(N), "--model", a.model,
               "--rank", str(a.rank), "--resident", a.resident, "--prompt", str(a.prompt), "--new-tokens",
               str(a.new_tokens), "--repeats", str(repeats)]
        print(f"seqr bench scale: N={N} ...", file=sys.stderr, flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"seqr bench scale: N={N} failed: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            break
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    end = cpu_snapshot()
    share = other_cpu_share(start, end)  # counts the measuring children as others: take their CPU time out
    if share is not None:
        share = max(0.0, share - (_children_cpu_s() - kids) / (end["total"] - start["total"]))
    info["other_cpu_share"] = share
    write_json(out / "scale.json", {"machine": info, "resident": a.resident, "rank": a.rank, "rows": rows,
                                    "targets": TARGETS})
    text = f"{machine_line(info)}\n\n{markdown(rows, a.resident)}" if rows else "no size finished\n"
    (out / "scale.md").write_text(text)
    if rows:
        plot(rows, out / "scale.png")
    print(text)
    return 0 if len(rows) == len(sizes) else 1
