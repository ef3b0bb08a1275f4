"""Cost of seqr's routing inside vLLM's layers, alone: `SetRouting.update` over every adapted layer of a library
(one decode step's worth), T tokens of a bf16 model, median of 20 steps; `--profile` adds torch's op table;
`--compile` also times the same step compiled by torch.compile (inductor) as one graph, as a compiled model runs
it, side by side with eager (interleaved rounds, medians) and checks both give the same updates; `--into` times
what a routed vLLM module adds to its base GEMM: the update computed, added and rounded by torch against the fused
step adding it into the bf16 output in place (interleaved, medians), and checks both give the same bits.

    .venv/bin/python scripts/vllm_routing_cost.py runs/serve/n10/lib --threads 1 --tokens 8 [--compile | --into]
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
    p.add_argument("--compile", action="store_true", help="also time the step compiled as one graph")
    p.add_argument("--into", action="store_true", help="time the update added by torch against in place")
    p.add_argument("--cold", action="store_true", help="with --into: stream 64 MB through the caches before each "
                   "module, as the base model's weights do between routed layers inside vLLM")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    lib = LoraLibrary.load(a.library)
    groups: dict[str, list] = {}  # vLLM's packed module -> its adapted parts' banks (q, k, v -> qkv_proj)
    for layer in lib.layers:
        prefix, _, leaf = layer.rpartition(".")
        groups.setdefault(f"{prefix}.{PACKED.get(leaf, leaf)}", []).append(lib.bank(layer))
    banks = [PackedBank(g) for g in groups.values()]
    routing = SetRouting(lib.names, lib.names, a.method)
    g = torch.Generator().manual_seed(0)  # each token's user allowed 2 adapters, as in `seqr bench serve`
    allowed = torch.zeros(a.tokens, len(lib.names))  # (T, C)
    allowed.scatter_(1, torch.stack([torch.randperm(len(lib.names), generator=g)[:2] for _ in range(a.tokens)]), 1.0)
    routing.begin(allowed)
    xs = {b.At.shape[0]: torch.randn(a.tokens, b.At.shape[0], dtype=torch.bfloat16) for b in banks}  # (T, n)

    def step():
        for b in banks:
            with one_thread():  # as the routed layer runs it
                routing.update(b, xs[b.At.shape[0]].float())  # [(T, m_p)]

    layers = sum(b.num_parts for b in banks)
    head = f"{a.method}, {a.threads} thread(s), {a.tokens} tokens: {layers} routed layers in {len(banks)} vLLM modules"
    if a.compile:
        compare(step, banks, routing, xs, head)
    elif a.into:
        in_place(banks, routing, xs, head + (", caches flushed before each module" if a.cold else ""), a.cold)
    else:
        times, _ = timed(step, repeats=20, warmup=3)
        med = statistics.median(times)
        print(f"{head}, median {1e3 * med:.2f} ms per step, {1e6 * med / len(banks):.0f} us per module")
    if a.profile:
        from torch.profiler import profile
        with profile() as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def compare(step, banks, routing, xs, head: str, rounds: int = 20) -> None:
    """Eager against compiled (one graph over every module's routing, as in a compiled model), interleaved."""
    import time

    def whole():
        return [u for b in banks for u in routing.update(b, xs[b.At.shape[0]].float())]

    compiled = torch.compile(whole, fullgraph=True, dynamic=False)
    t0 = time.perf_counter()
    got = compiled()
    print(f"compiled in {time.perf_counter() - t0:.1f} s")
    assert all(torch.allclose(g, w, rtol=1e-4, atol=1e-5) for g, w in zip(got, whole()))
    res = {"eager": [], "compiled": []}
    for _ in range(rounds):
        for name, f in (("eager", whole), ("compiled", compiled)):
            with one_thread():
                t0 = time.perf_counter()
                f()
                res[name].append(time.perf_counter() - t0)
    e, c = (statistics.median(res[k]) for k in ("eager", "compiled"))
    print(f"{head}: eager {1e3 * e:.2f} ms per step, compiled {1e3 * c:.2f} ms per step (medians of {rounds}, "
          f"interleaved): compiled takes {c / e:.2f}x the eager time")


def in_place(banks, routing, xs, head: str, cold: bool, rounds: int = 20) -> None:
    """A decode step's routed modules (every part adapted, the base output y in bf16): `update` then
    (y + upd).to(bf16), as before, against `update_into` (the fused step adding into y), interleaved; with `cold`,
    64 MB streamed through the caches before each module (not timed)."""
    import time

    ys = [torch.randn(next(iter(xs.values())).shape[0], sum(b.sizes), dtype=torch.bfloat16) for b in banks]
    big = torch.zeros(64 << 20 if cold else 0, dtype=torch.uint8)
    names = [[f"part{i}" for i in range(b.num_parts)] for b in banks]

    def added(b, y, _):
        return (y + routing.update(b, xs[b.At.shape[0]].float(), joined=True)).to(y.dtype)

    def into(b, y, nm):
        assert routing.update_into(b, xs[b.At.shape[0]], y, nm)
        return y

    def step(f):  # (seconds in the routing, outputs)
        took, outs = 0.0, []
        for b, y, nm in zip(banks, [y.clone() for y in ys], names):
            big.add_(1)
            t0 = time.perf_counter()
            outs.append(f(b, y, nm))
            took += time.perf_counter() - t0
        return took, outs

    assert all(torch.equal(g, w) for g, w in zip(step(into)[1], step(added)[1]))
    res = {"added": [], "in place": []}
    for _ in range(rounds):
        for name, f in (("added", added), ("in place", into)):
            res[name].append(step(f)[0])
    e, c = (statistics.median(res[k]) for k in ("added", "in place"))
    print(f"{head}: update added by torch {1e3 * e:.2f} ms per step, in place {1e3 * c:.2f} ms per step (medians "
          f"of {rounds}, interleaved): {c / e:.2f}x")


if __name__ == "__main__":
    main()
