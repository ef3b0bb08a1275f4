"""The paper-budget ten-task library (issue 14): per-task learning-rate sweep, full runs, checkpoints, calibration.

Usage: SEQR_TASK_DATA=../shared/data/tasks python scripts/paper_library.py OUT [--stage sweep|shared|unique|build|all]
(scripts/build_paper_library.sh runs every stage with logs). Resumable at every level: a finished sweep point,
adapter, checkpoint, calibration or library on disk is skipped, and a training run interrupted mid-way continues
from its last saved state (every STATE_EVERY steps) bit-for-bit. Deterministic given SEED and A_SEED.

Recipe (the paper's Appendix D, with the issue's short sweep): rank 32, alpha 64, dropout 0.05, q/k/v/o, batch 8,
cosine schedule with 5% warm-up. Sweep: SWEEP_TRAIN training examples, 1 epoch, at each of SWEEP_RATES, scored
on SWEEP_DEV dev examples (accuracy, ties broken by the gold answer's mean log-probability among the choices,
then by the lower rate). Full run: FULL_TRAIN examples (dbpedia has 900), EPOCHS epochs at the chosen rate, the
shared A of A_SEED; checkpoints at CHECKPOINTS steps; every adapter calibrated on CALIBRATION of its own
training examples. The unique-A library trains A too, with the same rate per task. Each silo only reads its
own task's files.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from seqr.store import files
from seqr.silo.build import build
from seqr.silo.calibrate import calibrate
from seqr.hf.models import load_model
from seqr.hf.choices import choice_logprobs
from seqr.silo.tasks import load_task
from seqr.silo.train import Session, TrainConfig, train

MODEL = "smollm2-135m-instruct"
TASKS = ("agnews", "cola", "dbpedia", "hellaswag", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2")
SWEEP_RATES = (5e-4, 1e-3, 2e-3)
SWEEP_TRAIN, SWEEP_DEV = 200, 100
FULL_TRAIN, EPOCHS = 1000, 2
CHECKPOINTS = (12, 50, 125)  # the final adapter (250 steps; dbpedia 226) is the fourth point
CALIBRATION = 200
STATE_EVERY = 10
SEED, A_SEED = 0, 0
STAGES = ("sweep", "shared", "unique", "build")


def recipe(task: str, out: Path, lr: float, data: str, **kw) -> TrainConfig:
    base = dict(model=MODEL, task=task, out=str(out), data=data, a_seed=A_SEED, rank=32, alpha=64, dropout=0.05,
                epochs=EPOCHS, lr=lr, batch_size=8, max_train=FULL_TRAIN, seed=SEED, dtype="auto")
    return TrainConfig(**{**base, **kw})


def choice_metrics(scores: list[list[float]], examples) -> dict:
    """Accuracy and the gold answer's mean log-probability among the choices (softmax over choice scores)."""
    right, gold_lp = 0, 0.0
    for s, ex in zip(scores, examples):
        t = torch.tensor(s, dtype=torch.float64)  # (C,)
        right += int(t.argmax()) == ex.label
        gold_lp += float(torch.log_softmax(t, 0)[ex.label])
    return {"accuracy": right / len(examples), "gold_logprob": gold_lp / len(examples), "n": len(examples)}


def sweep_point(model, tok, task: str, lr: float, dev, data: str) -> dict:
    """Train SWEEP_TRAIN examples for one epoch at `lr`, score on the dev subset, and give the model back."""
    cfg = recipe(task, Path("unused"), lr, data, epochs=1, max_train=SWEEP_TRAIN)
    session = Session(cfg, model, tok, load_task(task, "train", data_dir=data, max_examples=SWEEP_TRAIN, seed=SEED))
    t0 = time.perf_counter()
    while not session.done:
        session.step()
    session.model.eval()
    metrics = choice_metrics(choice_logprobs(session.model, tok, dev, progress=False), dev)
    session.model.unload()
    return {"task": task, "lr": lr, **metrics, "steps": len(session.log), "train_seconds": round(session.seconds, 1),
            "wall_seconds": round(time.perf_counter() - t0, 1), "loss": [round(r["loss"], 4) for r in session.log]}


def sweep(model, tok, task: str, root: Path, data: str) -> float:
    """The task's learning rate: each rate's result is kept in root/sweep/<task>/; returns the best rate."""
    d = root / "sweep" / task
    best_file = d / "best.json"
    if best_file.exists():
        return files.read_json(best_file, "sweep result")["lr"]
    dev = load_task(task, "dev", data_dir=data, max_examples=SWEEP_DEV, seed=SEED)
    base_file = d / "base.json"
    if not base_file.exists():
        model.eval()
        files.atomic_write_json(base_file, {"task": task, **choice_metrics(choice_logprobs(model, tok, dev), dev)})
    points = []
    for lr in SWEEP_RATES:
        f = d / f"lr-{lr:g}.json"
        if not f.exists():
            print(f"[paper] sweep {task} lr={lr:g}", file=sys.stderr, flush=True)
            files.atomic_write_json(f, sweep_point(model, tok, task, lr, dev, data))
        points.append(files.read_json(f, "sweep point"))
    best = max(points, key=lambda p: (p["accuracy"], p["gold_logprob"], -p["lr"]))
    base = files.read_json(base_file, "sweep base")
    files.atomic_write_json(best_file, {"task": task, "lr": best["lr"], "base_accuracy": base["accuracy"],
                                        "rates": {f"{p['lr']:g}": p["accuracy"] for p in points}})
    print(f"[paper] {task}: lr {best['lr']:g} (dev@{SWEEP_DEV} {best['accuracy']:.3f}, base {base['accuracy']:.3f})",
          file=sys.stderr, flush=True)
    return best["lr"]


def snapshotter(root: Path, task: str):
    """on_step callback: the adapter as trained so far into root/checkpoints/step-N/adapters/<task>."""
    def on_step(session, row):
        out = root / "checkpoints" / f"step-{row['step']}" / "adapters" / task
        if row["step"] in CHECKPOINTS and not (out / files.PEFT_WEIGHTS).exists():
            session.snapshot(out)
    return on_step


def calibrated(model, tok, adapter: Path, task: str, data: str) -> None:
    if not (adapter / files.STATS_FILE).exists():
        examples = load_task(task, "train", data_dir=data, max_examples=CALIBRATION, seed=SEED)
        calibrate(model, tok, adapter, examples, seed=SEED)


def full_run(model, tok, task: str, lr: float, root: Path, data: str, *, unique: bool) -> None:
    """One silo's full training run (resumable), then the calibration of it and of its checkpoints."""
    which = "unique" if unique else "shared"
    out = root / which / "adapters" / task
    cfg = recipe(task, out, lr, data, unique_a=unique)
    examples = load_task(task, "train", data_dir=data, max_examples=FULL_TRAIN, seed=SEED)
    print(f"[paper] {which} {task} lr={lr:g}: {len(examples)} examples x {EPOCHS} epochs", file=sys.stderr, flush=True)
    train(cfg, model=model, tokenizer=tok, examples=examples, state_every=STATE_EVERY,
          on_step=None if unique else snapshotter(root, task))
    calibrated(model, tok, out, task, data)
    if not unique:
        for step in CHECKPOINTS:
            ckpt = root / "checkpoints" / f"step-{step}" / "adapters" / task
            if (ckpt / files.PEFT_WEIGHTS).exists():
                calibrated(model, tok, ckpt, task, data)


def build_all(root: Path, tasks: tuple[str, ...]) -> None:
    """Every library whose ten adapters are all calibrated, once: shared, unique, and one per checkpoint."""
    sets = [root / "shared", root / "unique"] + [root / "checkpoints" / f"step-{s}" for s in CHECKPOINTS]
    for d in sets:
        adapters = [d / "adapters" / t for t in tasks]
        if (d / "library" / files.MANIFEST).exists():
            continue
        if all((a / files.STATS_FILE).exists() for a in adapters):
            lib = build([str(a) for a in adapters], str(d / "library"))
            print(f"[paper] built {d / 'library'}: {lib!r}", file=sys.stderr, flush=True)
        else:
            missing = [a.name for a in adapters if not (a / files.STATS_FILE).exists()]
            print(f"[paper] {d.name}: not built yet, waiting for {missing}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="output root (kept out of git)")
    p.add_argument("--stage", choices=STAGES + ("all",), default="all")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--data", default=os.environ.get("SEQR_TASK_DATA"), help="task dir (default $SEQR_TASK_DATA)")
    a = p.parse_args(argv)
    if not a.data or not Path(a.data).is_dir():
        p.error(f"--data / $SEQR_TASK_DATA must name the task directory, got {a.data!r}")
    root, tasks = Path(a.out), tuple(a.tasks)
    model, tok = load_model(MODEL, dtype="auto")
    stages = STAGES if a.stage == "all" else (a.stage,)
    for task in tasks:
        if "sweep" in stages or "shared" in stages:
            lr = sweep(model, tok, task, root, a.data)
            if "shared" in stages:
                full_run(model, tok, task, lr, root, a.data, unique=False)
    if "unique" in stages:
        for task in tasks:
            full_run(model, tok, task, sweep(model, tok, task, root, a.data), root, a.data, unique=True)
    if "build" in stages:
        build_all(root, tasks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
