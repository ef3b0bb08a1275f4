"""`seqr bench forward`: a whole model's forward pass with N routed adapters, beside peft.

For each N, on one batch of random tokens (fixed seed), under torch.no_grad(), `model(input_ids).logits` of:

  untouched     the model as loaded
  peft-static   peft with ONE static LoRA (`PeftModel.from_pretrained`): the speed reference
  peft-arrow    peft's Arrow over all N adapters (`create_arrow_model`, top_k=1)
  seqr, seqr-arrow, seqr-spectr
                `seqr.attach` of a library of the same N adapter dirs, routed with method seqr / arrow / spectr
                (calibrated with random per-layer NormStats, so the z-scoring is timed too)

The N rank-r adapters (q/k/v/o_proj of every layer) are standard peft dirs written once per run: one shared A per
layer drawn N(0, 1/r^2), random B per adapter. The N = 10 library is the first 10 adapters of the N = 100 one.
Every variant other than `untouched` runs on its own deep copy of the model, and its adapter layout is checked,
so none sees another's layers; the untouched model's logits are checked unchanged at the end of each N.
Cheap correctness checks (untimed, on the first call's logits): seqr fixed to one adapter equals peft-static,
seqr's 'base' method equals the untouched model, and seqr-arrow vs peft-arrow is reported with the alignment of
peft's prototypes to the exact top singular vectors (peft finds them with 15 power-iteration steps from a random
start, which random adapters need not converge in).

Timing: all variants but peft-arrow are timed interleaved, one forward of each per round, so that drift and bursts
of other load on a shared machine fall on all of them alike (blocks of one variant after another measured SEQR at
1.33x peft-static in one idle run where interleaved rounds gave 1.09x). peft-arrow, ~10x slower, is timed after
them with `timed`'s budget, which caps its repeats.
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
from tqdm import tqdm

from .bench import (_load, _num, _ratio, contention_note, cpu_snapshot, machine_info, machine_line, other_cpu_share, timed,
                    write_json)
from .files import PEFT_CONFIG, PEFT_WEIGHTS
from .stats import NormStats

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
DEFAULT_MODEL = "smollm2-135m-instruct"
# --quick: a tiny random Llama instead of the real model (seeded), in seconds
QUICK_LLAMA = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
# mode -> defaults of the options left unset
MODE_DEFAULTS = {
    "full": {"adapters": [10, 100], "batch": 8, "seq": 128, "budget_s": 60.0},
    "quick": {"adapters": [4, 8], "batch": 2, "seq": 16, "budget_s": 5.0},
}
VARIANTS = {  # name -> what is timed, in the order measured
    "untouched": "the model as loaded, no adapter",
    "peft-static": "peft, one static LoRA (PeftModel.from_pretrained)",
    "peft-arrow": "peft's Arrow over all N adapters (create_arrow_model, top_k=1)",
    "seqr": "seqr.attach, method 'seqr'",
    "seqr-arrow": "seqr.attach, method 'arrow'",
    "seqr-spectr": "seqr.attach, method 'spectr'",
}
SEQR_METHODS = {"seqr": "seqr", "seqr-arrow": "arrow", "seqr-spectr": "spectr"}
STATIC_TARGET = 1.15  # SEQR's routed forward at most this many times peft's single static adapter
ARROW_TARGET = 5.0  # peft's Arrow at least this many times slower than SEQR
B_STD = 0.02  # adapters' B ~ N(0, B_STD^2)
FIXED_TOL = 1e-4  # seqr fixed to one adapter vs peft-static, max |logit difference|
BASE_TOL = 1e-5  # seqr's 'base' method vs the untouched model


# --- the model and the adapters -----------------------------------------------------------------------------

def load_base(name: str, quick: bool, seed: int):
    """(model in eval mode, label): the tiny random Llama with --quick, else `seqr.models.load_model(name)`."""
    if quick:
        from transformers import LlamaConfig, LlamaForCausalLM
        with torch.random.fork_rng():  # seeded weights, the caller's global RNG left as it was
            torch.manual_seed(seed)
            model = LlamaForCausalLM(LlamaConfig(**QUICK_LLAMA)).eval()
        return model, "tiny random Llama (--quick)"
    from .models import load_model
    return load_model(name)[0].eval(), name


def write_adapters(base, root: Path, N: int, r: int, seed: int) -> list[Path]:
    """N standard peft adapter dirs under root: one peft-made template (shared A per layer ~ N(0, 1/r^2) from
    `seed`), then its safetensors rewritten with each adapter's own B ~ N(0, B_STD^2) (seed + 1 + i)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    from .library import natural_key

    template = root / "template"
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGET_MODULES),
                                                           init_lora_weights=False))
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
    from .library import LoraLibrary

    lib = LoraLibrary.from_peft(dirs)
    g = torch.Generator().manual_seed(seed)
    for name in lib.names:
        lib.set_stats(name, {layer: NormStats().update(torch.rand(16, generator=g) * 2 + 0.5) for layer in lib.layers})
    for layer in lib.layers:
        lib.bank(layer).prepare("arrow", "spectr")
    return lib


def layout(model) -> dict:
    """What adapter machinery a model holds: peft LoRA layers and adapter names, seqr routed layers."""
    from .layers import RoutedLinear

    lora = [m for m in model.modules() if hasattr(m, "lora_A")]
    return {"lora_layers": len(lora), "lora_adapters": sorted({k for m in lora for k in m.lora_A}),
            "routed_layers": sum(isinstance(m, RoutedLinear) for m in model.modules())}


def expected_layout(variant: str, n_layers: int, N: int) -> dict:
    adapted = n_layers * len(TARGET_MODULES)
    if variant == "peft-static":
        return {"lora_layers": adapted, "lora_adapters": ["default"], "routed_layers": 0}
    if variant == "peft-arrow":
        return {"lora_layers": adapted, "lora_adapters": sorted(["arrow_router"] + [f"task_{i}" for i in range(N)]),
                "routed_layers": 0}
    if variant in SEQR_METHODS:
        return {"lora_layers": 0, "lora_adapters": [], "routed_layers": adapted}
    return {"lora_layers": 0, "lora_adapters": [], "routed_layers": 0}


# --- measuring ----------------------------------------------------------------------------------------------

def _numbers(times: list[float], first: float, warm: float | None, tokens: int) -> dict:
    med = statistics.median(times)
    return {"times_ms": [t * 1e3 for t in times], "runs": len(times), "first_call_ms": first * 1e3,
            "warmup_ms": None if warm is None else warm * 1e3, "median_ms": med * 1e3, "min_ms": min(times) * 1e3,
            "tokens_per_s": tokens / med}


def _first_call(call) -> tuple[torch.Tensor, float]:
    """The untimed first call: its logits feed the checks; lazy set-up (peft's Arrow prototypes) happens here."""
    t0 = time.perf_counter()
    logits = call()  # (B, S, V)
    return logits, time.perf_counter() - t0


def time_forward(call, tokens: int, opts: dict) -> tuple[dict, torch.Tensor]:
    """First call, then `timed` forwards (budget-trimmed). Returns (numbers, first call's logits)."""
    logits, first = _first_call(call)
    times, warm = timed(call, opts["repeats"], opts["warmup"], opts["budget_s"])
    return _numbers(times, first, warm if opts["warmup"] else None, tokens), logits


def time_interleaved(calls: dict, tokens: int, opts: dict, bar) -> tuple[dict, dict]:
    """Each call's first call and warm-ups, then rounds of one `timed` forward per variant, the order rotated every
    round: drift and bursts of other load fall on every variant alike, which blocks of repeats of one variant after
    another do not give on a shared machine. A variant whose warm-up exceeds budget / repeats joins fewer rounds
    (at least one). Returns ({variant: numbers}, {variant: first call's logits})."""
    names, logits, first, warm, runs = list(calls), {}, {}, {}, {}
    for v in names:
        bar.set_postfix_str(f"{v} first call + warm-up")
        logits[v], first[v] = _first_call(calls[v])
        warm[v] = timed(calls[v], 0, opts["warmup"])[1] if opts["warmup"] else None
        budget = opts["budget_s"]
        runs[v] = max(1, min(opts["repeats"], int(budget // warm[v]))) if budget and warm[v] else opts["repeats"]
    times = {v: [] for v in names}
    for i in range(max(runs.values())):
        bar.set_postfix_str(f"round {i + 1} of {max(runs.values())}")
        for v in names[i % len(names):] + names[:i % len(names)]:
            if len(times[v]) < runs[v]:
                times[v] += timed(calls[v], 1, 0)[0]
    return {v: _numbers(times[v], first[v], warm[v], tokens) for v in names}, logits


def compare(a: torch.Tensor, b: torch.Tensor, tol: float | None = None, **extra) -> dict:
    """Max / mean |a - b| of two logit tensors, the share of tokens whose top logit agrees, and `ok` against tol
    (None: reported only)."""
    d = (a - b).abs()
    out = {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
           "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()), "tol": tol, **extra}
    out["ok"] = None if tol is None else out["max_abs_diff"] <= tol
    return out


def prototype_alignment(arrow_model, lib) -> dict:
    """|cos| between peft's Arrow prototypes (15 power-iteration steps) and the exact top right singular vectors
    that seqr's arrow routes with, over every (layer, adapter): why the two Arrows may route differently."""
    cos = []
    for name, mod in arrow_model.named_modules():
        arrow = mod.lora_arrow["arrow_router"] if "arrow_router" in getattr(mod, "lora_arrow", ()) else None
        layer = name.removeprefix("base_model.model.")
        if arrow is not None and getattr(arrow, "_protos_ready", False) and layer in lib.meta.layers:
            exact = lib.bank(layer)._prototypes  # (N, n), unit rows
            cos.append(torch.nn.functional.cosine_similarity(arrow.prototypes.float(), exact, dim=-1).abs())
    c = torch.cat(cos) if cos else torch.empty(0)
    return {"what": "peft Arrow prototypes vs exact top singular vectors, |cos| over (layer, adapter)",
            "pairs": c.numel(), "median_abs_cos": float(c.median()) if c.numel() else None,
            "min_abs_cos": float(c.min()) if c.numel() else None,
            "share_above_0.99": float((c > 0.99).float().mean()) if c.numel() else None, "ok": None}


def measure_point(base, dirs: list[Path], ids: torch.Tensor, opts: dict, seed: int, n_layers: int) -> dict:
    """Every variant for one N = len(dirs): numbers, set-up seconds, layouts and the correctness checks. The fast
    variants are timed interleaved (`time_interleaved`); peft's Arrow, many times slower, after them on its own."""
    from peft import ArrowConfig, PeftModel, create_arrow_model

    from .layers import attach, routing

    N, tokens = len(dirs), ids.numel()
    setup, checks = {}, {}
    bar = tqdm(total=2, desc=f"N={N}", file=sys.stderr, leave=False)

    def build(what: str, make):
        bar.set_postfix_str(f"set-up {what}")
        t0 = time.perf_counter()
        out = make()
        setup[what] = time.perf_counter() - t0
        return out

    def routed(method):
        def call():
            with routing(seqr_model, method):
                return seqr_model(ids).logits
        return call

    static = build("peft-static", lambda: PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[0])).eval())
    lib = build("seqr-library", lambda: seqr_library(dirs, seed))
    seqr_model = build("seqr-attach", lambda: attach(copy.deepcopy(base), lib, method="seqr"))
    models = {"untouched": base, "peft-static": static, **dict.fromkeys(SEQR_METHODS, seqr_model)}
    layouts = {v: layout(m) for v, m in models.items()}
    calls = {"untouched": lambda: base(ids).logits, "peft-static": lambda: static(ids).logits,
             **{v: routed(method) for v, method in SEQR_METHODS.items()}}
    results, logits = time_interleaved(calls, tokens, opts, bar)
    bar.update()
    checks["seqr_fixed_vs_peft_static"] = compare(routed(lib.names[0])(), logits["peft-static"], FIXED_TOL,
                                                  what=f"seqr fixed to {lib.names[0]} vs peft-static")
    checks["seqr_base_vs_untouched"] = compare(routed("base")(), logits["untouched"], BASE_TOL,
                                               what="seqr method 'base' vs untouched")
    static_effect = compare(logits["peft-static"], logits["untouched"], None, what="peft-static vs untouched")
    static_effect["ok"] = static_effect["max_abs_diff"] > 100 * FIXED_TOL  # the adapter really changes the output
    checks["peft_static_changes_output"] = static_effect
    del static, seqr_model, models, calls
    gc.collect()

    arrow_cfg = ArrowConfig(top_k=1, rng_seed=seed)  # seeded power iterations: reproducible prototypes
    arrow = build("peft-arrow", lambda: create_arrow_model(copy.deepcopy(base), [str(d) for d in dirs], arrow_cfg).eval())
    layouts["peft-arrow"] = layout(arrow)
    bar.set_postfix_str("peft-arrow")
    results["peft-arrow"], logits["peft-arrow"] = time_forward(lambda: arrow(ids).logits, tokens, opts)
    bar.update()
    checks["seqr_arrow_vs_peft_arrow"] = compare(logits["seqr-arrow"], logits["peft-arrow"], None,
                                                 what="seqr-arrow vs peft-arrow (top_k=1)")
    checks["peft_arrow_prototypes"] = prototype_alignment(arrow, lib)
    del arrow, lib
    gc.collect()
    unchanged = compare(base(ids).logits, logits["untouched"], 0.0, what="untouched model after all variants")
    checks["untouched_unchanged"] = dict(unchanged, ok=unchanged["ok"] and layout(base) == expected_layout("untouched", 0, 0))
    bad = {v: lay for v, lay in layouts.items() if lay != expected_layout(v, n_layers, N)}
    checks["isolation"] = {"what": "each variant holds only its own adapter layers", "ok": not bad, "unexpected": bad}
    bar.close()
    del logits
    results = {v: results[v] for v in VARIANTS}
    ref, plain = results["peft-static"]["median_ms"], results["untouched"]["median_ms"]
    for res in results.values():
        res["ratio_to_peft_static"] = res["median_ms"] / ref
        res["ratio_to_untouched"] = res["median_ms"] / plain
    return {"N": N, "results": results, "setup_s": setup, "layouts": layouts, "checks": checks}


def forward_targets(points: list[dict]) -> dict:
    """The two speed targets at the largest N measured."""
    p = max(points, key=lambda q: q["N"])
    res = p["results"]
    static = res["seqr"]["median_ms"] / res["peft-static"]["median_ms"]
    arrow = res["peft-arrow"]["median_ms"] / res["seqr"]["median_ms"]
    return {"N": p["N"],
            "seqr_vs_peft_static": {"what": "SEQR's forward time / peft's single static adapter's", "ratio": static,
                                    "target": STATIC_TARGET, "met": static <= STATIC_TARGET},
            "peft_arrow_vs_seqr": {"what": "peft Arrow's forward time / SEQR's", "ratio": arrow,
                                   "target": ARROW_TARGET, "met": arrow >= ARROW_TARGET}}


# --- report -------------------------------------------------------------------------------------------------

def forward_report(payload: dict) -> str:
    cfg, info, points = payload["config"], payload["machine"], payload["points"]
    budget = f", at most {cfg['budget_s']:g} s of timed calls per variant" if cfg["budget_s"] else ""
    lines = [machine_line(info),
             f"forward of {cfg['model_label']} ({cfg['layers']} layers): `model(input_ids).logits` on {cfg['batch']} × "
             f"{cfg['seq']} random tokens (seed {cfg['seed']}), torch.no_grad(); rank-{cfg['rank']} adapters on "
             f"{', '.join(TARGET_MODULES)} of every layer, one shared A; median of `runs` timed forwards after "
             f"{cfg['warmup']} warm-up{budget}; all but peft-arrow timed interleaved (one forward of each per round, "
             f"order rotated), peft-arrow after them", "",
             "| N | variant | median ms | min ms | runs | tokens/s | × peft-static | × untouched |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        for v, res in p["results"].items():
            lines.append(f"| {p['N']} | {v} | {_num(res['median_ms'])} | {_num(res['min_ms'])} | {res['runs']} | "
                         f"{_num(res['tokens_per_s'])} | {_ratio(res['ratio_to_peft_static'])} | "
                         f"{_ratio(res['ratio_to_untouched'])} |")
    lines += ["", "variants: " + "; ".join(f"{v}: {d}" for v, d in VARIANTS.items())]
    for p in points:
        trimmed = [f"{v} {r['runs']} of {cfg['repeats']} (its warm-up call took {r['warmup_ms'] / 1e3:.3g} s)"
                   for v, r in p["results"].items() if r["runs"] < cfg["repeats"]]
        if trimmed:
            lines.append(f"time budget at N={p['N']}: timed calls " + ", ".join(trimmed))
        s = p["setup_s"]
        lines.append(f"set-up at N={p['N']} (untimed): peft-static load {s['peft-static']:.3g} s, peft-arrow load "
                     f"{s['peft-arrow']:.3g} s, seqr library (read, calibrate, QR + SVD) {s['seqr-library']:.3g} s, "
                     f"attach {s['seqr-attach']:.3g} s; first calls (untimed): " + ", ".join(
                         f"{v} {r['first_call_ms'] / 1e3:.3g} s" for v, r in p["results"].items()))
    lines += ["", "checks (untimed, first call's logits):"]
    for p in points:
        for c in p["checks"].values():
            if "median_abs_cos" in c:
                lines.append(f"  N={p['N']}: {c['what']}: median {c['median_abs_cos']:.3g}, min {c['min_abs_cos']:.3g}, "
                             f"{c['share_above_0.99']:.1%} above 0.99 (reported only)")
                continue
            if "max_abs_diff" not in c:
                verdict = "ok" if c["ok"] else f"FAILED: {c['unexpected']}"
                lines.append(f"  N={p['N']}: {c['what']}: {verdict}")
                continue
            diff = f"max |Δlogit| {c['max_abs_diff']:.3g}, mean {c['mean_abs_diff']:.3g}, top-1 agree {c['top1_agreement']:.1%}"
            if c["ok"] is None:
                verdict = "reported only"
            elif c["tol"] is None:
                verdict = "ok" if c["ok"] else "FAILED"
            else:
                verdict = f"≤ {c['tol']:g}: " + ("ok" if c["ok"] else "FAILED")
            lines.append(f"  N={p['N']}: {c['what']}: {diff} ({verdict})")
    t = payload["targets"]
    s, a = t["seqr_vs_peft_static"], t["peft_arrow_vs_seqr"]
    lines += ["", f"targets at N={t['N']}: SEQR within {s['target']:g}× of peft-static: "
              f"{'met' if s['met'] else 'NOT met'} ({_ratio(s['ratio'])}); peft Arrow ≥ {a['target']:g}× slower than "
              f"SEQR: {'met' if a['met'] else 'NOT met'} ({_ratio(a['ratio'])})"]
    return "\n".join(lines + [note] if (note := contention_note(info)) else lines)


# --- `seqr bench forward` -----------------------------------------------------------------------------------

def _int_list(text: str) -> list[int]:
    try:
        vals = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        vals = []
    if not vals or vals[0] < 1:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}")
    return vals


def add_forward_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or dir for seqr.load_model (default "
                   f"{DEFAULT_MODEL}; --quick uses a tiny random Llama)")
    p.add_argument("--adapters", type=_int_list, help="comma list of library sizes N (default 10,100; --quick 4,8)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--batch", type=int, help="sequences per forward (default 8; --quick 2)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default 128; --quick 16)")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per variant (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards per variant before timing (default 1), "
                   "after the first call that feeds the checks")
    p.add_argument("--budget-s", type=float, help="seconds per variant: a variant whose warm-up forward is slow gets "
                   "fewer timed forwards, at least 1 (default 60; --quick 5; 0: no budget)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, metavar="PATH", help="write every number to this JSON file")
    p.add_argument("--quick", action="store_true", help="tiny random Llama (hidden 64, 2 layers), N in {4, 8}, "
                   "batch 2 × 16: finishes in seconds")


def resolve_forward(args: argparse.Namespace) -> dict:
    d = MODE_DEFAULTS["quick" if args.quick else "full"]
    run = {a: v if (v := getattr(args, a)) is not None else d[a] for a in d}
    for name, value in [("rank", args.rank), ("batch", run["batch"]), ("seq", run["seq"]), ("repeats", args.repeats),
                        ("threads", 1 if args.threads is None else args.threads)]:
        if value < 1:
            raise ValueError(f"--{name} must be positive, got {value}")
    if args.warmup < 0 or not run["budget_s"] >= 0:
        raise ValueError(f"--warmup and --budget-s must be >= 0, got {args.warmup} and {run['budget_s']}")
    return run


def cmd_forward(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        run = resolve_forward(args)
    except ValueError as e:
        parser.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    t0, cpu0 = time.perf_counter(), cpu_snapshot()
    base, label = load_base(args.model, args.quick, args.seed)
    n_layers = base.config.num_hidden_layers
    load_s = time.perf_counter() - t0
    ids = torch.randint(0, base.config.vocab_size, (run["batch"], run["seq"]),
                        generator=torch.Generator().manual_seed(args.seed))  # (B, S)
    opts = {"repeats": args.repeats, "warmup": args.warmup, "budget_s": run["budget_s"] or None}
    with tempfile.TemporaryDirectory(prefix="seqr-bench-forward-") as tmp, torch.no_grad():
        t1 = time.perf_counter()
        dirs = write_adapters(base, Path(tmp), max(run["adapters"]), args.rank, args.seed)
        write_s = time.perf_counter() - t1
        points = [measure_point(base, dirs[:N], ids, opts, args.seed, n_layers) for N in run["adapters"]]
    info["load_avg_1min_end"] = _load()
    info["other_cpu_share"] = other_cpu_share(cpu0, cpu_snapshot())
    info["contention_warning"] = contention_note(info)
    payload = {"machine": info, "config": {"model": None if args.quick else args.model, "model_label": label,
                                           "quick": args.quick, "layers": n_layers, "rank": args.rank,
                                           "target_modules": list(TARGET_MODULES), "b_std": B_STD, **run,
                                           "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed},
               "setup_s": {"model_load": load_s, "write_adapters": write_s}, "points": points,
               "targets": forward_targets(points), "wall_s": time.perf_counter() - t0}
    print(forward_report(payload))
    print(f"total wall time {payload['wall_s']:.1f} s (model load {load_s:.3g} s, writing {max(run['adapters'])} "
          f"adapters {write_s:.3g} s)")
    if args.json:
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    failed = [f"N={p['N']}: {name}" for p in points for name, c in p["checks"].items() if c["ok"] is False]
    if failed:
        print(f"CHECKS FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
