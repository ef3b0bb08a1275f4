"""Issue 7's study: what makes norm-based routing pick the right silo on real data (SmolLM2-135M, ten tasks).

Runs SEQR over the ten-task shared-A library once per routing variant, on the same dev examples as the
ten-task evaluation (runs/eval-ten: its oracle, untouched, MU, ARROW, LAG, SPECTR and paper-default SEQR
passes are the reference), then writes one table per axis. Every variant is unsupervised: calibration
variants read only each silo's own training examples; nothing sees eval labels.

    SEQR_TASK_DATA=../shared/data/tasks python scripts/routing_study.py run   [--only NAME ...]
    python scripts/routing_study.py report  # docs/results/routing_study/{study.md,study.json,study.png}
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIB, ADAPTERS = ROOT / "runs/ten-task/library", ROOT / "runs/ten-task/adapters"
REFERENCE, OUT = ROOT / "runs/eval-ten", ROOT / "runs/routing-study"
CONFIRM, CONFIRM_N = ROOT / "runs/routing-study/confirm", 90  # fresh dev examples per task for the confirmation
CONFIRM_PASSES = (("paper", {}, ("oracle", "seqr")), ("granularity=layers", {"granularity": "layers"}, ("seqr",)),
                  ("paper", {}, ("arrow",)), ("granularity=depth", {"granularity": "depth"}, ("seqr",)))
AXIS4 = {"rank 8, 1 epoch, 96 examples (the ten-task adapters)": ROOT / "runs/adapter-axis/96ex-r8/eval",
         "rank 8, 1 epoch, 300 examples": ROOT / "runs/adapter-axis/300ex-r8/eval",
         "rank 32, 1 epoch, 96 examples": ROOT / "runs/adapter-axis/96ex-r32/eval",
         "rank 8, 2 epochs, 96 examples": ROOT / "runs/adapter-axis/96ex-r8-2ep/eval"}  # scripts/adapter_axis.sh
DOCS = ROOT / "docs/results/routing_study"
CALIB_SIZES = (15, 30, 60)  # calibration examples per silo (nested seeded subsets of its train split)

# name -> (axis, EvalConfig overrides, calibration set or None for the library's own stats)
VARIANTS = {
    "granularity=prompt": ("granularity", {"granularity": "prompt"}, None),
    "normalise=ratio": ("score", {"normalise": "ratio"}, None),
    "normalise=raw": ("score", {"normalise": "raw"}, None),
    "stats=pooled": ("calibration", {"pooled": True}, None),
    "tokens=prompt": ("calibration", {}, "prompt@60"),
    "tokens=answer": ("calibration", {}, "answer@60"),
    "tokens=content": ("calibration", {}, "content@60"),
    "examples=15": ("calibration", {}, "all@15"),
    "mix=3": ("granularity", {"mix": 3}, None),
    "examples=30": ("calibration", {}, "all@30"),
    "ratio+prompt": ("combined", {"score": "ratio", "granularity": "prompt"}, None),
    "normalise=percentile": ("score", {"normalise": "percentile"}, "all@60"),  # the library's stats plus their quantiles
    "granularity=prompt-vote": ("granularity", {"granularity": "prompt-vote"}, None),
    "granularity=layers": ("granularity", {"granularity": "layers"}, None),
    "granularity=depth": ("granularity", {"granularity": "depth"}, None),
}
PAPER = "SEQR, paper default (z, per layer, all tokens, per token)"
AXES = {"score": "Score normalisation", "calibration": "Calibration data", "granularity": "Granularity",
        "combined": "Combinations"}


def calibration_sets(model, tok, tasks: list[str], data_dir: str | None) -> dict:
    """{set label: {adapter: per-layer stats dicts}} for every token set at 60 examples and 'all' at each size;
    cached in OUT/calibration.json (each silo reads only its own train split)."""
    from seqr.store import files
    from seqr.silo.calibrate import TOKEN_SETS, norm_stats_sets
    from seqr.silo.tasks import load_task

    path = OUT / "calibration.json"
    if path.exists():
        cached = json.loads(path.read_text())
        if all("quantiles" in d for per in cached.values() for ad in per.values() for d in ad.values()):
            return cached  # else: made before calibration stored quantiles (the percentile score): redo
    sets = {f"{k}@60": (k, 60) for k in TOKEN_SETS} | {f"all@{n}": ("all", n) for n in CALIB_SIZES}
    out: dict = {k: {} for k in sets}
    for t in tasks:
        nested, seen = [], set()
        for n in CALIB_SIZES:  # order the largest subset so that its first n examples are the n-subset
            for ex in load_task(t, "train", data_dir=data_dir, max_examples=n, seed=0):
                if ex.id not in seen:
                    seen.add(ex.id)
                    nested.append(ex)
        stats, _ = norm_stats_sets(model, tok, ADAPTERS / t, nested, sets)
        for k in sets:
            out[k][t] = {layer: s.to_dict() for layer, s in stats[k].items()}
    files.atomic_write_json(path, out)
    return out


def run(only: list[str] | None, data_dir: str | None) -> None:
    from seqr import LoraLibrary, NormStats
    from seqr.store import files
    from seqr.eval.evaluate import EvalConfig, evaluate, load_data
    from seqr.hf.models import load_model

    ref = files.read_json(REFERENCE / files.EVAL_RESULTS, "the ten-task evaluation (run seqr eval first)")
    key = ref["config"]
    lib = LoraLibrary.load(LIB)
    model, tok = load_model(key["model"])
    data = load_data(key["tasks"], key["split"], data_dir=data_dir, max_eval=key["max_eval"], seed=key["seed"])
    calib = None
    for name, (_, overrides, cset) in VARIANTS.items():
        if only and name not in only:
            continue
        variant = lib
        if cset is not None:
            calib = calib or calibration_sets(model, tok, lib.names, data_dir)
            variant = lib.with_stats({n: {layer: NormStats.from_dict(d) for layer, d in calib[cset][n].items()}
                                      for n in lib.names})
        cfg = EvalConfig(tasks=key["tasks"], methods=("seqr",), split=key["split"], max_eval=key["max_eval"],
                         seed=key["seed"], scoring=key["scoring"], model=key["model"], noise=(), **overrides)
        print(f"routing study: {name}", file=sys.stderr, flush=True)
        evaluate(model, tok, {name: variant}, data, cfg, out_dir=OUT)


def confirm(data_dir: str | None) -> None:
    """The study picked its best variants on 600 examples; re-measure them (with oracle, paper SEQR and ARROW) on
    up to CONFIRM_N dev examples per task that the study never scored (a seeded subset of the rest)."""
    import random

    from seqr import LoraLibrary

    from seqr.store import files
    from seqr.eval.evaluate import EvalConfig, evaluate
    from seqr.hf.models import load_model
    from seqr.silo.tasks import load_task

    ref = files.read_json(REFERENCE / files.EVAL_RESULTS, "the ten-task evaluation (run seqr eval first)")
    key = ref["config"]
    used = {t: set(ref["examples"][t]["ids"]) for t in key["tasks"]}
    data = {}
    for t in key["tasks"]:
        rest = [ex for ex in load_task(t, key["split"], data_dir=data_dir) if ex.id not in used[t]]
        data[t] = random.Random(f"confirm-{t}").sample(rest, min(CONFIRM_N, len(rest)))
    lib = LoraLibrary.load(LIB)
    model, tok = load_model(key["model"])
    for name, overrides, methods in CONFIRM_PASSES:
        cfg = EvalConfig(tasks=key["tasks"], methods=methods, split=key["split"], max_eval=CONFIRM_N, seed=key["seed"],
                         scoring=key["scoring"], model=key["model"], noise=(), **overrides)
        print(f"routing study, confirmation: {name} {methods}", file=sys.stderr, flush=True)
        evaluate(model, tok, {name: lib}, data, cfg, out_dir=CONFIRM)


# ---------------------------------------------------------------------------------------------- report
def _norm_row(res: dict, oracle: dict, tasks: list[str]) -> dict:
    """Per task and on average: accuracy / oracle accuracy (percent)."""
    row = {t: 100 * res["tasks"][t]["acc"] / oracle["tasks"][t]["acc"] for t in tasks}
    row["avg"] = statistics.fmean(row[t] for t in tasks)
    return row


def _own_share(res: dict, tasks: list[str]) -> float | None:
    """Share of (token, layer) decisions routed to the input's own task adapter, averaged over tasks (percent)."""
    from seqr.eval.report import pass_own_share

    share = pass_own_share(res, tasks)
    return None if share is None else 100 * share


def report() -> None:
    from seqr.eval import report as er
    from seqr.store import files

    ref = files.read_json(REFERENCE / files.EVAL_RESULTS, "the ten-task evaluation")
    study = files.read_json(OUT / files.EVAL_RESULTS, "the routing study (run it first)")
    if study["config"]["data_key"] != ref["config"]["data_key"]:
        raise ValueError("the study and the reference evaluation used different examples")
    tasks = ref["config"]["tasks"]
    shared = next(e for e in ref["libraries"].values() if e["shared_a"])
    unique = next((e for e in ref["libraries"].values() if not e["shared_a"]), None)
    oracle = shared["methods"]["oracle"]
    if study["examples"] != ref["examples"]:
        raise ValueError("the study and the reference evaluation scored different examples")
    paper = shared["methods"]["seqr"]

    def versus(res: dict) -> tuple[int, int, float] | None:
        """(only this right, only paper SEQR right, sign-test p) over every example."""
        return None if res is paper else er.paired(ref, {"methods": {"x": res, "seqr": paper}}, "x", "seqr")

    rows: dict[str, tuple[str, dict, float | None, tuple | None]] = {}
    seqr_runs = {PAPER: paper}  # every SEQR configuration's raw results, for the conclusion
    for key, label in (("base", "untouched model"), ("mu", "MU"), ("arrow", "ARROW"), ("lag@3", "LAG (k=3)"),
                       ("spectr", "SPECTR"), ("seqr", PAPER)):
        res = ref["base"] if key == "base" else shared["methods"][key]
        rows[label] = ("reference", _norm_row(res, oracle, tasks), _own_share(res, tasks) if "counts" in
                       next(iter(res["tasks"].values())) else None, versus(res))
    if unique is not None:
        res = unique["methods"]["spectr"]
        rows["SPECTR, unique A (ordinary LoRA; normalised by its own oracle)"] = (
            "adapters", _norm_row(res, unique["methods"]["oracle"], tasks), _own_share(res, tasks), None)
    for name, (axis, overrides, _) in VARIANTS.items():
        e = study["libraries"].get(result_label(name, overrides))
        if e is not None and "seqr" in e["methods"]:
            res = e["methods"]["seqr"]
            rows[f"SEQR {name}"] = (axis, _norm_row(res, oracle, tasks), _own_share(res, tasks), versus(res))
            seqr_runs[f"SEQR {name}"] = res
    DOCS.mkdir(parents=True, exist_ok=True)
    files.atomic_write_json(DOCS / "study.json", {"tasks": tasks, "rows": {
        k: {"axis": a, "normalised": n, "own_share": o, "vs_paper_seqr": v} for k, (a, n, o, v) in rows.items()}})
    lines = ["# Routing study: what makes norm-based routing discriminative (SmolLM2-135M-Instruct, ten tasks)", "",
             f"Dev examples per task: {ref['config']['max_eval']}; accuracy is normalised by the oracle (the input's "
             "own task adapter) per task, then averaged. Own share: the percentage of (token, layer) decisions "
             "routed to the input's own task adapter (chance: 10%). vs paper: examples only this variant got right / "
             "only paper-default SEQR got right, and the two-sided exact sign-test p. Made by "
             "`python scripts/routing_study.py report`.", ""]
    lines += _table_lines(rows, tasks)
    arrow = shared["methods"]["arrow"]
    conclusion = _conclusion_lines(rows, seqr_runs, lambda res: er.paired(
        ref, {"methods": {"x": res, "arrow": arrow}}, "x", "arrow") if res is not arrow else None)
    lines += _axis4_lines() + _best_lines(rows) + conclusion + _confirm_lines()
    (DOCS / "study.md").write_text("\n".join(lines))
    (DOCS / "summary.md").write_text("\n".join(_summary_lines(rows)))
    _figure(rows, DOCS / "study.png")
    print((DOCS / "study.md").read_text())


def _table_lines(rows: dict, tasks: list[str]) -> list[str]:
    """One Markdown table per axis (the reference methods, each study axis, the adapters), paper SEQR atop each."""
    lines = []
    for axis in ("reference", *AXES, "adapters"):
        sel = {k: v for k, v in rows.items() if v[0] == axis}
        if not sel:
            continue
        title = {"reference": "Reference methods (runs/eval-ten)",
                 "adapters": "The adapters themselves"}.get(axis, AXES.get(axis))
        if axis != "reference":
            sel = {PAPER: rows[PAPER], **sel}
        lines += [f"## {title}", "", "| variant | avg | " + " | ".join(tasks) + " | own share | vs paper |",
                  "|---|---|" + "---|" * len(tasks) + "---|---|"]
        for k, (_, n, o, v) in sel.items():
            vs = "" if v is None else f"{v[0]} / {v[1]} (p={v[2]:.2f})"
            lines.append(f"| {k} | **{n['avg']:.1f}** | " + " | ".join(f"{n[t]:.1f}" for t in tasks)
                         + f" | {'' if o is None else f'{o:.1f}'} | {vs} |")
        lines.append("")
    return lines


def _figure(rows: dict, path: Path) -> None:
    """Every row's average accuracy / oracle as a bar (reference methods grey), paper SEQR dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1))
    names = list(rows)
    ax.barh(range(len(names)), [rows[k][1]["avg"] for k in names], color=["#888" if rows[k][0] == "reference" else
                                                                           "#3a7" for k in names])
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(rows[PAPER][1]["avg"], ls="--", lw=0.8, color="k", label="paper-default SEQR")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("average accuracy / oracle (%)")
    ax.set_xlim(min(rows[k][1]["avg"] for k in names) - 5, 105)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _axis4_lines() -> list[str]:
    """Three-task libraries (sst2, agnews, cola) of adapters trained with more data, rank or epochs: SEQR and
    ARROW normalised by the library's own oracle."""
    from seqr.store import files

    done = {k: files.read_json(d / files.EVAL_RESULTS, "adapter axis") for k, d in AXIS4.items()
            if (d / files.EVAL_RESULTS).exists()}
    if not done:
        return []
    tasks = next(iter(done.values()))["config"]["tasks"]
    lines = ["## The adapters themselves: data, rank, epochs (3 tasks, 3 adapters; chance own share 33%)", "",
             "Paper-default SEQR and ARROW on a library of only the sst2, agnews and cola adapters, normalised by that "
             "library's oracle; `bash scripts/adapter_axis.sh`.", "",
             "| adapters | SEQR avg (norm.) | " + " | ".join(tasks) + " | SEQR own share | per task ("
             + " / ".join(tasks) + ") | ARROW avg (norm.) | ARROW own share | oracle acc. |",
             "|---|---|" + "---|" * len(tasks) + "---|---|---|---|---|"]
    for k, doc in done.items():
        e = next(iter(doc["libraries"].values()))
        if not {"seqr", "oracle"} <= set(e["methods"]):
            continue
        oracle = e["methods"]["oracle"]
        n, o = _norm_row(e["methods"]["seqr"], oracle, tasks), _own_share(e["methods"]["seqr"], tasks)
        arrow = e["methods"].get("arrow")
        a = "" if arrow is None else f"{_norm_row(arrow, oracle, tasks)['avg']:.1f}"
        ao = "" if arrow is None else f"{_own_share(arrow, tasks):.1f}"
        oacc = statistics.fmean(oracle["tasks"][t]["acc"] for t in tasks)
        per = " / ".join(f"{_own_share(e['methods']['seqr'], [t]):.0f}" for t in tasks)
        lines.append(f"| {k} | **{n['avg']:.1f}** | " + " | ".join(f"{n[t]:.1f}" for t in tasks)
                     + f" | {o:.1f} | {per} | {a} | {ao} | {100 * oacc:.1f} |")
    return lines + [""]


def _best_lines(rows: dict) -> list[str]:
    """Per axis, the best SEQR variant and whether it beats paper-default SEQR significantly (p < 0.05)."""
    lines = ["## Best per axis (computed from the tables above)", ""]
    for axis, title in AXES.items():
        sel = {k: v for k, v in rows.items() if v[0] == axis}
        if not sel:
            continue
        sel[PAPER] = rows[PAPER]
        k, (_, n, o, v) = max(sel.items(), key=lambda kv: kv[1][1]["avg"])
        if v is None:
            lines.append(f"- {title}: the paper default is best ({n['avg']:.1f}); no variant beat it.")
            continue
        sig = v[0] > v[1] and v[2] < 0.05
        lines.append(f"- {title}: best {k} at {n['avg']:.1f} vs paper {rows[PAPER][1]['avg']:.1f} (own share "
                     f"{o:.1f}% vs {rows[PAPER][2]:.1f}%); {'significantly' if sig else 'not significantly'} better "
                     f"example by example ({v[0]} vs {v[1]} discordant examples, sign test p = {v[2]:.2f}).")
    return lines + [""]


def _confirm_lines() -> list[str]:
    """Oracle-normalised accuracy, own share and sign tests vs paper SEQR on the fresh confirmation examples."""
    from seqr.eval import report as er
    from seqr.store import files

    path = CONFIRM / files.EVAL_RESULTS
    if not path.exists():
        return []
    doc = files.read_json(path, "the confirmation run")
    paper = doc["libraries"].get("paper", {}).get("methods", {})
    if not {"oracle", "seqr"} <= set(paper):
        return []
    tasks, oracle = doc["config"]["tasks"], paper["oracle"]
    n = sum(len(doc["examples"][t]["ids"]) for t in tasks)
    runs = {"ARROW": paper.get("arrow"), PAPER: paper["seqr"]}
    for name, overrides, _ in CONFIRM_PASSES[1:]:
        e = doc["libraries"].get(result_label(name, overrides)) if overrides else None
        if e is not None and "seqr" in e["methods"]:
            runs[f"SEQR {name}"] = e["methods"]["seqr"]
    lines = [f"## Confirmation on fresh examples ({n} dev examples the study never scored)", "",
             "The study chose among many variants on the same 600 examples, so its best rows are biased upwards; "
             "these passes re-measure them on up to "
             f"{CONFIRM_N} other dev examples per task (`python scripts/routing_study.py confirm`).", "",
             "| method | avg (norm.) | " + " | ".join(tasks) + " | own share | vs paper SEQR |",
             "|---|---|" + "---|" * len(tasks) + "---|---|"]
    for k, res in runs.items():
        if res is None:
            continue
        row, own = _norm_row(res, oracle, tasks), _own_share(res, tasks)
        v = None if res is paper["seqr"] else er.paired(doc, {"methods": {"x": res, "seqr": paper["seqr"]}}, "x", "seqr")
        vs = "" if v is None else f"{v[0]} / {v[1]} (p={v[2]:.2f})"
        lines.append(f"| {k} | **{row['avg']:.1f}** | " + " | ".join(f"{row[t]:.1f}" for t in tasks)
                     + f" | {'' if own is None else f'{own:.1f}'} | {vs} |")
    oacc = 100 * sum(oracle["tasks"][t]["correct"] for t in tasks) / n
    return lines + ["", f"Oracle accuracy over these examples: {oacc:.1f}%.", ""]


def _summary_lines(rows: dict) -> list[str]:
    """One compact table (ARROW, paper SEQR, every SEQR variant by axis) for the README."""
    keep = ["ARROW", PAPER] + [k for axis in AXES for k, v in rows.items() if v[0] == axis]
    out = ["| variant (SEQR unless named) | axis | normalised acc. | own-adapter share | vs paper SEQR (only this / "
           "only paper, p) |", "|---|---|---:|---:|---|"]
    for k in keep:
        axis, n, o, v = rows[k]
        name = "**paper default**: z-score, per-layer μ σ, all tokens, per token" if k == PAPER else k.removeprefix("SEQR ")
        vs = "" if v is None else f"{v[0]} / {v[1]}, p = {v[2]:.2f}"
        out.append(f"| {name} | {AXES.get(axis, '')} | {n['avg']:.1f} | {'' if o is None else f'{o:.1f}%'} | {vs} |")
    return out + [""]


def _conclusion_lines(rows: dict, seqr_runs: dict, versus_arrow) -> list[str]:
    """The best SEQR configuration overall, against paper-default SEQR and against ARROW (exact sign tests)."""
    best = max(seqr_runs, key=lambda k: rows[k][1]["avg"])
    _, n, own, vp = rows[best]
    va = versus_arrow(seqr_runs[best])
    arrow = rows["ARROW"][1]["avg"]
    lines = ["## Conclusion (computed)", "",
             f"- Best SEQR configuration by average normalised accuracy: **{best}** at {n['avg']:.1f} "
             f"(own share {own:.1f}%)."]
    if vp is not None:
        lines.append(f"- Against paper-default SEQR ({rows[PAPER][1]['avg']:.1f}): {vp[0]} vs {vp[1]} discordant "
                     f"examples, p = {vp[2]:.2f}: {'significant' if vp[2] < 0.05 else 'not significant'}.")
    lines.append(f"- Against ARROW ({arrow:.1f}): {va[0]} vs {va[1]} discordant examples, p = {va[2]:.2f}: "
                 f"{'significant' if va[2] < 0.05 else 'not significant'}.")
    return lines + [""]


def result_label(name: str, overrides: dict) -> str:
    """The results label evaluate() gives a variant: its name, plus the EvalConfig variant tag if any."""
    from seqr.eval.evaluate import EvalConfig

    tag = EvalConfig(tasks=["_"], **overrides).variant()
    return f"{name} [{tag}]" if tag else name


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("run", "confirm", "report"))
    p.add_argument("--only", nargs="+", choices=list(VARIANTS))
    p.add_argument("--data", help="task dir (default $SEQR_TASK_DATA)")
    a = p.parse_args()
    if a.what == "run":
        run(a.only, a.data)
    elif a.what == "confirm":
        confirm(a.data)
    else:
        report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
