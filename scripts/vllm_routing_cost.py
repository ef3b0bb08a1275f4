"""Cost of seqr's routing inside vLLM's layers, alone: `SetRouting.update` over every adapted layer of a library
(one decode step's worth), T tokens of a bf16 model, median of 20 steps; `--profile` adds torch's op table.

    .venv/bin/python scripts/vllm_routing_cost.py runs/serve/n10/lib --threads 1 --tokens 8
"""
import argparse
import statistics

import torch

from seqr.bench.common import timed
from seqr.serve.vllm_routing import SetRouting
from seqr.store.library import LoraLibrary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("library")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--method", default="seqr")
    p.add_argument("--profile", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    lib = LoraLibrary.load(a.library)
    banks = [lib.bank(layer) for layer in lib.layers]
    routing = SetRouting(lib.names, lib.names, a.method)
    routing.begin(torch.ones(a.tokens, len(lib.names)))  # (T, C): every token may use every adapter
    xs = {b.A.shape[-1]: torch.randn(a.tokens, b.A.shape[-1], dtype=torch.bfloat16) for b in banks}  # (T, n)

    def step():
        for b in banks:
            routing.update(b, xs[b.A.shape[-1]])  # (T, m)
    times, _ = timed(step, repeats=20, warmup=3)
    med = statistics.median(times)
    print(f"{a.method}, {a.threads} thread(s), {a.tokens} tokens: {len(banks)} routed layers, median {1e3 * med:.2f} ms "
          f"per step, {1e6 * med / len(banks):.0f} us per layer")
    if a.profile:
        from torch.profiler import profile
        with profile() as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
