# Usage: python scripts/bf16_agreement.py N  (after seqr bench train --out runs/bench-train; writes logs/bf16_agreement.json)
"""Real text: SEQR routing and predictions with the base model in bf16 vs fp32 (same calibrated library), via bench_train.routed_eval."""
import json, sys, torch, seqr
from tqdm import tqdm
from seqr.bench.train import routed_eval
from seqr.silo.tasks import load_task
n = int(sys.argv[1])
m32, tok = seqr.load_model("smollm2-135m-instruct", dtype="float32")
m16, _ = seqr.load_model("smollm2-135m-instruct", dtype="bfloat16")
lib = seqr.LoraLibrary.from_peft({t: f"runs/bench-train/{t}-fast" for t in ("sst2", "agnews")})
dev = {t: load_task(t, "dev", data_dir="../shared/data/tasks", max_examples=n, seed=0) for t in ("sst2", "agnews")}
with tqdm(total=2 * (n // 8)) as bar:
    res = routed_eval({"fp32": m32, "fast": m16, "tok": tok}, lib, dev, 8, bar)
print(json.dumps(res, indent=1))
json.dump(res, open("logs/bf16_agreement.json", "w"), indent=1)
