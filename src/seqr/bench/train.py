"""`seqr bench train`: the fp32 reference path against the fast path, side by side in one run, on the real model.

Per task, the same training examples are trained twice, the two sessions' steps interleaved (one step of each per
round, the order alternating) so that drift and bursts of other load fall on both alike:

  fp32   the base model in float32, the plain peft loop: full logits at every position, shuffled batches
  fast   the base model in --dtype (auto: bf16 where the machine multiplies it natively), the LM head only at the
         answer positions, length-bucketed batches, fast dropout (seqr train's default)

Training tokens/s = real (non-padding) tokens / seconds inside the optimizer steps; both paths see every example
once per epoch, so the token counts are equal. Then each adapter's dev accuracy on its own path (the fp32 adapter on
the fp32 model, the fast one on the fast model), with an exact sign test over the dev examples.

With two or more tasks, the fast adapters are calibrated (fp32 model) into one shared-A library and the dev
examples of every task are scored SEQR-routed on the fp32 model and on the fast model, batch by batch interleaved:
evaluation examples/s of each, the share of examples whose prediction agrees, and the share of (token, layer)
routing decisions that pick the same adapter.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from seqr.bench.common import contention_note, cpu_snapshot, machine_info, machine_line, other_cpu_share, write_json
from seqr.core.argfmt import existing_dir
from seqr.hf.dtypes import add_arg as add_dtype_arg
from seqr.hf.dtypes import choose, name
from seqr.core.stats import sign_test_p

DEFAULT_MODEL = "smollm2-135m-instruct"
MODE_DEFAULTS = {  # mode -> defaults of the options left unset
    "full": {"tasks": ["sst2", "agnews"], "max_train": 300, "max_eval": None, "calib": 40, "epochs": 1.0},
    "quick": {"tasks": ["sst2", "agnews"], "max_train": 32, "max_eval": 40, "calib": 16, "epochs": 1.0},
}
TARGETS = {"speedup": 3.0, "sign_test_p": 0.2, "eval_speedup": 2.5, "prediction_agreement": 0.97,
           "routing_agreement": 0.99}


def _models(model_name: str, fast_dtype: torch.dtype) -> dict:
    """Two separate base models (each session wraps its own in peft), and the tokenizer."""
    import copy

    from seqr.hf.models import load_model

    fp32, tok = load_model(model_name, dtype=torch.float32)
    fast = copy.deepcopy(fp32) if fast_dtype == torch.float32 else load_model(model_name, dtype=fast_dtype)[0]
    return {"fp32": fp32, "fast": fast, "tok": tok}


def train_pair(models: dict, task: str, examples, cfg, out: Path, bar) -> dict:
    """Train the fp32 and the fast adapter of one task, steps interleaved; returns their numbers and dirs."""
    from seqr.silo.train import Session

    sessions = {key: Session(replace(cfg, path=path, out=str(out / f"{task}-{key}")), models[key], models["tok"],
                             examples) for key, path in (("fp32", "reference"), ("fast", "fast"))}
    order, rnd = list(sessions), 0
    while not all(s.done for s in sessions.values()):
        for key in order if rnd % 2 == 0 else order[::-1]:
            if not sessions[key].done:
                sessions[key].step()
                bar.update(1)
        rnd += 1
    res = {}
    for key, s in sessions.items():
        s.finish(Path(s.cfg.out))
        res[key] = {"tokens": s.tokens(), "seconds": s.seconds, "tokens_per_s": s.tokens() / s.seconds,
                    "steps": len(s.log), "final_loss": s.log[-1]["loss"], "dir": s.cfg.out,
                    "padding_share": 1 - s.tokens() / sum(r["padded_tokens"] for r in s.log)}
    return res


def predictions(scores: list[list[float]]) -> list[int]:
    """The best-scoring choice of every example."""
    return [max(range(len(s)), key=s.__getitem__) for s in scores]


def dev_accuracy(model, tok, adapter_dir: str, examples, batch_size: int) -> list[int]:
    """Predictions on `examples` of the model with one adapter (seqr.attach, fixed to it)."""
    from seqr.hf.layers import attach, detach
    from seqr.store.library import LoraLibrary
    from seqr.hf.choices import choice_logprobs

    lib = LoraLibrary.from_peft({"adapter": adapter_dir})
    attach(model, lib, adapter="adapter")
    try:
        return predictions(choice_logprobs(model, tok, examples, batch_size=batch_size, progress=False))
    finally:
        detach(model)


def paired_accuracy(pred_a: list[int], pred_b: list[int], gold: list[int]) -> dict:
    only_a = sum(a == g != b for a, b, g in zip(pred_a, pred_b, gold))
    only_b = sum(b == g != a for a, b, g in zip(pred_a, pred_b, gold))
    n = len(gold)
    return {"n": n, "fp32_acc": sum(a == g for a, g in zip(pred_a, gold)) / n,
            "fast_acc": sum(b == g for b, g in zip(pred_b, gold)) / n, "only_fp32": only_a, "only_fast": only_b,
            "sign_test_p": sign_test_p(only_a, only_b)}


def routed_eval(models: dict, lib, data: dict, batch_size: int, bar) -> dict:
    """SEQR-routed scoring of every task's dev examples on the fp32 and the fast model, batch by batch
    interleaved: examples/s, prediction agreement, and (token, layer) routing agreement."""
    from seqr.eval.evaluate import length_chunks
    from seqr.hf.layers import attach, detach, routing
    from seqr.hf.choices import choice_logprobs

    tok = models["tok"]
    keys = ("fp32", "fast")
    for key in keys:
        attach(models[key], lib, method="seqr", granularity="token")
    seconds, pred, gold = dict.fromkeys(keys, 0.0), {k: [] for k in keys}, []
    same = total = 0
    try:
        for rnd, (task, chunk) in enumerate((t, c) for t in data for c in length_chunks(data[t], batch_size)):
            exs = [data[task][i] for i in chunk]
            gold += [ex.label for ex in exs]
            choice = {}
            for key in keys if rnd % 2 == 0 else keys[::-1]:
                t0 = time.perf_counter()
                with torch.no_grad(), routing(models[key], "seqr", trace="choices") as tr:
                    scores = choice_logprobs(models[key], tok, exs, batch_size=len(exs), progress=False)
                seconds[key] += time.perf_counter() - t0
                pred[key] += predictions(scores)
                choice[key] = tr.choices()  # (D,) the adapter of every (token, layer) decision
            same += int((choice["fp32"] == choice["fast"]).sum())
            total += choice["fp32"].numel()
            bar.update(1)
    finally:
        for key in keys:
            detach(models[key])
    n = len(gold)
    return {"examples": n, "fp32_examples_per_s": n / seconds["fp32"], "fast_examples_per_s": n / seconds["fast"],
            "eval_speedup": seconds["fp32"] / seconds["fast"],
            "prediction_agreement": sum(a == b for a, b in zip(pred["fp32"], pred["fast"])) / n,
            "routing_decisions": total, "routing_agreement": same / total,
            "fp32_routed_acc": sum(p == g for p, g in zip(pred["fp32"], gold)) / n,
            "fast_routed_acc": sum(p == g for p, g in zip(pred["fast"], gold)) / n}


def calibrated_library(models: dict, adapters: dict[str, str], calib: dict, batch_size: int):
    """The fast adapters, each calibrated on its own task's training examples (fp32 model), as one library."""
    from seqr.silo.calibrate import calibrate
    from seqr.store.library import LoraLibrary

    for task, d in adapters.items():
        calibrate(models["fp32"], models["tok"], d, calib[task], batch_size=batch_size, progress=False)
    return LoraLibrary.from_peft(adapters)


def measure(args, run: dict, out: Path) -> dict:
    from seqr.silo.tasks import load_task
    from seqr.silo.train import TrainConfig

    fast_dtype, why = choose(args.dtype)
    models = _models(args.model, fast_dtype)
    cfg = TrainConfig(model=args.model, task="", out="", rank=args.rank, alpha=2 * args.rank, epochs=run["epochs"],
                      max_train=run["max_train"], seed=args.seed, lr=args.lr)
    train = {t: load_task(t, "train", data_dir=args.data, max_examples=run["max_train"], seed=args.seed)
             for t in run["tasks"]}
    dev = {t: load_task(t, "dev", data_dir=args.data, max_examples=run["max_eval"], seed=args.seed)
           for t in run["tasks"]}
    steps = sum(2 * max(1, round(-(-len(train[t]) // cfg.batch_size) * cfg.epochs)) for t in run["tasks"])
    tasks = {}
    with tqdm(total=steps, desc="bench train: steps (fp32 + fast)", file=sys.stderr) as bar:
        for t in run["tasks"]:
            tasks[t] = {"train": train_pair(models, t, train[t], replace(cfg, task=t), out, bar)}
    for t in tqdm(run["tasks"], desc="bench train: dev accuracy", file=sys.stderr):
        gold = [ex.label for ex in dev[t]]
        pa = dev_accuracy(models["fp32"], models["tok"], tasks[t]["train"]["fp32"]["dir"], dev[t], args.batch_size)
        pb = dev_accuracy(models["fast"], models["tok"], tasks[t]["train"]["fast"]["dir"], dev[t], args.batch_size)
        tasks[t]["dev"] = paired_accuracy(pa, pb, gold) | {"pred_fp32": pa, "pred_fast": pb}
    result = summarise(tasks, fast_dtype, why)
    if len(run["tasks"]) > 1:
        calib = {t: train[t][:run["calib"]] for t in run["tasks"]}
        lib = calibrated_library(models, {t: tasks[t]["train"]["fast"]["dir"] for t in run["tasks"]}, calib,
                                 args.batch_size)
        from seqr.eval.evaluate import length_chunks
        chunks = sum(len(length_chunks(dev[t], args.batch_size)) for t in run["tasks"])
        with tqdm(total=chunks, desc="bench train: routed eval (fp32 + fast)", file=sys.stderr) as bar:
            result["eval"] = routed_eval(models, lib, dev, args.batch_size, bar)
    result["tasks"] = tasks
    return result


def summarise(tasks: dict, fast_dtype: torch.dtype, why: str) -> dict:
    """The headline numbers over all tasks: pooled tokens/s, pooled dev accuracy and sign test."""
    speed = {k: sum(t["train"][k]["tokens"] for t in tasks.values()) / sum(t["train"][k]["seconds"]
                                                                           for t in tasks.values())
             for k in ("fp32", "fast")}  # pooled real tokens per second of optimizer steps
    dev = [t["dev"] for t in tasks.values()]
    n = sum(d["n"] for d in dev)
    only_a, only_b = sum(d["only_fp32"] for d in dev), sum(d["only_fast"] for d in dev)
    return {"fast_dtype": name(fast_dtype), "fast_dtype_reason": why, "fp32_tokens_per_s": speed["fp32"],
            "fast_tokens_per_s": speed["fast"], "speedup": speed["fast"] / speed["fp32"],
            "fp32_dev_acc": sum(d["fp32_acc"] * d["n"] for d in dev) / n,
            "fast_dev_acc": sum(d["fast_acc"] * d["n"] for d in dev) / n, "dev_examples": n,
            "only_fp32": only_a, "only_fast": only_b, "sign_test_p": sign_test_p(only_a, only_b)}


def targets(result: dict) -> dict:
    """Each of the fast path's targets (`TARGETS`) that this run measured: value, target, met."""
    out = {"speedup": (result["speedup"], ">="), "sign_test_p": (result["sign_test_p"], ">")}
    ev = result.get("eval")
    if ev:
        out |= {k: (ev[k], ">=") for k in ("eval_speedup", "prediction_agreement", "routing_agreement")}
    return {k: {"value": v, "target": TARGETS[k], "op": op,
                "met": v >= TARGETS[k] if op == ">=" else v > TARGETS[k]} for k, (v, op) in out.items()}


def report(payload: dict) -> str:
    r, cfg = payload["result"], payload["config"]
    lines = [machine_line(payload["machine"]),
             f"fast path: base model in {r['fast_dtype']} ({r['fast_dtype_reason']}); fp32 path: float32, full logits,"
             f" shuffled batches; rank {cfg['rank']}, {cfg['epochs']:g} epoch(s), {cfg['max_train']} training examples "
             f"per task, steps interleaved", "",
             "| task | path | steps | tokens | seconds | tokens/s | padding | final loss | dev acc |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for t, res in r["tasks"].items():
        for k in ("fp32", "fast"):
            tr, d = res["train"][k], res["dev"]
            lines.append(f"| {t} | {k} | {tr['steps']} | {tr['tokens']} | {tr['seconds']:.1f} | {tr['tokens_per_s']:.1f} "
                         f"| {tr['padding_share']:.1%} | {tr['final_loss']:.3f} | {d[k + '_acc']:.1%} (n={d['n']}) |")
        d = res["dev"]
        lines.append(f"| {t} | sign test | | | | | | | only fp32 {d['only_fp32']} / only fast {d['only_fast']}, "
                     f"p = {d['sign_test_p']:.3g} |")
    lines += ["", f"training tokens/s: fp32 {r['fp32_tokens_per_s']:.1f}, fast {r['fast_tokens_per_s']:.1f}; dev accuracy "
              f"fp32 {r['fp32_dev_acc']:.1%}, fast {r['fast_dev_acc']:.1%} over {r['dev_examples']} examples "
              f"(only fp32 right {r['only_fp32']}, only fast right {r['only_fast']}, exact sign test p = {r['sign_test_p']:.3g})"]
    ev = r.get("eval")
    if ev:
        lines.append(f"SEQR-routed evaluation of {ev['examples']} dev examples: fp32 {ev['fp32_examples_per_s']:.2f} "
                     f"examples/s, fast {ev['fast_examples_per_s']:.2f} ({ev['eval_speedup']:.2f}x); predictions agree on "
                     f"{ev['prediction_agreement']:.1%}; routing decisions agree on {ev['routing_agreement']:.2%} of "
                     f"{ev['routing_decisions']} (token, layer) pairs; accuracy fp32 {ev['fp32_routed_acc']:.1%}, fast "
                     f"{ev['fast_routed_acc']:.1%}")
    for k, t in payload["targets"].items():
        lines.append(f"target {k} {t['op']} {t['target']:g}: {'met' if t['met'] else 'NOT met'} ({t['value']:.3g})")
    if note := contention_note(payload["machine"]):
        lines.append(note)
    return "\n".join(lines)


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"base model for seqr.load_model (default {DEFAULT_MODEL})")
    p.add_argument("--data", type=existing_dir,
                   help="JSONL task dir <task>/{train,dev}.jsonl (default $SEQR_TASK_DATA, else HF datasets)")
    p.add_argument("--tasks", nargs="+", help="tasks (default sst2 agnews)")
    p.add_argument("--max-train", type=int, help="training examples per task (default 300; --quick 32)")
    p.add_argument("--max-eval", type=int, help="dev examples per task, 0 = all (default all; --quick 40)")
    p.add_argument("--calib", type=int, help="calibration examples per adapter for the routed eval (default 40)")
    p.add_argument("--epochs", type=float, help="epochs (default 1)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank, alpha = 2 x rank (default 8)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=8, help="evaluation batch size (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the example subsets and training (default 0)")
    add_dtype_arg(p)
    p.add_argument("--out", type=Path, help="keep the trained adapters here (default: a temporary dir)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write every number to this JSON file")
    p.add_argument("--quick", action="store_true", help="32 training and 40 dev examples per task: under 10 min here")


def cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    d = MODE_DEFAULTS["quick" if args.quick else "full"]
    run = {k: v if (v := getattr(args, k)) is not None else d[k] for k in d}
    run["max_eval"] = run["max_eval"] or None
    for k in ("max_train", "calib", "rank", "batch_size"):
        v = run.get(k, getattr(args, k))
        if v is None or v < 1:
            parser.error(f"--{k.replace('_', '-')} must be positive, got {v}")
    if not run["epochs"] > 0:
        parser.error(f"--epochs must be positive, got {run['epochs']}")
    info, t0, cpu0 = machine_info(), time.perf_counter(), cpu_snapshot()
    with tempfile.TemporaryDirectory(prefix="seqr-bench-train-") as tmp:
        out = args.out or Path(tmp)
        result = measure(args, run, out)
    info["other_cpu_share"] = other_cpu_share(cpu0, cpu_snapshot())
    info["contention_warning"] = contention_note(info)
    payload = {"machine": info, "config": {"model": args.model, **run, "rank": args.rank, "lr": args.lr,
                                           "dtype": args.dtype, "seed": args.seed, "quick": args.quick},
               "result": result, "wall_s": time.perf_counter() - t0}
    payload["targets"] = targets(result)
    payload.update({k: result[k] for k in ("fp32_tokens_per_s", "fast_tokens_per_s", "speedup", "fp32_dev_acc",
                                           "fast_dev_acc")})
    print(report(payload))
    print(f"total wall time {payload['wall_s']:.0f} s")
    if args.json:
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    print(f"speedup {result['speedup']:.2f}x")
    return 0
