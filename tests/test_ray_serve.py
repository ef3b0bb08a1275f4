"""seqr serve --ray: the coordinator's change protocol (plain asyncio), then 2 Ray Serve replicas on a local Ray
cluster over real loopback HTTP: the same API, and admin changes that reach every replica before they return."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from seqr import LoraLibrary  # noqa: E402
from seqr.bench.serve import launch, stop  # noqa: E402
from seqr.serve.ray_serve import Coordinator  # noqa: E402
from serve_load import adapter_in_use, remove_under_load  # noqa: E402
from tiny_chat import saved_model_and_library  # noqa: E402

NAMES = ["alpha", "beta", "gamma"]
AUTH = {"users": {"alice": {"keys": ["sk-alice-0001"], "adapters": ["alpha"]},
                  "bob": {"keys": ["sk-bob-000001"], "adapters": ["beta", "gamma"]},
                  "frank": {"keys": ["sk-frank-0001"], "adapters": ["alpha", "beta"]}},
        "admin_keys": ["sk-admin-0001"]}
ADMIN = {"Authorization": "Bearer sk-admin-0001"}


def _files(tmp_path):
    model, lib = saved_model_and_library(tmp_path, NAMES)
    (tmp_path / "auth.json").write_text(json.dumps(AUTH))
    return model, lib, tmp_path / "auth.json"


# ---------------------------------------------------------------------------------------------- protocol
def test_replicas_serve_a_unique_a_library_with_its_own_default_method(tmp_path):
    """What a replica builds from the spec `seqr serve --ray` gives it: the library's default method (spectr for a
    unique A, as one process serves it), not seqr, which a unique-A library refuses."""
    from seqr.serve.ray_serve import replica_spec
    from seqr.serve.server import build_app

    model, lib = saved_model_and_library(tmp_path, NAMES, a_seed=None)
    (tmp_path / "auth.json").write_text(json.dumps(AUTH))
    spec = replica_spec(library_dir=str(lib), model=str(model), auth_file=str(tmp_path / "auth.json"), replicas=2)
    assert spec.pop("threads") >= 1 and spec["method"] is None
    _, engine = build_app(**spec, control=object(), replica="r1")
    try:
        assert not LoraLibrary.load(lib).shared_a and engine.method == "spectr"
    finally:
        engine.close()
    with pytest.raises(ValueError, match="'seqr' needs a shared A"):  # what the replicas met before
        build_app(**{**spec, "method": "seqr"}, control=object(), replica="r1")
    Coordinator(str(lib), str(tmp_path / "auth.json"))  # the coordinator takes the same default: no refusal


def test_a_change_returns_only_after_every_live_replica_reloaded_it(tmp_path):
    _, lib, auth = _files(tmp_path)

    async def scenario():
        c = Coordinator(str(lib), str(auth), stale_s=30)
        assert await c.register("r1") == 0 and await c.register("r2") == 0
        poll = asyncio.create_task(c.poll("r1", 0, timeout=10))
        change = asyncio.create_task(c.change("remove", "beta"))
        assert await poll == 1  # the long poll wakes on the change
        assert "beta" not in LoraLibrary.load(lib).names  # on disk before any replica is told
        await c.ack("r1", 1)
        await asyncio.sleep(0.1)
        assert not change.done()  # r2 has not reloaded yet
        await c.ack("r2", 1)
        assert await asyncio.wait_for(change, 5) == ("ok", ["alpha", "gamma"])
        assert "beta" not in json.loads(auth.read_text())["users"]["bob"]["adapters"]
        # errors change nothing and bump no generation
        assert await c.change("remove", "zeta") == ("error", "KeyError",
                                                    "unknown adapter 'zeta'; the library holds ['alpha', 'gamma']")
        status, kind, msg = await c.change("put_user", "eve", ["sk-eve-000001"], ["beta"])
        assert (status, kind) == ("error", "ValueError") and "beta" in msg and c.generation == 1
        # a replica silent for stale_s (crashed) is not waited for; a live one still is
        c.replicas["r2"].seen -= 60
        change = asyncio.create_task(c.change("put_user", "eve", ["sk-eve-000001"], ["gamma"]))
        await asyncio.sleep(0.1)
        assert not change.done()
        await c.ack("r1", 2)
        assert await asyncio.wait_for(change, 5) == ("ok", {"user": "eve", "adapters": ["gamma"]})
        await c.unregister("r2")  # a replica shut down; r1 then goes silent: waited for until stale_s only
        c.stale_s = 0.3
        t0 = time.monotonic()
        assert await c.change("remove", "gamma") == ("ok", ["alpha"]) and time.monotonic() - t0 >= 0.2
        assert (await c.change("remove", "alpha")) == ("error", "ValueError",
                                                       "cannot remove 'alpha': it is the library's last adapter")

    asyncio.run(scenario())


def test_bench_serve_runs_one_process_and_ray_side_by_side(tmp_path):  # before the fixture's cluster starts
    pytest.importorskip("ray.serve")
    from seqr.bench.cli import main as bench_main

    model, lib, _ = _files(tmp_path)
    out = tmp_path / "serve.json"
    assert bench_main(["serve", str(lib), "--model", str(model), "--clients", "4", "--seconds", "3",
                       "--max-tokens", "2", "--ray-replicas", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    one, ray = res["one_process"], res["ray_2_replicas"]
    assert one["requests"] > 0 and ray["requests"] > 0 and one["errors"] == ray["errors"] == 0
    assert res["ray_vs_one_process"]["requests_per_s"] == pytest.approx(
        ray["requests_per_s"] / one["requests_per_s"], abs=2e-3)


# ---------------------------------------------------------------------------------------------- on Ray
@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    pytest.importorskip("ray.serve")
    tmp = tmp_path_factory.mktemp("ray")
    model, lib, auth = _files(tmp)
    proc, url = launch([str(lib), "--model", str(model), "--auth", str(auth), "--served-model-name", "tiny",
                        "--adapters-root", str(tmp / "a"), "--ray", "--replicas", "2"], timeout_s=300)
    try:
        yield url, tmp
    finally:
        stop(proc)


def _complete(url, key, **kw) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"prompt": "route me", "max_tokens": 2, **kw},
                      headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _replicas_seen(url, key, n=40) -> set[str]:
    """Send n requests; every one must succeed; return the replica ids that answered."""
    seen = set()
    for _ in range(n):
        r = _complete(url, key)
        assert r.status_code == 200, r.text
        seen.add(r.json()["seqr"]["replica"])
    return seen


def test_two_replicas_serve_the_openai_api(ray_server):
    url, _ = ray_server
    c = openai.OpenAI(base_url=url + "/v1", api_key="sk-bob-000001", max_retries=0)
    r = c.completions.create(model="tiny", prompt="hello there", max_tokens=4)
    assert set(r.model_extra["seqr"]["routing"]) <= {"beta", "gamma"} and r.usage.completion_tokens <= 4
    stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert _complete(url, "sk-alice-0001", adapters=["beta"]).status_code == 403
    assert _complete(url, "sk-nobody-0001").status_code == 401
    assert len(_replicas_seen(url, "sk-alice-0001")) == 2  # Ray spreads requests over both replicas


def test_admin_changes_reach_every_replica_before_they_return(ray_server):
    from seqr.silo.calibrate import calibrate
    from test_evaluate import task_examples
    from peft_factory import make_adapter
    from tiny_chat import chat_tokenizer, tiny_chat_llama

    url, tmp = ray_server
    r = httpx.put(url + "/admin/users/carol", json={"keys": ["sk-carol-0001"], "adapters": ["gamma"]}, headers=ADMIN)
    assert r.status_code == 200
    assert len(_replicas_seen(url, "sk-carol-0001")) == 2  # the very next requests, on either replica, know carol
    tok = chat_tokenizer()
    make_adapter(tmp / "a" / "delta", seed=9, base=tiny_chat_llama(len(tok)), b_scale=1.0)
    calibrate(tiny_chat_llama(len(tok)), tok, tmp / "a" / "delta", task_examples("sst2", "train", 4), progress=False)
    r = httpx.post(url + "/admin/adapters", json={"name": "delta", "path": "delta"}, headers=ADMIN)
    assert r.status_code == 201 and r.json()["adapters"] == ["alpha", "beta", "delta", "gamma"]
    assert httpx.post(url + "/admin/adapters", json={"name": "x", "path": "../../etc"},
                      headers=ADMIN).status_code == 400
    assert httpx.delete(url + "/admin/adapters/zeta", headers=ADMIN).status_code == 404
    assert httpx.put(url + "/admin/users/dave", json={"keys": ["sk-dave-00001"], "adapters": ["delta"]},
                     headers=ADMIN).status_code == 200
    seen = set()
    for _ in range(40):
        body = _complete(url, "sk-dave-00001").json()
        assert set(body["seqr"]["routing"]) == {"delta"}
        seen.add(body["seqr"]["replica"])
    assert len(seen) == 2
    assert "delta" in LoraLibrary.load(tmp / "lib").names


def test_removal_under_load_is_final_on_every_replica(ray_server):
    url, tmp = ray_server
    used = adapter_in_use(url, "sk-frank-0001")  # the one adapter frank's requests are routed to
    results, t_sent, removed_at, r = remove_under_load(url, "sk-frank-0001", used, "sk-admin-0001", warm_s=2.0)
    assert r.status_code == 200 and used not in r.json()["adapters"]
    assert results and all(code == 200 for _, code, _ in results)  # no request failed
    before = [b for sent, _, b in results if sent < t_sent]
    after = [b for sent, _, b in results if sent > removed_at]
    assert any(used in b["seqr"]["routing"] for b in before)  # it was in use until then
    assert after and all(used not in b["seqr"]["routing"] for b in after)
    assert {b["seqr"]["replica"] for b in after} == {b["seqr"]["replica"] for b in before} and len(after) > 1
    health = [httpx.get(url + "/health").json() for _ in range(20)]
    assert {h["adapters"] for h in health} == {len(LoraLibrary.load(tmp / "lib").names)}
    assert not any(p.name.startswith(f"{used}-") for p in (tmp / "lib" / "adapters").iterdir())  # its file is gone
    assert all(used not in u["adapters"] for u in json.loads((tmp / "auth.json").read_text())["users"].values())
