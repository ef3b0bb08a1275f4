"""`seqr bench routing`: times `AdapterBank.route` per method on a random shared-A bank, beside the MACs that
`seqr.core.costs` predicts (the paper's Table 1); `--sweep` varies n, N and r one axis at a time (the paper's Figure 5).

Every method is timed exactly as the bank routes: SEQR from x (z = A x included), the baselines the way their papers
compute them (explicit V_i, explicit prototypes, LAG's per-token candidates). Times are medians of repeated calls
after warm-up, under torch.no_grad().
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from seqr.core import registry
from seqr.core.bank import AdapterBank
from seqr.core.costs import DEFAULT_SHAPE, add_shape_args, costs, human
from seqr.store.files import atomic_write_bytes
from seqr.bench.common import (contention_note, cpu_snapshot, load_avg, machine_info, machine_line, num,
                               other_cpu_share, ratio, timed, write_json)

METHODS = tuple(sorted(registry.names(("score", "shortlist")), key=lambda mt: costs(mt, 100, 512, 512, 8, 20).macs))
# every router of the registry, cheapest first (by its MACs at the quick shape)
TARGETS = {"arrow": 10.0, "spectr": 100.0}  # the paper's claim: at least this many times slower than SEQR
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUICK_SHAPE = {"N": 100, "n": 512, "m": 512, "r": 8, "k": 20}
# mode -> defaults of the options left unset: tokens, repeats, time budget per method (s), --skip-after (s)
MODE_DEFAULTS = {
    "single": {"tokens": 2048, "repeats": 5, "budget_s": 60.0, "skip_after": None},
    "quick": {"tokens": 256, "repeats": 5, "budget_s": 5.0, "skip_after": None},
    "sweep": {"tokens": 256, "repeats": 3, "budget_s": 10.0, "skip_after": 8.0},
    "quick-sweep": {"tokens": 32, "repeats": 1, "budget_s": 1.0, "skip_after": 1.0},
}
# Figure 5's axes, varied one at a time around the base shape (which joins every axis). Varying n sets m = n
# when the base layer is square.
SWEEP_AXES = {"n": (512, 1024, 2048, 4096), "N": (10, 30, 100, 300, 1000), "r": (4, 8, 16, 32, 64)}
QUICK_SWEEP_AXES = {"n": (64, 128), "N": (10, 30), "r": (2, 4)}


# --- routing: one shape -------------------------------------------------------------------------------------

def random_bank(N: int, n: int, m: int, r: int, dtype: torch.dtype, seed: int) -> tuple[AdapterBank, float]:
    """A calibrated shared-A bank: A ~ N(0, 1/r^2), B ~ N(0, 1), random mu/sigma so z-scoring is timed too, random
    centroids for the centroid routers. Returns the bank and the seconds its construction (batched QR of every B_i,
    packed Grams) took."""
    g = torch.Generator().manual_seed(seed)
    A = (torch.randn(r, n, generator=g) / r).to(dtype)  # (r, n)
    B = torch.randn(N, m, r, generator=g).to(dtype)  # (N, m, r)
    mu = torch.rand(N, generator=g) + 0.5  # (N,)
    sigma = torch.rand(N, generator=g) * 0.5 + 0.1  # (N,)
    centroids = torch.randn(N, n, generator=g)  # (N, n)
    t0 = time.perf_counter()
    bank = AdapterBank(A, B, mu=mu, sigma=sigma, centroids=centroids)
    return bank, time.perf_counter() - t0


# --- the dtype axis of the model benchmarks (forward, generate) ---------------------------------------------

def measure_routing(shape: dict, methods, *, tokens: int, repeats: int, warmup: int, dtype: torch.dtype,
                    seed: int, budget_s: float | None, progress: bool = True) -> dict:
    """Time bank.route(x, method) for each method on a fresh random bank of `shape` (k is clamped to N)."""
    N, n, m, r = (shape[a] for a in ("N", "n", "m", "r"))
    k = min(shape["k"], N)
    bank, qr_s = random_bank(N, n, m, r, dtype, seed)
    svd_s = None
    if any("svd" in registry.get(mt).needs for mt in methods):
        t0 = time.perf_counter()
        bank.prepare(*methods)  # the baselines' one-off SVD (lazy in the bank), kept out of their timings
        svd_s = time.perf_counter() - t0
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)  # (T, n)
    results = {}
    with torch.no_grad():
        for method in tqdm(methods, desc=f"N={N} n={n} r={r}", leave=False, disable=not progress):
            kw = {"k": k} if registry.get(method).takes_k else {}
            times, first = timed(lambda: bank.route(x, method, **kw), repeats, warmup, budget_s)
            c = costs(method, N, n, m, r, k)
            med = statistics.median(times)
            results[method] = {
                "macs_per_token": c.macs, "shared_macs_per_token": c.shared_macs,
                "times_ms": [t * 1e3 for t in times], "runs": len(times), "first_call_ms": first * 1e3,
                "median_ms": med * 1e3, "min_ms": min(times) * 1e3,
                "gmac_per_s": (c.macs + c.shared_macs) * tokens / med / 1e9,  # the work the timed call does
            }
    if "seqr" in results:
        base = results["seqr"]
        for res in results.values():
            res["ratio_to_seqr"] = res["median_ms"] / base["median_ms"]
            res["predicted_ratio_to_seqr"] = ((res["macs_per_token"] + res["shared_macs_per_token"])
                                              / (base["macs_per_token"] + base["shared_macs_per_token"]))
    return {"N": N, "n": n, "m": m, "r": r, "k": k, "tokens": tokens, "warmup": warmup,
            "prep_ms": {"qr": qr_s * 1e3, "svd": None if svd_s is None else svd_s * 1e3}, "results": results}


def targets(results: dict) -> dict:
    """{method: {"target", "ratio", "met"}} for the paper's speed-up claims (ratio None when not measured)."""
    ratios = {mt: results.get(mt, {}).get("ratio_to_seqr") for mt in TARGETS}
    return {mt: {"target": goal, "ratio": ratios[mt], "met": None if ratios[mt] is None else ratios[mt] >= goal}
            for mt, goal in TARGETS.items()}


def routing_report(point: dict, info: dict, dtype: str, budget_s: float | None) -> str:
    prep = point["prep_ms"]
    svd = "" if prep["svd"] is None else f", baselines' SVD {num(prep['svd'])} ms"
    lines = [machine_line(info),
             f"routing {point['tokens']} tokens: N={point['N']} adapters, n={point['n']}, m={point['m']}, "
             f"r={point['r']}, k={point['k']} (lag), shared A, {dtype}; median of `runs` timed calls after "
             f"{point['warmup']} warm-up{_budget(budget_s)}",
             f"one-off preparation: bank (QR + packed Grams) {num(prep['qr'])} ms{svd}", "",
             "| method | predicted MACs/token | median ms | min ms | runs | GMAC/s | × SEQR | × SEQR predicted |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for method, res in point["results"].items():
        shared = res["shared_macs_per_token"]
        macs = human(res["macs_per_token"]) + (f" (+{human(shared)} z=Ax)" if shared else "")
        lines.append(f"| {method} | {macs} | {num(res['median_ms'])} | {num(res['min_ms'])} | {res['runs']} "
                     f"| {num(res['gmac_per_s'], 3)} | {ratio(res.get('ratio_to_seqr'))} "
                     f"| {ratio(res.get('predicted_ratio_to_seqr'))} |")
    verdicts = [f"{mt.upper()} ≥ {t['target']:g}× slower than SEQR: " + ("not measured" if t["ratio"] is None
                else f"{'met' if t['met'] else 'NOT met'} ({ratio(t['ratio'])})")
                for mt, t in targets(point["results"]).items()]
    lines += ["", "SEQR's time includes z = A x; GMAC/s and the predicted ratio count that shared work too.",
              "targets: " + "; ".join(verdicts)]
    return "\n".join(lines + [note] if (note := contention_note(info)) else lines)


def _budget(budget_s: float | None) -> str:
    return f", at most {budget_s:g} s of timed calls per method" if budget_s else ""


# --- routing --sweep ----------------------------------------------------------------------------------------

def sweep_shapes(base: dict, axes: dict):
    """Yield (axis, value, shape) one axis at a time, ascending, the base value included on every axis."""
    square = base["n"] == base["m"]
    for axis, values in axes.items():
        for v in sorted(set(values) | {base[axis]}):
            shape = dict(base, **{axis: v})
            if axis == "n" and square:
                shape["m"] = v
            yield axis, v, shape


def run_sweep(base: dict, axes: dict, methods, opts: dict, skip_after: float | None) -> list[dict]:
    """Measure every method at every sweep point. Along an axis, costs only grow: once a method's call took
    longer than `skip_after` seconds, it is skipped at the axis's larger values (and the point says so).
    A shape shared by several axes (the base) is measured once."""
    measured: dict[tuple, dict] = {}
    slow: dict[str, str] = {}  # method -> why it is skipped on the current axis
    points, current_axis = [], None
    todo = list(sweep_shapes(base, axes))
    for axis, value, shape in (bar := tqdm(todo, desc="sweep", file=sys.stderr)):
        bar.set_postfix_str(f"{axis}={value}")
        if axis != current_axis:
            current_axis, slow = axis, {}
        key = tuple(shape[a] for a in ("N", "n", "m", "r", "k"))
        want = [mt for mt in methods if mt not in slow]
        have = measured.get(key)
        missing = [mt for mt in want if have is None or mt not in have["results"]]
        if missing:
            new = measure_routing(shape, missing, **opts)
            if have is not None:
                new["results"] = {**have["results"], **new["results"]}
            measured[key] = have = new
        results = {mt: have["results"][mt] for mt in methods if have and mt in have["results"]}  # free if cached
        meta = have or {**shape, "k": min(shape["k"], shape["N"]), "tokens": opts["tokens"], "prep_ms": None}
        points.append({"axis": axis, "value": value, **{a: meta[a] for a in ("N", "n", "m", "r", "k", "tokens")},
                       "prep_ms": meta["prep_ms"], "results": results,
                       "skipped": {mt: why for mt, why in slow.items() if mt not in results}})
        for mt, res in results.items():
            if skip_after is not None and mt not in slow and res["first_call_ms"] / 1e3 > skip_after:
                slow[mt] = (f"one call took {res['first_call_ms'] / 1e3:.3g} s at {axis}={value} "
                            f"(> --skip-after {skip_after:g} s); larger {axis} would take longer")
    return points


def _axis_label(axis: str, rows: list[dict]) -> str:
    return "n (= m)" if axis == "n" and all(p["m"] == p["n"] for p in rows) else axis


def _values(rows: list[dict], a: str) -> str:
    """The value of `a` over an axis's points: one number, or a range (LAG's k is capped at N)."""
    vals = sorted({p[a] for p in rows})
    return str(vals[0]) if len(vals) == 1 else f"{vals[0]}..{vals[-1]}"


def sweep_report(points: list[dict], methods, info: dict, run: dict) -> str:
    lines = [machine_line(info), f"routing sweep: median ms per bank.route call of {run['tokens']} tokens, "
             f"{run['repeats']} timed calls{_budget(run['budget_s'])}", ""]
    for axis in dict.fromkeys(p["axis"] for p in points):
        rows = [p for p in points if p["axis"] == axis]
        label = _axis_label(axis, rows)
        fixed = ", ".join(f"{a}={_values(rows, a)}" for a in ("N", "n", "m", "r", "k") if a not in label)
        lines += [f"varying {label}; {fixed}", "",
                  f"| {label} | " + " | ".join(methods) + " | ARROW × SEQR | SPECTR × SEQR |",
                  "|---:|" + "---:|" * (len(methods) + 2)]
        for p in rows:
            cells = [num(p["results"][mt]["median_ms"]) if mt in p["results"] else "skipped" for mt in methods]
            ratios = [ratio(p["results"].get(mt, {}).get("ratio_to_seqr")) for mt in ("arrow", "spectr")]
            lines.append(f"| {p['value']} | " + " | ".join(cells + ratios) + " |")
        lines.append("")
        for mt, why in {mt: w for p in rows for mt, w in p["skipped"].items()}.items():
            where = ", ".join(str(p["value"]) for p in rows if mt in p["skipped"])
            lines.append(f"skipped {mt} at {axis} = {where}: {why}")
        lines.append("")
    return "\n".join(lines + [contention_note(info) or ""]).rstrip()


def plot_sweep(points: list[dict], methods, path: Path, title: str) -> None:
    """3 panels (time vs n / N / r), log-log, one line per method; written atomically as PNG (Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    axes = list(dict.fromkeys(p["axis"] for p in points))
    fig = Figure(figsize=(5 * len(axes), 4.2))
    FigureCanvasAgg(fig)
    for ax, axis in zip(fig.subplots(1, len(axes), squeeze=False)[0], axes):
        rows = [p for p in points if p["axis"] == axis]
        for i, mt in enumerate(methods):
            xy = [(p["value"], p["results"][mt]["median_ms"]) for p in rows if mt in p["results"]]
            if xy:
                ax.plot(*zip(*xy), marker="o", label=mt, color=f"C{i}")  # one colour per method in every panel
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([p["value"] for p in rows], [str(p["value"]) for p in rows])
        ax.minorticks_off()
        ax.set_xlabel(_axis_label(axis, rows))
        ax.set_ylabel("median ms per route call")
        ax.set_title(f"routing time vs {axis}")
        ax.grid(True, which="both", alpha=0.3)
    legend = {lb: h for ax in fig.axes for h, lb in zip(*ax.get_legend_handles_labels())}
    fig.legend(list(legend.values()), list(legend), loc="center right")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


# --- `seqr bench routing` -----------------------------------------------------------------------------------

def _method_list(text: str) -> list[str]:
    methods = [s.strip() for s in text.split(",") if s.strip()]
    bad = [mt for mt in methods if mt not in METHODS]
    if bad or not methods:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad or text!r}; expected a comma list of {list(METHODS)}")
    return list(dict.fromkeys(methods))


def add_routing_args(p: argparse.ArgumentParser) -> None:
    add_shape_args(p, dict.fromkeys(DEFAULT_SHAPE))  # None: Table 1's shape, or QUICK_SHAPE with --quick
    p.add_argument("--tokens", type=int, help="tokens per route call (default 2048; sweep 256; --quick 256)")
    p.add_argument("--repeats", type=int, help="timed calls per method (default 5; sweep 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per method first (default 1)")
    p.add_argument("--budget-s", type=float, help="seconds per method: a method whose warm-up call is slow gets "
                   "fewer timed calls, at least 1 (default 60; sweep 10; 0: no budget)")
    p.add_argument("--methods", type=_method_list, default=list(METHODS), help=f"default {','.join(METHODS)}")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype of the bank and tokens")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random bank and tokens")
    p.add_argument("--json", type=Path, metavar="PATH", help="write every number to this JSON file")
    p.add_argument("--sweep", action="store_true", help="vary n, N, r one at a time; writes sweep.json/.png")
    p.add_argument("--skip-after", type=float, help="sweep: skip a method at larger values of an axis once one call "
                   "took this many seconds (default 8; 0: never skip)")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="sweep output folder (default bench-out/)")
    p.add_argument("--quick", action="store_true", help="small sizes (N=100, n=m=512, r=8, 256 tokens; "
                   "a tiny sweep with --sweep): finishes in seconds")


def resolve(args: argparse.Namespace) -> tuple[dict, dict]:
    """(shape, run options) from the flags: an explicit flag wins, then the --quick/--sweep defaults."""
    mode = ("quick-sweep" if args.sweep else "quick") if args.quick else ("sweep" if args.sweep else "single")
    shape = {a: v if (v := getattr(args, a)) is not None else (QUICK_SHAPE if args.quick else DEFAULT_SHAPE)[a]
             for a in DEFAULT_SHAPE}
    run = {a: v if (v := getattr(args, a)) is not None else d for a, d in MODE_DEFAULTS[mode].items()}
    threads = 1 if args.threads is None else args.threads
    for name, value in [*shape.items(), ("tokens", run["tokens"]), ("repeats", run["repeats"]), ("threads", threads)]:
        if value < 1:
            raise ValueError(f"--{name} must be positive, got {value}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    for name in ("budget_s", "skip_after"):
        if run[name] is not None and not run[name] >= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {run[name]}")
    return shape, run


def cmd_routing(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        shape, run = resolve(args)
    except ValueError as e:
        parser.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    opts = {"tokens": run["tokens"], "repeats": run["repeats"], "warmup": args.warmup, "dtype": DTYPES[args.dtype],
            "seed": args.seed, "budget_s": run["budget_s"] or None}
    payload = {"machine": info, "config": {**shape, **run, "warmup": args.warmup, "methods": args.methods,
                                           "dtype": args.dtype, "seed": args.seed}}
    t0, cpu0 = time.perf_counter(), cpu_snapshot()
    if not args.sweep:
        point = measure_routing(shape, args.methods, **opts)
        payload.update(point, targets=targets(point["results"]))
    else:
        axes = QUICK_SWEEP_AXES if args.quick else SWEEP_AXES
        points = run_sweep(shape, axes, args.methods, {**opts, "progress": False}, run["skip_after"] or None)
        payload.update(axes={a: list(v) for a, v in axes.items()}, points=points)
    payload["wall_s"] = time.perf_counter() - t0
    info["load_avg_1min_end"] = load_avg()
    info["other_cpu_share"] = other_cpu_share(cpu0, cpu_snapshot())
    info["contention_warning"] = contention_note(info)
    if not args.sweep:
        print(routing_report(point, info, args.dtype, run["budget_s"]))
    else:
        print(sweep_report(points, args.methods, info, run))
        base = ", ".join(f"{a}={shape[a]}" for a in ("N", "n", "m", "r", "k"))
        plot_sweep(points, args.methods, args.out / "sweep.png", f"bank.route around {base}: {run['tokens']} "
                   f"tokens, {args.dtype}, {info['processor']}, {info['threads']} threads")
        write_json(args.out / "sweep.json", payload)
        print(f"\nwrote {args.out / 'sweep.json'} and {args.out / 'sweep.png'}")
    print(f"total wall time {payload['wall_s']:.1f} s")
    if args.json:
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0
