"""The routing step (core/step.token_step) compiles as one graph: no host read and no data-dependent shape, so a
compiler (torch.compile, as vLLM compiles a model) can fuse it; the compiled step chooses exactly what the eager
step chooses, never outside the mask, and still refuses an empty allowed set. Dynamo captures with fullgraph=True
(a graph break is an error) through the aot_eager backend (functionalised in-place ops, no C++ toolchain)."""
from __future__ import annotations

import pytest
import torch

from seqr.core import registry
from seqr.core import routers as rt
from seqr.core.packed import PackedBank
from seqr.core.step import token_step
from test_packed import _bank, _mask, _parts, n

ROUTED = [r.name for r in registry.routers(("score", "shortlist"))]


def _compiled():
    torch._dynamo.reset()
    return torch.compile(token_step, backend="aot_eager", fullgraph=True, dynamic=False)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("T", [1, 8, rt.GATHER_TOKENS + 9])  # one token, a decode batch, a prefill
@pytest.mark.parametrize("masked", [False, True])
def test_seqr_step_compiles_whole_and_equals_eager(packed, T, masked):
    bank = PackedBank(_parts()) if packed else _bank(12)
    x = torch.randn(T, n, generator=torch.Generator().manual_seed(T))  # (T, n)
    mask = _mask(T) if masked else None
    idx, upd, z = token_step(bank, x, "seqr", mask)
    cidx, cupd, cz = _compiled()(bank, x, "seqr", mask)  # raises on any graph break
    assert torch.equal(cidx, idx)
    if masked:
        assert mask.gather(1, cidx.reshape(T, -1)).all()
    for got, want in zip(cupd if packed else [cupd], upd if packed else [upd]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cz, z)


@pytest.mark.parametrize("method", [m for m in ROUTED if m != "seqr"])
def test_every_router_step_compiles_whole(method):
    bank, T = _bank(12), 8
    x = torch.randn(T, n, generator=torch.Generator().manual_seed(1))  # (T, n)
    k = 2 if registry.get(method).takes_k else None
    idx, upd, _ = token_step(bank, x, method, _mask(T), k)
    cidx, cupd, _ = _compiled()(bank, x, method, _mask(T), k)
    assert torch.equal(cidx, idx), method
    torch.testing.assert_close(cupd, upd, rtol=1e-5, atol=1e-6)


def test_a_compiled_step_refuses_an_empty_allowed_set():
    bank, T = _bank(12), 4
    mask = _mask(T)
    mask[2] = False  # token 2 may use no adapter
    x = torch.randn(T, n)
    with pytest.raises(ValueError, match="allowed set is empty"):
        token_step(bank, x, "seqr", mask)
    with pytest.raises(RuntimeError, match="allowed set is empty"):
        _compiled()(bank, x, "seqr", mask)


@pytest.mark.parametrize("packed", [False, True])
def test_one_graph_serves_every_batch_size_and_mask(packed):
    """Compiled once (T symbolic), the step never recompiles for another T or another mask (a compiler that
    compiles once and drops its guards, as vLLM does, then runs the same graph) and equals eager each time."""
    bank = PackedBank(_parts()) if packed else _bank(12)
    step = _compiled_dynamic()
    try:
        for i, T in enumerate([rt.GATHER_TOKENS + 9, 8, 3, 2 * rt.GATHER_TOKENS + 1]):
            x = torch.randn(T, n, generator=torch.Generator().manual_seed(T))  # (T, n)
            mask = _mask(T, seed=T) if i % 2 else torch.ones(T, len(bank.names), dtype=torch.bool)
            idx, upd, _ = token_step(bank, x, "seqr", mask)
            cidx, cupd, _ = step(bank, x, "seqr", mask)
            if i == 0:
                torch.compiler.set_stance("fail_on_recompile")  # from here on a recompile raises
            assert torch.equal(cidx, idx), T
            for got, want in zip(cupd if packed else [cupd], upd if packed else [upd]):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    finally:
        torch.compiler.set_stance("default")


def test_vllm_set_routing_compiles_to_one_graph_for_every_forward():
    """SetRouting.update (what vLLM's routed modules call) compiled once: forwards whose masks differ (a token
    without a set, every token allowed everything, mixed) reuse the graph and equal eager."""
    from seqr.vllm.routing import SetRouting
    from test_packed import NAMES

    pb, routing = PackedBank(_parts()), SetRouting(NAMES, NAMES, "seqr")
    upd = torch.compile(routing.update, backend="aot_eager", fullgraph=True, dynamic=True)
    cols = [_mask(11, seed=1).float(), torch.ones(7, len(NAMES)), _mask(9, seed=2).float()]  # T: no layer width
    cols[2][4] = 0  # a token of a request without a set: no update
    try:
        for i, c in enumerate(cols):
            x = torch.randn(c.shape[0], n, generator=torch.Generator().manual_seed(i))  # (T, n)
            routing.begin(c)
            want = routing.update(pb, x)  # eager
            got = upd(pb, x)
            if i == 0:
                torch.compiler.set_stance("fail_on_recompile")
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    finally:
        torch.compiler.set_stance("default")


def _compiled_dynamic():
    torch._dynamo.reset()
    return torch.compile(token_step, backend="aot_eager", fullgraph=True, dynamic=True)
