"""`seqr bench granularity`: what each routing granularity costs per prompt position (prefill) and per generated
token (decode), side by side with the untouched model, the fixed-adapter path and the paper's per-token SEQR.

One call of a mode, under torch.no_grad(): a timed prefill of a fixed random prompt (B rows of P tokens, KV cache
on), then G timed greedy decode steps feeding each row's argmax token and the cache. prefill ms / position = the
prefill's time / P; decode ms / token = the steps' time / G (one token per row per step). Modes are timed
interleaved (one call of each per round, the order rotated) and compared within the same batch: their medians over
the untouched model's and over per-token SEQR's. The library is a committed one (--library, e.g. the paper-budget
library, whose calibrated stats route as in the evaluation) or N random adapters with random stats.

Checks (untimed, each request-level mode's first call): each row used one adapter in every layer and step, and
its greedy tokens equal the fixed-adapter path's with that row's adapter; the untouched model's tokens are the same
after all modes.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from seqr.bench.common import contention_note, cpu_snapshot, machine_info, machine_line, num, other_cpu_share, ratio
from seqr.bench.common import write_json
from seqr.bench.model import DEFAULT_MODEL, _int_list, load_base, seqr_library, write_adapters
from seqr.hf.granularity import REQUEST_PROBED
from seqr.store.files import atomic_write_bytes

# mode -> routing(...) keywords (None: the untouched model; "adapter" filled with the library's first adapter)
MODES = {
    "untouched": None,
    "fixed": {"adapter": None},
    "token": {"method": "seqr", "granularity": "token"},
    "depth": {"method": "seqr", "granularity": "depth"},
    "prompt": {"method": "seqr", "granularity": "prompt"},
    "layers": {"method": "seqr", "granularity": "layers"},
    "layers@0.5": {"method": "seqr", "granularity": "layers", "probe_depth": 0.5},
    "request": {"method": "seqr", "granularity": "request"},
    "request@0.5": {"method": "seqr", "granularity": "request", "probe_depth": 0.5},
    "request-reuse": {"method": "seqr", "granularity": "request-reuse"},
    "request-vote": {"method": "seqr", "granularity": "request-vote"},
}
ABOUT = {"untouched": "the model without adapters", "fixed": "every token through the library's first adapter",
         "token": "seqr per token and layer (the paper)", "depth": "per token and layer, scores summed over the "
         "layers so far", "prompt": "per row and layer, chosen at prefill", "layers": "per token for all layers, "
         "a probe forward first (every forward)", "request": "per row for all layers and tokens, a probe prefill "
         "first", "request-reuse": "per row for the generated tokens, chosen inside the one prefill (routed per "
         "token)", "request-vote": "request with the row's adapter voted by its prompt tokens (SEQR's default)",
         "@0.5": "the probe sums the first half of the routed layers and stops there"}
DEFAULTS = {"full": {"batch": [1, 8], "prompt": 64, "new_tokens": 16, "adapters": 10},
            "quick": {"batch": [1, 2], "prompt": 8, "new_tokens": 4, "adapters": 4}}


def one_call(model, how: dict | None, ids: torch.Tensor, steps: int, trace: bool = False):
    """((greedy tokens (B, steps + 1), the trace or None), (prefill seconds, decode seconds)) of one call."""
    from seqr.hf.compat import cache_kw, forward_params, returned_cache
    from seqr.hf.layers import routing

    kw = cache_kw(forward_params(model))
    ctx = routing(model, **how, trace="choices" if trace else False) if how else contextlib.nullcontext()
    with ctx as tr:
        t0 = time.perf_counter()
        res = model(input_ids=ids, use_cache=True)
        tok = res.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        t1 = time.perf_counter()
        out = [tok]
        for _ in range(steps):
            res = model(input_ids=tok, use_cache=True, **{kw: returned_cache(res)})
            tok = res.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            out.append(tok)
        t2 = time.perf_counter()
    return (torch.cat(out, 1), tr), (t1 - t0, t2 - t1)


def time_modes(calls: dict, repeats: int, warmup: int, bar) -> dict:
    """{mode: {"prefill_s": [...], "decode_s": [...]}}: each mode's warm-ups, then `repeats` rounds of one timed
    call per mode, the order rotated every round."""
    names = list(calls)
    for v in names:
        for _ in range(warmup):
            calls[v]()
    times = {v: {"prefill_s": [], "decode_s": []} for v in names}
    for i in range(repeats):
        bar.set_postfix_str(f"round {i + 1} of {repeats}")
        for v in names[i % len(names):] + names[:i % len(names)]:
            pf, dc = calls[v]()[1]
            times[v]["prefill_s"].append(pf)
            times[v]["decode_s"].append(dc)
    return times


def request_checks(model, modes: dict, ids: torch.Tensor, steps: int, names: list[str], base_tokens) -> dict:
    """Each request-level mode: one adapter per row in every layer and step, and its tokens equal the fixed path's
    with those adapters."""
    out = {}
    for mode, how in modes.items():
        if not how or how.get("granularity") not in REQUEST_PROBED:
            continue
        (tokens, tr), _ = one_call(model, how, ids, steps, trace=True)
        used = [tr.counts(row=b) for b in range(ids.shape[0])]
        rows = [next(iter(u)) if len(u) == 1 else None for u in used]
        same = None not in rows and torch.equal(tokens, one_call(model, {"adapter": rows}, ids, steps)[0][0])
        out[mode] = {"adapters": rows, "one_adapter_per_row": None not in rows, "tokens_equal_fixed": same,
                     "ok": same}
    return out


def measure(model, base, lib, run: dict, opts: dict, seed: int) -> list[dict]:
    modes = {m: ({"adapter": lib.names[0]} if how == {"adapter": None} else how) for m, how in MODES.items()
             if m in run["modes"]}
    points = []
    bar = tqdm(run["batch"], desc="batches", file=sys.stderr, leave=False)
    for B in bar:
        ids = torch.randint(0, model.config.vocab_size, (B, run["prompt"]),
                            generator=torch.Generator().manual_seed(seed))  # (B, P)
        first = one_call(base, None, ids, run["new_tokens"])[0][0]
        calls = {m: (lambda how=how, mdl=(base if how is None else model): one_call(mdl, how, ids, run["new_tokens"]))
                 for m, how in modes.items()}
        times = time_modes(calls, opts["repeats"], opts["warmup"], bar)
        res = {m: {"prefill_ms_per_position": 1e3 * statistics.median(t["prefill_s"]) / run["prompt"],
                   "decode_ms_per_token": 1e3 * statistics.median(t["decode_s"]) / run["new_tokens"],
                   "runs": len(t["prefill_s"]), "times_s": t} for m, t in times.items()}
        for ref in ("untouched", "token"):
            if ref in res:
                for r in res.values():
                    for what in ("prefill_ms_per_position", "decode_ms_per_token"):
                        r[f"{what.split('_')[0]}_over_{ref}"] = r[what] / res[ref][what]
        checks = request_checks(model, modes, ids, run["new_tokens"], lib.names, first)
        again = one_call(base, None, ids, run["new_tokens"])[0][0]
        checks["untouched_unchanged"] = {"ok": bool(torch.equal(first, again))}
        points.append({"batch": B, "results": res, "checks": checks})
    return points


def report(payload: dict) -> str:
    cfg = payload["config"]
    lines = ["# What each routing granularity costs", "", machine_line(payload["machine"]),
             f"{cfg['model_label']}, library {cfg['library']} ({cfg['adapters']} adapters), float32, prompt "
             f"{cfg['prompt']} tokens per row, {cfg['new_tokens']} decode steps; median of {cfg['repeats']} "
             f"interleaved rounds after {cfg['warmup']} warm-up", ""]
    head = "| batch | mode | prefill ms / position | × untouched | × token | decode ms / token | × untouched | × token |"
    lines += [head, "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for p in payload["points"]:
        for m, r in p["results"].items():
            lines.append(f"| {p['batch']} | {m} | {num(r['prefill_ms_per_position'])} | "
                         f"{ratio(r.get('prefill_over_untouched'))} | {ratio(r.get('prefill_over_token'))} | "
                         f"{num(r['decode_ms_per_token'])} | {ratio(r.get('decode_over_untouched'))} | "
                         f"{ratio(r.get('decode_over_token'))} |")
    lines += ["", "modes: " + "; ".join(f"{m}: {d}" for m, d in ABOUT.items()), "",
              "checks (untimed): " + "; ".join(f"batch {p['batch']} {k} {'ok' if c['ok'] else 'FAILED'}"
                                               for p in payload["points"] for k, c in p["checks"].items())]
    note = contention_note(payload["machine"])
    return "\n".join(lines + ([note] if note else []))


def figure(payload: dict, out: Path) -> str:
    from seqr.eval.plots import pyplot, save_png

    plt, pts = pyplot(), payload["points"]
    modes = [m for m in pts[0]["results"] if m != "untouched"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    width = 0.8 / len(pts)
    for ax, what in zip(axes, ("prefill", "decode")):
        for j, p in enumerate(pts):
            xs = [i + (j - (len(pts) - 1) / 2) * width for i in range(len(modes))]
            ax.bar(xs, [p["results"][m][f"{what}_over_untouched"] for m in modes], width, label=f"batch {p['batch']}")
        ax.axhline(1, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(modes)), modes, rotation=30)
        ax.set_title(f"{what}: time / the untouched model's")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{payload['config']['model_label']}, {payload['config']['adapters']} adapters: cost of each "
                 "routing granularity", fontsize=10)
    fig.tight_layout()
    return save_png(fig, out, "granularity_costs.png")


# --- `seqr bench granularity` -------------------------------------------------------------------------------

def _modes(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in MODES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {bad or text!r}; expected a comma list of {list(MODES)}")
    return [m for m in MODES if m in names]


def add_granularity_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"base model (default {DEFAULT_MODEL}; --quick: a tiny "
                   "random Llama)")
    p.add_argument("--library", type=Path, help="a library dir to route over (e.g. artifacts/paper-library); "
                   "default: --adapters random adapters with random stats")
    p.add_argument("--adapters", type=int, help="random adapters when no --library (default 10; --quick 4)")
    p.add_argument("--rank", type=int, default=8, help="rank of the random adapters (default 8)")
    p.add_argument("--modes", type=_modes, default=list(MODES), help=f"comma list of {', '.join(MODES)} (default all)")
    p.add_argument("--batch", type=_int_list, help="comma list of batch sizes (default 1,8; --quick 1,2)")
    p.add_argument("--prompt", type=int, help="prompt tokens per row (default 64; --quick 8)")
    p.add_argument("--new-tokens", type=int, help="timed decode steps per call (default 16; --quick 4)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per mode first (default 1)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt and the random adapters")
    p.add_argument("--out", type=Path, help="write granularity_costs.json, .md and .png here")
    p.add_argument("--quick", action="store_true", help="tiny random Llama, 4 adapters, batch 1,2: seconds")


def _run(a, parser) -> dict:
    run = {k: v if (v := getattr(a, k, None)) is not None else d for k, d in DEFAULTS["quick" if a.quick else
                                                                                   "full"].items()}
    bad = {k: run[k] for k in ("prompt", "new_tokens", "adapters") if run[k] < 1}
    bad |= {k: v for k, v in (("rank", a.rank), ("repeats", a.repeats)) if v < 1}
    if bad or a.warmup < 0:
        parser.error(f"these must be positive (--warmup >= 0): {bad or {'warmup': a.warmup}}")
    return {**run, "modes": a.modes}


def cmd_granularity(a, parser) -> int:
    from seqr.hf.layers import attach
    from seqr.store.library import LoraLibrary

    run = _run(a, parser)
    if a.threads:
        torch.set_num_threads(a.threads)
    info, cpu0, t0 = machine_info(), cpu_snapshot(), time.perf_counter()
    base, label = load_base(a.model, a.quick, a.seed)
    with tempfile.TemporaryDirectory(prefix="seqr-bench-granularity-") as tmp, torch.no_grad():
        if a.library is not None:
            try:
                lib = LoraLibrary.load(a.library)
            except (OSError, ValueError) as e:
                parser.error(f"--library {a.library}: {e}")
        else:
            lib = seqr_library(write_adapters(base, Path(tmp), run["adapters"], a.rank, a.seed), a.seed)
        run["adapters"] = len(lib)
        try:
            model = attach(copy.deepcopy(base), lib, method="seqr", granularity="token")
        except ValueError as e:
            parser.error(f"--library {a.library}: {str(e).splitlines()[0]}")
        points = measure(model, base, lib, run, {"repeats": a.repeats, "warmup": a.warmup}, a.seed)
    info["other_cpu_share"] = other_cpu_share(cpu0, cpu_snapshot())
    payload = {"machine": info, "config": {**run, "model_label": label, "library": str(a.library or "random"),
                                           "repeats": a.repeats, "warmup": a.warmup, "seed": a.seed},
               "points": points, "wall_s": time.perf_counter() - t0}
    text = report(payload)
    print(text)
    if a.out:
        write_json(a.out / "granularity_costs.json", payload)
        atomic_write_bytes(a.out / "granularity_costs.md", (text + "\n").encode())
        print(f"wrote {a.out}/granularity_costs.{{json,md,png}} ({figure(payload, a.out)})")
    failed = [f"batch {p['batch']} {k}" for p in payload["points"] for k, c in p["checks"].items() if not c["ok"]]
    if failed:
        print(f"CHECKS FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
