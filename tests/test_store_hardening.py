"""A library no writer can corrupt (issue 15, root causes 4-6): manifest entries confined to the library dir,
an inter-process writer lock with a generation check (no lost adds, no unloadable library), and admin removals
whose every crash point leaves a library and auth file a server starts from."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from seqr import LoraLibrary, NormStats

from seqr.store import files
from seqr.serve.auth import AuthStore
from seqr.store.library import LibraryConflict
from peft_factory import adapter_library, make_adapter, random_stats

NAMES = ["alpha", "beta", "gamma"]
TESTS = Path(__file__).parent


@pytest.fixture()
def lib_dir(tmp_path):
    lib = random_stats(adapter_library(tmp_path / "silos", NAMES))
    g = torch.Generator().manual_seed(1)
    for i, n in enumerate(("delta", "eps"), start=len(NAMES)):
        make_adapter(tmp_path / "silos" / n, seed=i)  # calibrated silo dirs, ready for add_peft
        stats = {layer: NormStats().update(torch.rand(30, generator=g) + 1).to_dict() for layer in lib.layers}
        files.atomic_write_json(tmp_path / "silos" / n / files.STATS_FILE, {"layers": stats})
    return lib.save(tmp_path / "lib")


def _manifest(d: Path) -> dict:
    return json.loads((d / files.MANIFEST).read_text())


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/etc/passwd", "adapters/../../outside.safetensors",
                                   "adapters/./x.safetensors", ""])
def test_manifest_entries_outside_the_library_are_refused(lib_dir, entry):
    outside = lib_dir.parent / "outside.safetensors"
    outside.write_bytes((lib_dir / _manifest(lib_dir)["adapters"][0]["file"]).read_bytes())
    man = _manifest(lib_dir)
    man["adapters"][0]["file"] = entry
    (lib_dir / files.MANIFEST).write_text(json.dumps(man))
    with pytest.raises(ValueError, match="alpha"):
        LoraLibrary.load(lib_dir)
    assert outside.exists()


def test_a_symlink_out_of_the_library_is_refused_and_never_deleted(lib_dir):
    man = _manifest(lib_dir)
    real = lib_dir / man["adapters"][1]["file"]
    target = lib_dir.parent / "elsewhere.safetensors"
    target.write_bytes(real.read_bytes())
    real.unlink()
    real.symlink_to(target)
    with pytest.raises(ValueError, match="symlink"):
        LoraLibrary.load(lib_dir)
    assert target.exists()


def _writer_script(lib_dir: Path, silo: Path, op: str, rounds: int) -> str:
    return textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(TESTS)!r})
        from seqr import LoraLibrary
        from seqr.store.library import LibraryConflict
        ok = conflicts = 0
        for i in range({rounds}):
            lib = LoraLibrary.load({str(lib_dir)!r})
            try:
                if {op!r} == "add":
                    name = "{silo.name}-" + str(i)
                    lib.add_peft(name, {str(silo)!r})
                elif {op!r} == "remove":
                    lib.remove(lib.names[-1]) if len(lib) > 3 else None
                else:
                    lib.save({str(lib_dir)!r})
                ok += 1
            except LibraryConflict:
                conflicts += 1
        print(ok, conflicts)
    """)


def _run_concurrently(scripts: list[str]) -> list[tuple[int, int]]:
    procs = [subprocess.Popen([sys.executable, "-c", s], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for s in scripts]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    return [tuple(map(int, out.split())) for out, _ in outs]


def test_two_writers_never_lose_an_add_and_leave_a_loadable_library(lib_dir):
    silos = lib_dir.parent / "silos"
    counts = _run_concurrently([_writer_script(lib_dir, silos / "delta", "add", 5),
                                _writer_script(lib_dir, silos / "eps", "add", 5)])
    final = LoraLibrary.load(lib_dir)  # loadable, every checksum verified
    added = [n for n in final.names if n not in NAMES]
    assert len(added) == sum(ok for ok, _ in counts)  # every add that returned is on disk: none lost silently
    assert sum(ok + c for ok, c in counts) == 10
    on_disk = {p.name for p in (lib_dir / files.ADAPTERS_DIR).iterdir()}
    assert on_disk == {Path(e["file"]).name for e in _manifest(lib_dir)["adapters"]}  # no orphan, none missing


def test_adds_racing_removes_and_concurrent_saves_stay_loadable(lib_dir):
    silos = lib_dir.parent / "silos"
    _run_concurrently([_writer_script(lib_dir, silos / "delta", "add", 4),
                       _writer_script(lib_dir, silos / "eps", "remove", 4),
                       _writer_script(lib_dir, silos / "eps", "save", 4)])
    final = LoraLibrary.load(lib_dir)
    assert set(NAMES) <= set(final.names)


def test_a_stale_copy_gets_a_clear_conflict_and_changes_nothing(lib_dir):
    a, b = LoraLibrary.load(lib_dir), LoraLibrary.load(lib_dir)
    a.remove("gamma")
    with pytest.raises(LibraryConflict, match="another writer"):
        b.remove("beta")
    assert b.names == NAMES  # the refused change was undone in memory too
    assert LoraLibrary.load(lib_dir).names == ["alpha", "beta"]


def test_a_held_lock_makes_a_second_writer_wait_then_fail_clearly(lib_dir):
    lib = LoraLibrary.load(lib_dir)
    with files.dir_lock(lib_dir):
        with pytest.raises(files.LockTimeout, match="locked"):
            with files.dir_lock(lib_dir, timeout=0.2):
                pass
    lib.remove("gamma")  # free again


KILL = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from seqr import LoraLibrary
from seqr.serve.auth import AuthStore
from seqr.serve.control import apply_change
lib, auth = LoraLibrary.load({lib!r}), AuthStore.load({auth!r})
target = {where!r}
if target == "before-library":
    LoraLibrary.remove = lambda self, *a, **k: os.kill(os.getpid(), signal.SIGKILL)
else:
    import seqr.store.library as L
    real = L.LoraLibrary._write_manifest
    def write_then_die(self, path):
        real(self, path)
        os.kill(os.getpid(), signal.SIGKILL)
    L.LoraLibrary._write_manifest = write_then_die
apply_change(lib, auth, "remove", "beta")
"""


@pytest.mark.parametrize("where", ["before-library", "after-manifest"])
def test_kill_9_during_an_admin_remove_leaves_a_startable_server(lib_dir, tmp_path, where):
    auth_file = tmp_path / "auth.json"
    auth_file.write_text(json.dumps({"users": {"bob": {"keys": ["sk-bob-000001"], "adapters": ["beta", "gamma"]}},
                                     "admin_keys": ["sk-admin-0001"]}))
    p = subprocess.run([sys.executable, "-c", KILL.format(tests=str(TESTS), lib=str(lib_dir), auth=str(auth_file),
                                                          where=where)], capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]
    lib, auth = LoraLibrary.load(lib_dir), AuthStore.load(auth_file)
    auth.check_adapters(set(lib.names))  # what `seqr serve` checks at start: passes at every crash point
    assert "beta" not in auth.users["bob"].adapters  # the authorisation went first
    assert lib.names in (NAMES, ["alpha", "gamma"])
