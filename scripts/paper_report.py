"""The paper-budget library's report (issue 28, items 4-6): docs/results/paper_library/report.md, summary.json and
the figures, from the committed stage documents (scripts/paper_eval.py), whichever of them exist so far.

Usage: python scripts/paper_report.py [--out docs/results/paper_library]
Sections: did each adapter learn (own adapter vs the untouched model per task, exact sign tests); the full-dev
comparison (Tables 3-4, Figures 3-4, SEQR against every method: main/report.md); exactness (spectr and naive
decide as seqr does); SEQR under noise on mu (Figure 6: the noise passes of the steps stage's final library);
routability vs training (step-12, step-50, final); SEQR's routing variants against every main method, and the
one-decision modes task by task; shared against unique A (Table 2) and the routers on ordinary LoRA; the
one-decision modes against every method on the step-50 snapshot (the checkpoint stage).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from seqr.eval import plots, study
from seqr.eval.evaluate import EvalConfig
from seqr.hf import granularity
from seqr.eval import report as er
from seqr.store import files

OUT = Path("docs/results/paper_library")
LABEL = "shared-0"
UNIQUE_LABEL = "unique-0"
# one adapter per request (by summed scores, by the tokens' votes) / per token for all layers
ONE_DECISION = ("granularity=request", "granularity=request-vote", "granularity=layers")


def load(out: Path, stage: str) -> dict | None:
    f = out / stage / files.EVAL_RESULTS
    return files.read_json(f, f"{stage} results") if f.exists() else None


def _table(header: list[str], rows: list[list]) -> list[str]:
    return er._table(header, [[str(c) for c in r] for r in rows]) + [""]


def learned_lines(doc: dict) -> tuple[list[str], dict]:
    res = study.learned(doc, LABEL)
    rows = [[t, f"{100 * r['base']:.1f}", f"{100 * r['oracle']:.1f}", r["only_oracle"], r["only_base"],
             f"{r['p']:.2g}", "yes" if r["learned"] else "no"] for t, r in res["tasks"].items()]
    n = len(res["tasks"])
    return (["## Did each adapter learn its task? (item 4; full dev splits)", "",
             f"Own adapter (the oracle) against the untouched model, example by example: **{res['learned']} of {n} "
             f"tasks** improve with exact sign-test p < {res['alpha']:g} (target: at least 8), and the oracle's mean "
             f"accuracy is **{res['points']:+.1f} points** over the untouched model's (target: at least +15).", ""]
            + _table(["task", "untouched %", "own adapter %", "only own right", "only untouched right", "sign-test p",
                      "learned"], rows), res)


def tried_lines(learned: dict, training: dict | None) -> list[str]:
    """What was tried for each task whose own adapter did not learn (item 4): its learning-rate sweep against the
    untouched model, the chosen rate, and where the training loss started and ended (training.json)."""
    runs = {r["task"]: r for r in (training or {}).get("tasks", [])}
    stuck = [t for t, r in learned["tasks"].items() if not r["learned"] and t in runs]
    rows = []
    for t in stuck:
        sweep, run = runs[t]["sweep"], runs[t]["run"]
        rates = ", ".join(f"{float(k):g}: {100 * v:.0f}" for k, v in sorted(sweep["rates"].items(),
                                                                          key=lambda kv: float(kv[0])))
        rows.append([t, f"{100 * sweep['base_accuracy']:.0f}", rates, f"{sweep['chosen_lr']:g}", run["steps"],
                     f"{run['loss'][0]:.2f}", f"{statistics.fmean(run['loss'][-50:]):.2f}",
                     f"{learned['tasks'][t]['p']:.2g}"])
    if not rows:
        return []
    return (["What was tried for the tasks whose own adapter did not learn: a learning-rate sweep (accuracy on 100 "
             "dev examples per rate, against the untouched model's on the same examples), then the recipe at the "
             "best rate; the training loss per step is in training.json.", ""]
            + _table(["task", "untouched % (sweep)", "sweep: rate -> accuracy %", "chosen rate", "steps",
                      "loss, first step", "loss, mean of the last 50 steps", "full-dev sign-test p"], rows))


def verdict_lines(doc: dict) -> tuple[list[str], dict]:
    entry, out, rows = doc["libraries"][LABEL], {}, []
    for key in (k for k in er.method_keys(doc, "shared") if k not in ("seqr", "oracle")):
        pr = er.paired(doc, entry, "seqr", key)
        if pr is None:
            continue
        a, b, p = pr
        verdict = ("SEQR better" if a > b else f"{key} better") if p < 0.05 else "no significant difference"
        out[key] = {"only_seqr": a, "only_other": b, "p": p, "verdict": verdict}
        rows.append([key, a, b, f"{p:.2g}", verdict])
    n = sum(len(v["gold"]) for v in doc["examples"].values())
    return ([f"## Does SEQR beat the other routers? (full dev splits, {n} examples)", ""]
            + _table(["method", "only seqr right", "only it right", "sign-test p", "verdict (p < 0.05)"], rows), out)


def exact_lines(doc: dict) -> tuple[list[str], dict]:
    res = study.exactness(doc, LABEL)
    rows = [[k, f"{r['same_answer']} / {r['examples']}", f"{r['same_counts']} / {r['tasks']}",
             f"{r['decisions'] - r['agree']} of {r['decisions']}"] for k, r in res.items()]
    return (["## Exactness: SPECTR and naive decide as SEQR does (Theorem 3.1)", "",
             f"{er.examples_per_task(doc)[er.tasks(doc)[0]]} dev examples per task. All three compute the same "
             "calibrated norm ||B_i A x|| by different factorisations; float32 rounding may split only exact near-ties.",
             ""] + _table(["router", "same answer as seqr", "tasks with identical decision counts",
                           "its decisions off the norm-max"], rows), res)


def noise_lines(steps: dict, out: Path) -> tuple[list[str], dict]:
    """Figure 6 from the steps document's final library (its seqr, oracle and noise passes)."""
    doc = {**steps, "libraries": {LABEL: steps["libraries"]["final"]}}
    plots.write_report(doc, out / "noise")
    curve = er.noise_summary(doc)
    return (["## SEQR under noise on mu (the paper's Figure 6)", "",
             f"{er.examples_per_task(doc)[er.tasks(doc)[0]]} dev examples per task; full tables: "
             "[noise/report.md](noise/report.md).", "", "![noise](noise/noise.png)", ""]
            + _table(["noise (std of mu)", "seqr, normalised accuracy %"],
                     [[f"{lv:g}", f"{100 * v[0]:.1f}"] for lv, v in curve.items()]),
            {f"{lv:g}": v[0] for lv, v in curve.items()})


def variants_lines(main: dict, variants: dict, out: Path) -> tuple[list[str], dict]:
    """Item 7: SEQR's routing variants on the full dev splits against every method of the main stage."""
    res = study.variants(main, variants, LABEL)
    if not res:
        return [], {}
    fig = plots.variants(main, res, out, LABEL)
    n_learned = len(next(iter(res.values()))["learned_tasks"])
    return (["## Routing variants on the full dev splits (item 7)", "",
             "SEQR with one routing setting changed, against every method of the main stage on the same examples: "
             "+a/-b counts the examples only the variant / only the other method answers right, with the exact "
             f"sign-test p. 'learned tasks': the {n_learned} tasks whose own adapter beats the untouched model.", ""]
            + er.variants_table(res) + [""] + default_lines(main, variants)
            + ([f"![variants]({fig})", ""] if fig else []), res)


def default_lines(main: dict, variants: dict) -> list[str]:
    """Every variant against the library's default router (SEQR at granularity.DEFAULT), which another variant
    replaces only by beating it with p < 0.05."""
    ref = EvalConfig(tasks=["_"], granularity=granularity.DEFAULT).variant()
    vs = study.against(main, variants, ref)
    if not vs:
        return []
    rows = [[v, f"+{r['only_variant']}/-{r['only_other']}", f"{r['p']:.2g}",
             ("better" if r["only_variant"] > r["only_other"] else "worse") if r["p"] < 0.05 else "no difference"]
            for v, r in vs.items()]
    wins = [v for v, r in vs.items() if r["p"] < 0.05 and r["only_variant"] > r["only_other"]]
    return ([f"Against the default router (SEQR, {ref}): "
             + (f"{', '.join(wins)} beat{'s' if len(wins) == 1 else ''} it with p < 0.05; the default also weighs "
                "what each decision costs per token ([granularity costs](../layer_routing/granularity_costs.md))."
                if wins else "no variant beats it with p < 0.05, so the default stays."), ""]
            + _table(["variant", "only it / only the default right", "sign-test p", "verdict (p < 0.05)"], rows))


def per_task_lines(main: dict, other: dict, label: str) -> tuple[list[str], dict]:
    """Per task, every method's accuracy beside the one-decision modes (ONE_DECISION), and each mode's sign test
    against per-token SEQR on the task: where it wins and where it does not (the layer-routing issue's item 1)."""
    res = study.per_task(main, other, label)
    modes = [v for v in ONE_DECISION if v in res["variants"]]
    shown = res["methods"] + modes
    tested = [v for v in modes if all(v in r["vs"] for r in res["tasks"].values())]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    rows = [[t, {None: "?", True: "yes", False: "no"}[r["learned"]], *(pct(r["acc"][k]) for k in shown),
             *(f"+{r['vs'][v]['only_variant']}/-{r['vs'][v]['only_other']} (p={r['vs'][v]['p']:.2g})" for v in tested)]
            for t, r in res["tasks"].items()]
    said = []
    for v in tested:
        sig = {t: r["vs"][v] for t, r in res["tasks"].items() if r["vs"][v]["p"] < 0.05}
        won = [t for t, r in sig.items() if r["only_variant"] > r["only_other"]]
        lost = [t for t in sig if t not in won]
        said.append(f"{v} beats per-token SEQR with p < 0.05 on {len(won)} of {len(rows)} tasks "
                    f"({', '.join(won) or 'none'}) and loses on {len(lost)} ({', '.join(lost) or 'none'}).")
    header = ["task", "own > untouched", *("untouched" if k == "base" else k for k in shown),
              *(f"{v} vs seqr" for v in tested)]
    return (["Per task (accuracy %; 'own > untouched': the own adapter scores above the untouched model; 'vs seqr': "
             "examples only the mode / only per-token SEQR answers right, exact sign test on the task):", ""]
            + _table(header, rows) + ([" ".join(said), ""] if said else []), res)


def checkpoint_lines(main: dict, ckpt: dict) -> tuple[list[str], dict]:
    """Item 1 of the layer-routing issue on the step-50 snapshot: the one-decision modes against every method on
    adapters that trained ~50 steps (full dev; the untouched model's pass is the main stage's)."""
    study.same_examples(main, ckpt, "the checkpoint passes")
    view = {**ckpt, "base": main.get("base"),
            "libraries": {lb: e for lb, e in ckpt["libraries"].items() if not e.get("variant")}}
    label = next(iter(view["libraries"]))
    methods = view["libraries"][label]["methods"]
    res = study.variants(view, ckpt, label) if "oracle" in methods else {}
    more, tasks = per_task_lines(view, ckpt, label)
    pending = [m for m in er.method_keys(main, "shared") if m != "base" and m not in methods]  # main's methods
    pending += [v for v in ONE_DECISION if v not in tasks["variants"]]
    n = sum(len(v["gold"]) for v in ckpt["examples"].values())
    tok = study.routability(view).get(label)
    lines = [f"## The one-decision modes on the {label} snapshot (full dev splits, {n} examples)", "",
             f"The same comparison on the adapters after {label.split('-')[-1]} training steps "
             "(`python scripts/paper_eval.py --stage checkpoint`): each mode against every method of the snapshot."
             + (f" Per-token SEQR here: {100 * tok['norm']:.1f}% of the oracle, own share {100 * tok['own']:.1f}%."
                if tok else "")]
    lines += ["", *er.variants_table(res), ""] if res else [""]
    lines += more + ([f"Passes still to run on this snapshot: {', '.join(pending)}.", ""] if pending else [])
    return lines, {"variants": res, "per_task": tasks}


def unique_lines(main: dict, unique: dict) -> tuple[list[str], dict]:
    """Item 7: the paper's Table 2 (does a shared frozen A cost accuracy?) and the routers in their native setting."""
    res = study.shared_vs_unique(main, unique, LABEL, UNIQUE_LABEL)
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    own = [[t, pct(r["shared"]), pct(r["unique"]), r["only_shared"], r["only_unique"], f"{r['p']:.2g}"]
           for t, r in res["oracle"].items()]
    each = [[("seqr / spectr" if k == "spectr" else k), pct(r["shared"]), pct(r["unique"]), pct(r["own_shared"]),
             pct(r["own_unique"]), r["only_shared"], r["only_unique"], f"{r['p']:.2g}"] for k, r in res["methods"].items()]
    native = [[k, pct(r["unique"]), pct(r["own_unique"]), r["only_shared"], r["only_unique"], f"{r['p']:.2g}"]
              for k, r in res["native"].items()]
    n = sum(len(v["gold"]) for v in main["examples"].values())
    return (["## Does a shared frozen A cost accuracy? (the paper's Table 2; item 7)", "",
             f"The same recipe trained as ordinary LoRA (each adapter's A trained too; "
             f"`artifacts/paper-library-unique/`), on the same {n} dev "
             "examples. 'only shared / only unique': examples only that library's pass answers right (exact sign "
             "test). Own adapter per task:", ""]
            + _table(["task", "shared A %", "unique A %", "only shared", "only unique", "sign-test p"], own)
            + ["Each router on its own library (the exact norm router is SEQR with shared A, SPECTR without):", ""]
            + _table(["router", "shared A %", "unique A %", "own share, shared %", "own share, unique %",
                      "only shared", "only unique", "sign-test p"], each)
            + ["The unique-A library's routers in their native setting, against SEQR on the shared-A library:", ""]
            + _table(["router (unique A)", "accuracy %", "own share %", "only seqr (shared A) right", "only it right",
                      "sign-test p"], native), res)


def steps_lines(doc: dict, final_steps: int, out: Path) -> tuple[list[str], dict]:
    res = study.routability(doc)
    if not res:  # the oracle passes are in, SEQR's not yet: how much each snapshot has learned
        return oracle_steps_lines(doc), {}
    steps = {lb: int(lb.split("-")[1]) for lb in res if lb.startswith("step-")} | {"final": final_steps}
    n = len(next(iter(doc["libraries"].values()))["adapters"])
    fig = plots.routability(res, steps, n, out)
    order = sorted(res, key=lambda lb: steps.get(lb, 0))
    rows = [[lb, steps.get(lb, "?"), f"{100 * res[lb]['oracle']:.1f}", f"{100 * res[lb]['acc']:.1f}",
             f"{100 * res[lb]['norm']:.1f}", f"{100 * res[lb]['own']:.1f}"] for lb in order]
    first, last = res[order[0]], res[order[-1]]
    owns = [100 * res[lb]["own"] for lb in order]
    return (["## Routability vs training (item 6)", "",
             f"{er.examples_per_task(doc)[er.tasks(doc)[0]]} dev examples per task; each library's SEQR against its own "
             f"oracle. Chance own share: {100 / n:.0f}%.", "",
             f"From {order[0]} to {order[-1]} the own adapters' accuracy (the oracle) goes from {100 * first['oracle']:.1f}"
             f"% to {100 * last['oracle']:.1f}%, SEQR's from {100 * first['acc']:.1f}% to {100 * last['acc']:.1f}%, and "
             f"the share of decisions routed to the input's own adapter stays between {min(owns):.1f}% and "
             f"{max(owns):.1f}%: {'training does not make these adapters more routable' if max(owns) - min(owns) < 5 else 'see the table'}"
             f" (SEQR's accuracy over the oracle's: {100 * first['norm']:.1f}% -> {100 * last['norm']:.1f}%).", ""]
            + _table(["library", "steps", "oracle %", "seqr %", "seqr / oracle %", "own-adapter share %"], rows)
            + ([f"![routability]({fig})", ""] if fig else []), res)


def oracle_steps_lines(doc: dict) -> list[str]:
    """Each snapshot library's own-adapter (oracle) accuracy per task, while SEQR's passes on them are pending."""
    ts, libs = er.tasks(doc), doc["libraries"]
    rows = [[lb] + [f"{100 * er.task_acc(doc, e, 'oracle', t):.0f}" for t in ts]
            + [f"{100 * sum(er.task_acc(doc, e, 'oracle', t) for t in ts) / len(ts):.1f}"]
            for lb, e in libs.items() if "oracle" in e["methods"]]
    return (["## Routability vs training (item 6): the snapshots' own adapters so far", "",
             f"{er.examples_per_task(doc)[ts[0]]} dev examples per task, own adapter (oracle) accuracy %; SEQR's passes "
             "on the snapshots are not run yet (`python scripts/paper_eval.py --stage steps`).", ""]
            + _table(["library", *ts, "average"], rows))


def write(out: Path) -> Path:
    docs = {st: load(out, st) for st in ("main", "exact", "steps", "variants", "unique", "checkpoint")}
    first = next((d for d in docs.values() if d), None)
    n = len(next(iter(first["libraries"].values()))["adapters"]) if first else 0
    lines = ["# The paper-budget library: evaluation", "",
             f"{first['config'].get('model') if first else '?'}, {n} shared-A adapters (the paper's recipe: "
             "[training.md](training.md)), every pass in float32. Stages not yet run are named at the end.", ""]
    summary, missing = {}, []
    if docs["main"]:
        plots.write_report(docs["main"], out / "main")
        training = out / "training.json"
        more, summary["learned"] = learned_lines(docs["main"])
        lines += more + tried_lines(summary["learned"],
                                    files.read_json(training, "training") if training.exists() else None)
        more, summary["seqr_vs"] = verdict_lines(docs["main"])
        lines += more
        lines += ["Full tables and figures (Tables 3-4, Figures 3-4, own-adapter shares): [main/report.md](main/report.md).",
                  "", "![accuracy](main/accuracy_shared.png)", ""]
    if docs["exact"]:
        more, summary["exactness"] = exact_lines(docs["exact"])
        lines += more
    noise = docs["steps"] and docs["steps"]["libraries"].get("final", {}).get("noise")
    if noise:
        more, summary["noise"] = noise_lines(docs["steps"], out)
        lines += more
    if docs["steps"]:
        more, summary["routability"] = steps_lines(docs["steps"], final_steps(), out)
        lines += more
    if docs["main"] and docs["variants"]:
        more, summary["variants"] = variants_lines(docs["main"], docs["variants"], out)
        lines += more
        more, summary["variants_per_task"] = per_task_lines(docs["main"], docs["variants"], LABEL)
        lines += more
    if docs["main"] and docs["checkpoint"]:
        more, summary["checkpoint"] = checkpoint_lines(docs["main"], docs["checkpoint"])
        lines += more
    if docs["main"] and docs["unique"]:
        more, summary["shared_vs_unique"] = unique_lines(docs["main"], docs["unique"])
        lines += more
    missing = [st for st, d in docs.items() if d is None] + ([] if noise else ["noise"])
    if missing:
        lines += [f"Not yet evaluated: {', '.join(missing)} (scripts/paper_eval.py --stage ...).", ""]
    files.atomic_write_json(out / "summary.json", summary)
    files.atomic_write_bytes(out / files.EVAL_REPORT, "\n".join(lines).encode())
    return out / files.EVAL_REPORT


def final_steps() -> int:
    """Steps of the final adapters (250; dbpedia's 900 examples give 226): the most any run took."""
    runs = Path("artifacts/paper-library/runs")
    return max((json.loads(f.read_text())["steps"] for f in runs.glob("*.json")), default=250)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(OUT), help=f"results root holding the stage folders (default {OUT})")
    a = p.parse_args(argv)
    print(write(Path(a.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
