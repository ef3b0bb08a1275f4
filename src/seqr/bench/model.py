"""What the whole-model benchmarks (`seqr bench forward`, `seqr bench generate`) share.

The model (`load_base`: seqr.load_model, or with --quick a tiny random Llama) and N random peft adapter dirs
(`write_adapters`: one shared A per layer, random B per adapter), peft-static and seqr built on their own deep
copies (`build_variants`), interleaved timing (`time_interleaved`), logit comparisons (`compare`), and the dtype
axis: `run_dtypes` measures each of --dtypes on the base model loaded in it, with the same adapter dirs, and
variants are compared only within a dtype (`add_ratios`); `dtype_ratios` gives each variant's bf16 / fp32 time.
Also the command-line options, report pieces and the JSON/exit-status ending both commands share.
"""
from __future__ import annotations

import argparse
import copy
import gc
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from seqr.bench.common import (load_avg, num, ratio, add_dtypes_arg, contention_note, cpu_snapshot, machine_info, machine_line,
                    other_cpu_share, resolve_dtypes, write_json)
from seqr.hf.dtypes import BY_NAME, name as dtype_name
from seqr.store.files import PEFT_CONFIG, PEFT_WEIGHTS
from seqr.core.stats import NormStats

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
DEFAULT_MODEL = "smollm2-135m-instruct"
# --quick: a tiny random Llama instead of the real model (seeded), in seconds
QUICK_LLAMA = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
B_STD = 0.02  # adapters' B ~ N(0, B_STD^2)
NO_ADAPTERS = {"lora_layers": 0, "lora_adapters": [], "routed_layers": 0}  # `layout` of the untouched model


# --- the model and the adapters -----------------------------------------------------------------------------

def load_base(name: str, quick: bool, seed: int, dtype: torch.dtype = torch.float32):
    """(model in eval mode in `dtype`, label): the tiny random Llama with --quick (made in fp32, then cast, so its
    weights are the same in every dtype), else `seqr.hf.models.load_model(name, dtype=dtype)`."""
    if quick:
        from transformers import LlamaConfig, LlamaForCausalLM
        with torch.random.fork_rng():  # seeded weights, the caller's global RNG left as it was
            torch.manual_seed(seed)
            model = LlamaForCausalLM(LlamaConfig(**QUICK_LLAMA)).eval()
        return model.to(dtype), "tiny random Llama (--quick)"
    from seqr.hf.models import load_model
    return load_model(name, dtype=dtype)[0].eval(), name


def write_adapters(base, root: Path, N: int, r: int, seed: int) -> list[Path]:
    """N standard peft adapter dirs under root: one peft-made template (shared A per layer ~ N(0, 1/r^2) from
    `seed`), then its safetensors rewritten with each adapter's own B ~ N(0, B_STD^2) (seed + 1 + i)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    from seqr.store.checks import natural_key

    template = root / "template"
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGET_MODULES), init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(base).float(), cfg)  # fp32 adapter files whatever base's dtype
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, mod in sorted(model.named_modules(), key=lambda kv: natural_key(kv[0])):
            if hasattr(mod, "lora_A") and "default" in mod.lora_A:
                A = mod.lora_A["default"].weight  # (r, n)
                A.copy_(torch.randn(A.shape, generator=g) / r)
    model.save_pretrained(template)
    del model
    tensors, config = load_file(template / PEFT_WEIGHTS), (template / PEFT_CONFIG).read_bytes()
    dirs = []
    for i in range(N):
        gi = torch.Generator().manual_seed(seed + 1 + i)
        out = {k: torch.randn(t.shape, generator=gi) * B_STD if k.endswith("lora_B.weight") else t
               for k, t in sorted(tensors.items())}
        d = root / f"adapter{i:03d}"
        d.mkdir()
        save_file(out, d / PEFT_WEIGHTS, metadata={"format": "pt"})
        (d / PEFT_CONFIG).write_bytes(config)
        dirs.append(d)
    shutil.rmtree(template)
    return dirs


def seqr_library(dirs: list[Path], seed: int):
    """`LoraLibrary.from_peft(dirs)`, calibrated with random per-layer NormStats, every bank's routing factors
    (Grams, the baselines' SVD) built up front so no timed call pays for them."""
    from seqr.store.library import LoraLibrary

    lib = LoraLibrary.from_peft(dirs)
    g = torch.Generator().manual_seed(seed)
    for name in lib.names:
        lib.set_stats(name, {layer: NormStats().update(torch.rand(16, generator=g) * 2 + 0.5) for layer in lib.layers})
    for layer in lib.layers:
        lib.bank(layer).prepare("arrow", "spectr")
    return lib


def layout(model) -> dict:
    """What adapter machinery a model holds: peft LoRA layers and adapter names, seqr routed layers."""
    from seqr.hf.layers import RoutedLinear

    lora = [m for m in model.modules() if hasattr(m, "lora_A")]
    return {"lora_layers": len(lora), "lora_adapters": sorted({k for m in lora for k in m.lora_A}),
            "routed_layers": sum(isinstance(m, RoutedLinear) for m in model.modules())}


def build_one(setup: dict, what: str, bar, make):
    """make(), its seconds in setup[what] (untimed set-up)."""
    bar.set_postfix_str(f"set-up {what}")
    t0 = time.perf_counter()
    out = make()
    setup[what] = time.perf_counter() - t0
    return out


def build_variants(base, dirs: list[Path], seed: int, setup: dict, bar):
    """(peft-static on dirs[0], the seqr library of all dirs, a seqr-attached model), each model on its own deep
    copy of `base`; the seconds each took go to setup[what]."""
    from peft import PeftModel

    from seqr.hf.layers import attach

    static = build_one(setup, "peft-static", bar,
                       lambda: PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[0])).eval())
    lib = build_one(setup, "seqr-library", bar, lambda: seqr_library(dirs, seed))
    routed = lambda: attach(copy.deepcopy(base), lib, method="seqr", granularity="token")  # noqa: E731 (the paper's)
    return static, lib, build_one(setup, "seqr-attach", bar, routed)


# --- measuring ----------------------------------------------------------------------------------------------

def _numbers(times: list[float], first: float, warm: float | None, tokens: int) -> dict:
    med = statistics.median(times)
    return {"times_ms": [t * 1e3 for t in times], "runs": len(times), "first_call_ms": first * 1e3,
            "warmup_ms": None if warm is None else warm * 1e3, "median_ms": med * 1e3, "min_ms": min(times) * 1e3,
            "tokens_per_s": tokens / med}


def _wall(call) -> tuple[object, float]:
    """(what call() returns, its wall seconds): how one call is timed unless it times itself. A variant's first
    call, untimed, is one of these: its output feeds the checks; lazy set-up (peft's Arrow prototypes) runs in it."""
    t0 = time.perf_counter()
    out = call()
    return out, time.perf_counter() - t0


def time_interleaved(calls: dict, tokens: int, opts: dict, bar, clock=_wall) -> tuple[dict, dict]:
    """Each call's first call and warm-ups, then rounds of one timed call per variant, the order rotated every
    round: drift and bursts of other load fall on every variant alike, which blocks of repeats of one variant after
    another do not give on a shared machine. A variant whose warm-up exceeds budget / repeats joins fewer rounds
    (at least one). clock(call) -> (output, seconds) times one call (default: its wall time; a call that times
    only part of itself passes its own). Returns ({variant: numbers}, {variant: first call's output})."""
    names, outs, first, warm, runs = list(calls), {}, {}, {}, {}
    for v in names:
        bar.set_postfix_str(f"{v} first call + warm-up")
        outs[v], first[v] = clock(calls[v])
        warms = [clock(calls[v])[1] for _ in range(opts["warmup"])]
        warm[v] = warms[0] if warms else None
        budget = opts["budget_s"]
        runs[v] = max(1, min(opts["repeats"], int(budget // warm[v]))) if budget and warm[v] else opts["repeats"]
    times = {v: [] for v in names}
    for i in range(max(runs.values())):
        bar.set_postfix_str(f"round {i + 1} of {max(runs.values())}")
        for v in names[i % len(names):] + names[:i % len(names)]:
            if len(times[v]) < runs[v]:
                times[v].append(clock(calls[v])[1])
    return {v: _numbers(times[v], first[v], warm[v], tokens) for v in names}, outs


def add_ratios(results: dict, *refs: str) -> None:
    """Every variant's median / each reference variant's (same point, so same dtype): res["ratio_to_<ref>"]."""
    for ref in refs:
        med = results[ref]["median_ms"]
        for res in results.values():
            res[f"ratio_to_{ref.replace('-', '_')}"] = res["median_ms"] / med


def compare(a: torch.Tensor, b: torch.Tensor, tol: float | None = None, **extra) -> dict:
    """Max / mean |a - b| of two logit tensors (in fp32), the share of tokens whose top logit agrees, and `ok`
    against tol (None: reported only)."""
    d = (a.float() - b.float()).abs()
    out = {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
           "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()), "tol": tol, **extra}
    out["ok"] = None if tol is None else out["max_abs_diff"] <= tol
    return out


def model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def untouched_unchanged(base, now: torch.Tensor, before: torch.Tensor) -> dict:
    """The untouched model's logits after all variants are bit-identical to its first call's, and it holds no
    adapter layers."""
    c = compare(now, before, 0.0, what="untouched model after all variants")
    return dict(c, ok=c["ok"] and layout(base) == NO_ADAPTERS)


def dtype_ratios(points: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """Each variant's bf16 median / its fp32 median at the same `keys` (N, batch), where both were measured."""
    fp32 = {tuple(p[k] for k in keys): p for p in points if p["dtype"] == "float32"}
    out = []
    for p in points:
        if p["dtype"] == "bfloat16" and (q := fp32.get(tuple(p[k] for k in keys))):
            out += [{**{k: p[k] for k in keys}, "variant": v,
                     "bf16_over_fp32": r["median_ms"] / q["results"][v]["median_ms"]} for v, r in p["results"].items()]
    return out


# --- report pieces ------------------------------------------------------------------------------------------

def point_label(p: dict) -> str:
    return p["dtype"] + "".join(f" {k}={p[k]}" for k in ("N", "batch") if k in p)


def report_head(payload: dict, what: str, unit: str, table: tuple, variants: dict) -> list[str]:
    """The reports' common start: the machine, `what` was timed (one timed call is one `unit`), the dtypes, the
    results table (`table`: results_table's keys, unit and refs), the variants and their bf16 / fp32 times."""
    cfg, keys = payload["config"], table[0]
    budget = f", at most {cfg['budget_s']:g} s of timed {unit}s per variant" if cfg["budget_s"] else ""
    return [machine_line(payload["machine"]),
            f"{what}; rank-{cfg['rank']} adapters on {', '.join(TARGET_MODULES)} of every layer, one shared A; median "
            f"of `runs` timed {unit}s after {cfg['warmup']} warm-up{budget}", *dtype_lines(cfg), "",
            *results_table(payload["points"], *table), "",
            "variants: " + "; ".join(f"{v}: {d}" for v, d in variants.items()),
            *dtype_ratio_lines(payload["dtype_ratios"], keys)]


def dtype_lines(cfg: dict) -> list[str]:
    lines = [f"dtypes: {', '.join(cfg['dtypes'])} (each on the base model loaded in it; variants compared only "
             f"within a dtype; seqr's and peft's adapters run in fp32 under bf16)"]
    return lines + [cfg["dtype_note"]] if cfg.get("dtype_note") else lines


def results_table(points: list[dict], keys: tuple[str, ...], unit: str, refs: tuple[str, ...]) -> list[str]:
    """The Markdown table: a row per (dtype, keys..., variant); median and min of `unit` (ms, or ms/token read
    from median_ms_per_token), runs, tokens/s and the ratio to each reference variant of the same point."""
    suffix = "_per_token" if unit.endswith("/token") else ""
    head = ["dtype", *keys, "variant", f"median {unit}", f"min {unit}", "runs", "tokens/s", *(f"× {r}" for r in refs)]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(keys) + "---|" + "---:|" * (4 + len(refs))]
    for p in points:
        for v, r in p["results"].items():
            ratios = [ratio(r[f"ratio_to_{ref.replace('-', '_')}"]) for ref in refs]
            cells = [p["dtype"], *(str(p[k]) for k in keys), v, num(r[f"median_ms{suffix}"]),
                     num(r[f"min_ms{suffix}"]), str(r["runs"]), num(r["tokens_per_s"]), *ratios]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def dtype_ratio_lines(ratios: list[dict], keys: tuple[str, ...]) -> list[str]:
    groups = dict.fromkeys(tuple(r[k] for k in keys) for r in ratios)
    lines = ["", "bfloat16 / float32 median time, per variant:"] if groups else []
    for g in groups:
        cells = [f"{r['variant']} {ratio(r['bf16_over_fp32'])}" for r in ratios if tuple(r[k] for k in keys) == g]
        lines.append("  " + ", ".join(f"{k}={v}" for k, v in zip(keys, g)) + ": " + ", ".join(cells))
    return lines


def check_text(c: dict) -> str:
    """One check as text: what was compared, the numbers, the verdict."""
    if "median_abs_cos" in c:
        return (f"{c['what']}: median {c['median_abs_cos']:.3g}, min {c['min_abs_cos']:.3g}, "
                f"{c['share_above_0.99']:.1%} above 0.99 (reported only)")
    if "max_abs_diff" not in c:
        return f"{c['what']}: " + ("ok" if c["ok"] else f"FAILED: {c['unexpected']}")
    diff = (f"max |Δlogit| {c['max_abs_diff']:.3g}, mean {c['mean_abs_diff']:.3g}, "
            f"top-1 agree {c['top1_agreement']:.1%}")
    if "token_agreement" in c:
        diff += f", greedy tokens agree {c['token_agreement']:.1%}"
    if c["ok"] is None:
        verdict = "reported only"
    elif c["tol"] is None:
        verdict = "ok" if c["ok"] else "FAILED"
    else:
        verdict = f"≤ {c['tol']:.3g}: " + ("ok" if c["ok"] else "FAILED")
    return f"{c['what']}: {diff} ({verdict})"


def check_lines(points: list[dict]) -> list[str]:
    return [f"  {point_label(p)}: {check_text(c)}" for p in points for c in p["checks"].values()]


# --- the command line -------------------------------------------------------------------------------------

def _int_list(text: str) -> list[int]:
    try:
        vals = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        vals = []
    if not vals or vals[0] < 1:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}")
    return vals


def add_model_args(p: argparse.ArgumentParser, unit: str, adapters: str) -> None:
    """The options of `seqr bench forward` and `seqr bench generate`; one timed call is one `unit`."""
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or dir for seqr.load_model (default "
                   f"{DEFAULT_MODEL}; --quick uses a tiny random Llama)")
    p.add_argument("--adapters", type=_int_list, help=f"comma list of library sizes N (default {adapters})")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    add_dtypes_arg(p)
    p.add_argument("--repeats", type=int, default=5, help=f"timed {unit}s per variant (default 5)")
    p.add_argument("--warmup", type=int, default=1, help=f"untimed {unit}s per variant before timing (default 1), "
                   "after the first call that feeds the checks")
    p.add_argument("--budget-s", type=float, help=f"seconds per variant: a variant whose warm-up {unit} is slow gets "
                   f"fewer timed {unit}s, at least 1 (default 60; --quick 5; 0: no budget)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random adapters and inputs")
    p.add_argument("--json", type=Path, metavar="PATH", help="write every number to this JSON file")


def resolve_model_run(args: argparse.Namespace, parser: argparse.ArgumentParser, modes: dict,
                      positive: tuple[str, ...]) -> tuple[dict, dict]:
    """(the run's settings: each flag, else its default in modes["quick" or "full"], the dtypes resolved; the
    timing options). A bad value is a parser.error naming it."""
    try:
        run = _settings(args, modes["quick" if args.quick else "full"], positive)
    except ValueError as e:
        parser.error(str(e))
    return run, {"repeats": args.repeats, "warmup": args.warmup, "budget_s": run["budget_s"] or None}


def _settings(args: argparse.Namespace, defaults: dict, positive: tuple[str, ...]) -> dict:
    run = {a: v if (v := getattr(args, a)) is not None else d for a, d in defaults.items()}
    for name, value in [("rank", args.rank), *((k, run[k]) for k in positive), ("repeats", args.repeats),
                        ("threads", 1 if args.threads is None else args.threads)]:
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.warmup < 0 or not run["budget_s"] >= 0:
        raise ValueError(f"--warmup and --budget-s must be >= 0, got {args.warmup} and {run['budget_s']}")
    run["dtypes"], run["dtype_note"] = resolve_dtypes(args.dtypes)
    return run


def run_dtypes(args: argparse.Namespace, run: dict, prefix: str, measure) -> dict:
    """The dtype loop, under torch.no_grad(): per dtype, the base model loaded in it and measure(base, dirs) -> its
    points; the adapter dirs are written once (fp32, from the first model) to a temporary folder. Returns the
    payload: machine, config, setup_s, points, wall_s."""
    if args.threads:
        torch.set_num_threads(args.threads)
    info, t0, cpu0 = machine_info(), time.perf_counter(), cpu_snapshot()
    setup, points, dirs = {"model_load": {}, "param_dtypes": {}}, [], None
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp, torch.no_grad():
        for dt in run["dtypes"]:
            t1 = time.perf_counter()
            base, label = load_base(args.model, args.quick, args.seed, BY_NAME[dt])
            setup["model_load"][dt], n_layers = time.perf_counter() - t1, base.config.num_hidden_layers
            setup["param_dtypes"][dt] = sorted({dtype_name(t.dtype) for t in base.parameters()})
            if dirs is None:
                t1 = time.perf_counter()
                dirs = write_adapters(base, Path(tmp), max(run["adapters"]), args.rank, args.seed)
                setup["write_adapters"] = time.perf_counter() - t1
            points += measure(base, dirs)
            del base
            gc.collect()
    info["load_avg_1min_end"] = load_avg()
    info["other_cpu_share"] = other_cpu_share(cpu0, cpu_snapshot())
    info["contention_warning"] = contention_note(info)
    config = {"model": None if args.quick else args.model, "model_label": label, "quick": args.quick,
              "layers": n_layers, "rank": args.rank, "target_modules": list(TARGET_MODULES), "b_std": B_STD, **run,
              "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed}
    return {"machine": info, "config": config, "setup_s": setup, "points": points, "wall_s": time.perf_counter() - t0}


def finish(payload: dict, keys: tuple[str, ...], report, json_path: Path | None) -> int:
    """Add the bf16 / fp32 ratios at equal `keys`, print report(payload), write the JSON; 1 when a check failed."""
    s = payload["setup_s"]
    loads = ", ".join(f"{dt} {t:.3g} s" for dt, t in s["model_load"].items())
    payload["dtype_ratios"] = dtype_ratios(payload["points"], keys)
    print(report(payload))
    print(f"total wall time {payload['wall_s']:.1f} s (model load {loads}, writing "
          f"{max(payload['config']['adapters'])} adapters {s['write_adapters']:.3g} s)")
    if json_path:
        write_json(json_path, payload)
        print(f"wrote {json_path}")
    failed = [f"{point_label(p)}: {name}" for p in payload["points"] for name, c in p["checks"].items()
              if c["ok"] is False]
    if failed:
        print(f"CHECKS FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
