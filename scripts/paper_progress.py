"""Summarise the committed paper-budget library (issue 28): per task the sweep (accuracy on 100 dev examples per
rate, the untouched model's, the chosen rate), the full run (steps, wall time, tokens/s, loss, where it ran) and
which snapshots are in; what the weights weigh. Writes OUT/training.json and OUT/training.md from ART alone.

Usage: python scripts/paper_progress.py [artifacts/paper-library] [docs/results/paper_library]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from seqr.store import files
from seqr.store.library import LoraLibrary

TASKS = ("agnews", "cola", "dbpedia", "hellaswag", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2")


def task_summary(art: Path, task: str, snapshot_libs: dict[str, list[str]]) -> dict:
    out: dict = {"task": task, "snapshots": [s for s, names in snapshot_libs.items() if task in names]}
    sweep, run = art / "sweeps" / f"{task}.json", art / "runs" / f"{task}.json"
    if sweep.exists():
        s = json.loads(sweep.read_text())
        out["sweep"] = {"rates": {f"{p['lr']:g}": p["accuracy"] for p in sorted(s["points"], key=lambda p: p["lr"])},
                        "base_accuracy": s.get("base", {}).get("accuracy"), "chosen_lr": s.get("lr")}
    if run.exists():
        r = json.loads(run.read_text())
        where = r["machine"].get("gpu") or f"CPU ({', '.join(r['machine']['cpu_flags'])})"
        out["run"] = {k: r[k] for k in ("lr", "steps", "n_train", "train_seconds", "wall_seconds", "tokens_per_s",
                                        "base_dtype", "final_loss", "loss")} | {"where": where}
    return out


def weights_bytes(art: Path) -> int:
    """Bytes of the tensor files under ART, each content once (a content-hashed name, e.g. the shared A every
    library dir holds, is one object in git)."""
    return sum({f.name: f.stat().st_size for f in art.rglob("*.safetensors")}.values())


def markdown(rows: list[dict], total: int) -> str:
    lines = ["| task | base acc (100 dev) | sweep acc by rate | chosen lr | steps | train s | tok/s | where, base dtype "
             "| loss first / last 10 steps | snapshots |", "|---|---:|---|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        sw, run = r.get("sweep"), r.get("run")
        rates = ", ".join(f"{k}: {v:.2f}" for k, v in sw["rates"].items()) if sw else "-"
        base = f"{sw['base_accuracy']:.2f}" if sw and sw["base_accuracy"] is not None else "-"
        chosen = f"{sw['chosen_lr']:g}" if sw and sw["chosen_lr"] else "-"
        if run:
            first, last = (sum(run["loss"][:10]) / 10, sum(run["loss"][-10:]) / 10)
            cells = (f"{run['steps']} | {run['train_seconds']:.0f} | {run['tokens_per_s']:.0f} | {run['where']}, "
                     f"{run['base_dtype']} | {first:.3f} / {last:.3f}")
        else:
            cells = "- | - | - | not trained yet | -"
        lines.append(f"| {r['task']} | {base} | {rates} | {chosen} | {cells} | {', '.join(r['snapshots']) or '-'} |")
    return "\n".join(lines) + f"\n\nCommitted tensor files (float16): {total / 2**20:.1f} MiB.\n"


def main(argv: list[str]) -> int:
    art = Path(argv[0] if argv else "artifacts/paper-library")
    out = Path(argv[1] if len(argv) > 1 else "docs/results/paper_library")
    snaps = {d.name: LoraLibrary.load(d).names for d in sorted((art / "checkpoints").glob("step-*"))
             if (d / files.MANIFEST).exists()}
    rows = [task_summary(art, t, snaps) for t in TASKS]
    total = weights_bytes(art)
    files.atomic_write_json(out / "training.json", {"artifacts": str(art), "weights_bytes": total, "tasks": rows})
    text = "# Paper-budget library: training\n\n" + markdown(rows, total)
    files.atomic_write_bytes(out / "training.md", text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
