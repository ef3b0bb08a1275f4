"""`seqr eval`: the command line of seqr.eval.evaluate (every router on every task's held-out split; JSON,
Markdown and PNG figures in --out, finished passes reused)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from seqr.core import registry
from seqr.core.argfmt import Parser, existing_dir
from seqr.core.stats import NORMALISATIONS
from seqr.eval.evaluate import METHODS, EvalConfig, evaluate, load_data
from seqr.hf.dtypes import add_arg as add_dtype_arg
from seqr.hf.dtypes import say_choice
from seqr.hf.layers import GRANULARITIES
from seqr.hf.models import add_device_arg, parse_device
from seqr.silo.tasks import SCORINGS
from seqr.store import files
from seqr.store.library import LoraLibrary


def parser() -> Parser:
    p = Parser(prog="seqr eval", description=(
        "Evaluate oracle, base, mu, arrow, lag, spectr and seqr on each task's held-out split; write eval.json, "
        "report.md and PNG figures to --out. Finished passes in --out are reused."))
    p.add_argument("--library", action="append", default=[], metavar="DIR",
                   help="a calibrated library (seqr build); repeat for several seeds; unique-A libraries are "
                        "detected and reported as the shared-vs-unique comparison")
    p.add_argument("--model", default="smollm2-135m-instruct", help="the base model the libraries adapt")
    p.add_argument("--data", type=existing_dir,
                   help="JSONL task dir <task>/{train,dev}.jsonl (default $SEQR_TASK_DATA, else HF datasets)")
    p.add_argument("--tasks", nargs="+", help="tasks to evaluate (default: the first library's adapter names)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=registry.names(), metavar="METHOD",
                   help=f"passes to run, of {registry.names()}")
    p.add_argument("--k", type=int, default=3, help="LAG's ARROW shortlist size (default 3)")
    p.add_argument("--split", default="dev", help="held-out split (default dev)")
    p.add_argument("--max-eval", type=int, default=100, help="examples per task, a seeded subset (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the examples subset")
    p.add_argument("--noise", default="0.25,0.5,0.75,1",
                   help="comma-separated std multiples of noise on mu for the robustness curve ('' for none)")
    p.add_argument("--noise-seed", type=int, default=0, help="seed of the noise on mu")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward")
    p.add_argument("--scoring", choices=SCORINGS, default="choices", help="answer format the adapters were trained on")
    _routing_args(p.add_argument_group("routing variants of the seqr / spectr passes (default: the paper's)"))
    p.add_argument("--out", default="eval-out", help="output dir (default eval-out)")
    p.add_argument("--replot", action="store_true", help="only redraw report.md and figures from --out/eval.json")
    add_dtype_arg(p)
    add_device_arg(p)
    return p


def _routing_args(g) -> None:
    g.add_argument("--normalise", choices=NORMALISATIONS, default="z",
                   help="z-score (paper), raw norm, norm / mu, or percentile (each adapter's own norm CDF; needs "
                        "stats calibrated with quantiles)")
    g.add_argument("--pooled-stats", action="store_true", help="one mu, sigma per adapter pooled over layers")
    g.add_argument("--granularity", choices=GRANULARITIES, default="token",
                   help="per token (paper); prompt: mean score over the prompt, kept for later tokens; prompt-vote: "
                        "the majority of the prompt tokens' picks; layers: one adapter per token for all layers, by "
                        "the score summed over layers (two forwards); depth: per token and layer, by the score "
                        "summed over that layer and the ones before it (one forward); request: one adapter per prompt "
                        "for all layers and later tokens, by the prompt's score summed over its tokens and the layers "
                        "(one extra prefill; SEQR's default in attach and serve, evaluated here as a variant so the "
                        "default compares every router as the paper routes it)")
    g.add_argument("--probe-depth", type=float, default=1.0,
                   help="with --granularity layers / request: the share of the routed layers (in forward order) "
                        "whose summed scores decide; the probe forward stops after them (default 1: all)")
    g.add_argument("--mix", type=int, help="top-K softmax(score / temperature) mixture per token")
    g.add_argument("--temperature", type=float, default=1.0, help="with --mix: softmax temperature")
    g.add_argument("--calibration", metavar="TOKENS[@N]",
                   help="first recalibrate every adapter on N (default 60) examples of its own task's train split, "
                        "from the token set all|prompt|answer|content (adapter names must be task names)")


def _libraries(p: Parser, dirs: list[str]) -> dict[str, LoraLibrary]:
    """label -> library: shared-0, shared-1, ... and unique-0, ... in the order given (one line naming a bad dir,
    before any model loads)."""
    libs, count = {}, {"shared": 0, "unique": 0}
    for d in dirs:
        try:
            lib = LoraLibrary.load(d)
        except (FileNotFoundError, ValueError) as e:
            p.error(f"--library {d}: {e}")
        kind = "shared" if lib.shared_a else "unique"
        libs[f"{kind}-{count[kind]}"] = lib
        count[kind] += 1
    return libs


def _config(p: Parser, a: argparse.Namespace, tasks: list[str]) -> EvalConfig:
    try:
        noise = tuple(float(x) for x in a.noise.split(",") if x.strip())
    except ValueError:
        p.error(f"--noise must be comma-separated numbers, got {a.noise!r}")
    try:
        return EvalConfig(tasks=tasks, methods=tuple(a.methods), k=a.k, split=a.split, max_eval=a.max_eval or None,
                          seed=a.seed, noise=noise, noise_seed=a.noise_seed, batch_size=a.batch_size,
                          scoring=a.scoring, model=a.model, normalise=a.normalise, pooled=a.pooled_stats,
                          granularity=a.granularity, mix=a.mix, temperature=a.temperature, probe_depth=a.probe_depth,
                          calibration=a.calibration)
    except ValueError as e:
        p.error(str(e))


def main(argv: list[str] | None = None) -> int:
    from seqr.eval import plots

    p = parser()
    a = p.parse_args(argv)
    device = parse_device(p, a.device)
    out = Path(a.out)
    if a.replot:
        try:
            doc = files.read_json(out / files.EVAL_RESULTS, "eval results (run seqr eval first)")
        except (FileNotFoundError, ValueError) as e:
            p.error(str(e))
    else:
        if not a.library:
            p.error("give at least one --library DIR (or --replot)")
        libs = _libraries(p, a.library)
        cfg = _config(p, a, a.tasks or next(iter(libs.values())).names)
        data = load_data(cfg.tasks, cfg.split, data_dir=a.data, max_eval=cfg.max_eval, seed=cfg.seed)
        from seqr.hf.models import load_model

        model, tok = load_model(a.model, dtype=say_choice(a.dtype, "seqr eval"), device=device)
        doc = evaluate(model, tok, libs, data, cfg, out_dir=out, train_data=a.data)
        doc["command"] = "seqr eval " + " ".join(sys.argv[2:] if argv is None else argv)
        files.atomic_write_json(out / files.EVAL_RESULTS, doc)
    report, figs = plots.write_report(doc, out)
    print(report.read_text())
    print(f"seqr eval: wrote {out / files.EVAL_RESULTS}, {report} and {len(figs)} figure(s) to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
