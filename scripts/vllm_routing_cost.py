"""Cost of seqr's routing inside vLLM's layers, alone: `SetRouting.update` over every adapted layer of a library
(one decode step's worth), T tokens of a bf16 model, median of 20 steps; `--profile` adds torch's op table.

    .venv/bin/python scripts/vllm_routing_cost.py runs/serve/n10/lib --threads 1 --tokens 8
"""
import argparse
import statistics

import torch

from seqr.bench.common import timed
from seqr.core.packed import PackedBank
from seqr.core.threads import one_thread
from seqr.vllm.routing import SetRouting
from seqr.store.library import LoraLibrary


PACKED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
          "up_proj": "gate_up_proj"}  # HF layer -> the vLLM Llama module it is packed into


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
    groups: dict[str, list] = {}  # vLLM's packed module -> its adapted parts' banks (q, k, v -> qkv_proj)
    for layer in lib.layers:
        prefix, _, leaf = layer.rpartition(".")
        groups.setdefault(f"{prefix}.{PACKED.get(leaf, leaf)}", []).append(lib.bank(layer))
    banks = [PackedBank(g) for g in groups.values()]
    routing = SetRouting(lib.names, lib.names, a.method)
    routing.begin(torch.ones(a.tokens, len(lib.names)))  # (T, C): every token may use every adapter
    xs = {b.At.shape[0]: torch.randn(a.tokens, b.At.shape[0], dtype=torch.bfloat16) for b in banks}  # (T, n)

    def step():
        for b in banks:
            with one_thread():  # as the routed layer runs it
                routing.update(b, xs[b.At.shape[0]].float())  # [(T, m_p)]
    times, _ = timed(step, repeats=20, warmup=3)
    med = statistics.median(times)
    layers = sum(b.num_parts for b in banks)
    print(f"{a.method}, {a.threads} thread(s), {a.tokens} tokens: {layers} routed layers in {len(banks)} vLLM modules, "
          f"median {1e3 * med:.2f} ms per step, {1e6 * med / len(banks):.0f} us per module")
    if a.profile:
        from torch.profiler import profile
        with profile() as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
