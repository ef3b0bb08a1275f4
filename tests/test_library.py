"""LoraLibrary: peft import/export against peft itself, the on-disk format, atomicity, bad input."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from peft_factory import make_adapter, tiny_llama
from seqr import LoraLibrary, NormStats
from seqr.store import files

ATOL = 1e-5  # fp32 layer outputs of a 32-wide model


@pytest.fixture(scope="module")
def shared_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_shared")
    return {f"task{i}": make_adapter(root / f"task{i}", seed=i, a_seed=0) and root / f"task{i}" for i in range(3)}


@pytest.fixture(scope="module")
def unique_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_unique")
    return [make_adapter(root / f"u{i}", seed=10 + i, a_seed=None) and root / f"u{i}" for i in range(2)]


def _stats(lib, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {layer: NormStats().update(torch.rand(50, generator=g) + 1) for layer in lib.layers}


def _peft_layer_outputs(peft_model, x_by_layer):
    """Output of every peft LoRA layer (base + scaled update) on a given input."""
    mods = dict(peft_model.named_modules())
    return {layer: mods["base_model.model." + layer](x) for layer, x in x_by_layer.items()}


def _inputs(lib, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {layer: torch.randn(T, lib.meta.layers[layer][1], generator=g) for layer in lib.layers}


# ------------------------------------------------------------------------------------------------ peft import
def test_from_peft_detects_shared_a_and_matches_peft_layers(shared_dirs):
    lib = LoraLibrary.from_peft(shared_dirs)
    assert lib.shared_a and lib.names == ["task0", "task1", "task2"]
    assert len(lib.layers) == 8 and lib.layers[0] == "model.layers.0.self_attn.k_proj"  # natural order
    assert lib.meta.base_model == "tiny-llama" and lib.rank == 4
    xs = _inputs(lib)
    for i, name in enumerate(lib.names):
        peft_model = PeftModel.from_pretrained(tiny_llama(), shared_dirs[name]).eval()
        ref = _peft_layer_outputs(peft_model, xs)
        base = dict(tiny_llama().named_modules())
        for layer, x in xs.items():
            ours = base[layer](x) + lib.bank(layer).delta(x, i)  # W x + B_i A x (scaling folded)
            torch.testing.assert_close(ours, ref[layer], atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling_is_folded_into_B(tmp_path, rslora):
    make_adapter(tmp_path / "a", seed=1, r=4, alpha=12, rslora=rslora)
    lib = LoraLibrary.from_peft([tmp_path / "a"])
    from safetensors.torch import load_file
    sd = load_file(tmp_path / "a" / files.PEFT_WEIGHTS)
    layer = lib.layers[0]
    scale = 12 / math.sqrt(4) if rslora else 12 / 4
    torch.testing.assert_close(lib.adapter_weights("a")[1][layer],
                               sd[f"base_model.model.{layer}.lora_B.weight"] * scale)


def test_unique_a_library_is_baselines_only(unique_dirs):
    lib = LoraLibrary.from_peft(unique_dirs)
    assert not lib.shared_a
    bank = lib.bank(lib.layers[0])
    assert bank.A.shape[0] == 2
    with pytest.raises(ValueError, match="shared A"):
        bank.route(torch.randn(3, bank.A.shape[-1]), "seqr")
    bank.route(torch.randn(3, bank.A.shape[-1]), "spectr")


def test_from_peft_lists_every_mismatch(tmp_path, shared_dirs):
    make_adapter(tmp_path / "rank8", seed=5, r=8)
    make_adapter(tmp_path / "qv", seed=6, targets=["q_proj", "v_proj"])
    make_adapter(tmp_path / "other_base", seed=7, base_name="another-model")
    with pytest.raises(ValueError) as e:
        LoraLibrary.from_peft([shared_dirs["task0"], tmp_path / "rank8", tmp_path / "qv", tmp_path / "other_base"])
    msg = str(e.value)
    assert "rank8" in msg and "rank 8" in msg
    assert "'qv'" in msg and "target modules" in msg
    assert "other_base" in msg and "another-model" in msg


@pytest.mark.parametrize("damage", ["nan", "missing_weights", "truncated", "bad_config", "dora"])
def test_from_peft_rejects_broken_adapters(tmp_path, damage):
    d = tmp_path / "broken"
    make_adapter(d, seed=3)
    w, c = d / files.PEFT_WEIGHTS, d / files.PEFT_CONFIG
    if damage == "nan":
        from safetensors.torch import load_file, save_file
        sd = load_file(w)
        key = sorted(sd)[1]
        sd[key][0, 0] = float("nan")
        save_file(sd, w)
        match = "NaN"
    elif damage == "missing_weights":
        w.unlink()
        match = "missing"
    elif damage == "truncated":
        w.write_bytes(w.read_bytes()[:100])
        match = "not a readable safetensors"
    elif damage == "bad_config":
        c.write_text("{not json")
        match = "not valid JSON"
    else:
        cfg = json.loads(c.read_text())
        cfg["use_dora"] = True
        c.write_text(json.dumps(cfg))
        match = "use_dora"
    with pytest.raises((ValueError, FileNotFoundError), match=match) as e:
        LoraLibrary.from_peft({"broken": d})
    assert "broken" in str(e.value)


# ------------------------------------------------------------------------------------------------ peft export
def test_to_peft_round_trip_reproduces_peft_logits(tmp_path, shared_dirs):
    lib = LoraLibrary.from_peft(shared_dirs)
    lib.set_stats("task1", _stats(lib))
    lib.to_peft("task1", tmp_path / "exported")
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = PeftModel.from_pretrained(tiny_llama(), shared_dirs["task1"]).eval()(ids).logits
        got = PeftModel.from_pretrained(tiny_llama(), tmp_path / "exported").eval()(ids).logits
        base = tiny_llama()(ids).logits
    assert (want - base).abs().max() > 1e-3  # the adapter really changes the output
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)
    again = LoraLibrary.from_peft({"task1": tmp_path / "exported"})
    for layer in lib.layers:
        torch.testing.assert_close(again.adapter_weights("task1")[1][layer], lib.adapter_weights("task1")[1][layer])
        assert again.stats("task1")[layer].to_dict() == lib.stats("task1")[layer].to_dict()  # a silo ships its stats


# ------------------------------------------------------------------------------------------------ disk format
def _assert_same(a: LoraLibrary, b: LoraLibrary):
    assert a.names == b.names and a.layers == b.layers and a.shared_a == b.shared_a
    for name in a.names:
        (Aa, Ba), (Ab, Bb) = a.adapter_weights(name), b.adapter_weights(name)
        for layer in a.layers:
            assert torch.equal(Ba[layer], Bb[layer]) and torch.equal(Aa[layer], Ab[layer])
        sa, sb = a.stats(name), b.stats(name)
        assert (sa is None) == (sb is None)
        if sa:
            assert all(sa[k].to_dict() == sb[k].to_dict() for k in sa)


@pytest.mark.parametrize("kind", ["shared", "unique"])
def test_save_load_round_trip(tmp_path, shared_dirs, unique_dirs, kind):
    lib = LoraLibrary.from_peft(shared_dirs if kind == "shared" else unique_dirs)
    lib.set_stats(lib.names[0], _stats(lib))
    lib.save(tmp_path / "lib")
    loaded = LoraLibrary.load(tmp_path / "lib")
    _assert_same(lib, loaded)
    x = torch.randn(4, lib.meta.layers[lib.layers[0]][1])
    m = "seqr" if kind == "shared" else "spectr"
    assert torch.equal(loaded.bank(lib.layers[0]).route(x, m), lib.bank(lib.layers[0]).route(x, m))
    n_shared = len(list((tmp_path / "lib").glob("shared_a-*")))
    assert n_shared == (1 if kind == "shared" else 0)  # the shared A is stored once


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_add_and_remove_touch_only_that_adapter(tmp_path, shared_dirs):
    lib = LoraLibrary.from_peft({k: v for k, v in shared_dirs.items() if k != "task2"})
    lib.save(tmp_path / "lib")
    before = _snapshot(tmp_path / "lib")
    extra = LoraLibrary.from_peft({"task2": shared_dirs["task2"]})
    A, B = extra.adapter_weights("task2")
    lib.add("task2", B, A=A, stats=_stats(lib))
    after = _snapshot(tmp_path / "lib")
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed == {files.MANIFEST} | {k for k in after if k.startswith("adapters/task2-")}
    assert len(changed) == 2
    assert LoraLibrary.load(tmp_path / "lib").names == ["task0", "task1", "task2"]

    before = _snapshot(tmp_path / "lib")
    lib.remove("task1")
    after = _snapshot(tmp_path / "lib")
    assert not any(k.startswith("adapters/task1-") for k in after)  # its data is gone from disk
    assert {k for k in after if before.get(k) != after[k]} == {files.MANIFEST}
    reloaded = LoraLibrary.load(tmp_path / "lib")
    assert reloaded.names == ["task0", "task2"]
    _assert_same(lib, reloaded)


KILL_SCRIPT = textwrap.dedent("""
    import os, sys, time, torch
    from seqr import LoraLibrary
    from seqr.store import files
    from seqr.store.library import LibraryMeta
    src, mode = sys.argv[1], sys.argv[2]
    old = LoraLibrary.load(src)
    new = LoraLibrary(old.meta, old.shared_A)
    for name in old.names:
        B = {k: v + 1.0 for k, v in old.adapter_weights(name)[1].items()}
        new.add(name, B)
    real_write, real_replace = files.atomic_write_bytes, os.replace
    def slow_write(path, data):
        print("write", path, flush=True)
        time.sleep(0.3)
        real_write(path, data)
    def slow_replace(a, b):
        print("replace", b, flush=True)
        time.sleep(0.3)
        real_replace(a, b)
    if mode == "before_write":
        files.atomic_write_bytes = slow_write
    else:
        os.replace = slow_replace
    new.save(src)
    print("done", flush=True)
""")


@pytest.mark.parametrize("mode", ["before_write", "before_replace"])
def test_killed_save_leaves_previous_library_loadable(tmp_path, shared_dirs, mode):
    lib = LoraLibrary.from_peft(shared_dirs)
    lib.save(tmp_path / "lib")
    script = tmp_path / "killer.py"
    script.write_text(KILL_SCRIPT)
    n_writes = len(lib.names) + 1  # adapters, then the manifest (the shared A is unchanged)
    for kill_after in range(1, n_writes + 1):
        lib.save(tmp_path / "lib")  # drops files a previous killed save left (they would be reused, unwritten)
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "lib"), mode],
                                stdout=subprocess.PIPE, text=True)
        for _ in range(kill_after):
            line = proc.stdout.readline()
            assert line, "the save finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)  # mid-save: while sleeping before a write / a rename
        proc.wait()
        loaded = LoraLibrary.load(tmp_path / "lib")  # must not raise
        _assert_same(lib, loaded)  # the manifest was never replaced, so the previous version is intact
    lib.save(tmp_path / "lib")  # a later save cleans up what the killed ones left behind
    assert not [p for p in (tmp_path / "lib").rglob("*.tmp")]
    assert len(list((tmp_path / "lib" / files.ADAPTERS_DIR).iterdir())) == len(lib.names)


# ------------------------------------------------------------------------------------------------ bad input
def test_load_rejects_corrupt_and_unknown(tmp_path, shared_dirs):
    lib = LoraLibrary.from_peft(shared_dirs)
    root = lib.save(tmp_path / "lib")
    man = json.loads((root / files.MANIFEST).read_text())
    victim = root / man["adapters"][1]["file"]
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="'task1'.*corrupt or truncated"):
        LoraLibrary.load(root)
    victim.unlink()
    with pytest.raises(FileNotFoundError, match="'task1'.*missing"):
        LoraLibrary.load(root)
    victim.write_bytes(good)
    LoraLibrary.load(root)
    (root / files.MANIFEST).write_text(json.dumps({**man, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        LoraLibrary.load(root)
    (root / files.MANIFEST).write_text(json.dumps(man)[:-20])
    with pytest.raises(ValueError, match="not valid JSON"):
        LoraLibrary.load(root)
    with pytest.raises(FileNotFoundError, match="manifest"):
        LoraLibrary.load(tmp_path / "nowhere")


def test_bad_adds_and_lookups(shared_dirs, unique_dirs):
    lib = LoraLibrary.from_peft(shared_dirs)
    A, B = lib.adapter_weights("task0")
    layer = lib.layers[0]
    with pytest.raises(ValueError, match="already in the library"):
        lib.add("task0", B)
    with pytest.raises(ValueError, match="name must match"):
        lib.add("../escape", B)
    with pytest.raises(ValueError, match=f"'bad', layer {layer}: B contains NaN"):
        lib.add("bad", {**B, layer: torch.full_like(B[layer], float("nan"))})
    with pytest.raises(ValueError, match="shape"):
        lib.add("bad", {**B, layer: B[layer][:, :2]})
    with pytest.raises(ValueError, match="missing"):
        lib.add("bad", {k: v for k, v in B.items() if k != layer})
    other_A = LoraLibrary.from_peft(unique_dirs).adapter_weights("u0")[0]
    with pytest.raises(ValueError, match="'silo'.*differs from the library's shared A"):
        lib.add("silo", B, A=other_A)
    with pytest.raises(ValueError, match="std > 0"):
        lib.add("flat", B, stats={k: NormStats().update([1.0, 1.0]) for k in lib.layers})
    with pytest.raises(KeyError, match="unknown adapter 'nope'"):
        lib.remove("nope")
    with pytest.raises(KeyError, match="unknown layer"):
        lib.bank("model.layers.9.mlp")
    assert lib.names == ["task0", "task1", "task2"]  # nothing half-added
    empty = LoraLibrary(lib.meta, lib.shared_A)
    with pytest.raises(ValueError, match="empty"):
        empty.bank(layer)
    with pytest.raises(ValueError, match="at least one"):
        LoraLibrary.from_peft([])


def test_banks_carry_calibration_stats(shared_dirs):
    lib = LoraLibrary.from_peft(shared_dirs)
    layer = lib.layers[3]
    assert lib.bank(layer).mu is None  # uncalibrated: raw norms
    for i, name in enumerate(lib.names):
        lib.set_stats(name, _stats(lib, seed=i))
    bank = lib.bank(layer)
    assert torch.allclose(bank.mu, torch.tensor([lib.stats(n)[layer].mean for n in lib.names], dtype=bank.mu.dtype))
    assert torch.allclose(bank.sigma, torch.tensor([lib.stats(n)[layer].std for n in lib.names], dtype=bank.mu.dtype))


def test_failed_manifest_write_leaves_memory_and_disk_in_agreement(tmp_path, shared_dirs, monkeypatch):
    lib = LoraLibrary.from_peft({k: v for k, v in shared_dirs.items() if k != "task2"})
    lib.save(tmp_path / "lib")
    extra = LoraLibrary.from_peft({"task2": shared_dirs["task2"]})
    real = files.atomic_write_json

    def full_disk(path, obj, **kw):
        raise OSError("No space left on device")

    monkeypatch.setattr(files, "atomic_write_json", full_disk)
    with pytest.raises(OSError, match="No space"):
        lib.add("task2", extra.adapter_weights("task2")[1])
    with pytest.raises(OSError, match="No space"):
        lib.remove("task0")
    with pytest.raises(OSError, match="No space"):
        lib.set_stats("task1", _stats(lib))
    monkeypatch.setattr(files, "atomic_write_json", real)
    assert lib.names == ["task0", "task1"] and lib.stats("task1") is None
    _assert_same(lib, LoraLibrary.load(tmp_path / "lib"))
