"""Issue 29 (families 2, 3, 4): the auth file under its lock and generation check (two real processes never lose a
user; a stale server's refused change never rewrites the file), admin changes that wait for a lock off the
engine's worker (generation is not stalled by a real `flock` holder), and a user's adapters checked on the thread
that removes adapters (PUT racing DELETE never persists a user the restarted server would refuse)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from peft_factory import adapter_library, make_adapter, random_stats  # noqa: E402
from seqr import LoraLibrary  # noqa: E402
from seqr.serve.auth import AuthConflict, AuthStore  # noqa: E402
from seqr.serve.control import apply_change  # noqa: E402
from seqr.store import files  # noqa: E402
from test_server import PATHS, server  # noqa: E402,F401  (a module-scoped loopback server of this module's own)
from tiny_chat import tiny_chat_llama  # noqa: E402

ADMIN = {"Authorization": "Bearer sk-admin-0001"}
ALICE = {"Authorization": "Bearer sk-alice-0001"}
TESTS = Path(__file__).parent

PUT = """
import sys, time
sys.path.insert(0, {tests!r})
from seqr.serve.auth import AuthStore, AuthConflict
store = AuthStore.load({auth!r})
while not __import__("os").path.exists({go!r}):
    time.sleep(0.005)
try:
    store.put_user({user!r}, ["sk-{user}-key-0001"], [], set())
    print("ok")
except AuthConflict as e:
    print("conflict")
"""


def _auth(tmp_path) -> Path:
    f = tmp_path / "auth.json"
    f.write_text(json.dumps({"users": {}, "admin_keys": ["sk-admin-0001"]}))
    AuthStore.load(f)  # hashes the admin key once
    return f


def test_two_processes_adding_users_never_lose_one(tmp_path):
    auth = _auth(tmp_path)
    for trial in range(3):
        go = tmp_path / f"go{trial}"
        procs = {u: subprocess.Popen([sys.executable, "-c", PUT.format(tests=str(TESTS), auth=str(auth), go=str(go),
                                                                       user=u)], stdout=subprocess.PIPE, text=True)
                 for u in (f"u{trial}a", f"u{trial}b")}
        time.sleep(1.0)  # both loaded the same generation
        go.touch()
        said = {u: p.communicate(timeout=60)[0].strip() for u, p in procs.items()}
        on_disk = AuthStore.load(auth).users
        for u, out in said.items():
            assert out in ("ok", "conflict")
            assert (u in on_disk) == (out == "ok"), (trial, said)  # acknowledged means kept; refused means absent
        assert "ok" in said.values()


def test_a_stale_copy_is_refused_and_never_rewrites_the_file(tmp_path):
    lib = random_stats(adapter_library(tmp_path / "silos", ["alpha", "beta"]))
    lib.save(tmp_path / "lib")
    auth = _auth(tmp_path)
    a, b = AuthStore.load(auth), AuthStore.load(auth)
    a.put_user("carol", ["sk-carol-0001"], ["beta"], {"alpha", "beta"})
    before = auth.read_bytes()
    with pytest.raises(AuthConflict, match="changed by another writer"):
        apply_change(LoraLibrary.load(tmp_path / "lib"), b, "remove", "beta")  # server B's DELETE: refused
    assert auth.read_bytes() == before and "beta" in LoraLibrary.load(tmp_path / "lib").names
    with pytest.raises(AuthConflict):
        b.put_user("dave", ["sk-dave-00001"], [], set())
    b.reload()
    b.put_user("dave", ["sk-dave-00001"], [], set())
    assert set(AuthStore.load(auth).users) == {"carol", "dave"}


def _completion_seconds(url) -> float:
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, headers=ALICE, timeout=60)
    assert r.status_code == 200
    return time.perf_counter() - t0


def test_a_held_library_lock_stalls_no_generation(server, monkeypatch):
    url, engine = server
    make_adapter(PATHS["silos"] / "held", seed=11, base=tiny_chat_llama(len(PATHS["tok"])), b_scale=1.0)
    src = LoraLibrary.load(engine.library.path)
    LoraLibrary.from_peft({"held": PATHS["silos"] / "held"})  # readable
    stats = {layer: s.to_dict() for layer, s in src.stats("alpha").items()}
    files.atomic_write_json(PATHS["silos"] / "held" / files.STATS_FILE, {"layers": stats})
    idle = sorted(_completion_seconds(url) for _ in range(5))[2]
    monkeypatch.setattr(files, "LOCK_TIMEOUT_S", 6.0)
    holder = subprocess.Popen(["flock", str(engine.library.path / files.LOCK_FILE), "sleep", "30"],
                              start_new_session=True)
    try:
        time.sleep(0.5)
        result = {}
        add = threading.Thread(target=lambda: result.update(r=httpx.post(
            url + "/admin/adapters", json={"name": "held", "path": "held"}, headers=ADMIN, timeout=60)))
        add.start()
        time.sleep(0.5)  # the add is waiting for the lock
        blocked = sorted(_completion_seconds(url) for _ in range(5))[2]
        add.join(timeout=30)
    finally:
        os.killpg(holder.pid, 9)
        holder.wait()
    idle = max(idle, sorted(_completion_seconds(url) for _ in range(5))[2])  # idle measured before and after
    assert result["r"].status_code == 503 and "locked" in result["r"].json()["error"]["message"]
    assert blocked <= 2 * idle + 0.05, (idle, blocked)  # the add waited 6 s for the lock; generation did not
    assert "held" not in engine.library and "held" not in LoraLibrary.load(engine.library.path)
    r = httpx.post(url + "/admin/adapters", json={"name": "held", "path": "held"}, headers=ADMIN, timeout=60)
    assert r.status_code == 201  # the lock is free again: the same add goes through


def test_put_user_racing_delete_never_persists_a_user_of_a_removed_adapter(server):
    url, engine = server
    src = LoraLibrary.load(engine.library.path)
    stats = {layer: s.to_dict() for layer, s in src.stats("alpha").items()}
    for rnd in range(8):
        name = f"race{rnd}"
        make_adapter(PATHS["silos"] / name, seed=20 + rnd, base=tiny_chat_llama(len(PATHS["tok"])), b_scale=1.0)
        files.atomic_write_json(PATHS["silos"] / name / files.STATS_FILE, {"layers": stats})
        assert httpx.post(url + "/admin/adapters", json={"name": name, "path": name}, headers=ADMIN,
                          timeout=60).status_code == 201
        out = {}
        put = threading.Thread(target=lambda: out.update(put=httpx.put(
            url + f"/admin/users/racer{rnd}", json={"keys": [f"sk-racer-{rnd:04d}"], "adapters": [name]},
            headers=ADMIN, timeout=60)))
        delete = threading.Thread(target=lambda: out.update(delete=httpx.delete(
            url + f"/admin/adapters/{name}", headers=ADMIN, timeout=60)))
        put.start(), delete.start()
        put.join(), delete.join()
        assert out["delete"].status_code == 200 and out["put"].status_code in (200, 400)
        auth, lib = AuthStore.load(PATHS["auth"]), LoraLibrary.load(engine.library.path)
        auth.check_adapters(set(lib.names))  # what a restarted server checks first: never refused
        assert name not in lib.names


def test_each_change_writes_the_next_generation(tmp_path):
    auth = _auth(tmp_path)
    assert json.loads(auth.read_text())["generation"] == 1  # the rewrite that hashed the plaintext admin key
    store = AuthStore.load(auth)
    store.put_user("erin", ["sk-erin-00001"], [], set())
    assert json.loads(auth.read_text())["generation"] == store.generation == 2
    doc = json.loads(auth.read_text())
    doc["generation"] = "two"
    auth.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="generation must be a non-negative integer, got 'two'"):
        AuthStore.load(auth)


def test_two_servers_admin_churn_and_a_held_lock_under_traffic_lose_nothing_acknowledged(tmp_path):
    """Fault injection: two real `seqr serve` processes on one library and auth file, live traffic on both, admin
    churn through both (users, adapter adds and removes), and a real flock holder in the middle. Every change
    answered 2xx must be there after a restart, which must succeed; a refused change (409/503) leaves nothing."""
    from seqr.bench.serve import launch, stop
    from seqr.serve.auth import AuthStore
    from tiny_chat import chat_tokenizer, saved_model_and_library

    model, lib_dir = saved_model_and_library(tmp_path, ["alpha", "beta", "gamma"])
    auth_file, silos = tmp_path / "auth.json", tmp_path / "silos"
    auth_file.write_text(json.dumps({"users": {"alice": {"keys": ["sk-alice-0001"], "adapters": ["alpha", "beta"]}},
                                     "admin_keys": ["sk-admin-0001"]}))
    stats = {layer: s.to_dict() for layer, s in LoraLibrary.load(lib_dir).stats("alpha").items()}
    for i in range(6):
        make_adapter(silos / f"s{i}", seed=40 + i, base=tiny_chat_llama(len(chat_tokenizer())), b_scale=1.0)
        files.atomic_write_json(silos / f"s{i}" / files.STATS_FILE, {"layers": stats})
    args = [str(lib_dir), "--model", str(model), "--auth", str(auth_file), "--adapters-root", str(silos),
            "--lock-timeout", "2"]
    servers = [launch(args, timeout_s=120) for _ in range(2)]
    stop_traffic, codes = threading.Event(), []

    def traffic(url):
        while not stop_traffic.is_set():
            r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=ALICE, timeout=60)
            codes.append(r.status_code)

    threads = [threading.Thread(target=traffic, args=(url,)) for _, url in servers]
    for t in threads:
        t.start()
    users, added, removed = {}, set(), set()
    try:
        for i in range(12):
            url = servers[i % 2][1]
            if i == 6:  # a held lock: whatever asks for it now gets a 503 and changes nothing
                holder = subprocess.Popen(["flock", str(lib_dir / files.LOCK_FILE), "sleep", "40"],
                                          start_new_session=True)
                time.sleep(0.3)
            r = httpx.put(url + f"/admin/users/u{i}", json={"keys": [f"sk-user-{i:05d}"], "adapters": ["alpha"]},
                          headers=ADMIN, timeout=60)
            assert r.status_code in (200, 409, 503), r.text
            if r.status_code == 200:
                users[f"u{i}"] = {"alpha"}
            r = httpx.post(url + "/admin/adapters", json={"name": f"s{i % 6}", "path": f"s{i % 6}"}, headers=ADMIN,
                           timeout=60)
            assert r.status_code in (201, 400, 409, 503), r.text
            if r.status_code == 201:
                added.add(f"s{i % 6}")
            if i == 6:
                os.killpg(holder.pid, 9)
                holder.wait()
            if i % 3 == 2 and added:
                name = sorted(added)[0]
                r = httpx.delete(url + f"/admin/adapters/{name}", headers=ADMIN, timeout=60)
                assert r.status_code in (200, 404, 409, 503), r.text
                if r.status_code == 200:
                    added.discard(name)
                    removed.add(name)
    finally:
        stop_traffic.set()
        for t in threads:
            t.join(timeout=60)
        for proc, _ in servers:
            stop(proc)
    assert codes and set(codes) == {200}  # traffic never failed
    assert users and added  # both servers made changes that were acknowledged
    proc, url = launch(args, timeout_s=120)  # the restart must succeed
    try:
        auth, lib = AuthStore.load(auth_file), LoraLibrary.load(lib_dir)
        assert set(users) <= set(auth.users) and added <= set(lib.names) and not (removed & set(lib.names))
        assert httpx.get(url + "/health").json()["adapters"] == len(lib.names)
    finally:
        stop(proc)
