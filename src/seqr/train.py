"""`seqr train`: one silo trains its LoRA on its own task data, with peft, never seeing another silo's data.

Shared-A mode (default, what SEQR routes): lora_A of every target module is drawn N(0, 1/r^2) from a
generator seeded by (--a-seed, module name) and frozen; only B (zero-initialised) is trained. Two silos
that train separately with the same seed therefore get bit-identical A, which `LoraLibrary.from_peft`
verifies. `--unique-a` trains ordinary LoRA (A and B), for the paper's comparison.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import files

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class TrainConfig:
    """Defaults follow the paper: rank 32, alpha 64, dropout 0.05, q/k/v/o, 2 epochs, batch 8, cosine, 5% warm-up."""

    model: str
    task: str
    out: str
    data: str | None = None
    a_seed: int = 0
    rank: int = 32
    alpha: float = 64
    dropout: float = 0.05
    epochs: float = 2
    lr: float = 1e-3
    batch_size: int = 8
    max_train: int | None = None
    unique_a: bool = False
    force: bool = False
    seed: int = 0
    warmup: float = 0.05
    scoring: str = "choices"  # answer format trained on: the choice text, or its option letter ("letter")
    target_modules: tuple[str, ...] = field(default=TARGETS)

    def __post_init__(self):
        for name in ("rank", "batch_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_train is not None and self.max_train <= 0:
            raise ValueError(f"max_train must be positive, got {self.max_train}")
        for name in ("epochs", "lr", "alpha"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.scoring not in ("choices", "letter"):
            raise ValueError(f"scoring must be 'choices' or 'letter', got {self.scoring!r}")
        if not 0 <= self.dropout < 1 or not 0 <= self.warmup < 1:
            raise ValueError(f"dropout and warmup must be in [0, 1), got {self.dropout} and {self.warmup}")


def shared_a(layer: str, shape: tuple[int, int], a_seed: int, dtype=torch.float32) -> torch.Tensor:
    """The frozen shared A of one layer: N(0, 1/r^2) from a generator seeded by (a_seed, layer name), so
    it does not depend on module order, process, or which silo draws it."""
    digest = hashlib.sha256(f"seqr-shared-a:{a_seed}:{layer}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    r = shape[0]
    return (torch.randn(shape, generator=g, dtype=torch.float64) / r).to(dtype)  # (r, n)


def lora_model(model, cfg: TrainConfig):
    """Wrap a base model with peft LoRA; in shared-A mode set and freeze every lora_A."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    peft_model = get_peft_model(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                                  target_modules=list(cfg.target_modules)))
    if not cfg.unique_a:
        for name, mod in peft_model.named_modules():
            if hasattr(mod, "lora_A") and "default" in mod.lora_A:
                layer = name.removeprefix("base_model.model.")
                W = mod.lora_A["default"].weight  # (r, n)
                with torch.no_grad():
                    W.copy_(shared_a(layer, tuple(W.shape), cfg.a_seed))
                W.requires_grad_(False)
    return peft_model


def encode(example, tokenizer, scoring: str = "choices") -> tuple[list[int], list[int]]:
    """(input ids, labels) of prompt + gold answer + end of turn; the loss sees the answer tokens only."""
    from .tasks import answer_text, build_prompt

    prompt = tokenizer(build_prompt(example, tokenizer, scoring=scoring), add_special_tokens=False).input_ids
    answer = tokenizer(answer_text(example, example.label, scoring), add_special_tokens=False).input_ids
    answer = answer + [tokenizer.eos_token_id]
    return prompt + answer, [-100] * len(prompt) + answer


def batches(encoded: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, gen: torch.Generator):
    """Shuffled, right-padded batches: input_ids, attention_mask, labels, each (B, L)."""
    order = torch.randperm(len(encoded), generator=gen).tolist()
    for start in range(0, len(order), batch_size):
        rows = [encoded[i] for i in order[start:start + batch_size]]
        L = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([x + [pad_id] * (L - len(x)) for x, _ in rows])  # (B, L)
        mask = torch.tensor([[1] * len(x) + [0] * (L - len(x)) for x, _ in rows])  # (B, L)
        labels = torch.tensor([y + [-100] * (L - len(y)) for _, y in rows])  # (B, L)
        yield ids, mask, labels


def train(cfg: TrainConfig, *, model=None, tokenizer=None, examples=None, progress: bool = True) -> Path:
    """Train one adapter and write it (peft files + seqr_adapter.json + train_log.jsonl) atomically to cfg.out.
    An adapter already at cfg.out is kept unless cfg.force."""
    from tqdm import tqdm
    from transformers import get_cosine_schedule_with_warmup

    out = Path(cfg.out)
    if (out / files.PEFT_WEIGHTS).exists() and not cfg.force:
        print(f"seqr train: {out} already holds a trained adapter; skipping (use --force to retrain)", file=sys.stderr)
        return out
    if model is None:
        from .models import load_model
        model, tokenizer = load_model(cfg.model)
    if examples is None:
        from .tasks import load_task
        examples = load_task(cfg.task, "train", data_dir=cfg.data, max_examples=cfg.max_train, seed=cfg.seed)
    if not examples:
        raise ValueError(f"task {cfg.task!r} has no training examples")
    torch.manual_seed(cfg.seed)
    peft_model = lora_model(model, cfg)
    peft_model.train()
    encoded = [encode(ex, tokenizer, cfg.scoring) for ex in examples]
    steps = math.ceil(len(encoded) / cfg.batch_size)
    total = max(1, round(steps * cfg.epochs))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, round(cfg.warmup * total), total)
    gen = torch.Generator().manual_seed(cfg.seed)
    log, step, t0 = [], 0, time.time()
    bar = tqdm(total=total, desc=f"train {Path(cfg.out).name}", disable=not progress, file=sys.stderr)
    while step < total:
        for ids, mask, labels in batches(encoded, cfg.batch_size, tokenizer.pad_token_id, gen):
            loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            log.append({"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0],
                        "tokens": int(mask.sum()), "seconds": round(time.time() - t0, 3)})
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step >= total:
                break
    bar.close()
    peft_model.eval()
    meta = {"task": cfg.task, "a_seed": None if cfg.unique_a else cfg.a_seed, "shared_a": not cfg.unique_a,
            "n_train": len(encoded), "steps": step, "train_seconds": round(time.time() - t0, 1),
            "final_loss": log[-1]["loss"], "config": asdict(cfg)}
    _save(peft_model, cfg, out, meta, log)
    peft_model.unload()  # the caller's model gets its own linear layers back
    return out


def _save(peft_model, cfg: TrainConfig, out: Path, meta: dict, log: list[dict]) -> None:
    """Write into a temp dir beside `out`, then swap it into place: never a half-written adapter dir."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        peft_model.save_pretrained(tmp)
        config = json.loads((tmp / files.PEFT_CONFIG).read_text())
        config["base_model_name_or_path"] = cfg.model  # the name seqr.load_model takes, checked by `seqr build`
        files.atomic_write_json(tmp / files.PEFT_CONFIG, config)
        files.atomic_write_json(tmp / files.ADAPTER_META, meta)
        files.atomic_write_bytes(tmp / files.TRAIN_LOG, "".join(json.dumps(r) + "\n" for r in log).encode())
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{int(time.time())}")
            out.rename(old)
        tmp.rename(out)
        files.fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="seqr train", description="Train one silo's LoRA adapter on its own task data.")
    p.add_argument("--model", required=True, help="anything seqr.load_model takes, e.g. smollm2-135m-instruct")
    p.add_argument("--task", required=True, help="one of the ten task names, or a JSONL file of the task schema")
    p.add_argument("--data", help="directory laid out as <task>/{train,dev}.jsonl (default $SEQR_TASK_DATA)")
    p.add_argument("--out", required=True, help="adapter directory to write")
    d = TrainConfig("", "", "")
    p.add_argument("--a-seed", type=int, default=d.a_seed, help="seed of the shared, frozen A (default 0)")
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--max-train", type=int, help="use at most this many training examples (seeded subset)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--scoring", choices=("choices", "letter"), default="choices",
                   help="answer format: the choice text (default) or its option letter")
    p.add_argument("--unique-a", action="store_true", help="ordinary LoRA: train A too (baselines only)")
    p.add_argument("--force", action="store_true", help="retrain even if --out holds an adapter")
    a = p.parse_args(argv)
    try:
        cfg = TrainConfig(model=a.model, task=a.task, out=a.out, data=a.data, a_seed=a.a_seed, rank=a.rank,
                          alpha=a.alpha, dropout=a.dropout, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size,
                          max_train=a.max_train, unique_a=a.unique_a, force=a.force, seed=a.seed,
                          scoring=a.scoring)
    except ValueError as e:
        p.error(str(e))
    out = train(cfg)
    print(json.dumps(json.loads((out / files.ADAPTER_META).read_text()), indent=1))
    return 0
