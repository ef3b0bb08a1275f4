"""The vLLM plugin's plain-torch parts (no vLLM needed): set columns and masks, per-token routing inside packed
layers, and the engine's vLLM arguments, against brute-force references."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import _lora, _stats, _tokens
from seqr.core import fused
from seqr.core import routers as rt
from seqr.core.bank import AdapterBank
from seqr.core.packed import PackedBank
from seqr.serve.vllm_engine import engine_kwargs
from seqr.vllm.routing import RoutedPacked, SetRouting, install, packed_parts
from seqr.vllm.sets import Columns, column_mask

NAMES = ["a", "b", "c", "d"]


def _bank(m, n=16, r=4, seed=0):
    A, B = _lora(len(NAMES), m, n, r, seed=seed)
    mu, sigma = _stats(len(NAMES), seed=seed)
    return AdapterBank(A, B, mu=mu, sigma=sigma, names=NAMES)


def test_columns_are_stable_and_never_reused():
    cols = Columns(["b", "a"], 4)
    assert cols.order == ["a", "b", None, None]
    assert cols.sync(["a", "b", "z"]) == ["a", "b", "z", None]
    assert cols.sync(["b", "z"]) == [None, "b", "z", None]  # a's column freed, b and z keep theirs
    assert cols.sync(["b", "z", "y"]) == [None, "b", "z", "y"]  # a's old column is not handed out again
    with pytest.raises(ValueError, match="'x'"):
        cols.sync(["b", "z", "y", "x"])
    assert cols.mask({"z"}).tolist() == [False, False, True, False]
    with pytest.raises(KeyError, match="'a'"):
        cols.mask({"a"})
    with pytest.raises(ValueError, match="capacity 1"):
        Columns(["a", "b"], 1)


def test_a_request_carries_its_sets_columns_and_a_malformed_list_is_refused():
    cols = Columns(NAMES, 6)
    assert cols.of({"d", "b"}) == [1, 3] and cols.mask({"b", "d"}).tolist() == [0, 1, 0, 1, 0, 0]
    assert column_mask([1, 3], 6).dtype == torch.bool
    for bad in ([6], [-1], [True], ["1"], "13", None):
        with pytest.raises(ValueError, match="seqr_columns"):
            column_mask(bad, 6)


@pytest.mark.parametrize("method", ["seqr", "arrow", "spectr", "naive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_equals_routing_each_token_among_its_own_mask(method, dtype):
    bank = _bank(m=12)
    x = _tokens(10, n=16, seed=3).to(dtype)  # (T, n)
    g = torch.Generator().manual_seed(5)
    columns = ["c", None, "a", "d", "b"]  # bank order differs from column order
    col_mask = (torch.rand(10, 5, generator=g) > 0.5).float()  # (T, C)
    col_mask[:, 1] = 1.0  # a free column's bit is never read
    col_mask[7] = 0.0  # a token without a set
    st = SetRouting(NAMES, columns, method)
    st.tracing = True
    st.begin(col_mask)
    got = st.update(PackedBank([bank]), rt.in_compute_dtype(x))[0]  # (T, m)
    for t in range(10):
        allowed = {columns[c] for c in range(5) if col_mask[t, c] and columns[c]}
        if not allowed:
            assert got[t].abs().max() == 0
            continue
        i = int(bank.route(x[t:t + 1].float(), method, allowed=allowed))  # brute force: this token alone
        assert NAMES[i] in allowed
        torch.testing.assert_close(got[t], bank.delta(x[t:t + 1].float(), i)[0], rtol=1e-5, atol=1e-5)
    tr = st.trace()  # the transformers path's format: rows are the allowed sets seen
    assert sum(tr.outside()) == 0 and len(tr) == 9 and sum(c for _, _, c in tr.by_set()) == 9
    for s, n, c in tr.by_set():
        assert n in s
    want = {}
    for t in range(10):
        allowed = tuple(sorted(columns[c] for c in range(5) if col_mask[t, c] and columns[c]))
        if allowed:
            key = (allowed, NAMES[int(bank.route(x[t:t + 1].float(), method, allowed=set(allowed)))])
            want[key] = want.get(key, 0) + 1
    assert {(tuple(s), n): c for s, n, c in tr.by_set()} == want


def test_per_request_counts_equal_each_requests_own_decisions():
    """The serving engine's routing shares: each token's decisions, over two packed parts and two layers, counted
    for the request vLLM's input batch says it belongs to; a warm-up forward (other token count) counts nothing."""
    banks = [_bank(m=12, seed=0), _bank(m=8, seed=1)]
    x = _tokens(7, n=16, seed=4)  # (T, n): request "r0-abcdefgh" has 3 tokens, "r1-..." 4
    col_mask = torch.tensor([[1, 1, 0, 0]] * 3 + [[0, 0, 1, 1]] * 3 + [[0, 0, 0, 0]]).float()  # (T, C) last: no set
    st = SetRouting(NAMES, NAMES, "seqr")
    st.counting = True
    st.requests(["r0-abcdefgh", "r1-12345678"], [3, 4], [None, None])
    st.begin(col_mask)
    for _ in range(2):  # two layers
        st.update(PackedBank(banks), x)
    st.end()
    want = {"r0": {}, "r1": {}}
    for t, req in enumerate(["r0"] * 3 + ["r1"] * 3):
        allowed = {NAMES[c] for c in range(4) if col_mask[t, c]}
        for bank in banks:  # brute force: this token alone, per part, once per layer
            name = NAMES[int(bank.route(x[t:t + 1], "seqr", allowed=allowed))]
            want[req][name] = want[req].get(name, 0) + 2
    st.requests(["r0-abcdefgh", "r1-12345678"], [3, 4], [None, None])
    st.begin(torch.ones(5, 4))  # a dummy run of another size: not this step's requests
    st.update(PackedBank(banks), _tokens(5, n=16, seed=9))
    st.end()
    got = st.take(["r0", "r1", "gone"])
    assert got == {"r0": {"counts": want["r0"], "outside": 0}, "r1": {"counts": want["r1"], "outside": 0}}
    assert st.take(["r0"]) == {} and not st.per_request  # taken once, then forgotten
    st.requests(["r0-abcdefgh", "r1-12345678"], [3, 4], [None, None])
    st.begin(col_mask)
    st._chosen = [torch.full((7, 1), 3)]  # (T, 1): a choice of d for every token, as a leaking router would make
    st.end()
    assert st.take(["r0", "r1"]) == {"r0": {"counts": {"d": 3}, "outside": 3}, "r1": {"counts": {"d": 3}, "outside": 0}}


def test_sets_of_one_adapter_take_it_without_scoring(monkeypatch):
    """Request-level serving narrows each request's set to its chosen adapter: every token then gets that adapter's
    update (the fixed-adapter path), and no router score is computed; a token without a set gets none."""
    import seqr.vllm.routing as vr

    banks = [_bank(m=12), _bank(m=6, seed=1)]  # two packed parts
    x = rt.in_compute_dtype(_tokens(6, n=16, seed=4))  # (T, n)
    cols = Columns(NAMES, 5)
    st = SetRouting(NAMES, cols.order, "seqr")
    st.requests(["r0", "r1", "r2"], [2, 3, 1], [cols.of({"c"}), cols.of({"a"}), None])
    st.begin(st.batch_columns(6))
    assert st.single
    monkeypatch.setattr(vr, "token_step", lambda *a, **k: pytest.fail("scored a one-adapter set"))
    got = st.update(PackedBank(banks), x)  # [(T, m_p)]
    want = ["c", "c", "a", "a", "a", None]
    for p, bank in enumerate(banks):
        for t, name in enumerate(want):
            ref = torch.zeros(bank.shape[1]) if name is None else bank.delta(x[t:t + 1], name)[0]
            torch.testing.assert_close(got[p][t], ref, rtol=1e-6, atol=1e-6)
    st.requests(["r0"], [2], [cols.of({"a", "b"})])  # a set of two: routed as before
    st.begin(st.batch_columns(2))
    assert not st.single


def test_masks_from_the_input_batch_are_each_requests_own_set():
    """Each token's allowed columns indexed from the set its request carries (vLLM's input batch: requests in token
    order, their token counts and carried columns) equal that set's mask; a forward of another size, or a second
    forward of the same step, gets None, and a forward without masks updates no token."""
    cols = Columns(NAMES, 6)
    allowed = [{"a", "c"}, None, {"d"}]  # the middle request carries no set
    carried = [None if s is None else cols.of(s) for s in allowed]
    st = SetRouting(NAMES, cols.order, "seqr")
    st.requests(["x", "y", "z"], [2, 1, 3], carried)
    want = torch.stack([cols.mask(s) if s else torch.zeros(6, dtype=torch.bool)
                        for s, n in zip(allowed, [2, 1, 3]) for _ in range(n)])
    assert torch.equal(st.batch_columns(6), want)  # (T, C)
    assert st.batch_columns(6) is None  # consumed: one forward per step
    st.requests(["x"], [2], [carried[0]])
    assert st.batch_columns(5) is None  # a dummy run's token count
    st.begin(None, 5)  # warm-up: no set anywhere
    assert st.mask.shape == (5, 4) and not st.has.any() and st.mask_sources["none"] == 1
    st.requests(["y"], [4], [None])  # a step without any set: every token maskless
    st.begin(st.batch_columns(4))
    assert not st.has.any()
    with pytest.raises(ValueError, match="seqr_columns"):
        st.requests(["w"], [1], [[9]])  # a column outside the library's: refused, naming the field


class _FakePacked(nn.Module):
    """A vLLM-style linear: returns (y, bias), with output_sizes for its packed parts."""

    def __init__(self, n, sizes):
        super().__init__()
        self.lin, self.output_sizes, self.output_size = nn.Linear(n, sum(sizes), bias=False), list(sizes), sum(sizes)

    def forward(self, x):
        return self.lin(x), None


def test_install_routes_packed_parts_and_skips_unadapted_ones():
    model = nn.Module()
    model.layer = nn.Module()
    model.layer.qkv_proj = _FakePacked(16, [12, 6, 6])
    model.layer.o_proj = _FakePacked(16, [16])
    banks = {"layer.q_proj": _bank(12), "layer.v_proj": _bank(6, seed=1)}  # k and o not adapted
    st = SetRouting(NAMES, NAMES, "seqr")
    routed = install(model, banks, st, {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}, (_FakePacked,))
    assert sorted(routed) == ["layer.q_proj", "layer.v_proj"]
    assert isinstance(model.layer.qkv_proj, RoutedPacked) and isinstance(model.layer.o_proj, _FakePacked)
    x = _tokens(5, n=16, seed=2)
    st.begin(torch.ones(5, 4))
    y, _ = model.layer.qkv_proj(x)
    base = model.layer.qkv_proj.base.lin(x)
    q = banks["layer.q_proj"].delta(x, banks["layer.q_proj"].route(x, "seqr"))
    v = banks["layer.v_proj"].delta(x, banks["layer.v_proj"].route(x, "seqr"))
    torch.testing.assert_close(y, base + torch.cat([q, torch.zeros(5, 6), v], -1), rtol=1e-5, atol=1e-5)
    assert packed_parts("m.l.qkv_proj", {"qkv_proj": ["q", "k"]}) == ["m.l.q", "m.l.k"]
    install(model, {"layer.v_proj": banks["layer.v_proj"]}, st, {"qkv_proj": ["q_proj", "k_proj", "v_proj"]},
            (_FakePacked,))  # re-install after a change: the same base, new banks
    assert isinstance(model.layer.qkv_proj.base, _FakePacked)
    with pytest.raises(ValueError, match="layer.up_proj"):
        install(model, {"layer.up_proj": _bank(16)}, st, {}, (_FakePacked,))


@pytest.mark.skipif(not fused.available(), reason="fused step not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_fully_adapted_layer_adds_the_fused_update_in_place(monkeypatch, dtype):
    """q | k | v all adapted: the fused step adds the routed updates into the layer's output in place, the same
    bits as the joined update added and rounded once, the same choices counted; a token without a set is unchanged."""
    banks = [_bank(12), _bank(6, seed=1), _bank(6, seed=2)]
    st = SetRouting(NAMES, NAMES, "seqr")
    layer = RoutedPacked(_FakePacked(16, [12, 6, 6]).to(dtype), [(f"l.{p}", b, b.shape[1])
                                                                  for p, b in zip("qkv", banks)], st)
    x = _tokens(5, n=16, seed=2).to(dtype)
    cols = torch.ones(5, 4)
    cols[1] = 0  # token 1 carries no set
    calls = []
    into = fused.step_into_prepared
    monkeypatch.setattr(fused, "step_into_prepared", lambda *a: calls.append(1) or into(*a))
    runs = []
    for takes_into in (True, False):
        if not takes_into:
            monkeypatch.setattr(st, "update_into", lambda *a: False)
        st.begin(cols)
        st.tracing = True
        y, _ = layer(x)
        runs.append((y, st.trace().by_set()))
    assert calls == [1]
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    assert torch.equal(runs[0][0][1], layer.base.lin(x)[1])  # no set: the base output, untouched


def test_routing_errors_name_the_problem():
    with pytest.raises(ValueError, match="'mu'"):
        SetRouting(NAMES, NAMES, "mu")
    with pytest.raises(ValueError, match=r"\['d'\]"):
        SetRouting(NAMES, ["a", "b", "c"], "seqr")
    st = SetRouting(NAMES, NAMES, "seqr")
    with pytest.raises(RuntimeError, match="begin"):
        st.update(PackedBank([_bank(12)]), _tokens(3, n=16))


def test_engine_kwargs_route_the_registered_families_only(tmp_path):
    for arch in ("LlamaForCausalLM", "Qwen2ForCausalLM"):
        (tmp_path / "config.json").write_text(json.dumps({"architectures": [arch]}))
        kw = engine_kwargs(tmp_path, "/lib", ["a"], method="seqr", k=None, dtype="float32", max_batch=4,
                           max_model_len=128)
        assert kw["hf_overrides"]["architectures"] == [f"Seqr{arch}"]
    assert not kw.get("enable_lora")  # sets travel in each request's sampling parameters: vLLM's LoRA stays off
    assert kw["enforce_eager"] and kw["compilation_config"] == {"mode": 0}
    kw = engine_kwargs(tmp_path, "/lib", ["a"], method="seqr", k=None, dtype="float32", max_batch=4,
                       max_model_len=128, compile_cache=tmp_path / "cc")
    assert not kw["enforce_eager"] and kw["compilation_config"] == {"cache_dir": str(tmp_path / "cc")}
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        engine_kwargs(tmp_path, "/lib", ["a"], method="seqr", k=None, dtype="float32", max_batch=4,
                      max_model_len=128)
    with pytest.raises(FileNotFoundError, match="config.json"):
        engine_kwargs(tmp_path / "nope", "/lib", ["a"], method="seqr", k=None, dtype="float32", max_batch=4,
                      max_model_len=128)


def test_a_trace_with_no_forward_is_empty_not_an_error():
    """A trace switched on while nothing ran (e.g. between a library change and the next request) reports no
    decisions: no outside-set decision, no counts, no sets."""
    st = SetRouting(NAMES, NAMES, "seqr")
    st.tracing = True
    tr = st.trace()
    assert len(tr) == 0 and sum(tr.outside()) == 0 and tr.counts() == {} and tr.by_set() == []


def test_one_probe_over_prompts_that_arrive_together_chooses_as_each_alone(tmp_path):
    """The vLLM engine probes the prompts that arrive together in one left-padded forward (positions counted from
    each prompt's first token): each gets the adapter the probe of its prompt alone picks, within its own set."""
    from seqr.store.library import LoraLibrary
    from seqr.vllm.request import RequestRouter
    from vllm_tiny import model_and_library

    names = ["alpha", "beta", "evil", "gamma"]
    model_dir, lib_dir = model_and_library(tmp_path, names, boost={"evil": 8.0})
    router = RequestRouter(model_dir, LoraLibrary.load(lib_dir), tmp_path / "work", method="seqr", export=False)
    prompts = [[5, 17, 33, 2, 90, 41], [7, 7, 120, 64], [200, 3, 3, 19, 77, 150, 11, 8], [12, 250, 99], [9]]
    sets = [{"alpha", "beta"}, {"beta", "gamma"}, set(names), {"alpha", "evil"}, {"gamma"}]
    alone = [router.choose(p, s) for p, s in zip(prompts, sets)]
    assert router.choose_many(prompts, sets) == alone
    assert all(n in s for n, s in zip(alone, sets)) and alone[2] == alone[3] == "evil"
    assert not (tmp_path / "work").exists()  # nothing exported for vLLM's LoRA path


def test_the_vllm_loop_wakes_on_a_step_output_or_a_new_job_and_not_before():
    """The engine's loop waits while vLLM's engine core steps: an output put by vLLM's output thread, or a request
    submitted meanwhile, wakes it at once (the request then joins the next step); nothing else does."""
    import queue
    import threading
    import time
    from types import SimpleNamespace

    from seqr.serve.vllm_engine import VllmEngine

    eng = VllmEngine.__new__(VllmEngine)  # the loop's parts only: no vLLM
    outputs = queue.Queue()
    eng.llm = SimpleNamespace(llm_engine=SimpleNamespace(engine_core=SimpleNamespace(outputs_queue=outputs)))
    eng._q, eng._wake = queue.Queue(), threading.Event()
    eng._ready = eng._wake_on_outputs()
    assert eng._ready is outputs

    def waited(wake) -> float:
        done = threading.Event()
        t0 = time.monotonic()
        threading.Thread(target=lambda: (eng._await_work(), done.set()), daemon=True).start()
        assert not done.wait(0.2)  # nothing to do: still waiting
        wake()
        assert done.wait(0.5)
        return time.monotonic() - t0

    assert waited(lambda: outputs.put_nowait("step")) < 0.7  # vLLM's output thread puts a step's outputs
    outputs.get_nowait()
    assert waited(lambda: eng._put(("generate", None, None))) < 0.7  # a request arrives
    eng._await_work()  # a job is queued already: no wait at all
    eng.llm.llm_engine.engine_core = SimpleNamespace()  # the in-process client: step() itself waits
    assert eng._wake_on_outputs() is None


def _routed_model(banks, routing, key):
    """A one-block vLLM-style model, q, v and o adapted (k not: its part of the update is zeros)."""
    model = nn.Module()
    model.layer = nn.Module()
    model.layer.qkv_proj, model.layer.o_proj = _FakePacked(16, [12, 6, 6]), _FakePacked(16, [16])
    install(model, banks, routing, {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}, (_FakePacked,), key=key)
    return model


def _library(names, seed):
    A, B = _lora(len(names), 34, 16, 4, seed=seed)  # B rows: q (12) | v (6) | o (16)
    mu, sigma = _stats(len(names), seed=seed)
    return {layer: AdapterBank(A, B[:, rows], mu=mu, sigma=sigma, names=names) for layer, rows in
            (("layer.q_proj", slice(0, 12)), ("layer.v_proj", slice(12, 18)), ("layer.o_proj", slice(18, 34)))}


def test_a_compiled_model_routes_each_forwards_sets_with_the_library_of_the_moment():
    """Compiled once with every guard dropped (as vLLM runs its compiled model), each routed layer's update is one
    opaque op (seqr::routed_add_) that reads the routing state at run time: forwards of other token counts and
    sets, and a library changed after compiling (an adapter fewer, the layers re-wrapped), give exactly the eager
    model's outputs and choices."""
    routing = SetRouting(NAMES, NAMES, "seqr")
    model = _routed_model(_library(NAMES, 0), routing, key=f"test{id(routing)}")

    def forward(x):
        return model.layer.qkv_proj(x)[0], model.layer.o_proj(x)[0]

    torch._dynamo.reset()
    compiled = torch.compile(forward, backend="aot_eager", fullgraph=True, dynamic=True,
                             options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe})
    forwards = [(9, NAMES, 0), (5, NAMES, 1), (12, NAMES[1:], 2), (3, NAMES[1:], 3)]
    for i, (T, names, seed) in enumerate(forwards):
        if i == 2:  # "a" removed: the banks lose an adapter, every layer is re-wrapped; the graph stays
            routing.configure(names, NAMES, "seqr", None)
            install(model, _library(names, 5), routing, {"qkv_proj": ["q_proj", "k_proj", "v_proj"]},
                    (_FakePacked,), key=f"test{id(routing)}")
        x = _tokens(T, n=16, seed=seed)
        cols = _mask_cols(T, seed, allowed=[NAMES.index(a) for a in names])
        outs = []
        for fn in (forward, compiled):
            routing.begin(cols)
            routing.tracing = True
            outs.append((*fn(x), routing.trace().by_set()))
        assert all(torch.equal(a, b) for a, b in zip(outs[0][:2], outs[1][:2])), (T, names)
        assert outs[0][2] == outs[1][2] and outs[0][2], (T, names)
        if i == 0:  # the eager forward routed: its outputs differ from the base layers'
            assert not torch.allclose(outs[0][0], model.layer.qkv_proj.base.lin(x))


def _mask_cols(T, seed, allowed):
    """(T, C) allowed columns: each token a random non-empty subset of `allowed`; one token without a set."""
    g = torch.Generator().manual_seed(seed)
    cols = torch.zeros(T, len(NAMES))
    for t in range(T):
        pick = [c for c in allowed if torch.rand((), generator=g) < 0.6] or allowed[:1]
        cols[t, pick] = 1
    cols[T // 2] = 0  # a request without a set: no update
    return cols
