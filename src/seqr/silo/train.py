"""`seqr train`: one silo trains its LoRA on its own task data, with peft, never seeing another silo's data.

Shared-A mode (default, what SEQR routes): lora_A of every target module is drawn N(0, 1/r^2) from a
generator seeded by (--a-seed, module name) and frozen; only B (zero-initialised) is trained. Two silos
that train separately with the same seed therefore get bit-identical A, which `LoraLibrary.from_peft`
verifies. `--unique-a` trains ordinary LoRA (A and B), for the paper's comparison.

The fast path (default, `path="fast"`) does no wasted work: the LM head and its log-softmax run only at the
positions that predict answer tokens (the prompt's positions never reach the 49k-vocab head), batches are drawn
from length buckets so padding stays small, and LoRA dropout draws its mask with one `rand` instead of
`bernoulli_`. The base model runs in `dtype` (bf16 where the machine multiplies it natively); B and the optimizer
state stay fp32. `path="reference"` is the plain peft loop (full logits, shuffled batches), which
`seqr bench train` times against it.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from seqr.store import files
from seqr.hf.dtypes import CHOICES
from seqr.hf.dtypes import add_arg as add_dtype_arg
from seqr.hf.dtypes import name as dtype_name
from seqr.hf.models import add_device_arg, parse_device
from seqr.core.argfmt import BadValue, Parser, existing_dir

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MODULE_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")  # a module name or dotted path suffix (peft's matching)
PATHS = ("fast", "reference")
BUCKET_BATCHES = 16  # length buckets: sort this many batches' worth of shuffled examples by length, then cut


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
    dtype: str = "auto"  # the base model's dtype when train() loads it (dtypes.CHOICES)
    path: str = "fast"  # PATHS: answer-only head + length buckets + fast dropout, or the plain peft loop
    device: str = "cpu"  # where train() runs the model when it loads it ("cpu", "cuda", "cuda:1")

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
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {self.path!r}")
        if self.dtype not in CHOICES:
            raise ValueError(f"dtype must be one of {list(CHOICES)}, got {self.dtype!r}")
        tm = self.target_modules
        self.target_modules = (tm,) if isinstance(tm, str) else tuple(tm)  # a string names one module
        bad = [m for m in self.target_modules if not isinstance(m, str) or not MODULE_RE.fullmatch(m)]
        if bad or not self.target_modules or len(set(self.target_modules)) < len(self.target_modules):
            raise ValueError(f"target_modules must be distinct module names such as q_proj, got "
                             f"{list(self.target_modules)}" + (f" ({bad[0]!r} is not a module name)" if bad else ""))


def shared_a(layer: str, shape: tuple[int, int], a_seed: int, dtype=torch.float32) -> torch.Tensor:
    """The frozen shared A of one layer: N(0, 1/r^2) from a generator seeded by (a_seed, layer name), so
    it does not depend on module order, process, or which silo draws it."""
    digest = hashlib.sha256(f"seqr-shared-a:{a_seed}:{layer}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    r = shape[0]
    return (torch.randn(shape, generator=g, dtype=torch.float64) / r).to(dtype)  # (r, n)


def check_targets(model, targets) -> None:
    """Every target module name matches a weight layer of `model` (its name, or a dotted suffix of it, as peft
    matches); else BadValue naming the missing ones and the weight layers' names the model has."""
    layers = {name for name, mod in model.named_modules()
              if getattr(getattr(mod, "weight", None), "ndim", 0) == 2 and not any(True for _ in mod.children())}
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in layers)]
    if missing:
        have = sorted({n.rsplit(".", 1)[-1] for n in layers})
        raise BadValue(f"target module(s) {missing} match no layer of the model; its layers are named {have}")


def lora_model(model, cfg: TrainConfig):
    """Wrap a base model with peft LoRA; in shared-A mode set and freeze every lora_A."""
    from peft import LoraConfig, get_peft_model

    check_targets(model, cfg.target_modules)
    torch.manual_seed(cfg.seed)
    peft_model = get_peft_model(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                                  target_modules=list(cfg.target_modules)))
    if cfg.path == "fast" and cfg.dropout > 0:
        for mod in peft_model.modules():
            if hasattr(mod, "lora_dropout") and "default" in mod.lora_dropout:
                mod.lora_dropout["default"] = FastDropout(cfg.dropout)
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
    from seqr.silo.tasks import answer_text, build_prompt

    prompt = tokenizer(build_prompt(example, tokenizer, scoring=scoring), add_special_tokens=False).input_ids
    answer = tokenizer(answer_text(example, example.label, scoring), add_special_tokens=False).input_ids
    answer = answer + [tokenizer.eos_token_id]
    return prompt + answer, [-100] * len(prompt) + answer


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded input_ids, attention_mask, labels, each (B, L)."""
    L = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([x + [pad_id] * (L - len(x)) for x, _ in rows])  # (B, L)
    mask = torch.tensor([[1] * len(x) + [0] * (L - len(x)) for x, _ in rows])  # (B, L)
    labels = torch.tensor([y + [-100] * (L - len(y)) for _, y in rows])  # (B, L)
    return ids, mask, labels


def shuffled_order(n: int, batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """One epoch of plain shuffled batches of example indices (the reference path)."""
    order = torch.randperm(n, generator=gen).tolist()
    return [order[s:s + batch_size] for s in range(0, n, batch_size)]


def bucketed_order(lengths: list[int], batch_size: int, gen: torch.Generator,
                   window: int = BUCKET_BATCHES) -> list[list[int]]:
    """One epoch of length-bucketed batches: shuffle, sort each window of `window` batches' worth of examples by
    length, cut it into batches, shuffle the batches. Every example appears exactly once; a batch holds examples
    of similar length, so little of it is padding, and the batch order stays random."""
    order = torch.randperm(len(lengths), generator=gen).tolist()
    span = batch_size * window
    out = []
    for s in range(0, len(order), span):
        chunk = sorted(order[s:s + span], key=lengths.__getitem__)
        out += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    return [out[i] for i in torch.randperm(len(out), generator=gen).tolist()]


def batches(encoded: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, gen: torch.Generator,
            bucketed: bool = False):
    """One epoch of batches (input_ids, attention_mask, labels), each (B, L)."""
    order = (bucketed_order([len(ids) for ids, _ in encoded], batch_size, gen) if bucketed
             else shuffled_order(len(encoded), batch_size, gen))
    for rows in order:
        yield collate([encoded[i] for i in rows], pad_id)


class FastDropout(nn.Module):
    """Inverted dropout with the keep mask from one `rand_like` compare: the same distribution as nn.Dropout,
    measured ~2.5x faster than its `bernoulli_` on this CPU (120 of them per SmolLM2 step)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * (torch.rand_like(x) >= self.p) * (1.0 / (1.0 - self.p))  # (..., n)


def _lm_parts(model):
    """(decoder, LM head) of a causal LM (or a peft wrapper) whose logits are plain head(hidden), else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    if any(getattr(cfg, a, None) for a in ("final_logit_softcapping", "logit_scale")):
        return None  # logits are transformed after the head: the full forward computes them
    try:
        decoder, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return None if decoder is None or head is None else (decoder, head)


def answer_loss(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens (labels != -100), as transformers' causal-LM loss,
    with the LM head and log-softmax run only at the positions that predict an answer token."""
    parts = _lm_parts(model)
    if parts is None:
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss
    decoder, head = parts
    target = labels[:, 1:]  # (B, L-1) the token each position predicts
    keep = target != -100  # (B, L-1)
    hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, d)
    logits = head(hidden[:, :-1][keep]).float()  # (K, V) only the answer-predicting positions
    return torch.nn.functional.cross_entropy(logits, target[keep])


class Session:
    """One adapter's training: the peft model, encoded examples, optimizer and schedule; `step` runs one batch.

    train() runs one session to the end; `seqr bench train` interleaves the steps of two."""

    def __init__(self, cfg: TrainConfig, model, tokenizer, examples):
        from transformers import get_cosine_schedule_with_warmup

        if not examples:
            raise ValueError(f"task {cfg.task!r} has no training examples")
        self.cfg, self.pad = cfg, tokenizer.pad_token_id
        torch.manual_seed(cfg.seed)
        self.model = lora_model(model, cfg)
        self.model.train()
        self.encoded = [encode(ex, tokenizer, cfg.scoring) for ex in examples]
        self.total = max(1, round(math.ceil(len(self.encoded) / cfg.batch_size) * cfg.epochs))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        self.sched = get_cosine_schedule_with_warmup(self.opt, round(cfg.warmup * self.total), self.total)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.log: list[dict] = []
        self.seconds = 0.0  # time spent inside step()
        self._epoch = iter(())
        self._epoch_start: torch.Tensor | None = None  # the generator's state when this epoch's order was drawn
        self._epoch_pos = 0  # batches of this epoch already taken

    @property
    def done(self) -> bool:
        return len(self.log) >= self.total

    def next_batch(self):
        """The next batch, starting a new epoch (reshuffled) when one runs out."""
        batch = next(self._epoch, None)
        if batch is None:
            self._new_epoch()
            batch = next(self._epoch)
        self._epoch_pos += 1
        return batch

    def _new_epoch(self) -> None:
        self._epoch_start, self._epoch_pos = self.gen.get_state(), 0
        self._epoch = batches(self.encoded, self.cfg.batch_size, self.pad, self.gen, bucketed=self.cfg.path == "fast")

    def step(self) -> dict:
        """One optimizer step on the next batch; returns (and logs) its row."""
        dev = next(self.model.parameters()).device
        ids, mask, labels = (t.to(dev) for t in self.next_batch())  # (B, L) each, where the model runs
        t0 = time.perf_counter()
        if self.cfg.path == "fast":
            loss = answer_loss(self.model, ids, mask, labels)
        else:
            loss = self.model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.seconds += time.perf_counter() - t0
        row = {"step": len(self.log) + 1, "loss": loss.item(), "lr": self.sched.get_last_lr()[0],
               "tokens": int(mask.sum()), "padded_tokens": ids.numel(), "seconds": round(self.seconds, 3)}
        self.log.append(row)
        return row

    def tokens(self) -> int:
        return sum(r["tokens"] for r in self.log)

    def _resume_key(self) -> dict:
        return {k: v for k, v in asdict(self.cfg).items() if k not in ("out", "force", "dtype", "device")}

    def save_state(self, path: Path) -> None:
        """Everything a later process needs to continue bit-for-bit: trainable weights, optimizer and schedule,
        the data order's generator, the position in the epoch, the dropout RNG and the log; written atomically."""
        buf = io.BytesIO()
        torch.save({"key": self._resume_key(), "n_train": len(self.encoded), "log": self.log, "seconds": self.seconds,
                    "params": {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad},
                    "opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "rng": torch.get_rng_state(),
                    "epoch_start": self._epoch_start, "epoch_pos": self._epoch_pos}, buf)
        files.atomic_write_bytes(path, buf.getvalue())

    def load_state(self, path: Path) -> None:
        """Continue from save_state's file; refuses a state saved under another config or data."""
        state = torch.load(path, weights_only=False)
        if state["key"] != self._resume_key() or state["n_train"] != len(self.encoded):
            raise ValueError(f"{path} was saved by a run with another config or training set; delete it to restart")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, t in state["params"].items():
                params[n].copy_(t)
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.log, self.seconds = state["log"], state["seconds"]
        torch.set_rng_state(state["rng"])
        if state["epoch_start"] is not None:
            self.gen.set_state(state["epoch_start"])
            self._new_epoch()
            for _ in range(state["epoch_pos"]):
                next(self._epoch)
            self._epoch_pos = state["epoch_pos"]

    def snapshot(self, out: Path) -> Path:
        """Write the adapter as trained so far to `out` (atomically) and keep training."""
        _save(self.model, self.cfg, out, self.meta(), self.log)
        return out

    def meta(self) -> dict:
        cfg = self.cfg
        dtype = next(p.dtype for p in self.model.get_base_model().parameters() if not p.requires_grad)
        return {"task": cfg.task, "a_seed": None if cfg.unique_a else cfg.a_seed, "shared_a": not cfg.unique_a,
                "n_train": len(self.encoded), "steps": len(self.log), "train_seconds": round(self.seconds, 1),
                "tokens_per_s": round(self.tokens() / max(self.seconds, 1e-9), 1),
                "padding_share": round(1 - self.tokens() / max(1, sum(r["padded_tokens"] for r in self.log)), 4),
                "base_dtype": dtype_name(dtype), "final_loss": self.log[-1]["loss"],
                "config": asdict(cfg)}

    def finish(self, out: Path) -> Path:
        """Write the adapter atomically to `out` and give the caller's model its own linear layers back."""
        self.model.eval()
        _save(self.model, self.cfg, out, self.meta(), self.log)
        self.model.unload()
        return out


def resume_path(out: str | Path) -> Path:
    """Where train(state_every=...) keeps the resumable state of the run writing `out`."""
    out = Path(out)
    return out.with_name(f".{out.name}{files.TRAIN_STATE_SUFFIX}")


def train(cfg: TrainConfig, *, model=None, tokenizer=None, examples=None, progress: bool = True,
          state_every: int = 0, on_step=None) -> Path:
    """Train one adapter and write it (peft files + seqr_adapter.json + train_log.jsonl) atomically to cfg.out.
    An adapter already at cfg.out is kept unless cfg.force. `state_every` > 0: save a resumable state beside
    cfg.out every that many steps and continue from it on a rerun (removed once the adapter is written).
    `on_step(session, row)` runs after every step (e.g. to snapshot checkpoints)."""
    from tqdm import tqdm

    out = Path(cfg.out)
    if (out / files.PEFT_WEIGHTS).exists() and not cfg.force:
        print(f"seqr train: {out} already holds a trained adapter; skipping (use --force to retrain)", file=sys.stderr)
        return out
    if model is None:
        from seqr.hf.dtypes import say_choice
        from seqr.hf.models import load_model
        model, tokenizer = load_model(cfg.model, dtype=say_choice(cfg.dtype, "seqr train"), device=cfg.device)
    if examples is None:
        from seqr.silo.tasks import load_task
        examples = load_task(cfg.task, "train", data_dir=cfg.data, max_examples=cfg.max_train, seed=cfg.seed)
    session = Session(cfg, model, tokenizer, examples)
    state = resume_path(out)
    if state_every and state.exists() and not cfg.force:
        session.load_state(state)
        print(f"seqr train: resuming {out} at step {len(session.log)} of {session.total}", file=sys.stderr)
    bar = tqdm(total=session.total, initial=len(session.log), desc=f"train {out.name}", disable=not progress,
               file=sys.stderr)
    while not session.done:
        row = session.step()
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{session.tokens() / max(session.seconds, 1e-9):.0f}")
        if on_step is not None:
            on_step(session, row)
        if state_every and row["step"] % state_every == 0 and not session.done:
            session.save_state(state)
    bar.close()
    session.finish(out)
    state.unlink(missing_ok=True)
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
    p = Parser(prog="seqr train", description="Train one silo's LoRA adapter on its own task data.")
    p.add_argument("--model", required=True, help="anything seqr.load_model takes, e.g. smollm2-135m-instruct")
    p.add_argument("--task", required=True, help="one of the ten task names, or a JSONL file of the task schema")
    p.add_argument("--data", type=existing_dir,
                   help="directory laid out as <task>/{train,dev}.jsonl (default $SEQR_TASK_DATA)")
    p.add_argument("--out", required=True, help="adapter directory to write")
    d = TrainConfig("", "", "")
    p.add_argument("--a-seed", type=int, default=d.a_seed, help="seed of the shared, frozen A (default 0)")
    p.add_argument("--rank", type=int, default=d.rank, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=d.alpha, help="LoRA alpha (scaling alpha / r)")
    p.add_argument("--dropout", type=float, default=d.dropout, help="LoRA dropout on the adapter input")
    p.add_argument("--epochs", type=float, default=d.epochs, help="passes over the training examples")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (cosine schedule, 5%% warm-up)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per optimizer step")
    p.add_argument("--max-train", type=int, help="use at most this many training examples (seeded subset)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the example subset, order and dropout")
    p.add_argument("--scoring", choices=("choices", "letter"), default="choices",
                   help="answer format: the choice text (default) or its option letter")
    p.add_argument("--target-modules", type=lambda s: tuple(s.split(",")), default=d.target_modules,
                   metavar="M1,M2,...", help=f"comma-separated names of the linear layers to adapt (default "
                                             f"{','.join(d.target_modules)})")
    p.add_argument("--unique-a", action="store_true", help="ordinary LoRA: train A too (baselines only)")
    p.add_argument("--force", action="store_true", help="retrain even if --out holds an adapter")
    p.add_argument("--state-every", type=int, default=0, metavar="N",
                   help="every N steps save a resumable state beside --out; a rerun continues from it (default 0: off)")
    add_dtype_arg(p)
    add_device_arg(p)
    p.add_argument("--path", choices=PATHS, default=d.path,
                   help="fast: LM head only at answer positions, length-bucketed batches, fast dropout; reference: "
                        "the plain peft loop (full logits, shuffled batches), for comparison (default fast)")
    a = p.parse_args(argv)
    try:
        cfg = TrainConfig(model=a.model, task=a.task, out=a.out, data=a.data, a_seed=a.a_seed, rank=a.rank,
                          alpha=a.alpha, dropout=a.dropout, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size,
                          max_train=a.max_train, unique_a=a.unique_a, force=a.force, seed=a.seed,
                          scoring=a.scoring, target_modules=a.target_modules, dtype=a.dtype, path=a.path,
                          device=str(parse_device(p, a.device)))
    except ValueError as e:
        p.error(str(e))
    if a.state_every < 0:
        p.error(f"--state-every must be >= 0, got {a.state_every}")
    from seqr.silo.tasks import check_task

    examples = check_task(p, cfg.task, cfg.data, cfg.max_train, cfg.seed)  # before the model loads
    out = train(cfg, examples=examples, state_every=a.state_every)
    print(json.dumps(json.loads((out / files.ADAPTER_META).read_text()), indent=1))
    return 0
