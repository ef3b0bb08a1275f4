"""`seqr VERB ...`: a small dispatcher; each verb's `main(argv)` lives with the module that owns it."""
from __future__ import annotations

import importlib
import os
import sys

from seqr.core.argfmt import UserError, one_line, unknown

# verb -> (module, one-line help). Modules are imported only when their verb runs.
VERBS = {
    "demo": ("seqr.eval.demo", "end to end on SmolLM2: train, calibrate, build, evaluate every method (--quick: "
                               "8-14 min on 2 cores)"),
    "train": ("seqr.silo.train", "train one silo's shared-A LoRA adapter on its own task data"),
    "calibrate": ("seqr.silo.calibrate", "per-layer activation-norm stats of an adapter on its own data"),
    "build": ("seqr.silo.build", "build a routing library from calibrated adapter dirs"),
    "info": ("seqr.silo.info", "describe a library: adapters, layers, rank, shared A, sizes, stats"),
    "eval": ("seqr.eval.cli", "evaluate every routing method on held-out task data: JSON, Markdown, PNG figures"),
    "serve": ("seqr.serve.cli", "OpenAI-compatible HTTP service; each user routed only among their authorised adapters"),
    "costs": ("seqr.core.costs", "print routing MACs and storage per method (the paper's Table 1)"),
    "bench": ("seqr.bench.cli", "benchmarks: `seqr bench routing|forward|generate|serve|train|scale|granularity` "
                                "(routing --sweep: Figure 5)"),
}


def usage() -> str:
    lines = ["usage: seqr VERB [options]", "", "verbs:"]
    lines += [f"  {verb:<10} {help_}" for verb, (_, help_) in VERBS.items()]
    lines += ["", "`seqr VERB --help` shows a verb's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run `seqr VERB ...`. A user error (seqr.core.argfmt.UserError, e.g. an unknown task, a model that cannot be
    loaded, a path that does not exist) is one line `seqr VERB: message` on stderr, exit 2; anything else keeps
    its traceback: it is a bug to fix, not a message to hide."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"seqr: {unknown('verb', verb, VERBS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(VERBS[verb][0])
    try:
        return int(module.main(rest) or 0)
    except UserError as e:
        print(f"seqr {verb}: {one_line(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`seqr info --json | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0


if __name__ == "__main__":
    sys.exit(main())
