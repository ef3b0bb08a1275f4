"""Issue 29 (families 1, 5, 10): a library write that cannot take its lock (a real `flock` holder, a read-only
directory) changes nothing in memory or on disk; a damaged file under a hashed name is rewritten, never trusted;
a malformed manifest or stats record is refused with a message naming the adapter, layer, file and field."""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import torch

from peft_factory import adapter_library, make_adapter, random_stats
from seqr import LoraLibrary, NormStats
from seqr.store import files

NAMES = ["alpha", "beta", "gamma"]


@pytest.fixture()
def lib_dir(tmp_path):
    lib = random_stats(adapter_library(tmp_path / "silos", NAMES))
    make_adapter(tmp_path / "silos" / "delta", seed=7)
    g = torch.Generator().manual_seed(1)
    stats = {layer: NormStats().update(torch.rand(30, generator=g) + 1).to_dict() for layer in lib.layers}
    files.atomic_write_json(tmp_path / "silos" / "delta" / files.STATS_FILE, {"layers": stats})
    return lib.save(tmp_path / "lib")


def _disk(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".seqr.lock"}


def hold_lock(lib_dir) -> subprocess.Popen:
    """A real process holding the library's writer lock (flock(1)) for 20 s; returns once it holds it."""
    proc = subprocess.Popen(["flock", str(lib_dir / files.LOCK_FILE), "sleep", "20"], start_new_session=True)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with files.dir_lock(lib_dir, timeout=0):
                time.sleep(0.05)
        except files.LockTimeout:
            return proc
    release(proc)
    raise AssertionError("flock never took the lock")


def release(proc: subprocess.Popen) -> None:
    """End flock and its sleeping child (which holds the lock too)."""
    os.killpg(proc.pid, 9)
    proc.wait()


def test_a_change_that_cannot_take_the_lock_is_undone(lib_dir, monkeypatch):
    monkeypatch.setattr(files, "LOCK_TIMEOUT_S", 0.3)
    lib, before = LoraLibrary.load(lib_dir), _disk(lib_dir)
    held_lock = hold_lock(lib_dir)
    with pytest.raises(files.LockTimeout, match="locked by another writer"):
        lib.add_peft("delta", lib_dir.parent / "silos" / "delta")
    with pytest.raises(files.LockTimeout):
        lib.remove("beta")
    with pytest.raises(files.LockTimeout):
        lib.set_stats("alpha", {layer: NormStats().update(torch.rand(30) + 5) for layer in lib.layers})
    assert lib.names == NAMES and "delta" not in lib  # memory unchanged: nobody is routed to delta
    assert lib.stats("alpha")["model.layers.0.self_attn.q_proj"].mean < 5
    assert _disk(lib_dir) == before
    release(held_lock)
    lib.remove("beta")  # the next change writes a manifest that names only what is on disk
    back = LoraLibrary.load(lib_dir)
    assert back.names == ["alpha", "gamma"]
    assert all(e["file"] for e in json.loads((lib_dir / files.MANIFEST).read_text())["adapters"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_library_refuses_changes_and_keeps_memory(lib_dir):
    lib = LoraLibrary.load(lib_dir)
    os.chmod(lib_dir, 0o555)
    try:
        with pytest.raises(OSError):
            lib.add_peft("delta", lib_dir.parent / "silos" / "delta")
        assert lib.names == NAMES
    finally:
        os.chmod(lib_dir, 0o755)


def test_lock_file_that_cannot_be_opened_undoes_the_change(lib_dir, monkeypatch):
    """What a read-only disk does to the lock (this test runs as root too): os.open of the lock file fails."""
    lib, before = LoraLibrary.load(lib_dir), _disk(lib_dir)
    real_open = os.open

    def readonly(path, flags, *a):
        if str(path).endswith(files.LOCK_FILE) and flags & os.O_CREAT:
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", readonly)
    with pytest.raises(OSError, match="Read-only"):
        lib.add_peft("delta", lib_dir.parent / "silos" / "delta")
    with pytest.raises(OSError, match="Read-only"):
        lib.remove("alpha")
    monkeypatch.undo()
    assert lib.names == NAMES and _disk(lib_dir) == before
    assert LoraLibrary.load(lib_dir).names == NAMES


def test_a_damaged_file_under_a_hashed_name_is_rewritten(lib_dir):
    lib = LoraLibrary.load(lib_dir, lazy=False)  # the values in memory (a lazy load reads them from that file)
    entry = json.loads((lib_dir / files.MANIFEST).read_text())["adapters"][0]
    path = lib_dir / entry["file"]
    good = path.read_bytes()
    path.write_bytes(bytes(len(good)))  # same size, wrong bytes: a damaged leftover
    lib.save(lib_dir)  # the save must not trust it
    assert path.read_bytes() == good and LoraLibrary.load(lib_dir).names == NAMES


@pytest.mark.parametrize("damage, words", [
    (lambda m: m["adapters"][0].pop("file"), ["alpha", "'file'"]),
    (lambda m: m["adapters"][1].pop("sha256"), ["beta", "'sha256'"]),
    (lambda m: m.update(adapters={"alpha": {}}), ["'adapters'", "list"]),
    (lambda m: m.update(adapters="alpha"), ["'adapters'", "list"]),
    (lambda m: m["adapters"].append("x"), ["adapters[3]", "object"]),
    (lambda m: m.update(shared_a_file=None), ["shared_a_file"]),
    (lambda m: m["adapters"][0]["stats"]["model.layers.1.self_attn.v_proj"].update(mean=float("nan")),
     ["alpha", "model.layers.1.self_attn.v_proj", "mean"]),
    (lambda m: m["adapters"][2]["stats"]["model.layers.0.self_attn.k_proj"].update(count=2.5),
     ["gamma", "model.layers.0.self_attn.k_proj", "count"]),
    (lambda m: m["adapters"][2]["stats"]["model.layers.0.self_attn.o_proj"].update(mean="big"),
     ["gamma", "model.layers.0.self_attn.o_proj", "mean"]),
])
def test_malformed_manifests_name_what_is_wrong(lib_dir, damage, words):
    man = json.loads((lib_dir / files.MANIFEST).read_text())
    damage(man)
    (lib_dir / files.MANIFEST).write_text(json.dumps(man))
    with pytest.raises(ValueError) as e:
        LoraLibrary.load(lib_dir)
    msg = str(e.value)
    assert str(lib_dir) in msg and all(w in msg for w in words), msg
    assert "\n" not in msg


@pytest.mark.parametrize("record, field", [
    ({"count": True, "mean": 1.0, "m2": 1.0}, "count"), ({"count": 5, "mean": 1.0, "m2": -1.0}, "m2"),
    ({"count": 5, "mean": float("inf"), "m2": 1.0}, "mean"),
    ({"count": 5, "mean": 1.0, "m2": 1.0, "quantiles": [3, 2, 1]}, "quantiles"),
])
def test_a_bad_stats_file_names_adapter_layer_file_and_field(tmp_path, record, field):
    lib = adapter_library(tmp_path / "silos", ["alpha"])
    layer = lib.layers[1]
    stats = {l: NormStats().update(torch.rand(20) + 1).to_dict() for l in lib.layers}
    stats[layer] = record
    f = tmp_path / "silos" / "alpha" / files.STATS_FILE
    files.atomic_write_json(f, {"layers": stats})
    with pytest.raises(ValueError) as e:
        LoraLibrary.from_peft({"alpha": tmp_path / "silos" / "alpha"})
    msg = str(e.value)
    assert "alpha" in msg and layer in msg and str(f) in msg and field in msg, msg


@pytest.mark.parametrize("field, value", [("lora_alpha", "16"), ("lora_alpha", True), ("use_rslora", "yes"),
                                          ("target_modules", {"q": 1}), ("r", True)])
def test_a_bad_peft_config_names_the_field(tmp_path, field, value):
    make_adapter(tmp_path / "a", seed=0)
    cfg_file = tmp_path / "a" / files.PEFT_CONFIG
    cfg = json.loads(cfg_file.read_text())
    cfg[field] = value
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        LoraLibrary.from_peft({"a": tmp_path / "a"})
    assert field in str(e.value) and repr(value) in str(e.value) and "'a'" in str(e.value), str(e.value)


@pytest.mark.parametrize("allowed, words", [([{"a1"}, "a2"], ["mix", "'a2'"]), ([1, 2], ["strings", "1"])])
def test_malformed_allowed_sets_are_named(tmp_path, allowed, words):
    from seqr.hf.layers import RoutingState

    lib = random_stats(adapter_library(tmp_path, ["a1", "a2"]))
    state = RoutingState(lib)
    with pytest.raises(ValueError) as e:
        state.configure("seqr", allowed=allowed)
    assert all(w in str(e.value) for w in words), str(e.value)



def test_manifest_lines_and_the_generation_read_from_its_head(tmp_path):
    """The manifest keeps one adapter per line (each entry encoded once, Python's C encoder) and a change reads
    the generation from the file's head, falling back to a full parse when the head is not as written."""
    import json

    from seqr.store import files

    obj = {"format": "seqr-library", "format_version": 2, "generation": 7, "extra": {"generation": 99},
           "adapters": [{"name": "a", "stats": {"l": {"mean": 1.0}}}, files.Encoded({"name": "b", "stats": None})]}
    text = files.json_text(obj, "adapters")
    assert json.loads(text) == {**obj, "adapters": [obj["adapters"][0], {"name": "b", "stats": None}]}
    assert text.splitlines()[-4:] == ['  {"name": "a", "stats": {"l": {"mean": 1.0}}},', '  {"name": "b", "stats": null}',
                                      " ]", "}"]
    files.atomic_write_json(tmp_path / files.MANIFEST, obj, rows="adapters")
    assert files.manifest_generation(tmp_path) == 7
    (tmp_path / files.MANIFEST).write_text(json.dumps({"extra": {"generation": 5}, **obj}))  # not our head: parsed
    assert files.manifest_generation(tmp_path) == 7
    assert files.manifest_generation(tmp_path / "none") == 0


def test_a_loaded_librarys_first_change_writes_the_other_adapters_lines_back_as_read(lib_dir, monkeypatch):
    """Loading keeps each adapter's manifest line as read, so the first change after a load encodes only what it
    changed (not every adapter's stats again), and the lines of the adapters it left alone stay byte for byte; a
    manifest laid out by another hand is parsed as before and simply re-encoded."""
    before = (lib_dir / files.MANIFEST).read_text().splitlines()
    lib = LoraLibrary.load(lib_dir)
    encoded = []
    to_dict = NormStats.to_dict
    monkeypatch.setattr(NormStats, "to_dict", lambda self: encoded.append(1) or to_dict(self))
    lib.add_peft("delta", lib_dir.parent / "silos" / "delta")
    assert len(encoded) == len(lib.layers)  # the new adapter's stats only
    after = (lib_dir / files.MANIFEST).read_text().splitlines()
    assert [ln for ln in after if ln.startswith('  {"name": ')][:3] == [ln.rstrip(",") + ","
                                                                        for ln in before if ln.startswith('  {"name": ')]
    monkeypatch.undo()
    man = json.loads((lib_dir / files.MANIFEST).read_text())
    (lib_dir / files.MANIFEST).write_text(json.dumps(man, indent=2))  # another layout: one entry over many lines
    lib = LoraLibrary.load(lib_dir)
    lib.remove("beta")
    back = LoraLibrary.load(lib_dir)
    assert sorted(back.names) == ["alpha", "delta", "gamma"] and all(
        back.stats(n)[layer].mean == lib.stats(n)[layer].mean for n in back.names for layer in back.layers)
    assert json.loads((lib_dir / files.MANIFEST).read_text())["adapters"][0] == man["adapters"][0]
