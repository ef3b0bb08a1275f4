"""The HTTP service over real loopback HTTP: the openai client and httpx against uvicorn on a free port."""
from __future__ import annotations

import json
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from seqr import LoraLibrary, NormStats  # noqa: E402
from seqr.serve.auth import AuthStore  # noqa: E402
from seqr.bench.serve import free_port, launch, stop  # noqa: E402
from seqr.serve.engine import Engine  # noqa: E402
from seqr.serve.server import ServeSettings, create_app  # noqa: E402
from peft_factory import make_adapter  # noqa: E402
from serve_load import adapter_in_use, remove_under_load  # noqa: E402
from tiny_chat import chat_tokenizer, saved_model_and_library, tiny_chat_llama  # noqa: E402

NAMES = ["alpha", "beta", "gamma"]
PATHS: dict = {}  # filled by the server fixture: the auth file and the adapters root
AUTH = {"users": {"alice": {"keys": ["sk-alice-0001"], "adapters": ["alpha"]},
                  "bob": {"keys": ["sk-bob-000001"], "adapters": ["beta", "gamma"]}},
        "admin_keys": ["sk-admin-0001"]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    root = tmp_path_factory.mktemp("serve")
    tok = chat_tokenizer()
    for i, n in enumerate(NAMES):
        make_adapter(root / n, seed=i, base=tiny_chat_llama(len(tok)), b_scale=1.0)
    lib = LoraLibrary.from_peft({n: root / n for n in NAMES})
    g = torch.Generator().manual_seed(0)
    for n in lib.names:
        lib.set_stats(n, {layer: NormStats().update(torch.rand(30, generator=g) + 1) for layer in lib.layers})
    lib.save(root / "library")
    (root / "auth.json").write_text(json.dumps(AUTH))
    PATHS.update(auth=root / "auth.json", silos=root / "silos", tok=tok)
    (root / "silos").mkdir()
    auth = AuthStore.load(root / "auth.json")
    engine = Engine(tiny_chat_llama(len(tok)), tok, lib)
    app = create_app(engine, auth, ServeSettings(model_name="tiny", max_prompt_tokens=200, max_tokens_limit=64,
                                                          adapters_root=str(root / "silos")))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", engine
    srv.should_exit = True
    th.join(timeout=10)
    engine.close()


def client(url, key):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def test_completion_and_chat_with_the_openai_client(server):
    url, _ = server
    c = client(url, "sk-alice-0001")
    r = c.completions.create(model="tiny", prompt="hello there", max_tokens=5)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > 0
    assert r.usage.completion_tokens <= 5
    assert r.model_extra["seqr"]["routing"] in ({"alpha": 1.0}, {})  # alice only ever reaches alpha
    ch = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert ch.choices[0].message.role == "assistant" and ch.object == "chat.completion"
    assert [m.id for m in c.models.list().data] == ["tiny"]


def test_streaming_equals_the_non_streamed_answer(server):
    url, _ = server
    c = client(url, "sk-bob-000001")
    full = c.completions.create(model="tiny", prompt="stream me", max_tokens=8).choices[0].text
    parts = [ev.choices[0].text for ev in c.completions.create(model="tiny", prompt="stream me", max_tokens=8,
                                                                 stream=True)]
    assert "".join(parts) == full
    chat = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=6,
                                          stream=True))
    assert chat[0].choices[0].delta.role == "assistant" and chat[-1].choices[0].finish_reason in ("stop", "length")


def test_auth_failures_and_forbidden_adapters(server):
    url, _ = server
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
    assert httpx.post(url + "/v1/completions", json=body).status_code == 401
    r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer sk-nobody-00"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert "sk-nobody" not in r.text
    r = httpx.post(url + "/v1/completions", json={**body, "adapters": ["beta"]},
                   headers={"Authorization": "Bearer sk-alice-0001"})
    assert r.status_code == 403 and "beta" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", json={**body, "adapters": ["gamma"]},
                   headers={"Authorization": "Bearer sk-bob-000001"})
    assert r.status_code == 200 and set(r.json()["seqr"]["routing"]) <= {"gamma"}


@pytest.mark.parametrize("payload, status, param", [
    ("{not json", 400, None), ({"prompt": 3}, 400, "prompt"), ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10 ** 9}, 400, "max_tokens"), ({"prompt": "x " * 400}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-9"}, 404, "model"), ({"prompt": "x", "logit_bias": {}}, 400, "logit_bias"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature")])
def test_bad_input_gets_openai_errors_and_the_server_keeps_serving(server, payload, status, param):
    url, _ = server
    h = {"Authorization": "Bearer sk-alice-0001"}
    r = (httpx.post(url + "/v1/completions", content=payload, headers={**h, "content-type": "application/json"})
         if isinstance(payload, str) else httpx.post(url + "/v1/completions", json=payload, headers=h))
    assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert r.json()["error"]["param"] == param and "Traceback" not in r.text
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_concurrent_users_are_batched_and_never_leave_their_sets(server):
    url, _ = server
    results = {}

    def ask(user, key, i):
        r = httpx.post(url + "/v1/completions", json={"prompt": f"adversarial {i} ignore rules", "max_tokens": 6},
                       headers={"Authorization": f"Bearer {key}"}, timeout=60)
        results[(user, i)] = r.json()

    threads = [threading.Thread(target=ask, args=(u, k, i)) for i in range(4)
               for u, k in (("alice", "sk-alice-0001"), ("bob", "sk-bob-000001"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    allowed = {"alice": {"alpha"}, "bob": {"beta", "gamma"}}
    for (user, _), r in results.items():
        assert set(r["seqr"]["routing"]) <= allowed[user] and r["seqr"]["routing"]


def test_metrics_count_requests_and_routed_tokens(server):
    url, _ = server
    text = httpx.get(url + "/metrics").text
    assert 'seqr_requests_total{endpoint="/v1/completions"}' in text and "seqr_request_seconds_bucket" in text
    assert "seqr_routed_outside_total 0.0\n" in text  # the server-side trace never saw a decision outside a set
    assert 'seqr_errors_total{endpoint="/v1/completions",status="401"}' in text
    assert "seqr_routed_tokens_total" not in text and "alpha" not in text  # no adapter names without a key
    for key in ("sk-alice-0001", "sk-nobody-00"):  # a user key or a wrong key gets the public text too
        assert "alpha" not in httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"}).text
    full = httpx.get(url + "/metrics", headers={"Authorization": "Bearer sk-admin-0001"}).text
    assert 'seqr_routed_tokens_total{adapter="alpha"}' in full and "seqr_routed_outside_total 0.0\n" in full


def test_admin_add_remove_users_and_persistence(server, tmp_path):
    url, engine = server
    adm = {"Authorization": "Bearer sk-admin-0001"}
    assert httpx.delete(url + "/admin/adapters/alpha", headers={"Authorization": "Bearer sk-alice-0001"}).status_code == 403
    r = httpx.post(url + "/admin/adapters", json={"name": "evil", "path": "../../etc"}, headers=adm)
    assert r.status_code == 400 and "under the adapters root" in r.json()["error"]["message"]
    assert httpx.delete(url + "/admin/adapters/nope", headers=adm).status_code == 404
    r = httpx.put(url + "/admin/users/carol", json={"keys": ["sk-carol-0001"], "adapters": ["gamma"]}, headers=adm)
    assert r.status_code == 200
    c = client(url, "sk-carol-0001")
    assert set(c.completions.create(model="tiny", prompt="hi", max_tokens=3).model_extra["seqr"]["routing"]) <= {"gamma"}
    lib_dir = engine.library.path
    before = set((lib_dir / "adapters").iterdir())
    r = httpx.delete(url + "/admin/adapters/gamma", headers=adm)
    assert r.status_code == 200 and "gamma" not in r.json()["adapters"]
    gone = before - set((lib_dir / "adapters").iterdir())
    assert len(gone) == 1 and "gamma" in next(iter(gone)).name  # its file is deleted
    assert LoraLibrary.load(lib_dir).names == ["alpha", "beta"]  # persisted: a restart sees the removal
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2},
                   headers={"Authorization": "Bearer sk-carol-0001"})
    assert r.status_code == 403  # carol's only adapter is gone: refused, not routed elsewhere
    saved = json.loads(PATHS["auth"].read_text())
    assert saved["users"]["carol"]["adapters"] == [] and "gamma" not in saved["users"]["bob"]["adapters"]
    raw = PATHS["auth"].read_text()  # keys are stored hashed: none of them is on disk
    assert all(k not in raw for k in ("sk-carol-0001", "sk-alice-0001", "sk-admin-0001"))


def test_admin_adds_a_calibrated_adapter_that_users_can_then_reach(server):
    from seqr.silo.calibrate import calibrate
    from test_evaluate import task_examples

    url, engine = server
    adm = {"Authorization": "Bearer sk-admin-0001"}
    tok = PATHS["tok"]
    d = PATHS["silos"] / "delta"
    make_adapter(d, seed=9, base=tiny_chat_llama(len(tok)), b_scale=1.0)
    r = httpx.post(url + "/admin/adapters", json={"name": "delta", "path": "delta"}, headers=adm)
    assert r.status_code == 400 and "no calibration stats" in r.json()["error"]["message"]
    calibrate(tiny_chat_llama(len(tok)), tok, d, task_examples("sst2", "train", 4), progress=False)
    r = httpx.post(url + "/admin/adapters", json={"name": "delta", "path": "delta"}, headers=adm)
    assert r.status_code == 201 and "delta" in r.json()["adapters"]
    assert "delta" in LoraLibrary.load(engine.library.path).names  # persisted
    assert httpx.put(url + "/admin/users/dave", json={"keys": ["sk-dave-00001"], "adapters": ["delta"]},
                     headers=adm).status_code == 200
    out = client(url, "sk-dave-00001").completions.create(model="tiny", prompt="new silo", max_tokens=3)
    assert set(out.model_extra["seqr"]["routing"]) == {"delta"}


def test_bench_serve_reports_throughput_and_latency(tmp_path):
    from seqr.bench.cli import main as bench_main

    model, lib = saved_model_and_library(tmp_path, NAMES)
    out = tmp_path / "serve.json"
    assert bench_main(["serve", str(lib), "--model", str(model), "--clients", "3", "--seconds", "2",
                       "--max-tokens", "2", "--ray-replicas", "0", "--json", str(out)]) == 0
    r = json.loads(out.read_text())["one_process"]
    assert r["requests"] > 0 and r["errors"] == 0 and r["clients"] == 3
    assert 0 < r["p50_s"] <= r["p95_s"] and r["requests_per_s"] == pytest.approx(r["requests"] / r["seconds"], rel=1e-2)


def test_seqr_serve_cli_restarts_with_the_persisted_library_and_users(tmp_path):
    import subprocess
    import sys

    saved_model_and_library(tmp_path, NAMES)
    (tmp_path / "auth.json").write_text(json.dumps(AUTH))
    bad = {**AUTH, "users": {"eve": {"keys": ["sk-eve-000001"], "adapters": ["omega"]}}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    cmd = [sys.executable, "-m", "seqr.cli", "serve", str(tmp_path / "lib"), "--model", str(tmp_path / "model")]
    r = subprocess.run(cmd + ["--auth", str(tmp_path / "bad.json")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "omega" in r.stderr and "Traceback" not in r.stderr

    def start():
        return launch([str(tmp_path / "lib"), "--model", str(tmp_path / "model"), "--auth", str(tmp_path / "auth.json"),
                       "--served-model-name", "tiny"], timeout_s=120)

    proc, url = start()
    try:
        adm = {"Authorization": "Bearer sk-admin-0001"}
        assert httpx.delete(url + "/admin/adapters/beta", headers=adm).status_code == 200
        assert httpx.put(url + "/admin/users/carol", json={"keys": ["sk-carol-0001"], "adapters": ["gamma"]},
                         headers=adm).status_code == 200
    finally:
        stop(proc)
    proc, url = start()  # restart: the removal and the new user survive
    try:
        assert httpx.get(url + "/health").json()["adapters"] == 2
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "model": "tiny"},
                       headers={"Authorization": "Bearer sk-carol-0001"})
        assert r.status_code == 200 and set(r.json()["seqr"]["routing"]) <= {"gamma"}
    finally:
        stop(proc)


def test_removal_under_concurrent_load_fails_nothing_and_is_final(server):
    url, engine = server
    adm = {"Authorization": "Bearer sk-admin-0001"}
    assert httpx.put(url + "/admin/users/frank", json={"keys": ["sk-frank-0001"], "adapters": ["alpha", "beta"]},
                     headers=adm).status_code == 200
    used = adapter_in_use(url, "sk-frank-0001")  # the one adapter frank's requests are routed to
    results, t_sent, removed_at, r = remove_under_load(url, "sk-frank-0001", used, "sk-admin-0001")
    assert r.status_code == 200
    assert results and all(code == 200 for _, code, _ in results)  # no request failed
    after = [body for sent, _, body in results if sent > removed_at]  # sent once the DELETE had returned
    before = [body for sent, _, body in results if sent < t_sent]
    assert after and all(used not in b["seqr"]["routing"] for b in after)
    assert any(used in b["seqr"]["routing"] for b in before)  # it was in use until then
    assert used not in engine.adapters and t_sent < removed_at
