"""`seqr bench generate`: greedy decoding time per generated token with N routed adapters, beside peft.

For each dtype (--dtypes), library size N (--adapters) and batch size (--batch), under torch.no_grad(), on a
fixed random prompt of P tokens per row (seeded; batch 1's row is the first row of every larger batch). One timed
call of a variant: an untimed prefill of the prompt (use_cache=True), then G greedy decode steps, each feeding
every row's argmax token with the returned KV cache. Only the G steps are timed: ms/token = their time / G (one
token per row per step), tokens/s = batch × G / their time.

  untouched    the model as loaded
  peft-static  peft with ONE unmerged LoRA (`PeftModel.from_pretrained`)
  seqr-fixed   `seqr.attach` of the library of the N adapters, every token routed to the first adapter (the one
               peft-static loads)
  seqr         the same attached model routed by method 'seqr' over all N (calibrated like `bench forward`'s)

The adapters, the library and the model copies come from bench_model (shared with `seqr bench forward`). The
variants are timed interleaved (one call of each per round, order rotated) and compared within the same dtype and
batch. Checks (untimed, on each variant's first call): seqr-fixed's greedy tokens equal peft-static's in float32
(under bfloat16 reported only: the two round their fp32 updates into bf16 outputs that can differ by an ulp, which
can flip a near-tie argmax, and the continuations then part), and the untouched model's tokens and last logits are
bit-identical after all variants. --profile runs torch.profiler over one decode step of seqr (largest N, batch 1,
first dtype) and of the untouched model: the top ops by self CPU time and the op count per step.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time

import torch
from tqdm import tqdm

from seqr.bench.common import ratio, contention_note
from seqr.bench.model import (_int_list, add_model_args, add_ratios, build_variants, check_lines, compare, finish,
                          model_dtype, report_head, resolve_model_run, run_dtypes, time_interleaved,
                          untouched_unchanged)
from seqr.hf.dtypes import name as dtype_name

VARIANTS = {  # name -> what is timed, in the order measured
    "untouched": "the model as loaded, no adapter",
    "peft-static": "peft, one unmerged LoRA (PeftModel.from_pretrained)",
    "seqr-fixed": "seqr.attach of all N, every token routed to peft-static's adapter",
    "seqr": "seqr.attach, method 'seqr' over all N adapters",
}
# mode -> defaults of the options left unset
MODE_DEFAULTS = {
    "full": {"adapters": [100], "batch": [1, 8], "prompt": 32, "new_tokens": 16, "budget_s": 60.0},
    "quick": {"adapters": [4], "batch": [1, 2], "prompt": 8, "new_tokens": 4, "budget_s": 5.0},
}
TARGET = 1.2  # seqr's decode time per token at most this many times the untouched model's
PROFILE_ROWS = 25


# --- measuring ----------------------------------------------------------------------------------------------

def decode(model, ids: torch.Tensor, steps: int, cache_kw: str):
    """An untimed prefill of ids (B, P) with the KV cache on, then `steps` timed greedy decode steps. Returns
    ((tokens (B, steps + 1): the prefill's argmax, then each step's; the last step's logits (B, V)), the seconds
    of the decode steps)."""
    from seqr.hf.compat import returned_cache

    res = model(input_ids=ids, use_cache=True)
    tok = res.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    out = [tok]
    t0 = time.perf_counter()
    for _ in range(steps):
        res = model(input_ids=tok, use_cache=True, **{cache_kw: returned_cache(res)})
        tok = res.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        out.append(tok)
    seconds = time.perf_counter() - t0
    return (torch.cat(out, dim=1), res.logits[:, -1]), seconds  # (B, steps + 1), (B, V)


def _routed(model, how: dict | None):
    """seqr's routing context for a routed variant (routing's method= or adapter=); nothing for the others."""
    from seqr.hf.layers import routing

    return routing(model, **how) if how else contextlib.nullcontext()


def variant_calls(models: dict, ids: torch.Tensor, steps: int, cache_kw: str) -> dict:
    """{variant: call() -> ((tokens, last logits), decode seconds)} for models = {variant: (model, method)}."""
    def call(model, method):
        def run():
            with _routed(model, method):
                return decode(model, ids, steps, cache_kw)
        return run
    return {v: call(model, method) for v, (model, method) in models.items()}


def prompt_ids(vocab: int, batch: int, length: int, seed: int) -> torch.Tensor:
    """The fixed random prompt (batch, length): the same in every dtype; row b the same in every batch > b."""
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))  # (B, P)


def decode_checks(outs: dict, again, base, fixed: str) -> dict:
    """seqr-fixed vs peft-static (greedy tokens; the last step's logits reported), and the untouched model's tokens
    and logits after all variants (`again`: its output now) against its first call's."""
    (fixed_tok, fixed_logits), (static_tok, static_logits) = outs["seqr-fixed"], outs["peft-static"]
    same = compare(fixed_logits, static_logits, None, what=f"seqr-fixed ({fixed}) vs peft-static greedy tokens",
                   token_agreement=float((fixed_tok == static_tok).float().mean()))
    same["ok"] = bool(torch.equal(fixed_tok, static_tok)) if model_dtype(base) == torch.float32 else None
    effect = compare(static_logits, outs["untouched"][1], None, what="peft-static vs untouched",
                     token_agreement=float((static_tok == outs["untouched"][0]).float().mean()))
    unchanged = untouched_unchanged(base, again[1], outs["untouched"][1])
    unchanged["ok"] = unchanged["ok"] and torch.equal(again[0], outs["untouched"][0])
    unchanged["token_agreement"] = float((again[0] == outs["untouched"][0]).float().mean())
    return {"seqr_fixed_vs_peft_static": same, "peft_static_vs_untouched": effect, "untouched_unchanged": unchanged}


def measure_n(base, dirs: list, run: dict, opts: dict, seed: int, profile: bool) -> tuple[list[dict], dict | None]:
    """Every (batch, variant) for one N = len(dirs) in base's dtype, the models built once for all batches.
    Returns (one point per batch, the --profile result or None)."""
    from seqr.hf.compat import cache_kw as cache_kw_of, forward_params

    N, dtype, steps = len(dirs), model_dtype(base), run["new_tokens"]
    setup, points = {}, []
    bar = tqdm(total=len(run["batch"]), desc=f"{dtype_name(dtype)} N={N}", file=sys.stderr, leave=False)
    static, lib, seqr_model = build_variants(base, dirs, seed, setup, bar)
    models = {"untouched": (base, None), "peft-static": (static, None), "seqr-fixed": (seqr_model, {"adapter": lib.names[0]}),
              "seqr": (seqr_model, {"method": "seqr"})}
    cache_kw = cache_kw_of(forward_params(base))
    for batch in run["batch"]:
        calls = variant_calls(models, prompt_ids(base.config.vocab_size, batch, run["prompt"], seed), steps, cache_kw)
        results, outs = time_interleaved(calls, batch * steps, opts, bar, clock=lambda call: call())
        for res in results.values():
            res["median_ms_per_token"], res["min_ms_per_token"] = res["median_ms"] / steps, res["min_ms"] / steps
        add_ratios(results, "untouched", "peft-static")
        checks = decode_checks(outs, calls["untouched"]()[0], base, lib.names[0])
        points.append({"dtype": dtype_name(dtype), "N": N, "batch": batch, "results": results, "setup_s": setup,
                       "checks": checks})
        bar.update()
    prof = None
    if profile:
        bar.set_postfix_str("profile")
        prof = profile_step(models, prompt_ids(base.config.vocab_size, 1, run["prompt"], seed), cache_kw)
        prof.update(dtype=dtype_name(dtype), N=N, batch=1)
    bar.close()
    del static, lib, seqr_model, models
    gc.collect()
    return points, prof


def profile_step(models: dict, ids: torch.Tensor, cache_kw: str) -> dict:
    """torch.profiler (CPU) over one decode step of seqr and of the untouched model, each after a warm-up decode
    (prefill + one step) and a fresh prefill. Returns each one's op count and self CPU ms in the step, and seqr's
    top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    from seqr.hf.compat import returned_cache

    out = {}
    for v in ("seqr", "untouched"):
        model, method = models[v]
        with _routed(model, method):
            decode(model, ids, 1, cache_kw)  # warm-up
            res = model(input_ids=ids, use_cache=True)
            tok = res.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                model(input_ids=tok, use_cache=True, **{cache_kw: returned_cache(res)})
        events = prof.key_averages()
        out[v] = {"ops_per_step": sum(e.count for e in events),
                  "self_cpu_ms": sum(e.self_cpu_time_total for e in events) / 1e3}
        if v == "seqr":
            top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:PROFILE_ROWS]
            out["top_ops"] = [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3}
                              for e in top]
    return out


def generate_targets(points: list[dict]) -> dict:
    """seqr within TARGET × untouched at every (dtype, batch) measured, at the largest N."""
    N = max(p["N"] for p in points)
    rows = [{"dtype": p["dtype"], "batch": p["batch"], "ratio": p["results"]["seqr"]["ratio_to_untouched"]}
            for p in points if p["N"] == N]
    for r in rows:
        r["met"] = r["ratio"] <= TARGET
    return {"what": "seqr's decode time per token / the untouched model's, same dtype and batch", "N": N,
            "target": TARGET, "points": rows, "met": all(r["met"] for r in rows),
            "worst_ratio": max(r["ratio"] for r in rows)}


# --- report -------------------------------------------------------------------------------------------------

def generate_report(payload: dict) -> str:
    cfg, info, points = payload["config"], payload["machine"], payload["points"]
    what = (f"greedy decoding with {cfg['model_label']} ({cfg['layers']} layers), torch.no_grad(): per call a fixed "
            f"random prompt of {cfg['prompt']} tokens per row (seed {cfg['seed']}), an untimed prefill "
            f"(use_cache=True), then {cfg['new_tokens']} timed decode steps each feeding the argmax token and the KV "
            f"cache, ms/token = their time / {cfg['new_tokens']}; variants timed interleaved (one call of each per "
            f"round, order rotated)")
    lines = report_head(payload, what, "decode", (("N", "batch"), "ms/token", ("untouched", "peft-static")), VARIANTS)
    lines.append("")
    for p in points:
        if p["batch"] == cfg["batch"][0]:
            s = p["setup_s"]
            lines.append(f"set-up at {p['dtype']} N={p['N']} (untimed): peft-static load {s['peft-static']:.3g} s, "
                         f"seqr library (read, calibrate, QR + SVD) {s['seqr-library']:.3g} s, attach "
                         f"{s['seqr-attach']:.3g} s")
    lines += ["", "checks (untimed, each variant's first call): seqr-fixed's greedy tokens equal peft-static's in "
              "float32, reported only in bfloat16; the untouched model's tokens and last logits bit-identical after "
              "all variants:", *check_lines(points)]
    lines += profile_lines(payload.get("profile")) + ["", target_line(payload["targets"])]
    return "\n".join(lines + [note] if (note := contention_note(info)) else lines)


def profile_lines(prof: dict | None) -> list[str]:
    if not prof:
        return []
    s, u = prof["seqr"], prof["untouched"]
    more = s["ops_per_step"] / u["ops_per_step"]
    lines = ["", f"profile of one decode step ({prof['dtype']}, N={prof['N']}, batch 1; torch.profiler, every op "
             f"recorded, nested ones included): seqr {s['ops_per_step']} ops, {s['self_cpu_ms']:.3g} ms self CPU; "
             f"untouched {u['ops_per_step']} ops, {u['self_cpu_ms']:.3g} ms ({more:.3g}× the ops)", "",
             f"seqr's top {len(prof['top_ops'])} ops by self CPU time:", "",
             "| op | calls | self CPU ms | share |", "|---|---:|---:|---:|"]
    for op in prof["top_ops"]:
        share = op["self_cpu_ms"] / s["self_cpu_ms"]
        lines.append(f"| {op['op']} | {op['calls']} | {op['self_cpu_ms']:.3g} | {share:.1%} |")
    return lines


def target_line(t: dict) -> str:
    cells = ", ".join(f"{r['dtype']} batch {r['batch']} {ratio(r['ratio'])}" for r in t["points"])
    return (f"target at N={t['N']}: seqr within {t['target']:g}× of untouched at every (dtype, batch) measured: "
            f"{'met' if t['met'] else 'NOT met'} ({cells})")


# --- `seqr bench generate` ----------------------------------------------------------------------------------

def add_generate_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, "decode", "100; --quick 4")
    p.add_argument("--batch", type=_int_list, help="comma list of batch sizes (default 1,8; --quick 1,2)")
    p.add_argument("--prompt", type=int, help="prompt tokens per row P (default 32; --quick 8)")
    p.add_argument("--new-tokens", type=int, help="timed decode steps per call G (default 16; --quick 4)")
    p.add_argument("--profile", action="store_true", help="also profile one decode step of seqr (largest N, batch 1, "
                   f"first dtype) and of the untouched model: top {PROFILE_ROWS} ops by self CPU time, op counts")
    p.add_argument("--quick", action="store_true", help="tiny random Llama (hidden 64, 2 layers), N=4, batch 1,2, "
                   "P=8, G=4: finishes in seconds")


def cmd_generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    run, opts = resolve_model_run(args, parser, MODE_DEFAULTS, ("prompt", "new_tokens"))
    profiles = []

    def measure(base, dirs):
        points = []
        for N in run["adapters"]:
            want = args.profile and not profiles and N == max(run["adapters"])  # the first dtype's largest N
            pts, prof = measure_n(base, dirs[:N], run, opts, args.seed, want)
            points += pts
            profiles.extend([prof] if prof else [])
        return points

    payload = run_dtypes(args, run, "seqr-bench-generate-", measure)
    payload["config"]["timings"] = ("times_ms, median_ms, min_ms: the G timed decode steps of one call; "
                                    "*_per_token: those / G; tokens_per_s: batch × G / median")
    payload["profile"] = profiles[0] if profiles else None
    payload["targets"] = generate_targets(payload["points"])
    return finish(payload, ("N", "batch"), generate_report, args.json)
