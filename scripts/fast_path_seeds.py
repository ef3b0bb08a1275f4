# Usage: python scripts/fast_path_seeds.py  (writes logs/exp_sst2.json; copied to docs/results/fast_path_sst2_seeds.json)
"""sst2, 300 examples, 1 epoch, rank 8: is the fast path's sst2 gap (86.3 vs 90.3) bucketing, or run-to-run noise?"""
import json, time

import seqr
import seqr.silo.train as T
from seqr.bench.train import dev_accuracy
from seqr.silo.tasks import load_task
D = "../shared/data/tasks"
model, tok = seqr.load_model("smollm2-135m-instruct")
train = load_task("sst2", "train", data_dir=D, max_examples=300, seed=0)
dev = load_task("sst2", "dev", data_dir=D, seed=0)
gold = [e.label for e in dev]
res = {}
for label, path, seed, bucket in [("fast-nobucket-seed0", "fast", 0, False), ("reference-seed1", "reference", 1, None), ("fast-bucket-seed1", "fast", 1, True)]:
    orig = T.bucketed_order
    if bucket is False:
        T.bucketed_order = lambda lengths, bs, gen, window=16: T.shuffled_order(len(lengths), bs, gen)
    cfg = T.TrainConfig(model="smollm2-135m-instruct", task="sst2", out=f"runs/exp/{label}", rank=8, alpha=16, epochs=1, max_train=300, seed=seed, path=path, force=True)
    t0 = time.time(); T.train(cfg, model=model, tokenizer=tok, examples=train, progress=False); T.bucketed_order = orig
    pred = dev_accuracy(model, tok, cfg.out, dev, 8)
    res[label] = {"acc": sum(p == g for p, g in zip(pred, gold)) / len(gold), "pred": pred, "train_s": time.time() - t0}
    print(label, res[label]["acc"], round(res[label]["train_s"]), flush=True)
json.dump(res, open("logs/exp_sst2.json", "w"))
