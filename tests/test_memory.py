"""One copy of every adapter in memory (issue 31, item 1): the library's per-adapter tensors are views of the
stacked tensors its banks route with, before and after changes, with every value as given."""
from __future__ import annotations

import pytest
import torch

from peft_factory import adapter_library, random_stats


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of a against the reference b."""
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    return float((a - b).norm() / b.norm())


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_banks_and_library_share_one_copy_of_every_b(tmp_path):
    lib = random_stats(adapter_library(tmp_path / "s", ["a", "b", "c"]))
    given = {n: {l: t.clone() for l, t in lib.adapter_weights(n)[1].items()} for n in lib.names}
    for layer in lib.layers:
        bank = lib.bank(layer)
        for i, n in enumerate(lib.names):
            B = lib.adapter_weights(n)[1][layer]
            assert _storage(B) == _storage(bank.B) and torch.equal(B, given[n][layer])  # a view, same values
            assert torch.equal(bank.B[i], given[n][layer])
    view = lib.with_stats({"a": lib.stats("b")})  # a derived view shares the same tensors
    assert _storage(view.adapter_weights("c")[1][lib.layers[0]]) == _storage(lib.bank(lib.layers[0]).B)
    lib.remove("b")
    lib.add("d", given["b"])
    layer = lib.layers[1]
    bank = lib.bank(layer)
    assert lib.names == ["a", "c", "d"] and bank.B.shape[0] == 3
    for i, n in enumerate(lib.names):
        assert _storage(lib.adapter_weights(n)[1][layer]) == _storage(bank.B)
        assert torch.equal(bank.B[i], given["b" if n == "d" else n][layer])


def test_unique_a_libraries_share_their_a_too(tmp_path):
    lib = adapter_library(tmp_path / "u", ["x", "y"], a_seed=None)
    layer = lib.layers[0]
    A_given = {n: lib.adapter_weights(n)[0][layer].clone() for n in lib.names}
    bank = lib.bank(layer)
    for i, n in enumerate(lib.names):
        A = lib.adapter_weights(n)[0][layer]
        assert _storage(A) == _storage(bank.A) and torch.equal(A, A_given[n]) and torch.equal(bank.A[i], A)



def _live_tensors() -> int:
    import gc

    gc.collect()
    return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())


def test_a_banked_library_keeps_no_tensor_object_per_adapter_and_layer(tmp_path):
    """At N = 1000 on SmolLM2 one view object per adapter and layer (120 000) cost 0.1x the formula: once every
    bank is built, the tensors alive grow with the layers, not with adapters x layers."""
    lib = random_stats(adapter_library(tmp_path / "s", [f"a{i}" for i in range(3)]))
    extra = random_stats(adapter_library(tmp_path / "more", [f"e{i}" for i in range(30)]))
    for n in extra.names:
        lib.add(n, extra.adapter_weights(n)[1], stats=extra.stats(n))
    del extra
    before = _live_tensors()
    for layer in lib.layers:
        lib.bank(layer)
    N, L = len(lib), len(lib.layers)
    assert before >= N * L  # the adapters' own tensors, before the banks
    assert _live_tensors() < before - N * L // 2  # the banks hold them, a few tensors per layer
    B = lib.adapter_weights("e3")[1]
    assert list(B) == lib.layers and len(B) == L and _storage(B[lib.layers[2]]) == _storage(lib.bank(lib.layers[2]).B)


def test_derived_views_keep_their_values_through_the_sources_changes(tmp_path):
    lib = random_stats(adapter_library(tmp_path / "s", ["a", "b", "c", "d"]))
    given = {n: {l: t.clone() for l, t in lib.adapter_weights(n)[1].items()} for n in lib.names}
    layers = lib.layers
    lib.bank(layers[0])
    view = lib.with_stats({"a": lib.stats("b")})
    view.bank(layers[1])  # the view's own bank of one layer; the rest it reads from the source
    lib.set_stats("c", lib.stats("d"))  # the source drops its banks ...
    for layer in layers:
        lib.bank(layer)  # ... and builds them again
    lib.remove("a")  # "d" moves into a's rows
    lib.add("e", given["b"], stats=lib.stats("b"))  # written into the spare rows
    lib.remove("b")
    for n in ("a", "b", "c", "d"):
        for layer in layers:
            assert torch.equal(view.adapter_weights(n)[1][layer], given[n][layer]), (n, layer)
    for n, want in (("c", "c"), ("d", "d"), ("e", "b")):
        for layer in layers:
            assert torch.equal(lib.adapter_weights(n)[1][layer], given[want][layer]), (n, layer)
            assert torch.equal(lib.bank(layer).B[lib.names.index(n)], given[want][layer])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_resident_library_routes_like_float32_and_holds_half(tmp_path, dtype):
    ref = random_stats(adapter_library(tmp_path / "s", [f"a{i}" for i in range(6)]))
    half = random_stats(adapter_library(tmp_path / "s", [f"a{i}" for i in range(6)])).set_resident_dtype(dtype)
    x = torch.randn(3000, ref.meta.layers[ref.layers[0]][1], generator=torch.Generator().manual_seed(0))
    for layer in ref.layers:
        b32, b16 = ref.bank(layer), half.bank(layer)
        assert b16.B.dtype == getattr(torch, dtype) and b16.A.dtype == b16.B.dtype
        for method in ("seqr", "arrow", "spectr"):
            s = b32.scores(x, method)  # (T, N) the float32 reference
            top = s.topk(2, dim=-1).values
            clear = (top[:, 0] - top[:, 1]) > 2e-2 * top[:, 0].abs().clamp(min=1)
            i32, i16 = b32.route(x, method), b16.route(x, method)
            assert clear.float().mean() > 0.8 and torch.equal(i16[clear], i32[clear]), (layer, method)
        idx, eps = b32.route(x, "seqr"), torch.finfo(getattr(torch, dtype)).eps
        for T in (1, 5, 3000):  # one token, a decode batch, a prefill: each path of the update
            assert _rel(b16.delta(x[:T], idx[:T]), b32.delta(x[:T], idx[:T])) < 4 * eps  # the weights' rounding
        assert _rel(b16.mean_delta(x[:64]), b32.mean_delta(x[:64])) < 4 * eps
        assert b16._cast(torch.float32)[1].dtype == b16.B.dtype  # no float32 copy of B behind the update
    name = half.names[0]
    assert half.adapter_weights(name)[1][half.layers[0]].dtype == getattr(torch, dtype)
    with pytest.raises(ValueError, match="'int8'"):
        half.set_resident_dtype("int8")



def _held(obj) -> dict[int, int]:
    """Bytes of every distinct tensor storage an object holds in its attributes (tensors, tuples, dicts of them)."""
    out = {}

    def walk(v):
        if isinstance(v, torch.Tensor):
            out[_storage(v)] = v.untyped_storage().nbytes()
        elif isinstance(v, (tuple, list)):
            for t in v:
                walk(t)
        elif isinstance(v, dict):
            for t in v.values():
                walk(t)
        elif hasattr(v, "store"):
            walk(v.store)

    for v in vars(obj).values():
        walk(v)
    return out


def test_a_calibrated_half_bank_holds_each_routing_tensor_once(tmp_path):
    """Measured at N = 100 on SmolLM2 (half resident): the packed Grams were held beside the z-scored ones, and a
    half shared A was cast to float32 twice (A and A^T), 3.8 MiB of 94; each is now held once."""
    lib = random_stats(adapter_library(tmp_path / "s", [f"a{i}" for i in range(5)])).set_resident_dtype("float16")
    bank = lib.bank(lib.layers[0])
    N, m, n, r = bank.shape
    x = torch.randn(7, n, generator=torch.Generator().manual_seed(0))
    bank.delta(x, bank.route(x))  # the forward's casts
    B, A = N * m * r * 2, n * r * 2  # float16
    # B (built: no spare rows) + A + A^T in float32 + G/sigma^2 + R blocks + mu, sigma, mu/sigma
    want = B + A + 2 * A + N * r * (r + 1) // 2 * 4 + N * r * r * 4 + 3 * N * 4
    assert sum(_held(bank).values()) == want
    G = bank.G_packed  # derived from the z-scored Grams, exactly up to rounding
    from seqr.core import routers as rt
    _, R = rt.qr_positive(bank.B.float())
    assert torch.allclose(G, rt.pack_gram(R), rtol=1e-5, atol=1e-7)

def test_half_resident_unique_a_library(tmp_path):
    ref = adapter_library(tmp_path / "u", ["x", "y", "z"], a_seed=None)
    half = adapter_library(tmp_path / "u", ["x", "y", "z"], a_seed=None).set_resident_dtype("float16")
    layer = ref.layers[0]
    x = torch.randn(40, ref.meta.layers[layer][1], generator=torch.Generator().manual_seed(1))
    idx = torch.arange(40) % 3
    eps = torch.finfo(torch.float16).eps
    assert _rel(half.bank(layer).delta(x, idx), ref.bank(layer).delta(x, idx)) < 4 * eps
    assert _rel(half.bank(layer).mean_delta(x), ref.bank(layer).mean_delta(x)) < 4 * eps


def test_a_half_resident_library_attached_to_a_model(tmp_path):
    from peft_factory import tiny_llama
    from seqr import attach, detach, routing

    ref = random_stats(adapter_library(tmp_path / "s", ["a", "b", "c"], b_scale=1.0))
    half = random_stats(adapter_library(tmp_path / "s", ["a", "b", "c"], b_scale=1.0)).set_resident_dtype("float16")
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    out, first = {}, [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]  # layers fed the same embeddings
    for label, lib in (("fp32", ref), ("fp16", half)):
        model = attach(tiny_llama(), lib)
        with torch.no_grad(), routing(model, "seqr", trace=True) as tr:
            model(input_ids=ids)
        with torch.no_grad(), routing(model, adapter="b"):
            logits = model(input_ids=ids).logits
        out[label] = (logits, {layer: tr.layer(layer) for layer in first})
        detach(model)
    assert _rel(out["fp16"][0], out["fp32"][0]) < 4 * torch.finfo(torch.float16).eps  # a fixed adapter: rounding only
    for layer in first:  # routed: the same choice wherever the float32 margin is clear
        ref_t, half_t = out["fp32"][1][layer], out["fp16"][1][layer]
        clear = ref_t["margin"].abs() > 0.05
        assert clear.float().mean() > 0.7 and torch.equal(half_t["chosen"][clear], ref_t["chosen"][clear]), layer


@pytest.mark.parametrize("resident", ["float32", "float16"])
def test_a_loaded_library_holds_its_rows_stacked_and_its_banks_take_them_over(tmp_path, resident):
    src = random_stats(adapter_library(tmp_path / "s", [f"a{i}" for i in range(12)]))
    given = {n: {l: t.clone() for l, t in src.adapter_weights(n)[1].items()} for n in src.names}
    src.save(tmp_path / "lib", dtype="float16")
    before = _live_tensors()
    lib = type(src).load(tmp_path / "lib", resident_dtype=resident)
    N, L = len(lib), len(lib.layers)
    assert _live_tensors() - before < N * L // 2  # a few stacked tensors per layer, not one per adapter and layer
    layer, dt = lib.layers[3], getattr(torch, resident)
    B = lib.adapter_weights("a5")[1][layer]  # before first use: read from a5's file alone
    assert B.dtype == dt and torch.equal(B.float(), given["a5"][layer].half().float())  # the stored values
    bank = lib.bank(layer)  # first use: every file read into the stacked rows, which the bank takes over
    assert _storage(lib.adapter_weights("a5")[1][layer]) == _storage(bank.B)  # no copy
    assert _storage(lib.adapter_weights("a5")[1][lib.layers[4]]) == _storage(lib.adapter_weights("a0")[1][lib.layers[4]])
    lib.remove("a2")  # a9 moves into a2's place: later banks are built from the adapters, not the loaded rows
    other = lib.layers[4]
    for i, n in enumerate(lib.names):
        for ly in (layer, other):
            assert torch.equal(lib.bank(ly).B[i].float(), given[n][ly].half().float()), (n, ly)
    assert _storage(lib.bank(other).B) != _storage(lib.adapter_weights("a0")[1][lib.layers[5]])
    with pytest.raises(ValueError, match="'int8'"):
        type(src).load(tmp_path / "lib", resident_dtype="int8")
