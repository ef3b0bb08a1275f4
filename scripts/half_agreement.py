"""Half-precision residency on real text: SEQR's per-token routing decisions with the paper-budget library held in
float16 / bfloat16 against the same library held in float32 (issue 31, item 2), on SmolLM2-135M-Instruct (float32).

Usage: SEQR_TASK_DATA=../shared/data/tasks python scripts/half_agreement.py [--per-task 4] [--out FILE]

Per task, the first --per-task dev examples (seed 0), each prompt (its text and pair, at most MAX_TOKENS tokens)
one forward routed per token with a full trace, once per resident dtype. Reported per dtype: the share of the
(token, layer) decisions that pick the float32 library's adapter, over all decisions and over those whose float32
margin is clear (runner-up more than CLEAR of the top score behind, as tests/test_memory.py defines it).
Decisions past the first layer see inputs the earlier layers' half-precision updates changed, so this is the
agreement a user gets end to end, not layer by layer.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from tqdm import tqdm

from seqr import attach, detach, routing
from seqr.bench.common import machine_info
from seqr.hf.models import load_model
from seqr.silo.tasks import load_task
from seqr.store.library import LoraLibrary

LIBRARY = Path("artifacts/paper-library")
DTYPES = ("float32", "float16", "bfloat16")
MAX_TOKENS = 128
CLEAR = 2e-2  # a clear margin: top - runner-up > CLEAR * max(|top|, 1)


def decisions(model, lib, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (token, layer) decision of SEQR per token over the prompts: (chosen (D,), clear margin (D,) bool)."""
    attach(model, lib, granularity="token")
    chosen, clear = [], []
    try:
        for ids in prompts:
            with torch.no_grad(), routing(model, "seqr", trace=True) as tr:
                model(input_ids=ids)
            d = tr.decisions()
            top = d["norm"].max(-1).values  # (D,) the calibrated scores' top
            chosen.append(d["chosen"])
            clear.append(d["margin"] > CLEAR * top.abs().clamp(min=1))
    finally:
        detach(model)
    return torch.cat(chosen), torch.cat(clear)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-task", type=int, default=4)
    p.add_argument("--data", default=os.environ.get("SEQR_TASK_DATA"))
    p.add_argument("--out", default="docs/results/half_agreement.json")
    a = p.parse_args()
    if not a.data or not Path(a.data).is_dir():
        p.error(f"--data / $SEQR_TASK_DATA must name the task directory, got {a.data!r}")
    model, tok = load_model("smollm2-135m-instruct", dtype="float32")
    names = LoraLibrary.load(LIBRARY).names
    prompts = []
    for task in names:
        for ex in load_task(task, "dev", data_dir=a.data, max_examples=a.per_task, seed=0):
            text = ex.text if ex.text_pair is None else f"{ex.text}\n{ex.text_pair}"
            prompts.append(torch.tensor([tok(text)["input_ids"][:MAX_TOKENS]]))  # (1, L)
    runs = {dt: decisions(model, LoraLibrary.load(LIBRARY, resident_dtype=dt), tqdm(prompts, desc=dt))
            for dt in DTYPES}
    ref, clear = runs["float32"]
    out = {"machine": machine_info(), "library": str(LIBRARY), "examples": len(prompts), "decisions": len(ref),
           "clear_share": round(float(clear.float().mean()), 4), "clear_margin": CLEAR, "agreement": {}}
    for dt in DTYPES[1:]:
        same = runs[dt][0] == ref  # (D,)
        out["agreement"][dt] = {"all": round(float(same.float().mean()), 5),
                                "clear": round(float(same[clear].float().mean()), 5)}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["agreement"]), f"over {len(ref)} decisions ({out['clear_share']:.1%} clear)")


if __name__ == "__main__":
    main()
