"""Issue 30's five-task, 50-step library on SmolLM2-135M and its routing evaluation, built piece by piece into git.

Usage: SEQR_TASK_DATA=../shared/data/tasks python scripts/layer_routing.py [build|eval|report|all] [--commit]
  build   per task of TASKS not yet in ARTIFACTS: `seqr train --task T --max-train 400 --epochs 1 --lr LR[T]`
          (rank 32, alpha 64, everything else seqr train's defaults, the shared A of seed 0) and `seqr calibrate
          --max-examples 200` on its own training examples; added to the library (float16 on disk), committed.
  eval    `seqr eval --max-eval 60 --noise ''` on the library: the main methods (MAIN), then seqr under each routing
          variant (VARIANTS); every pass committed into OUT/eval.json as it finishes, so a fresh clone resumes.
  report  OUT/report.md, summary.json and variants.png: every variant against every main method (paired sign
          tests), with and without the tasks whose own adapter does not beat the untouched model.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from seqr.eval import plots, study
from seqr.eval import report as er
from seqr.eval.evaluate import EvalConfig, evaluate, load_data
from seqr.hf.models import load_model
from seqr.silo.tasks import load_task
from seqr.silo.train import train
from seqr.store import files
from seqr.store.library import LoraLibrary

sys.path.insert(0, str(Path(__file__).resolve().parent))
from longrun import commit_only, data_and_device  # noqa: E402
from paper_eval import finished_passes  # noqa: E402
from paper_library import MODEL, SEED, add_to_library, calibrated, recipe  # noqa: E402

TASKS = ("agnews", "dbpedia", "sst2", "mnli", "qnli")
LR = {"dbpedia": 1e-3}  # every other task 2e-3
MAX_TRAIN, EPOCHS, MAX_EVAL, RANK = 400, 1, 60, 32  # alpha = 2 rank
ARTIFACTS = Path("artifacts/layer-routing")
OUT = Path("docs/results/layer_routing")
LABEL = "shared-0"
MAIN = ("base", "oracle", "seqr", "mu", "arrow", "centroid", "centroid-seqr")
VARIANTS = ({"granularity": "layers"}, {"granularity": "request"}, {"granularity": "prompt"},
            {"granularity": "depth"}, {"granularity": "request", "probe_depth": 0.5}, {"granularity": "request-reuse"},
            {"granularity": "layers", "probe_depth": 0.5})


def build(ctx: dict, commit) -> None:
    for task in TASKS:
        held = LoraLibrary.load(ctx["art"]).names if (ctx["art"] / files.MANIFEST).exists() else []
        if task in held:
            continue
        out = ctx["work"] / task
        lr = LR.get(task, 2e-3)
        cfg = recipe(task, out, lr, ctx["data"], model=ctx["name"], rank=RANK, epochs=EPOCHS, max_train=MAX_TRAIN)
        examples = load_task(task, "train", data_dir=ctx["data"], max_examples=MAX_TRAIN, seed=SEED)
        print(f"[layer-routing] {task} lr={lr:g}: {len(examples)} examples x {EPOCHS} epoch", file=sys.stderr)
        t0 = time.perf_counter()
        train(cfg, model=ctx["model"], tokenizer=ctx["tok"], examples=examples, state_every=10)
        print(f"[layer-routing] {task} trained in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        calibrated(ctx, out, task)
        add_to_library(ctx["art"], task, out)
        art = ctx["art"]
        commit(f"Issue 30: layer-routing library: {task} (lr {lr:g}, {MAX_TRAIN} examples, {EPOCHS} epoch)",
               [art / files.MANIFEST, art / files.ADAPTERS_DIR, *art.glob(f"{files.SHARED_A_PREFIX}-*")])


def passes() -> list[tuple[str, dict]]:
    return [(m, {}) for m in MAIN] + [("seqr", v) for v in VARIANTS]


def run_eval(ctx: dict, commit: bool) -> None:
    lib = LoraLibrary.load(ctx["art"])
    cfg = EvalConfig(tasks=lib.names, max_eval=MAX_EVAL, noise=(), model=ctx["name"])
    data = load_data(cfg.tasks, cfg.split, data_dir=ctx["data"], max_eval=MAX_EVAL, seed=cfg.seed)
    for method, overrides in passes():
        c = dataclasses.replace(cfg, methods=(method,), **overrides)
        before = finished_passes(OUT / files.EVAL_RESULTS)
        evaluate(ctx["model"], ctx["tok"], {LABEL: lib}, data, c, out_dir=OUT)
        if commit and finished_passes(OUT / files.EVAL_RESULTS) != before:
            tag = f" [{c.variant()}]" if c.variant() else ""
            commit_only(OUT / files.EVAL_RESULTS, f"Issue 30: layer-routing eval {method}{tag} pass")


def report(out: Path | None = None) -> Path:
    """report.md, summary.json and the figures from OUT/eval.json (its main passes and its variant passes)."""
    out = OUT if out is None else out
    doc = files.read_json(out / files.EVAL_RESULTS, "layer-routing results")
    plots.write_report(doc, out)
    res = study.variants(doc, doc, LABEL)
    fig = plots.variants(doc, res, out, LABEL)
    files.atomic_write_json(out / "summary.json", res)
    lines = ["# Layer-summed and request-level routing on the five-task, 50-step library", "",
             f"{len(doc['examples'][next(iter(doc['examples']))]['gold'])} dev examples per task; the main methods' "
             "tables: [report.md](report.md) (written by seqr eval's report).", ""]
    lines += study_table(res) + ([f"![variants]({fig})", ""] if fig else [])
    path = out / "variants.md"
    files.atomic_write_bytes(path, "\n".join(lines).encode())
    return path


def study_table(res: dict) -> list[str]:
    """One row per variant: normalised accuracy (CI), on the learned tasks only, own share, sign tests."""
    if not res:
        return ["No variant pass yet."]
    n = len(next(iter(res.values()))["learned_tasks"])
    return er.variants_table(res) + ["", f"'learned tasks only': the {n} tasks whose own adapter beats the untouched "
                                         "model.", ""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", nargs="?", choices=("build", "eval", "report", "all"), default="all")
    p.add_argument("--data", default=os.environ.get("SEQR_TASK_DATA"), help="task dir (default $SEQR_TASK_DATA)")
    p.add_argument("--work", default="runs/layer-routing", help="resumable training state, kept out of git")
    p.add_argument("--model", default=MODEL, help=f"base model (default {MODEL})")
    p.add_argument("--device", default="cpu", help="cpu, or cuda where a GPU is available")
    p.add_argument("--commit", action="store_true", help="git commit every finished piece at once")
    a = p.parse_args(argv)
    if a.stage == "report":
        print(report())
        return 0
    device = data_and_device(p, a)
    ctx = {"data": a.data, "name": a.model, "art": ARTIFACTS, "work": Path(a.work)}

    def commit(message: str, paths: list[Path]) -> None:
        if a.commit:
            commit_only(paths, message)

    if a.stage in ("build", "all"):
        ctx["model"], ctx["tok"] = load_model(a.model, dtype="auto", device=device)  # training: the machine's dtype
        build(ctx, commit)
    if a.stage in ("eval", "all"):
        ctx["model"], ctx["tok"] = load_model(a.model, dtype="float32", device=device)  # every pass in float32
        run_eval(ctx, a.commit)
        report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
