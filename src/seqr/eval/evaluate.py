"""What `seqr eval` (seqr.eval.cli) runs: every routing method on every task's held-out split, written to one
JSON document.

A *pass* runs one method over the eval examples of every task with a library attached to the model. Per
task it stores the prediction of every example and, for the routers (arrow, lag, spectr, seqr), what its
(token, layer) decisions did: how many picked the calibrated norm-maximising adapter, and how many went to
each adapter (the routing confusion). The *reference pass* (seqr's, or spectr's on a unique-A library)
also keeps, from the same traces, the choice every router would have made on those hidden states (the
paper's Figure 4, LAG for every k) and each adapter's mean raw and z-scored activation norm per task
(Figure 3). Noise passes rerun seqr with Gaussian noise on every mu (Figure 6).

The JSON is saved after every pass; rerunning with the same settings reuses finished passes, so an
interrupted evaluation resumes and new libraries or noise levels add only their own passes. Tables and
figures are drawn from the JSON alone (`eval_report`, `plots`).
"""
from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from seqr.store import files
from seqr.hf.dtypes import name as dtype_name
from seqr.silo.calibrate import add_noise, parse_calibration, recalibrated
from seqr.hf.granularity import check_probe_depth
from seqr.hf.layers import GRANULARITIES, attach, detach, routing
from seqr.store.library import LoraLibrary
from seqr.hf.choices import choice_logprobs
from seqr.core import registry
from seqr.core.stats import NORMALISATIONS
from seqr.silo.tasks import Example, SCORINGS

METHODS = tuple(r.name for r in registry.routers() if r.evaluated)  # the default passes, in report order
FORMAT = "seqr-eval"
FORMAT_VERSION = 1


@dataclass
class EvalConfig:
    """What is evaluated; everything but `noise`, `methods`, `k` and `batch_size` keys the cached passes."""

    tasks: list[str]
    methods: tuple[str, ...] = METHODS
    k: int = 3  # LAG's ARROW shortlist (the paper's default for ten adapters)
    split: str = "dev"
    max_eval: int | None = 100  # examples per task (a seeded subset), None for all
    seed: int = 0
    noise: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # std multiples of Gaussian noise on mu (Figure 6)
    noise_seed: int = 0
    batch_size: int = 8
    scoring: str = "choices"
    model: str = ""
    # How the norm routers (seqr, spectr) decide; the defaults are the paper's (see `variant`).
    normalise: str = "z"  # stats.NORMALISATIONS: z-score, raw norm, norm / mu, or the adapter's own percentile
    pooled: bool = False  # one mu, sigma per adapter over all layers instead of per layer
    granularity: str = "token"  # layers.GRANULARITIES: per token (paper), per prompt, or shared across layers
    mix: int | None = None  # top-k softmax mixture per token instead of one adapter
    temperature: float = 1.0
    probe_depth: float = 1.0  # granularities layers / request: the share of the routed layers the probe sums
    calibration: str | None = None  # "TOKENS[@N]": recalibrate every adapter on its own task first (None: as built)
    dtype: str = "float32"  # the base model's dtype (evaluate() reads it off the model; keys the cache)

    def __post_init__(self):
        self.tasks, self.methods, self.noise = list(self.tasks), tuple(self.methods), tuple(self.noise)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be a non-empty list of distinct names, got {self.tasks}")
        bad = [m for m in self.methods if m not in registry.names()]
        if bad or not self.methods:
            raise ValueError(f"unknown method(s) {bad or self.methods!r}; expected some of {registry.names()}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive int, got {self.k!r}")
        if self.max_eval is not None and (isinstance(self.max_eval, bool) or not isinstance(self.max_eval, int)
                                          or self.max_eval < 1):
            raise ValueError(f"max_eval must be a positive int or None, got {self.max_eval!r}")
        bad = [s for s in self.noise if not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0)]
        if bad:
            raise ValueError(f"noise levels must be positive finite numbers (0 is the seqr pass), got {bad}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.normalise not in NORMALISATIONS:
            raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {self.normalise!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.mix is not None and (isinstance(self.mix, bool) or not isinstance(self.mix, int) or self.mix < 1):
            raise ValueError(f"mix must be a positive int or None, got {self.mix!r}")
        if self.mix is not None and self.granularity != "token":
            raise ValueError(f"mix is per token; it cannot be combined with granularity {self.granularity!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {self.temperature!r}")
        check_probe_depth(self.probe_depth, self.granularity)
        if self.calibration is not None:
            parse_calibration(self.calibration)
        if not isinstance(getattr(torch, str(self.dtype), None), torch.dtype):
            raise ValueError(f"dtype must name a torch dtype, e.g. 'float32' or 'bfloat16', got {self.dtype!r}")

    def routing_options(self) -> dict:
        """routing(...) keyword arguments of the norm routers' passes."""
        opts = {"granularity": self.granularity, "mix": self.mix, "temperature": self.temperature}
        return opts if self.probe_depth == 1 else {**opts, "probe_depth": self.probe_depth}  # results kept before stay valid

    def variant(self) -> str:
        """'' for the paper's routing, else a tag like 'normalise=ratio granularity=prompt' (labels results)."""
        default = EvalConfig(tasks=["_"])
        keys = ("calibration", "normalise", "pooled", "granularity", "probe_depth", "mix", "temperature")
        return " ".join(f"{k}={getattr(self, k)}" for k in keys if getattr(self, k) != getattr(default, k))

    def data_key(self) -> dict:
        """The settings every cached pass depends on (with the library's fingerprint)."""
        key = {"model": self.model, "tasks": self.tasks, "split": self.split, "max_eval": self.max_eval,
               "seed": self.seed, "scoring": self.scoring}
        return key if self.dtype == "float32" else {**key, "dtype": self.dtype}  # fp32 results cached before stay valid


def fingerprint(library: LoraLibrary) -> str:
    """A digest of everything routing depends on: names, layers, every adapter's A, B and stats."""
    h = hashlib.sha256()
    for name in library.names:
        h.update(name.encode())
        A, B = library.adapter_weights(name)
        for layer in library.layers:
            s = library.stats(name)[layer] if library.stats(name) else None
            h.update(f"{layer}:{None if s is None else (s.count, s.mean, s.std)}".encode())
            if library.percentile:  # the percentile score also reads the quantiles
                h.update(repr(s.quantiles).encode())
            h.update(B[layer].detach().float().contiguous().numpy().tobytes())
            h.update(A[layer].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- traces
@dataclass
class TraceTally:
    """Running totals over the traces of one (pass, task): decisions, agreement with the norm-max, the
    adapters used; for the reference pass also every router's would-be agreement and the mean norms."""

    names: list[str]
    mu: torch.Tensor  # (L, N) per-layer stats, layer order of `layers`
    sigma: torch.Tensor  # (L, N)
    layers: list[str]
    reference: bool = False
    decisions: int = 0
    agree: int = 0
    counts: torch.Tensor = None  # (N,) decisions per adapter
    would: dict = field(default_factory=dict)  # router -> decisions agreeing with the norm-max
    raw_sum: torch.Tensor = None  # (N,) sum of ||B_i A x|| over decisions
    z_sum: torch.Tensor = None  # (N,) sum of z-scored norms

    def __post_init__(self):
        N = len(self.names)
        self.counts = torch.zeros(N, dtype=torch.long)
        self.raw_sum = torch.zeros(N, dtype=torch.float64)
        self.z_sum = torch.zeros(N, dtype=torch.float64)
        self._pos = {name: i for i, name in enumerate(self.layers)}

    @classmethod
    def for_library(cls, library: LoraLibrary, reference: bool = False) -> "TraceTally":
        names, layers = library.names, library.layers
        mu = torch.tensor([[library.stats(n)[l].mean for n in names] for l in layers], dtype=torch.float64)
        sigma = torch.tensor([[library.stats(n)[l].std for n in names] for l in layers], dtype=torch.float64)
        return cls(names, mu, sigma, layers, reference)

    def add(self, trace) -> None:
        d = trace.decisions()
        norm, arrow, chosen = d["norm"].double(), d["arrow"].double(), d["chosen"]  # (D, N), (D, N), (D,)
        best = norm.argmax(-1)  # (D,) the calibrated norm-maximising adapter
        self.decisions += best.numel()
        self.agree += int((chosen == best).sum())
        self.counts += torch.bincount(chosen.clamp(min=0), minlength=len(self.names))
        if not self.reference:
            return
        li = torch.tensor([self._pos[l] for l in trace.layers])[d["layer"]]  # (D,) row of mu/sigma
        self.raw_sum += (norm * self.sigma[li] + self.mu[li]).sum(0)  # (N,) z * sigma + mu = ||B_i A x||
        self.z_sum += norm.sum(0)  # (N,)
        rank = arrow.argsort(dim=-1, descending=True, stable=True)  # (D, N) ARROW's order
        by_rank = norm.gather(1, rank)  # (D, N) norms in that order
        for k in range(1, len(self.names) + 1):  # LAG(k): the norm-max among ARROW's top k; k=1 is ARROW
            pick = rank.gather(1, by_rank[:, :k].argmax(-1, keepdim=True))[:, 0]  # (D,)
            key = f"lag@{k}"
            self.would[key] = self.would.get(key, 0) + int((pick == best).sum())
        self.would["arrow"] = self.would["lag@1"]
        self.would["seqr"] = self.would["spectr"] = self.decisions  # the norm-max itself, by definition

    def result(self) -> dict:
        out = {"decisions": self.decisions, "agree": self.agree,
               "counts": dict(zip(self.names, self.counts.tolist()))}
        if self.reference and self.decisions:
            out["would_agree"] = dict(self.would)
            out["mean_raw_norm"] = dict(zip(self.names, (self.raw_sum / self.decisions).tolist()))
            out["mean_z_norm"] = dict(zip(self.names, (self.z_sum / self.decisions).tolist()))
        return out


# ---------------------------------------------------------------------------------------------- passes
def length_chunks(examples: list[Example], size: int) -> list[list[int]]:
    """Example indices in chunks of `size`, longest text first, so each batch pads little."""
    order = sorted(range(len(examples)), key=lambda i: -(len(examples[i].text) + len(examples[i].text_pair or "")
                                                         + max(map(len, examples[i].choices))))
    return [order[s:s + size] for s in range(0, len(order), size)]


def run_pass(model, tokenizer, library: LoraLibrary, method: str, data: dict[str, list[Example]], cfg: EvalConfig,
             *, reference: bool = False, label: str = "", progress: bool = True) -> dict:
    """One method over every task's examples (the library must be attached): per task the predictions,
    accuracy, and for routers the trace tallies."""
    from tqdm import tqdm

    chunks = {t: length_chunks(data[t], cfg.batch_size) for t in cfg.tasks}
    bar = tqdm(total=sum(map(len, chunks.values())), desc=f"eval {label + ' ' if label else ''}{method}",
               disable=not progress, file=sys.stderr)
    out, t0 = {}, time.time()
    try:
        for task in cfg.tasks:
            route, k = _route(method, task, library, cfg)
            router = registry.get(method)
            traced = router.routes  # its decisions vs the calibrated norm-max
            opts = cfg.routing_options() if router.kind == "score" and router.trace == "norm" else {}
            tally = TraceTally.for_library(library, reference) if traced else None
            pred: list[int | None] = [None] * len(data[task])
            for chunk in chunks[task]:
                exs = [data[task][i] for i in chunk]
                with torch.no_grad(), routing(model, **route, k=k, trace=traced, **opts) as tr:
                    scores = choice_logprobs(model, tokenizer, exs, scoring=cfg.scoring, batch_size=len(exs),
                                           progress=False)
                for i, s in zip(chunk, scores):
                    pred[i] = max(range(len(s)), key=s.__getitem__)
                if traced:
                    tally.add(tr)
                bar.update(1)
            gold = [ex.label for ex in data[task]]
            correct = sum(p == g for p, g in zip(pred, gold))
            out[task] = {"n": len(gold), "correct": correct, "acc": correct / len(gold), "pred": pred}
            if traced:
                out[task].update(tally.result())
    finally:
        bar.close()
    return {"tasks": out, "seconds": round(time.time() - t0, 1)}


def _route(method: str, task: str, library: LoraLibrary, cfg: EvalConfig) -> tuple[dict, int | None]:
    """routing(...)'s method or fixed adapter, and k, of one (method, task): a fixed method (the oracle) applies
    the adapter named like the task."""
    router = registry.get(method)
    if router.kind == "fixed":
        if task not in library:
            raise ValueError(f"{method} needs an adapter named like the task {task!r}; the library holds "
                             f"{library.names}")
        return {"adapter": task}, None
    return {"method": method}, (min(cfg.k, len(library)) if router.takes_k else None)


def _applies(method: str, lib: LoraLibrary, label: str) -> bool:
    """Whether a (non-base) method runs on this library; one it cannot serve (seqr without a shared A, a centroid
    router without centroids) is skipped with a note."""
    router = registry.get(method)
    if router.kind == "none":
        return False
    try:
        router.check(shared_a=lib.shared_a, centroids=lib.has_centroids, where=f"library {label!r}")
    except ValueError as e:
        if not (method == "seqr" and not lib.shared_a):  # expected: the unique-A comparison has no SEQR
            print(f"seqr eval: skipping {method} on {label}: {e}", file=sys.stderr)
        return False
    return True


# ---------------------------------------------------------------------------------------------- driver
def evaluate(model, tokenizer, libraries: dict[str, LoraLibrary], data: dict[str, list[Example]], cfg: EvalConfig,
             *, out_dir: str | Path | None = None, progress: bool = True, train_data: str | Path | None = None) -> dict:
    """Run every pass not already in `out_dir`'s results and return the whole results document.

    `libraries`: label -> calibrated library, e.g. {"shared-0": ..., "unique-0": ...}; all over the same
    model. The untouched model's pass ("base") is run once. Results are saved after every pass.
    With cfg.calibration, each adapter is first recalibrated on its own task's train split (read from
    `train_data`, like load_task's data_dir)."""
    _check(libraries, data, cfg)
    cfg = replace(cfg, dtype=dtype_name(next(model.parameters()).dtype))  # bf16 passes never reuse fp32 ones
    path = None if out_dir is None else Path(out_dir) / files.EVAL_RESULTS
    doc = _resume(path, cfg)
    doc["examples"] = {t: {"ids": [ex.id for ex in data[t]], "gold": [ex.label for ex in data[t]]} for t in cfg.tasks}
    save = (lambda: files.atomic_write_json(path, doc)) if path is not None else (lambda: None)

    passes = _Passes(_planned(libraries, cfg), progress)

    def run(lib, method, label, **kw):
        passes.start(f"{label + ' ' if label else ''}{method}")
        attach(model, lib, method="base")
        try:
            return run_pass(model, tokenizer, lib, method, data, cfg, label=label, progress=progress, **kw)
        finally:
            detach(model)
            passes.done()

    if "base" in cfg.methods and doc.get("base") is None:
        doc["base"] = run(next(iter(libraries.values())), "base", "")
        save()
    tag = cfg.variant()
    for label, lib in libraries.items():
        path_ = None if lib.path is None else str(lib.path)
        if cfg.calibration is not None:
            lib = recalibrated(lib, model, tokenizer, cfg.calibration, data_dir=train_data,
                               scoring=cfg.scoring, progress=progress)
        calibrated, lib = lib, lib.normalised(cfg.normalise, cfg.pooled)
        label = f"{label} [{tag}]" if tag else label
        entry = _entry(doc, label, lib, path_, cfg)
        ref = lib.default_method
        for method in cfg.methods:
            if not _applies(method, lib, label):
                continue
            key = registry.get(method).key(min(cfg.k, len(lib)))
            if key not in entry["methods"]:
                entry["methods"][key] = run(lib, method, label, reference=method == ref)
                save()
        if lib.shared_a and "seqr" in cfg.methods:
            for level in cfg.noise:
                key = f"{float(level):g}@{cfg.noise_seed}"
                if key not in entry["noise"]:
                    entry["noise"][key] = run(noisy(calibrated, level, cfg.noise_seed).normalised(cfg.normalise, cfg.pooled),
                                              "seqr", f"{label} noise {level:g}")
                    save()
    doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    save()
    return doc


def _check(libraries: dict[str, LoraLibrary], data: dict[str, list[Example]], cfg: EvalConfig) -> None:
    """One line naming what cannot be evaluated: no library, an adapter without stats, a task without examples."""
    if not libraries:
        raise ValueError("evaluate needs at least one library")
    for label, lib in libraries.items():
        if lib.uncalibrated:
            raise ValueError(f"library {label!r}: adapter(s) {lib.uncalibrated} have no stats; run seqr calibrate")
    missing = [t for t in cfg.tasks if not data.get(t)]
    if missing:
        raise ValueError(f"no eval examples for task(s) {missing}")


def _entry(doc: dict, label: str, lib: LoraLibrary, path: str | None, cfg: EvalConfig) -> dict:
    """The results entry of `label`: the stored one while its library (fingerprint) and routing options are the
    same, else a fresh one (its passes rerun)."""
    fp, opts = fingerprint(lib), cfg.routing_options()
    entry = doc["libraries"].get(label)
    if entry is None or entry.get("fingerprint") != fp or entry.get("routing", opts) != opts:
        entry = doc["libraries"][label] = {"fingerprint": fp, "shared_a": lib.shared_a, "adapters": lib.names,
                                           "path": path, "methods": {}, "noise": {}, "routing": opts,
                                           "variant": cfg.variant()}
    return entry


def _planned(libraries: dict, cfg: EvalConfig) -> int:
    """Passes an evaluation runs at most (cached ones are skipped): base, each library's methods, noise levels."""
    n = int("base" in cfg.methods)
    for label, lib in libraries.items():
        n += sum(_applies(m, lib, label) for m in cfg.methods)
        n += len(cfg.noise) if lib.shared_a and "seqr" in cfg.methods else 0
    return n


class _Passes:
    """The overall progress line: pass k of n, elapsed time, and an estimate of the time left."""

    def __init__(self, planned: int, show: bool):
        self.planned, self.show, self.k, self.t0, self.ran = planned, show, 0, time.time(), 0

    def start(self, what: str) -> None:
        self.k += 1
        if not self.show:
            return
        el = time.time() - self.t0
        left = f", about {_mmss(el / self.ran * max(0, self.planned - self.k + 1))} left" if self.ran else ""
        print(f"seqr eval: pass {self.k} of at most {self.planned} ({what}), {_mmss(el)} elapsed{left}",
              file=sys.stderr, flush=True)

    def done(self) -> None:
        self.ran += 1


def _mmss(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def noisy(library: LoraLibrary, level: float, seed: int) -> LoraLibrary:
    """The library with mu_i + level * sigma_i * eps per layer and adapter (eps ~ N(0, 1), seeded per adapter)."""
    return library.with_stats({n: add_noise(library.stats(n), level, seed=seed * 100_003 + i)
                               for i, n in enumerate(library.names)})


def _resume(path: Path | None, cfg: EvalConfig) -> dict:
    """The saved results if their data settings match `cfg`, else a fresh document (said on stderr)."""
    fresh = {"format": FORMAT, "version": FORMAT_VERSION, "config": {**asdict(cfg), "data_key": cfg.data_key()},
             "base": None, "libraries": {}}
    if path is None or not path.exists():
        return fresh
    try:
        doc = files.read_json(path, "eval results")
    except (OSError, ValueError) as e:
        print(f"seqr eval: ignoring unreadable {path} ({e}); starting afresh", file=sys.stderr)
        return fresh
    if doc.get("format") != FORMAT or doc.get("config", {}).get("data_key") != cfg.data_key():
        print(f"seqr eval: {path} was made with other settings; starting afresh", file=sys.stderr)
        return fresh
    done = sum(len(e["methods"]) + len(e["noise"]) for e in doc["libraries"].values()) + (doc["base"] is not None)
    print(f"seqr eval: reusing {done} finished pass(es) from {path}", file=sys.stderr)
    doc["config"] = {**asdict(cfg), "data_key": cfg.data_key()}
    return doc


# ------------------------------------------------------------------------------------------------ data
def load_data(tasks: list[str], split: str, *, data_dir=None, source: str = "auto", max_eval: int | None = None,
              seed: int = 0) -> dict[str, list[Example]]:
    from seqr.silo.tasks import load_task

    return {t: load_task(t, split, data_dir=data_dir, source=source, max_examples=max_eval, seed=seed) for t in tasks}
