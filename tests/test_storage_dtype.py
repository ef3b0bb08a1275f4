"""Libraries stored in half precision: files halve, loading gives float32 back, memory equals disk, and routing
decisions equal the float32 library's wherever its margin is clear."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from peft_factory import make_adapter
from seqr import LoraLibrary, NormStats
from seqr.store import files
from seqr.store.library import LibraryMeta

N, R, LAYERS = 12, 8, {"l0": (48, 40), "l1": (24, 40)}  # layer -> (m, n)


def _library(seed=0) -> LoraLibrary:
    """N random shared-A adapters with calibrated stats (float32): norms spread so choices vary by token."""
    g = torch.Generator().manual_seed(seed)
    A = {layer: torch.randn(R, n, generator=g) / R for layer, (m, n) in LAYERS.items()}
    lib = LoraLibrary(LibraryMeta(rank=R, layers=LAYERS, target_modules=["l"], a_seed=0), A)
    for i in range(N):
        B = {layer: torch.randn(m, R, generator=g) * (0.5 + i / N) for layer, (m, n) in LAYERS.items()}
        stats = {layer: NormStats().update(torch.rand(40, generator=g) + 1 + i / N) for layer in LAYERS}
        cents = {layer: torch.randn(n, generator=g) for layer, (m, n) in LAYERS.items()}
        lib.add(f"a{i}", B, stats=stats, centroids=cents)
    return lib


def _sizes(path) -> dict[str, int]:
    return {f.name.split("-")[0]: f.stat().st_size for f in [*path.glob("shared_a-*"), *(path / "adapters").glob("*")]}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_files_halve_and_load_back_as_the_values_in_memory(tmp_path, dtype):
    full, half = _library(), _library()
    full.save(tmp_path / "fp32")
    half.save(tmp_path / "half", dtype=dtype)
    s32, s16 = _sizes(tmp_path / "fp32"), _sizes(tmp_path / "half")
    assert s32.keys() == s16.keys() and len(s32) == N + 1
    for k in s32:  # the tensors halve; only the safetensors header stays
        assert 0.45 < s16[k] / s32[k] < 0.55, (k, s16[k], s32[k])
    raw = load_file(next((tmp_path / "half" / "adapters").glob("a0-*")))
    assert {t.dtype for t in raw.values()} == {getattr(torch, dtype)}
    back = LoraLibrary.load(tmp_path / "half")
    assert back.storage_dtype == dtype and json.loads((tmp_path / "half" / files.MANIFEST).read_text())[
        "storage_dtype"] == dtype
    for name in half.names:
        for layer in LAYERS:
            b_mem, b_disk = half.adapter_weights(name)[1][layer], back.adapter_weights(name)[1][layer]
            assert b_disk.dtype == torch.float32 and torch.equal(b_mem, b_disk)  # memory holds what disk holds
            b32 = full.adapter_weights(name)[1][layer]
            assert not torch.equal(b_mem, b32) and torch.allclose(b_mem, b32, rtol=1e-2, atol=1e-3)
            assert torch.equal(half.centroids(name)[layer], back.centroids(name)[layer])
        assert back.stats(name)["l0"].mean == full.stats(name)["l0"].mean  # stats stay float64 in the manifest
    assert torch.equal(half.shared_A["l0"], back.shared_A["l0"])


@pytest.mark.parametrize("method", ["seqr", "spectr", "arrow", "centroid"])
def test_float16_routing_equals_float32_on_clear_margins(tmp_path, method):
    full = _library()
    half = _library()
    half.save(tmp_path / "half", dtype="float16")
    half = LoraLibrary.load(tmp_path / "half")
    x = torch.randn(4000, 40, generator=torch.Generator().manual_seed(1))
    for layer in LAYERS:
        s32 = full.bank(layer).scores(x, method)  # (T, N) the float32 reference
        top2 = s32.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-2 * top2[:, 0].abs().clamp(min=1)  # (T,)
        i32, i16 = full.bank(layer).route(x, method), half.bank(layer).route(x, method)
        assert clear.float().mean() > 0.8
        assert torch.equal(i16[clear], i32[clear]), (method, layer, int((i16[clear] != i32[clear]).sum()))
        assert (i16 == i32).float().mean() > 0.99


def test_adds_to_a_half_precision_library_are_rounded_and_checked_after_rounding(tmp_path):
    root = tmp_path / "peft"
    dirs = {f"t{i}": make_adapter(root / f"t{i}", seed=i, a_seed=0) and root / f"t{i}" for i in range(3)}
    lib = LoraLibrary.from_peft({"t0": dirs["t0"]})
    lib.save(tmp_path / "lib", dtype="float16")
    def add(name, d):
        A, B = LoraLibrary.from_peft({name: d}).adapter_weights(name)
        lib.add(name, B, A=A)

    add("t1", dirs["t1"])  # its float32 A equals the stored shared A once rounded the same way
    assert LoraLibrary.load(tmp_path / "lib").names == ["t0", "t1"]
    raw = load_file(tmp_path / "lib" / LoraLibrary.load(tmp_path / "lib")._get("t1").file)
    assert {t.dtype for t in raw.values()} == {torch.float16}
    other = make_adapter(root / "x", seed=9, a_seed=5) and root / "x"
    with pytest.raises(ValueError, match="A differs from the library's shared A"):
        add("x", other)


def test_a_view_with_other_centroids_holds_them_as_a_saved_library_would(tmp_path):
    """with_stats(stats, centroids): a released set of centroids (e.g. a private one) replaces the named adapters'
    only, rounded through the storage dtype as a save and load would; the library itself is untouched."""
    lib = _library()
    lib.save(tmp_path / "lib", dtype="float16")
    g = torch.Generator().manual_seed(5)
    new = {layer: torch.randn(n, generator=g) for layer, (m, n) in LAYERS.items()}
    view = lib.with_stats({}, centroids={"a3": new})
    for layer in LAYERS:
        assert torch.equal(view.centroids("a3")[layer], new[layer].half().float())
        assert torch.equal(view.centroids("a4")[layer], lib.centroids("a4")[layer])
        assert not torch.equal(lib.centroids("a3")[layer], view.centroids("a3")[layer])
    view.save(tmp_path / "view")
    back = LoraLibrary.load(tmp_path / "view")
    assert all(torch.equal(back.centroids("a3")[k], view.centroids("a3")[k]) for k in LAYERS)
    with pytest.raises(ValueError, match="adapter 'a3', layer l1: a centroid must be a float tensor of shape"):
        lib.with_stats({}, centroids={"a3": {**new, "l1": torch.ones(3)}})
    with pytest.raises(KeyError, match=r"unknown adapter\(s\) \['zz'\]"):
        lib.with_stats({}, centroids={"zz": new})


def test_storage_dtype_errors_and_defaults(tmp_path):
    lib = _library()
    with pytest.raises(ValueError, match="'float8'"):
        lib.save(tmp_path / "a", dtype="float8")
    lib.save(tmp_path / "b", dtype="float16")
    with pytest.raises(ValueError, match="stored in float16; it cannot be re-stored in bfloat16"):
        lib.save(tmp_path / "c", dtype="bfloat16")
    lib.save(tmp_path / "d", dtype="float32")  # widening keeps every value
    assert LoraLibrary.load(tmp_path / "d").storage_dtype == "float32"
    man = json.loads((tmp_path / "b" / files.MANIFEST).read_text())
    del man["storage_dtype"]  # a library written before storage dtypes existed
    (tmp_path / "b" / files.MANIFEST).write_text(json.dumps(man))
    assert LoraLibrary.load(tmp_path / "b").storage_dtype == "float32"
    man["storage_dtype"] = "int4"
    (tmp_path / "b" / files.MANIFEST).write_text(json.dumps(man))
    with pytest.raises(ValueError, match="unknown storage_dtype 'int4'"):
        LoraLibrary.load(tmp_path / "b")


def test_build_and_info_cli_store_and_show_the_dtype(tmp_path, capsys):
    from seqr.cli import main

    root = tmp_path / "peft"
    dirs = [str(make_adapter(root / f"t{i}", seed=i, a_seed=0) and root / f"t{i}") for i in range(2)]
    assert main(["build", *dirs, "-o", str(tmp_path / "l16"), "--dtype", "float16", "--allow-uncalibrated"]) == 0
    assert main(["build", *dirs, "-o", str(tmp_path / "l32"), "--allow-uncalibrated"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "l16"), "--json"]) == 0
    d16 = json.loads(capsys.readouterr().out)
    assert main(["info", str(tmp_path / "l32"), "--json"]) == 0
    d32 = json.loads(capsys.readouterr().out)
    assert d16["storage_dtype"] == "float16" and d32["storage_dtype"] == "float32"
    for d, info in (("l16", d16), ("l32", d32)):  # the manifest, the shared A and every adapter file
        own = [tmp_path / d / files.MANIFEST, *(tmp_path / d).glob("shared_a-*"), *(tmp_path / d / "adapters").glob("*")]
        assert info["disk_bytes"] == sum(f.stat().st_size for f in own)
    assert d16["disk_bytes"] < 0.7 * d32["disk_bytes"]
    (tmp_path / "l16" / "unrelated.bin").write_bytes(b"x" * 10**6)  # info counts the library's own files only
    assert main(["info", str(tmp_path / "l16"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["disk_bytes"] == d16["disk_bytes"]
    with pytest.raises(SystemExit) as e:
        main(["build", *dirs, "-o", str(tmp_path / "x"), "--dtype", "int8"])
    assert e.value.code == 2 and "int8" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_vllm_holds_a_library_in_its_stored_dtype_and_routes_as_from_float32(tmp_path, dtype):
    """vLLM's workers keep a half-precision library half in memory (the stored values exactly: the routed layers
    read half the bytes); every token's choice and update equal those of the same library held in float32."""
    from seqr.core.packed import PackedBank
    from seqr.core.step import token_step
    from seqr.vllm.sets import library_banks

    _library().save(tmp_path / "lib", dtype=dtype)
    lib, banks = library_banks(str(tmp_path / "lib"), "seqr")
    full = LoraLibrary.load(tmp_path / "lib")  # float32 in memory
    x = torch.randn(7, 40, generator=torch.Generator().manual_seed(3))  # (T, n)
    for layer in LAYERS:
        assert banks[layer].B.dtype == getattr(torch, dtype) and full.bank(layer).B.dtype == torch.float32
        got = token_step(PackedBank([banks[layer]]), x, "seqr", None)
        want = token_step(PackedBank([full.bank(layer).prepare("seqr")]), x, "seqr", None)
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1][0], want[1][0], rtol=1e-6, atol=1e-6)
