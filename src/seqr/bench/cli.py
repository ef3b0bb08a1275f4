"""`seqr bench SUBCOMMAND`: the benchmarks, one module each; a subcommand is one entry of SUBCOMMANDS.

routing   `AdapterBank.route` per method beside the MACs `seqr costs` predicts (`--sweep`: the paper's Figure 5)
forward   a whole model's forward with N routed adapters beside peft's static LoRA and Arrow
generate  per-token greedy decoding with N routed adapters beside the untouched model and peft
serve     N concurrent clients against the HTTP service
train     the fp32 training path against the fast path, interleaved
scale     memory, load, add/remove and decode cost as the library grows to thousands of adapters
granularity  prefill and decode cost of each routing granularity beside the untouched model and per-token seqr
"""
from __future__ import annotations

from seqr.bench import forward, generate, granularity, routing, scale, serve, train
from seqr.core.argfmt import Parser, unknown

# name -> (help, add its options, run(args, parser)).
SUBCOMMANDS = {
    "routing": ("time every router per token against the predicted MACs (--sweep: Figure 5)", routing.add_routing_args,
                routing.cmd_routing),
    "forward": ("time a whole model's forward with N routed adapters beside peft (static LoRA, Arrow)",
                forward.add_forward_args, forward.cmd_forward),
    "generate": ("time greedy decoding per generated token with N routed adapters beside the untouched model and "
                 "peft", generate.add_generate_args, generate.cmd_generate),
    "serve": ("N concurrent clients against the HTTP service: requests/s, p50/p95 latency", serve.add_serve_args,
              serve.cmd_serve),
    "train": ("train the same examples on the fp32 path and the fast path, interleaved: tokens/s, dev accuracy, "
              "routed-eval throughput and agreement", train.add_train_args, train.cmd_train),
    "scale": ("memory, load, add/remove and decode cost as N grows (fresh process per N): JSON, Markdown, PNG",
              scale.add_scale_args, scale.cmd_scale),
    "granularity": ("prefill and decode cost of each routing granularity (token, depth, prompt, layers, request) "
                    "beside the untouched model and the fixed-adapter path: JSON, Markdown, PNG",
                    granularity.add_granularity_args, granularity.cmd_granularity),
}


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="seqr bench", description="Benchmarks of the seqr routers.")
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    for name, (help_, add_args, run) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        add_args(sp)
        sp.set_defaults(run=run, subparser=sp)
    if argv and not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:
        parser.error(unknown("subcommand", argv[0], SUBCOMMANDS))  # one line, with a "did you mean"
    args = parser.parse_args(argv)
    return int(args.run(args, args.subparser) or 0)
