"""The paper-budget ten-task library (issue 28), built piece by piece into git: `artifacts/paper-library/`.

Usage: SEQR_TASK_DATA=../shared/data/tasks python scripts/paper_library.py [--device cuda] [--commit]
(scripts/build_paper_library.sh wraps it). What is committed is the store: a task whose adapter is already in
ARTIFACTS' library is skipped, so a fresh clone continues with the next task; within a session a cut training run
continues from its last saved state (WORK, kept out of git), so an interruption loses at most that one run.
Deterministic given SEED and A_SEED (and the machine's dtype: bfloat16 where it is native, else float32).

Recipe (the paper's Appendix D): rank 32, alpha 64, dropout 0.05, q/k/v/o, batch 8, cosine schedule with 5%
warm-up, FULL_TRAIN training examples (dbpedia has 900) for EPOCHS epochs, the shared A of A_SEED. The rate is
swept per task: SWEEP_TRAIN examples for one epoch at each of SWEEP_RATES, scored on SWEEP_DEV dev examples
(accuracy, ties broken by the gold answer's mean log-probability among the choices); while the best rate sits at
an edge of the swept range, the range is widened by a factor 2 on that side (at most WIDEN times). Every adapter
is calibrated (mu, sigma, quantiles and centroids) on CALIBRATION of its own training examples, and snapshots at
CHECKPOINTS steps are calibrated and kept too (the routability-vs-training study).

Committed per task: the adapter in ARTIFACTS' library (float16 on disk), its snapshots in
ARTIFACTS/checkpoints/step-N/ (libraries too), ARTIFACTS/sweeps/<task>.json and ARTIFACTS/runs/<task>.json (rate,
sweep scores, steps, epochs, wall time, tokens/s, base dtype, device, CPU flags, loss curve).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from seqr.store import files
from seqr.store.library import LoraLibrary
from seqr.silo.calibrate import calibrate
from seqr.hf.dtypes import key_cpu_flags, name as dtype_name
from seqr.hf.models import load_model
from seqr.hf.choices import choice_logprobs
from seqr.silo.tasks import load_task
from seqr.silo.train import Session, TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from longrun import commit_only, data_and_device  # noqa: E402

MODEL = "smollm2-135m-instruct"
TASKS = ("agnews", "cola", "dbpedia", "hellaswag", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2")
SWEEP_RATES = (5e-4, 1e-3, 2e-3)
WIDEN = 2  # extra rates per side at most
SWEEP_TRAIN, SWEEP_DEV = 200, 100
FULL_TRAIN, EPOCHS = 1000, 2
CHECKPOINTS = (12, 50)  # snapshots kept besides the final adapter (250 steps; dbpedia 226)
CALIBRATION = 200
STATE_EVERY = 10
SEED, A_SEED = 0, 0
STORAGE = "float16"
ARTIFACTS = Path("artifacts/paper-library")
UNIQUE_ARTIFACTS = Path("artifacts/paper-library-unique")  # --unique-a: ordinary LoRA (A trained, stored per adapter)
OLD_SWEEPS = Path("docs/results/paper_library/cpu_sweeps_issue14.json")  # sweeps run on CPU before this store existed


def recipe(task: str, out: Path, lr: float, data: str, rank: int = 32, **kw) -> TrainConfig:
    """The Appendix D recipe; `unique_a=True` in kw trains ordinary LoRA (the paper's Table 2 comparison)."""
    base = dict(model=MODEL, task=task, out=str(out), data=data, a_seed=A_SEED, rank=rank, alpha=2 * rank, dropout=0.05,
                epochs=EPOCHS, lr=lr, batch_size=8, max_train=FULL_TRAIN, seed=SEED, dtype="auto")
    return TrainConfig(**{**base, **kw})


def machine() -> dict:
    """Where a piece was made: device, GPU name or the CPU's model and bf16 flags, torch version."""
    out = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
           "cpu_flags": key_cpu_flags()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


# ---------------------------------------------------------------------------------------------- sweep
def choice_metrics(scores: list[list[float]], examples) -> dict:
    """Accuracy and the gold answer's mean log-probability among the choices (softmax over choice scores)."""
    right, gold_lp = 0, 0.0
    for s, ex in zip(scores, examples):
        t = torch.tensor(s, dtype=torch.float64)  # (C,)
        right += int(t.argmax()) == ex.label
        gold_lp += float(torch.log_softmax(t, 0)[ex.label])
    return {"accuracy": right / len(examples), "gold_logprob": gold_lp / len(examples), "n": len(examples)}


def sweep_point(ctx: dict, task: str, lr: float, dev) -> dict:
    """Train SWEEP_TRAIN examples for one epoch at `lr`, score on the dev subset, and give the model back."""
    model, tok, data = ctx["model"], ctx["tok"], ctx["data"]
    cfg = recipe(task, Path("unused"), lr, data, epochs=1, max_train=SWEEP_TRAIN, model=ctx["name"],
                 rank=ctx["rank"], unique_a=ctx["unique_a"])
    session = Session(cfg, model, tok, load_task(task, "train", data_dir=data, max_examples=SWEEP_TRAIN, seed=SEED))
    t0 = time.perf_counter()
    while not session.done:
        session.step()
    session.model.eval()
    metrics = choice_metrics(choice_logprobs(session.model, tok, dev, progress=False), dev)
    session.model.unload()
    return {"lr": lr, **metrics, "steps": len(session.log), "train_seconds": round(session.seconds, 1),
            "wall_seconds": round(time.perf_counter() - t0, 1), "base_dtype": dtype_name(ctx["dtype"]),
            "machine": machine()}


def best_point(points: list[dict], prior: float | None) -> dict:
    """Best accuracy; ties by the gold log-probability (points without one lose), then the rate chosen before
    (`prior`), then the lower rate."""
    def key(p):
        lp = p.get("gold_logprob")
        return p["accuracy"], float("-inf") if lp is None else lp, p["lr"] == prior, -p["lr"]
    return max(points, key=key)


def next_rate(points: list[dict], prior: float | None) -> float | None:
    """The rate to try next: one beyond the edge the best rate sits at, if that side has widened < WIDEN times."""
    rates = sorted(p["lr"] for p in points)
    best = best_point(points, prior)["lr"]
    if best == rates[-1] and sum(r > max(SWEEP_RATES) for r in rates) < WIDEN:
        return rates[-1] * 2
    if best == rates[0] and sum(r < min(SWEEP_RATES) for r in rates) < WIDEN:
        return rates[0] / 2
    return None


def old_sweep(task: str) -> tuple[list[dict], float | None]:
    """Points of the CPU sweep committed earlier (accuracy only) and the rate it chose, reused as they are."""
    if not OLD_SWEEPS.exists():
        return [], None
    for t in json.loads(OLD_SWEEPS.read_text())["tasks"]:
        if t["task"] == task and "sweep" in t:
            s = t["sweep"]
            pts = [{"lr": float(r), "accuracy": a, "gold_logprob": None, "n": SWEEP_DEV, "source": str(OLD_SWEEPS)}
                   for r, a in s["rates"].items()]
            return pts, s["chosen_lr"]
    return [], None


def sweep(ctx: dict, task: str) -> dict:
    """The task's sweep record (ARTIFACTS/sweeps/<task>.json, rewritten after every point): its chosen rate."""
    f = ctx["art"] / "sweeps" / f"{task}.json"
    rec = files.read_json(f, "sweep record") if f.exists() else None
    if rec is None:
        pts, prior = old_sweep(task) if not ctx["unique_a"] else ([], None)  # the old sweeps trained shared A
        rec = {"task": task, "points": pts, "prior_choice": prior, "sweep_train": SWEEP_TRAIN, "sweep_dev": SWEEP_DEV}
    if rec.get("lr") is not None:
        return rec
    dev = load_task(task, "dev", data_dir=ctx["data"], max_examples=SWEEP_DEV, seed=SEED)
    if "base" not in rec:
        ctx["model"].eval()
        rec["base"] = choice_metrics(choice_logprobs(ctx["model"], ctx["tok"], dev, progress=False), dev)
    todo = [r for r in SWEEP_RATES if r not in {p["lr"] for p in rec["points"]}]
    while True:
        lr = todo.pop(0) if todo else (next_rate(rec["points"], rec["prior_choice"]) if rec["points"] else None)
        if lr is None:
            break
        print(f"[paper] sweep {task} lr={lr:g}", file=sys.stderr, flush=True)
        rec["points"].append(sweep_point(ctx, task, lr, dev))
        files.atomic_write_json(f, rec)
    rec["lr"] = best_point(rec["points"], rec["prior_choice"])["lr"]
    files.atomic_write_json(f, rec)
    ctx["commit"](f"{'unique-A ' if ctx['unique_a'] else ''}sweep {task}: lr {rec['lr']:g}", [f])
    print(f"[paper] {task}: lr {rec['lr']:g} (base {rec['base']['accuracy']:.3f})", file=sys.stderr, flush=True)
    return rec


# ---------------------------------------------------------------------------------------------- full runs
def snapshotter(work: Path, task: str, checkpoints: tuple[int, ...]):
    """on_step callback: the adapter as trained so far into WORK/step-N/<task> at each of CHECKPOINTS."""
    def on_step(session, row):
        out = work / f"step-{row['step']}" / task
        if row["step"] in checkpoints and not (out / files.PEFT_WEIGHTS).exists():
            session.snapshot(out)
    return on_step


def calibrated(ctx: dict, adapter: Path, task: str) -> None:
    if not (adapter / files.STATS_FILE).exists():
        examples = load_task(task, "train", data_dir=ctx["data"], max_examples=CALIBRATION, seed=SEED)
        calibrate(ctx["model"], ctx["tok"], adapter, examples, seed=SEED, progress=False)


def full_run(ctx: dict, task: str, lr: float) -> Path:
    """One silo's full training run (resumable within WORK), then the calibration of it and of its snapshots."""
    out = ctx["work"] / "final" / task
    cfg = recipe(task, out, lr, ctx["data"], model=ctx["name"], rank=ctx["rank"], unique_a=ctx["unique_a"])
    examples = load_task(task, "train", data_dir=ctx["data"], max_examples=FULL_TRAIN, seed=SEED)
    print(f"[paper] {task} lr={lr:g}: {len(examples)} examples x {EPOCHS} epochs", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    train(cfg, model=ctx["model"], tokenizer=ctx["tok"], examples=examples, state_every=STATE_EVERY,
          on_step=snapshotter(ctx["work"], task, ctx["checkpoints"]))
    wall = time.perf_counter() - t0
    for d in [out] + [ctx["work"] / f"step-{s}" / task for s in ctx["checkpoints"]]:
        if (d / files.PEFT_WEIGHTS).exists():
            calibrated(ctx, d, task)
    meta = files.read_json(out / files.ADAPTER_META, "adapter meta")
    meta.setdefault("wall_seconds", round(wall, 1))  # of this process's share of the run
    files.atomic_write_json(out / files.ADAPTER_META, meta)
    return out


def missing_snapshots(ctx: dict, task: str) -> tuple[int, ...]:
    """CHECKPOINTS whose committed library lacks the task (e.g. made on a machine that could not send them back)."""
    return tuple(s for s in ctx["checkpoints"] if task not in done_tasks(ctx["art"] / "checkpoints" / f"step-{s}"))


def snapshots_run(ctx: dict, task: str, lr: float) -> None:
    """Rerun the first steps of a committed task's run (same recipe, rate, seeds and data order) up to the last
    missing snapshot, calibrate those snapshots, add them to their libraries, note where they were made, commit."""
    steps = missing_snapshots(ctx, task)
    if not steps:
        return
    cfg = recipe(task, Path("unused"), lr, ctx["data"], model=ctx["name"], rank=ctx["rank"], unique_a=ctx["unique_a"])
    examples = load_task(task, "train", data_dir=ctx["data"], max_examples=FULL_TRAIN, seed=SEED)
    print(f"[paper] {task}: snapshots at steps {steps} (lr {lr:g})", file=sys.stderr, flush=True)
    session, on_step = Session(cfg, ctx["model"], ctx["tok"], examples), snapshotter(ctx["work"], task, steps)
    while len(session.log) < max(steps):
        on_step(session, session.step())
    session.model.unload()
    art, f = ctx["art"], ctx["art"] / "runs" / f"{task}.json"
    record, touched = files.read_json(f, "run record"), [f]
    for s in steps:
        d = ctx["work"] / f"step-{s}" / task
        calibrated(ctx, d, task)
        touched.append(add_to_library(art / "checkpoints" / f"step-{s}", task, d))
        record.setdefault("snapshots", {})[str(s)] = {"device": str(ctx["device"]), "machine": machine(),
                                                      "base_dtype": dtype_name(ctx["dtype"]), "rerun": True}
    files.atomic_write_json(f, record)
    ctx["commit"](f"paper library: {task} snapshots at steps {steps}", touched)


# ---------------------------------------------------------------------------------------------- publishing
def add_to_library(path: Path, name: str, adapter: Path) -> Path:
    """Add one calibrated adapter dir to the library at `path` (created on first use, stored in STORAGE)."""
    if (path / files.MANIFEST).exists():
        lib = LoraLibrary.load(path)
        if name not in lib:
            lib.add_peft(name, adapter)
    else:
        LoraLibrary.from_peft({name: adapter}).save(path, dtype=STORAGE)
    return path


def run_record(ctx: dict, task: str, rec: dict, out: Path) -> dict:
    meta = files.read_json(out / files.ADAPTER_META, "adapter meta")
    loss = [round(json.loads(ln)["loss"], 4) for ln in (out / files.TRAIN_LOG).read_text().splitlines()]
    return {"task": task, "lr": rec["lr"], "sweep": {f"{p['lr']:g}": p["accuracy"] for p in rec["points"]},
            "sweep_base_accuracy": rec["base"]["accuracy"], "steps": meta["steps"], "epochs": EPOCHS,
            "n_train": meta["n_train"], "train_seconds": meta["train_seconds"], "wall_seconds": meta.get("wall_seconds"),
            "tokens_per_s": meta["tokens_per_s"], "base_dtype": meta["base_dtype"], "device": str(ctx["device"]),
            "machine": machine(), "final_loss": meta["final_loss"], "loss": loss, "checkpoints": list(ctx["checkpoints"]),
            "calibration_examples": CALIBRATION, "storage_dtype": STORAGE, "shared_a": not ctx["unique_a"],
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def publish(ctx: dict, task: str, rec: dict, out: Path) -> None:
    """Snapshots first, the final adapter last: a task counts as done once it is in ARTIFACTS' library."""
    art, touched = ctx["art"], []
    for s in ctx["checkpoints"]:
        d = ctx["work"] / f"step-{s}" / task
        if (d / files.STATS_FILE).exists():
            touched.append(add_to_library(art / "checkpoints" / f"step-{s}", task, d))
    f = art / "runs" / f"{task}.json"
    files.atomic_write_json(f, run_record(ctx, task, rec, out))
    add_to_library(art, task, out)
    kind = "unique-A paper library" if ctx["unique_a"] else "paper library"
    ctx["commit"](f"{kind}: {task} (lr {rec['lr']:g})",
                  [f, art / files.MANIFEST, art / files.ADAPTERS_DIR, *touched,
                   *art.glob(f"{files.SHARED_A_PREFIX}-*")])


def done_tasks(art: Path) -> list[str]:
    return LoraLibrary.load(art).names if (art / files.MANIFEST).exists() else []


def git_committer(enabled: bool):
    def commit(message: str, paths: list[Path]) -> None:
        if enabled:
            commit_only(paths, f"Issue 28: {message}")
    return commit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--data", default=os.environ.get("SEQR_TASK_DATA"), help="task dir (default $SEQR_TASK_DATA)")
    p.add_argument("--work", default=None, help="resumable training state, kept out of git (default runs/paper, "
                                                 "runs/paper-unique with --unique-a)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda where a GPU is available")
    p.add_argument("--commit", action="store_true", help="git commit every finished piece at once")
    p.add_argument("--artifacts", default=None,
                   help=f"the committed store (default {ARTIFACTS}; with --unique-a {UNIQUE_ARTIFACTS})")
    p.add_argument("--unique-a", action="store_true",
                   help="ordinary LoRA, A trained and stored per adapter (the paper's Table 2; no snapshots by default)")
    p.add_argument("--model", default=MODEL, help=f"base model (default {MODEL}; tests pass a tiny one)")
    p.add_argument("--snapshots-only", action="store_true",
                   help="only rebuild the committed tasks' missing snapshot libraries (the first steps of each run)")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank (alpha = 2 rank; default 32, the paper's)")
    p.add_argument("--checkpoints", default=None,
                   help=f"steps whose snapshots are kept, comma-separated (default {','.join(map(str, CHECKPOINTS))}; "
                        "none with --unique-a)")
    a = p.parse_args(argv)
    device = data_and_device(p, a)
    art = Path(a.artifacts or (UNIQUE_ARTIFACTS if a.unique_a else ARTIFACTS))
    done = done_tasks(art)
    checkpoints = a.checkpoints if a.checkpoints is not None else "" if a.unique_a else ",".join(map(str, CHECKPOINTS))
    steps = tuple(int(x) for x in checkpoints.split(",") if x)
    if a.snapshots_only:  # committed tasks whose snapshot libraries lack them
        todo = [t for t in a.tasks if t in done and any(t not in done_tasks(art / "checkpoints" / f"step-{s}")
                                                         for s in steps)]
    else:
        todo = [t for t in a.tasks if t not in done]
    print(f"[paper] committed: {done}; to do: {todo}", file=sys.stderr, flush=True)
    if not todo:
        return 0
    model, tok = load_model(a.model, dtype="auto", device=device)
    work = Path(a.work or ("runs/paper-unique" if a.unique_a else "runs/paper"))
    ctx = {"model": model, "tok": tok, "name": a.model, "data": a.data, "work": work, "device": device, "art": art,
           "dtype": next(model.parameters()).dtype, "commit": git_committer(a.commit),
           "checkpoints": steps, "rank": a.rank, "unique_a": a.unique_a}
    for task in todo:
        rec = sweep(ctx, task)
        if a.snapshots_only:
            snapshots_run(ctx, task, rec["lr"])
        else:
            publish(ctx, task, rec, full_run(ctx, task, rec["lr"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
