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

dtypes (`--dtypes`, shared with `seqr bench generate`): each dtype is a run of its own on the base model loaded
(with --quick: the tiny random Llama cast) in it, with the same adapter dirs; variants are compared only within a
dtype, and the report adds each variant's bf16 / fp32 time where both were measured. seqr's routed layers and
peft's LoRA both run the adapters in fp32 under a bf16 model. Under bf16, `seqr fixed vs peft-static` is judged
against BF16_FIXED_REL_TOL x the largest |logit| instead of FIXED_TOL (see the constant); the 'base' and untouched
checks stay exact in both dtypes. The model, the adapters, the timing loop and the dtype loop are bench_model's
(shared with `seqr bench generate`).
"""
from __future__ import annotations

import argparse
import copy
import gc
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from seqr.bench.common import ratio, contention_note, timed
from seqr.bench.model import (NO_ADAPTERS, TARGET_MODULES, _numbers, _wall, add_model_args, add_ratios, build_one,
                          build_variants, check_lines, compare, finish, layout, model_dtype, point_label, report_head,
                          resolve_model_run, run_dtypes, time_interleaved, untouched_unchanged)
from seqr.hf.dtypes import name as dtype_name

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
FIXED_TOL = 1e-4  # seqr fixed to one adapter vs peft-static, max |logit difference| (float32)
# The same under bf16, relative to the largest |logit| of peft-static: both add an fp32 update to the bf16 base output
# and round once, but their fp32 updates may differ in the last bits, so a value near a rounding boundary can land
# one bf16 ulp (2^-8 relative) apart, and that difference grows through the later layers. 0.05 is ~13 ulps of the
# largest logit. On the --quick model the two agree exactly in bf16, and the adapter itself moves the logits by
# ~0.7 of the largest (peft_static_changes_output); the real model's margin is not measured here.
BF16_FIXED_REL_TOL = 0.05
BASE_TOL = 1e-5  # seqr's 'base' method vs the untouched model (both dtypes: the same ops on the same weights)


def expected_layout(variant: str, n_layers: int, N: int) -> dict:
    adapted = n_layers * len(TARGET_MODULES)
    if variant == "peft-static":
        return {"lora_layers": adapted, "lora_adapters": ["default"], "routed_layers": 0}
    if variant == "peft-arrow":
        return {"lora_layers": adapted, "lora_adapters": sorted(["arrow_router"] + [f"task_{i}" for i in range(N)]),
                "routed_layers": 0}
    if variant in SEQR_METHODS:
        return {"lora_layers": 0, "lora_adapters": [], "routed_layers": adapted}
    return NO_ADAPTERS


# --- measuring ----------------------------------------------------------------------------------------------


def time_forward(call, tokens: int, opts: dict) -> tuple[dict, torch.Tensor]:
    """First call, then `timed` forwards (budget-trimmed). Returns (numbers, first call's logits)."""
    logits, first = _wall(call)
    times, warm = timed(call, opts["repeats"], opts["warmup"], opts["budget_s"])
    return _numbers(times, first, warm if opts["warmup"] else None, tokens), logits


def fixed_tol(dtype: torch.dtype, reference: torch.Tensor) -> float:
    """Max |logit difference| allowed between seqr fixed to one adapter and peft-static in this dtype."""
    return FIXED_TOL if dtype == torch.float32 else BF16_FIXED_REL_TOL * float(reference.float().abs().max())


def prototype_alignment(arrow_model, lib) -> dict:
    """|cos| between peft's Arrow prototypes (15 power-iteration steps) and the exact top right singular vectors
    that seqr's arrow routes with, over every (layer, adapter): why the two Arrows may route differently."""
    cos = []
    for name, mod in arrow_model.named_modules():
        arrow = mod.lora_arrow["arrow_router"] if "arrow_router" in getattr(mod, "lora_arrow", ()) else None
        layer = name.removeprefix("base_model.model.")
        if arrow is not None and getattr(arrow, "_protos_ready", False) and layer in lib.meta.layers:
            exact = lib.bank(layer).prototypes  # (N, n), unit rows
            cos.append(torch.nn.functional.cosine_similarity(arrow.prototypes.float(), exact, dim=-1).abs())
    c = torch.cat(cos) if cos else torch.empty(0)
    return {"what": "peft Arrow prototypes vs exact top singular vectors, |cos| over (layer, adapter)",
            "pairs": c.numel(), "median_abs_cos": float(c.median()) if c.numel() else None,
            "min_abs_cos": float(c.min()) if c.numel() else None,
            "share_above_0.99": float((c > 0.99).float().mean()) if c.numel() else None, "ok": None}


def measure_point(base, dirs: list[Path], ids: torch.Tensor, opts: dict, seed: int) -> dict:
    """Every variant for one N = len(dirs) in base's dtype: numbers, set-up seconds, layouts and the correctness
    checks. The fast variants are timed interleaved; peft's Arrow, many times slower, after them on its own."""
    from peft import ArrowConfig, create_arrow_model

    from seqr.hf.layers import routing

    N, tokens, dtype, n_layers = len(dirs), ids.numel(), model_dtype(base), base.config.num_hidden_layers
    setup, checks = {}, {}
    bar = tqdm(total=2, desc=f"{dtype_name(dtype)} N={N}", file=sys.stderr, leave=False)

    def routed(method=None, adapter=None):
        def call():
            with routing(seqr_model, method, adapter=adapter):
                return seqr_model(ids).logits
        return call

    static, lib, seqr_model = build_variants(base, dirs, seed, setup, bar)
    models = {"untouched": base, "peft-static": static, **dict.fromkeys(SEQR_METHODS, seqr_model)}
    layouts = {v: layout(m) for v, m in models.items()}
    calls = {"untouched": lambda: base(ids).logits, "peft-static": lambda: static(ids).logits,
             **{v: routed(method) for v, method in SEQR_METHODS.items()}}
    results, logits = time_interleaved(calls, tokens, opts, bar)
    bar.update()
    checks["seqr_fixed_vs_peft_static"] = compare(routed(adapter=lib.names[0])(), logits["peft-static"],
                                                  fixed_tol(dtype, logits["peft-static"]),
                                                  what=f"seqr fixed to {lib.names[0]} vs peft-static")
    checks["seqr_base_vs_untouched"] = compare(routed("base")(), logits["untouched"], BASE_TOL,
                                               what="seqr method 'base' vs untouched")
    static_effect = compare(logits["peft-static"], logits["untouched"], None, what="peft-static vs untouched")
    static_effect["ok"] = static_effect["max_abs_diff"] > 100 * FIXED_TOL  # the adapter really changes the output
    checks["peft_static_changes_output"] = static_effect
    del static, seqr_model, models, calls
    gc.collect()

    arrow_cfg = ArrowConfig(top_k=1, rng_seed=seed)  # seeded power iterations: reproducible prototypes
    arrow = build_one(setup, "peft-arrow", bar,
                      lambda: create_arrow_model(copy.deepcopy(base), [str(d) for d in dirs], arrow_cfg).eval())
    layouts["peft-arrow"] = layout(arrow)
    bar.set_postfix_str("peft-arrow")
    results["peft-arrow"], logits["peft-arrow"] = time_forward(lambda: arrow(ids).logits, tokens, opts)
    bar.update()
    checks["seqr_arrow_vs_peft_arrow"] = compare(logits["seqr-arrow"], logits["peft-arrow"], None,
                                                 what="seqr-arrow vs peft-arrow (top_k=1)")
    checks["peft_arrow_prototypes"] = prototype_alignment(arrow, lib)
    del arrow, lib
    gc.collect()
    checks["untouched_unchanged"] = untouched_unchanged(base, base(ids).logits, logits["untouched"])
    bad = {v: lay for v, lay in layouts.items() if lay != expected_layout(v, n_layers, N)}
    checks["isolation"] = {"what": "each variant holds only its own adapter layers", "ok": not bad, "unexpected": bad}
    bar.close()
    results = {v: results[v] for v in VARIANTS}
    add_ratios(results, "peft-static", "untouched")
    return {"dtype": dtype_name(dtype), "N": N, "results": results, "setup_s": setup, "layouts": layouts,
            "checks": checks}


def forward_targets(points: list[dict]) -> dict:
    """{dtype: the two speed targets at the largest N measured in that dtype}."""
    out = {}
    for dt in dict.fromkeys(p["dtype"] for p in points):
        p = max((q for q in points if q["dtype"] == dt), key=lambda q: q["N"])
        res = p["results"]
        static = res["seqr"]["median_ms"] / res["peft-static"]["median_ms"]
        arrow = res["peft-arrow"]["median_ms"] / res["seqr"]["median_ms"]
        out[dt] = {"N": p["N"],
                   "seqr_vs_peft_static": {"what": "SEQR's forward time / peft's single static adapter's",
                                           "ratio": static, "target": STATIC_TARGET, "met": static <= STATIC_TARGET},
                   "peft_arrow_vs_seqr": {"what": "peft Arrow's forward time / SEQR's", "ratio": arrow,
                                          "target": ARROW_TARGET, "met": arrow >= ARROW_TARGET}}
    return out


def forward_report(payload: dict) -> str:
    cfg, info, points = payload["config"], payload["machine"], payload["points"]
    what = (f"forward of {cfg['model_label']} ({cfg['layers']} layers): `model(input_ids).logits` on {cfg['batch']} "
            f"× {cfg['seq']} random tokens (seed {cfg['seed']}), torch.no_grad(); all but peft-arrow timed "
            f"interleaved (one forward of each per round, order rotated), peft-arrow after them")
    lines = report_head(payload, what, "forward", (("N",), "ms", ("peft-static", "untouched")), VARIANTS)
    lines += [""] + forward_setup_lines(points, cfg)
    lines += ["", f"checks (untimed, first call's logits; seqr fixed vs peft-static: ≤ {FIXED_TOL:g} in float32, "
              f"≤ {BF16_FIXED_REL_TOL:g} × the largest |logit| in bfloat16):", *check_lines(points), ""]
    for dt, t in payload["targets"].items():
        s, a = t["seqr_vs_peft_static"], t["peft_arrow_vs_seqr"]
        lines.append(f"targets, {dt} at N={t['N']}: SEQR within {s['target']:g}× of peft-static: "
                     f"{'met' if s['met'] else 'NOT met'} ({ratio(s['ratio'])}); peft Arrow ≥ {a['target']:g}× "
                     f"slower than SEQR: {'met' if a['met'] else 'NOT met'} ({ratio(a['ratio'])})")
    return "\n".join(lines + [note] if (note := contention_note(info)) else lines)


def forward_setup_lines(points: list[dict], cfg: dict) -> list[str]:
    lines = []
    for p in points:
        trimmed = [f"{v} {r['runs']} of {cfg['repeats']} (its warm-up call took {r['warmup_ms'] / 1e3:.3g} s)"
                   for v, r in p["results"].items() if r["runs"] < cfg["repeats"]]
        if trimmed:
            lines.append(f"time budget at {point_label(p)}: timed calls " + ", ".join(trimmed))
        s = p["setup_s"]
        lines.append(f"set-up at {point_label(p)} (untimed): peft-static load {s['peft-static']:.3g} s, peft-arrow "
                     f"load {s['peft-arrow']:.3g} s, seqr library (read, calibrate, QR + SVD) {s['seqr-library']:.3g} "
                     f"s, attach {s['seqr-attach']:.3g} s; first calls (untimed): " + ", ".join(
                         f"{v} {r['first_call_ms'] / 1e3:.3g} s" for v, r in p["results"].items()))
    return lines


# --- `seqr bench forward` -----------------------------------------------------------------------------------

def add_forward_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, "forward", "10,100; --quick 4,8")
    p.add_argument("--batch", type=int, help="sequences per forward (default 8; --quick 2)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default 128; --quick 16)")
    p.add_argument("--quick", action="store_true", help="tiny random Llama (hidden 64, 2 layers), N in {4, 8}, "
                   "batch 2 × 16: finishes in seconds")


def cmd_forward(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    run, opts = resolve_model_run(args, parser, MODE_DEFAULTS, ("batch", "seq"))

    def measure(base, dirs):
        ids = torch.randint(0, base.config.vocab_size, (run["batch"], run["seq"]),
                            generator=torch.Generator().manual_seed(args.seed))  # (B, S), the same in every dtype
        return [measure_point(base, dirs[:N], ids, opts, args.seed) for N in run["adapters"]]

    payload = run_dtypes(args, run, "seqr-bench-forward-", measure)
    payload["config"]["check_tolerances"] = {"seqr_fixed_vs_peft_static": {"float32": FIXED_TOL,
                                             "bfloat16": f"{BF16_FIXED_REL_TOL:g} × max |logit|"},
                                             "seqr_base_vs_untouched": BASE_TOL, "untouched_unchanged": 0.0}
    payload["targets"] = forward_targets(payload["points"])
    return finish(payload, ("N",), forward_report, args.json)
