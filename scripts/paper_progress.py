"""Summarise what scripts/build_paper_library.sh has finished so far (issue 14, item 1): per task the sweep
(accuracy on 100 dev examples per rate, the untouched model's, the chosen rate) and the full runs (steps, wall
time, tokens/s, loss curve). Writes OUT/training.json and OUT/training.md; reads only RUN (the run's root).

Usage: python scripts/paper_progress.py runs/paper [docs/results/paper_library]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from seqr.store import files


def task_summary(run: Path, task: str) -> dict:
    out: dict = {"task": task}
    best = run / "sweep" / task / "best.json"
    if best.exists():
        b = json.loads(best.read_text())
        out["sweep"] = {"rates": b["rates"], "base_accuracy": b["base_accuracy"], "chosen_lr": b["lr"]}
    for which in ("shared", "unique"):
        meta = run / which / "adapters" / task / files.ADAPTER_META
        if meta.exists():
            m = json.loads(meta.read_text())
            log = (meta.parent / files.TRAIN_LOG).read_text().splitlines()
            out[which] = {"lr": m["config"]["lr"], "steps": m["steps"], "n_train": m["n_train"],
                          "train_seconds": m["train_seconds"], "tokens_per_s": m["tokens_per_s"],
                          "loss": [round(json.loads(line)["loss"], 4) for line in log],
                          "calibrated": (meta.parent / files.STATS_FILE).exists()}
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| task | base acc (100 dev) | sweep acc by rate | chosen lr | shared-A: steps, wall s, tok/s, "
             "first/last loss (mean of 10 steps) | unique-A |", "|---|---:|---|---:|---|---|"]
    for r in rows:
        sw = r.get("sweep")
        rates = ", ".join(f"{k}: {v:.2f}" for k, v in sw["rates"].items()) if sw else "-"
        cells = []
        for which in ("shared", "unique"):
            t = r.get(which)
            if t is None:
                cells.append("-")
                continue
            first, last = sum(t["loss"][:10]) / 10, sum(t["loss"][-10:]) / 10
            cells.append(f"{t['steps']}, {t['train_seconds']:.0f}, {t['tokens_per_s']:.0f}, {first:.3f} / {last:.3f}")
        lines.append(f"| {r['task']} | {sw['base_accuracy']:.2f} | {rates} | {sw['chosen_lr']:g} | {cells[0]} | "
                     f"{cells[1]} |" if sw else f"| {r['task']} | - | - | - | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    run = Path(argv[0])
    out = Path(argv[1] if len(argv) > 1 else "docs/results/paper_library")
    tasks = sorted(p.name for p in (run / "sweep").iterdir()) if (run / "sweep").is_dir() else []
    rows = [task_summary(run, t) for t in tasks]
    files.atomic_write_json(out / "training.json", {"run": str(run), "tasks": rows})
    files.atomic_write_bytes(out / "training.md", ("# Paper-budget library: training so far\n\n" + markdown(rows)).encode())
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
