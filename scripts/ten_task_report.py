"""Issue 4's report: per-task dev accuracy of each adapter vs the untouched model, training time per adapter,
and the spread of the calibration stats across adapters (the paper's Figure 2 finding).

Usage: python scripts/ten_task_report.py runs/ten-task [--max-dev 60]   (writes report.json / report.md there)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import seqr
from seqr.store import files
from seqr.hf.choices import accuracy
from seqr.silo.tasks import load_task


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run", type=Path)
    p.add_argument("--max-dev", type=int, default=60)
    p.add_argument("--data", default=None)
    a = p.parse_args()
    lib = seqr.LoraLibrary.load(a.run / "library")
    model, tok = seqr.load_model("smollm2-135m-instruct")
    seqr.attach(model, lib, method="base")
    rows = []
    for task in lib.names:
        dev = load_task(task, "dev", data_dir=a.data, max_examples=a.max_dev, seed=0)
        meta = json.loads((a.run / "adapters" / task / files.ADAPTER_META).read_text())
        t0 = time.time()
        with torch.no_grad(), seqr.routing(model, "base"):
            base = accuracy(model, tok, dev, progress=False)
        with torch.no_grad(), seqr.routing(model, adapter=task):
            own = accuracy(model, tok, dev, progress=False)
        mus = [s.mean for s in lib.stats(task).values()]
        rows.append({"task": task, "dev_examples": len(dev), "base_acc": base, "adapter_acc": own,
                     "train_seconds": meta["train_seconds"], "n_train": meta["n_train"], "final_loss": meta["final_loss"],
                     "mu_mean": statistics.fmean(mus), "sigma_mean": statistics.fmean(s.std for s in lib.stats(task).values()),
                     "eval_seconds": round(time.time() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    # spread across adapters, per layer: max mu / min mu
    ratios = []
    for layer in lib.layers:
        mu = [lib.stats(n)[layer].mean for n in lib.names]
        ratios.append(max(mu) / min(mu))
    spread = {"per_layer_mu_max_over_min_median": statistics.median(ratios), "max": max(ratios), "min": min(ratios)}
    report = {"rows": rows, "mu_spread": spread, "library": str(a.run / "library")}
    files.atomic_write_json(a.run / "report.json", report)
    lines = ["| task | untouched acc | own adapter acc | train s | train examples | final loss | mean mu | mean sigma |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['base_acc']:.1%} | {r['adapter_acc']:.1%} | {r['train_seconds']:.0f} | "
                     f"{r['n_train']} | {r['final_loss']:.3f} | {r['mu_mean']:.3f} | {r['sigma_mean']:.3f} |")
    avg_b = statistics.fmean(r["base_acc"] for r in rows)
    avg_a = statistics.fmean(r["adapter_acc"] for r in rows)
    lines.append(f"| **average** | {avg_b:.1%} | {avg_a:.1%} | | | | | |")
    lines += ["", f"per-layer spread of mu across the {len(lib.names)} adapters (max/min): median "
              f"{spread['per_layer_mu_max_over_min_median']:.2f}x, range {spread['min']:.2f}x to {spread['max']:.2f}x"]
    files.atomic_write_bytes(a.run / "report.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
