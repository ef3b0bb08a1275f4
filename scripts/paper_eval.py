"""Evaluate the committed paper-budget library (issue 28, item 5-6), one pass at a time, each committed at once.

Usage: SEQR_TASK_DATA=../shared/data/tasks python scripts/paper_eval.py
       [--stage main|exact|steps|noise|variants|unique|checkpoint|all] [--device cuda] [--commit]
Every pass runs the base model in float32 (on any machine or device), so passes made on different machines
combine in one eval.json; a pass already in the stage's eval.json is skipped, so a fresh clone continues with the
next one. Stages (each its own `seqr eval` results document under OUT):
  main   full dev splits: base, oracle, seqr, mu, arrow, centroid, centroid-seqr@3, lag@3
  exact  EXACT_N dev examples per task: seqr, spectr, naive (the same decisions, by Theorem 3.1)
  steps  NOISE_N dev examples per task: oracle and seqr on the step-12 / step-50 snapshots and the final library
  variants  full dev splits: seqr under each routing variant of VARIANTS (the routing study's main axes; the
         norm routers' score, stats and granularity), for sign tests against the main stage's passes
  unique  full dev splits on the unique-A library (ordinary LoRA, scripts/paper_library.py --unique-a): UNIQUE,
         the routers in their native setting, for the shared-vs-unique comparison (the paper's Table 2)
  noise  the steps stage's examples and document: the final library's seqr with noise on mu at NOISE_LEVELS
         sigmas (Figure 6; its seqr and oracle passes are the steps stage's)
  checkpoint  full dev splits on the step-CHECKPOINT snapshot: CHECKPOINT_PASSES, the one-decision modes (layer-summed
         and request-level) against every main method on adapters that have trained ~50 steps (base: main's)
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from seqr.eval.evaluate import EvalConfig, evaluate, load_data
from seqr.hf.models import load_model
from seqr.store import files
from seqr.store.library import LoraLibrary

sys.path.insert(0, str(Path(__file__).resolve().parent))
from longrun import commit_only, data_and_device  # noqa: E402

MODEL = "smollm2-135m-instruct"
LIBRARY = Path("artifacts/paper-library")
UNIQUE_LIBRARY = Path("artifacts/paper-library-unique")
OUT = Path("docs/results/paper_library")
TASKS = ("agnews", "cola", "dbpedia", "hellaswag", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2")
MAIN = ("base", "oracle", "seqr", "mu", "arrow", "centroid", "centroid-seqr", "lag")
EXACT_N, NOISE_N = 20, 100
NOISE_LEVELS = (0.1, 0.2, 0.5, 1.0)
STEPS = (12, 50)
UNIQUE = ("oracle", "spectr", "mu", "arrow", "lag", "centroid")  # spectr: the exact norm router without shared A
STAGES = ("main", "exact", "steps", "noise", "variants", "unique", "checkpoint")
# EvalConfig overrides of the seqr passes in the variants stage, most telling first
VARIANTS = ({"granularity": "request"}, {"granularity": "layers"}, {"granularity": "request-reuse"},
            {"granularity": "depth"}, {"granularity": "request", "probe_depth": 0.5},
            {"granularity": "prompt"}, {"normalise": "ratio"}, {"normalise": "raw"}, {"pooled": True},
            {"granularity": "request-vote"})
CHECKPOINT = 50
# base is the main stage's (the same untouched model on the same examples)
CHECKPOINT_PASSES = ("oracle", "seqr", ("seqr", VARIANTS[1]), ("seqr", VARIANTS[0]), "centroid", "arrow", "mu",
                     "centroid-seqr", "lag", ("seqr", VARIANTS[-1]))
FOLDER = {"noise": "steps"}  # a stage that adds passes to another stage's document
ISSUE = {"checkpoint": 30}  # the issue a stage's commits name (28 otherwise)


def plan(stage: str, lib: Path, unique: Path) -> tuple[dict[str, Path], EvalConfig, tuple]:
    """(libraries by label, the stage's config, its passes in order: a method, or (method, config overrides))."""
    tasks = LoraLibrary.load(lib).names
    if stage == "unique":
        return {"unique-0": unique}, EvalConfig(tasks=tasks, max_eval=None, noise=(), model=MODEL), UNIQUE
    if stage == "main":
        return {"shared-0": lib}, EvalConfig(tasks=tasks, max_eval=None, noise=(), model=MODEL), MAIN
    if stage == "variants":
        return ({"shared-0": lib}, EvalConfig(tasks=tasks, max_eval=None, noise=(), model=MODEL),
                tuple(("seqr", v) for v in VARIANTS))
    if stage == "exact":
        return ({"shared-0": lib}, EvalConfig(tasks=tasks, max_eval=EXACT_N, noise=(), model=MODEL),
                ("seqr", "spectr", "naive"))
    if stage == "noise":
        return ({"final": lib}, EvalConfig(tasks=tasks, max_eval=NOISE_N, noise=(), model=MODEL),
                tuple(("seqr", {"noise": (level,)}) for level in NOISE_LEVELS))  # one pass per level, each committed
    if stage == "checkpoint":
        return ({f"step-{CHECKPOINT}": lib / "checkpoints" / f"step-{CHECKPOINT}"},
                EvalConfig(tasks=tasks, max_eval=None, noise=(), model=MODEL), CHECKPOINT_PASSES)
    libs = {f"step-{s}": lib / "checkpoints" / f"step-{s}" for s in STEPS}
    return {**libs, "final": lib}, EvalConfig(tasks=tasks, max_eval=NOISE_N, noise=(), model=MODEL), ("oracle", "seqr")


def run_stage(stage: str, a, model, tok) -> None:
    paths, cfg, passes = plan(stage, Path(a.library), Path(a.unique_library))
    cfg.model, cfg.batch_size = a.model, a.batch_size
    libs = {label: LoraLibrary.load(p) for label, p in paths.items() if (p / files.MANIFEST).exists()}
    cfg.tasks = [t for t in cfg.tasks if all(t in lib for lib in libs.values())]
    data = load_data(cfg.tasks, cfg.split, data_dir=a.data, max_eval=cfg.max_eval, seed=cfg.seed)
    out = Path(a.out) / FOLDER.get(stage, stage)
    for item in passes:
        method, overrides = (item, {}) if isinstance(item, str) else item
        c = dataclasses.replace(cfg, methods=(method,), **overrides)
        before = finished_passes(out / files.EVAL_RESULTS)
        evaluate(model, tok, libs, data, c, out_dir=out)
        if a.commit and finished_passes(out / files.EVAL_RESULTS) != before:  # a reused pass is no news
            label = " ".join(x for x in (c.variant(), " ".join(f"noise={n}" for n in c.noise)) if x)
            tag = f" [{label}]" if label else ""
            commit_only(out / files.EVAL_RESULTS, f"Issue {ISSUE.get(stage, 28)}: eval {stage} {method}{tag} pass")


def finished_passes(path: Path) -> set[str]:
    """The passes a results document holds: base, and per library its methods and noise passes."""
    if not path.exists():
        return set()
    doc = files.read_json(path, "eval results")
    return ({"base"} if doc.get("base") else set()) | {f"{label} {key}" for label, e in doc["libraries"].items()
                                                      for key in [*e["methods"], *e["noise"]]}


def incomplete(path: str, default: Path, flag: str, partial: bool) -> str | None:
    """Why `path` cannot be evaluated yet: it holds no library, or, at its default place, not all of TASKS (every
    pass's fingerprint changes with each added adapter) and `partial` is off; None when it can."""
    if not (Path(path) / files.MANIFEST).exists():
        return f"{flag} {path}: no library there yet (scripts/paper_library.py builds it)"
    held = LoraLibrary.load(path).names
    if path == str(default) and set(held) != set(TASKS) and not partial:
        return (f"{flag} {path} holds {len(held)} of the {len(TASKS)} tasks ({sorted(held)}); finish "
                f"scripts/paper_library.py first (every pass's fingerprint changes with each added adapter)")
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=STAGES + ("all",), default="all")
    p.add_argument("--data", default=os.environ.get("SEQR_TASK_DATA"), help="task dir (default $SEQR_TASK_DATA)")
    p.add_argument("--library", default=str(LIBRARY), help=f"the library (default {LIBRARY})")
    p.add_argument("--unique-library", default=str(UNIQUE_LIBRARY),
                   help=f"the unique-A library of the unique stage (default {UNIQUE_LIBRARY})")
    p.add_argument("--out", default=str(OUT), help=f"results root, one folder per stage (default {OUT})")
    p.add_argument("--model", default=MODEL, help=f"base model (default {MODEL})")
    p.add_argument("--device", default="cpu", help="cpu, or cuda where a GPU is available")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward (default 8; a GPU takes more)")
    p.add_argument("--commit", action="store_true", help="git commit every finished pass at once")
    p.add_argument("--allow-partial", action="store_true", help="evaluate the default library before all ten are in")
    a = p.parse_args(argv)
    device = data_and_device(p, a)
    if why := incomplete(a.library, LIBRARY, "--library", a.allow_partial):
        p.error(why)
    todo = list(STAGES) if a.stage == "all" else [a.stage]
    if "unique" in todo and (why := incomplete(a.unique_library, UNIQUE_LIBRARY, "--unique-library", a.allow_partial)):
        if a.stage != "all":
            p.error(why)
        todo.remove("unique")  # the unique-A library is built after the shared one: its stage waits for it
        print(f"[paper-eval] unique stage skipped: {why}", file=sys.stderr)
    model, tok = load_model(a.model, dtype="float32", device=device)
    for stage in todo:
        run_stage(stage, a, model, tok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
