"""A server one user cannot take down (issue 15, root causes 2, 3, 7, 8): a failing request fails alone, admin
changes jump the queue, dropped streams stop generating, limits hold before tokenising, crafted paths cannot
break /metrics, and malformed input gets a 400 naming the field, never a 500. Loopback only, bounded loops."""
from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from seqr.hf.generation import Request  # noqa: E402
from test_server import AUTH, PATHS, server  # noqa: E402,F401  (the module-scoped loopback server fixture)

ALICE = {"Authorization": "Bearer sk-alice-0001"}
ADMIN = {"Authorization": "Bearer sk-admin-0001"}


def _post(url, body, headers=ALICE, path="/v1/completions", **kw):
    return httpx.post(url + path, content=body if isinstance(body, (bytes, str)) else json.dumps(body),
                      headers={**headers, "Content-Type": "application/json"}, timeout=60, **kw)


def _hold_worker(engine):
    """Block the engine's worker on a call until the returned event is set (so later jobs queue up)."""
    release, entered = threading.Event(), threading.Event()
    engine.call(lambda e: (entered.set(), release.wait(30)))
    assert entered.wait(30)
    return release


def test_a_request_that_fails_in_the_worker_fails_alone(server):
    url, engine = server
    release = _hold_worker(engine)
    good = [engine.submit(Request([5, 6, 7], {"alpha"}, max_tokens=3)) for _ in range(2)]
    bad = engine.submit(Request([10 ** 6], {"beta"}, max_tokens=3))  # a token id past the vocabulary: fails inside
    good.append(engine.submit(Request([8, 9], {"gamma"}, max_tokens=3, temperature=1e-300)))
    release.set()
    for f in good:
        assert f.result(timeout=60).tokens  # its batch-mates still get their completions
    with pytest.raises(Exception):
        bad.result(timeout=60)


@pytest.mark.parametrize("field,value", [("seed", 2 ** 70), ("seed", -1), ("temperature", float("nan")),
                                         ("temperature", 1e-300)])
def test_values_the_worker_cannot_use_are_400_and_tiny_temperatures_work(server, field, value):
    url, _ = server
    r = _post(url, json.dumps({"prompt": "hi", "max_tokens": 2, field: value}))  # NaN goes out as JSON NaN
    if field == "temperature" and value == 1e-300:
        assert r.status_code == 200
    else:
        assert r.status_code == 400 and field in r.json()["error"]["message"]


def test_admin_changes_run_ahead_of_waiting_batches(server):
    url, engine = server
    order = []
    release = _hold_worker(engine)
    futs = [engine.submit(Request([5, 6], {"alpha"}, max_tokens=2)) for _ in range(12)]
    for f in futs:
        f.add_done_callback(lambda _: order.append("gen"))
    change = engine.call(lambda e: order.append("admin"))
    release.set()
    change.result(timeout=60)
    for f in futs:
        f.result(timeout=60)
    assert order.index("admin") == 0, order[:5]


def test_a_dropped_stream_stops_its_generation(server):
    url, engine = server
    seen, real = [], engine._run_rows

    def spy(requests):
        out = real(requests)
        seen.extend(out)
        return out
    engine._run_rows = spy
    try:
        with httpx.stream("POST", url + "/v1/completions", headers=ALICE, timeout=60,
                          json={"prompt": "tell me a long story", "max_tokens": 64, "stream": True,
                                "temperature": 1.0, "seed": 3}) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # one event, then hang up
        for _ in range(400):
            if seen:
                break
            time.sleep(0.05)
    finally:
        engine._run_rows = real
    assert seen and seen[0].finish_reason in ("cancelled", "stop")
    assert len(seen[0].tokens) < 64 or seen[0].finish_reason == "stop"


def test_oversized_bodies_and_prompts_are_refused_before_tokenising(server):
    url, _ = server
    big = json.dumps({"prompt": "x" * (2 << 20)})
    t0 = time.monotonic()
    r = _post(url, big)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = _post(url, {"prompt": "word " * 20000})  # under the body limit, over the character limit
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert time.monotonic() - t0 < 30
    assert httpx.get(url + "/health", timeout=5).status_code == 200


def test_health_answers_while_a_long_prompt_is_tokenised(server):
    url, _ = server
    slow = threading.Thread(target=lambda: _post(url, {"prompt": "ab " * 20000, "max_tokens": 1}))
    slow.start()
    t0 = time.monotonic()
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    assert time.monotonic() - t0 < 5
    slow.join(60)


@pytest.mark.parametrize("raw", [
    b'{"prompt": "\\ud800 lone surrogate"}',
    b"[" * 100000 + b"]" * 100000,
    b'{"prompt": "hi", "adapters": [{"x": 1}]}',
    b'{"prompt": 3}',
    b"\xff\xfe not utf8",
])
def test_malformed_generation_bodies_are_400(server, raw):
    url, _ = server
    r = _post(url, raw)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


@pytest.mark.parametrize("method,path,body", [
    ("put", "/admin/users/carol2", {"keys": ["sk-carol-0002"], "adapters": [1, {"a": 2}]}),
    ("put", "/admin/users/carol3", {"keys": [None], "adapters": ["alpha"]}),
    ("post", "/admin/adapters", {"name": "x", "path": "a\x00b"}),
    ("post", "/admin/adapters", {"name": "x", "path": 5}),
])
def test_malformed_admin_bodies_are_400(server, method, path, body):
    url, _ = server
    r = getattr(httpx, method)(url + path, json=body, headers=ADMIN, timeout=60)
    assert r.status_code == 400, r.text


def test_an_added_adapter_with_a_malformed_config_is_400_naming_it(server):
    url, _ = server
    import shutil

    src = PATHS["silos"].parent / "alpha"
    dst = PATHS["silos"] / "badalpha"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["lora_alpha"] = "sixteen"
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    r = httpx.post(url + "/admin/adapters", json={"name": "badalpha", "path": "badalpha"}, headers=ADMIN, timeout=60)
    assert r.status_code == 400, r.text


def test_crafted_paths_cannot_break_or_grow_metrics(server):
    url, _ = server
    before = httpx.get(url + "/metrics", headers=ADMIN).text
    for i in range(200):
        httpx.get(url + f"/v1/x{i}%22%7D%201%0Afoo%7Bbar%3D%22", headers=ALICE)  # decodes to: x"} 1\nfoo{bar="
    httpx.post(url + "/admin/adapters/%22%7D%0A", headers={"Authorization": "Bearer nope"})
    text = httpx.get(url + "/metrics", headers=ADMIN).text
    families = {f.name: f for f in text_string_to_metric_families(text)}  # parses: no injected line
    assert "seqr_errors" in families and "seqr_routed_outside" in families
    labels = {s.labels.get("endpoint") for f in families.values() for s in f.samples}
    assert all(lb is None or lb.startswith("/") and "{" not in lb.replace("{name}", "").replace("{user}", "")
               or lb == "other" for lb in labels)
    assert len(text.splitlines()) <= len(before.splitlines()) + 12  # bounded: templates, not raw paths


def test_metrics_without_a_key_show_no_adapter_names(server):
    url, _ = server
    _post(url, {"prompt": "hi", "max_tokens": 2})
    public = httpx.get(url + "/metrics").text
    assert "seqr_routed_outside_total" in public and "seqr_requests_total" in public
    for name in [a for u in AUTH["users"].values() for a in u["adapters"]]:
        assert f'"{name}"' not in public
    assert 'adapter="alpha"' in httpx.get(url + "/metrics", headers=ADMIN).text


def test_admin_actions_are_audited_without_keys(tmp_path):
    """The audit log of a server: every admin change through the API, ok or refused, and never a key."""
    from starlette.testclient import TestClient

    from seqr.serve import audit
    from seqr.serve.auth import AuthStore
    from seqr.serve.engine import Engine
    from seqr.serve.server import ServeSettings, create_app
    from test_server import NAMES
    from tiny_chat import chat_tokenizer, tiny_chat_llama
    from peft_factory import adapter_library, random_stats

    tok = chat_tokenizer()
    lib = random_stats(adapter_library(tmp_path, NAMES, base=lambda: tiny_chat_llama(len(tok))))
    lib.save(tmp_path / "lib")
    (tmp_path / "auth.json").write_text(json.dumps({**AUTH, "admin_keys": ["sk-admin-0001", "sk-admin-0002"]}))
    (tmp_path / "silos").mkdir()
    engine = Engine(tiny_chat_llama(len(tok)), tok, lib)
    log = tmp_path / "audit.jsonl"
    admin2 = {"Authorization": "Bearer sk-admin-0002"}
    try:
        auth = AuthStore.load(tmp_path / "auth.json")
        app = create_app(engine, auth, ServeSettings(audit_log=str(log), adapters_root=str(tmp_path / "silos")))
        with TestClient(app) as c:
            assert c.put("/admin/users/dave", json={"keys": ["sk-dave-000001"], "adapters": ["beta"]},
                         headers=ADMIN).status_code == 200
            assert c.delete("/admin/adapters/nope", headers=ADMIN).status_code == 404
            assert c.delete("/admin/adapters/gamma", headers=admin2).status_code == 200
            # refused before any change: still audited
            assert c.post("/admin/adapters", json={"name": "evil", "path": "../../etc"}, headers=ADMIN).status_code == 400
            assert c.post("/admin/adapters", json={"name": 5, "path": "x"}, headers=ADMIN).status_code == 400
            assert c.put("/admin/users/erin", json={"keys": "sk-erin-000001", "adapters": []},
                         headers=admin2).status_code == 400
            assert c.put("/admin/users/erin", content=b"{not json", headers=ADMIN).status_code == 400
    finally:
        engine.close()
    rows = audit.read(log)
    assert [(r["action"], r["target"], r["result"]) for r in rows] == [
        ("put_user", "dave", "ok"), ("remove_adapter", "nope", "error 404"), ("remove_adapter", "gamma", "ok"),
        ("add_adapter", "evil", "error 400"), ("add_adapter", "5", "error 400"), ("put_user", "erin", "error 400"),
        ("put_user", "erin", "error 400")]
    ids = [auth.lookup(k).key_id for k in ("sk-admin-0001", "sk-admin-0002")]
    assert ids[0] != ids[1] and all(len(i) == 12 for i in ids)
    assert [r["who"] for r in rows] == [f"admin:{ids[i]}" for i in (0, 0, 1, 0, 0, 1, 0)]  # which admin, not the key
    assert all(r["time"] for r in rows) and "sk-" not in log.read_text()


def test_adapter_files_leading_outside_the_root_and_unusable_paths_are_400(server, tmp_path):
    from peft_factory import make_adapter
    from tiny_chat import tiny_chat_llama

    url, engine = server
    outside = tmp_path / "outside"
    make_adapter(outside, seed=3, base=tiny_chat_llama(len(PATHS["tok"])))
    linked = PATHS["silos"] / "linked"
    linked.mkdir()
    for f in outside.iterdir():  # a real directory under the root whose weights file is a symlink out of it
        (linked / f.name).write_bytes(f.read_bytes()) if f.name != "adapter_model.safetensors" else \
            (linked / f.name).symlink_to(f)
    r = _post(url, {"name": "linked", "path": "linked"}, ADMIN, "/admin/adapters")
    assert r.status_code == 400 and "adapter_model.safetensors" in r.json()["error"]["message"]
    assert "lead outside" in r.json()["error"]["message"] and "linked" not in engine.library
    for bad in ("a" * 300, "x/" + "b" * 4000):  # a component over 255 bytes; a path over PATH_MAX
        r = _post(url, {"name": "long", "path": bad}, ADMIN, "/admin/adapters")
        assert r.status_code == 400 and r.json()["error"]["param"] == "path", r.text
    assert httpx.get(url + "/health").status_code == 200


@pytest.mark.parametrize("field, value", [("user", {}), ("stream_options", "x"), ("seqr", "no"), ("n", True),
                                          ("n", 1.0), ("stream_options", {"include_usage": "yes"})])
def test_fields_of_the_wrong_type_are_400_naming_them(server, field, value):
    url, _ = server
    r = _post(url, {"prompt": "hi", "max_tokens": 2, field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_a_lone_surrogate_is_refused_where_it_is(server):
    url, _ = server
    r = _post(url, '{"messages": [{"role": "us\\udc80er", "content": "hi"}], "max_tokens": 2}',
              path="/v1/chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role", r.text
    r = httpx.put(
        url + "/admin/users/lone", content=b'{"keys": ["sk-lone-\\udc80-0001"], "adapters": []}',
        headers={**ADMIN, "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400 and "keys" in r.json()["error"]["message"], r.text


def test_a_client_that_disconnects_mid_body_is_no_server_error(server):
    import socket

    url, _ = server
    host, port = url.removeprefix("http://").split(":")

    def errors_500() -> float:
        text = httpx.get(url + "/metrics", headers=ADMIN).text
        return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                   if s.name == "seqr_errors_total" and s.labels.get("status") == "500")

    before = errors_500()
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-alice-0001\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\": \"h")
        time.sleep(0.3)
    assert errors_500() == before
    assert httpx.get(url + "/health").status_code == 200


@pytest.mark.parametrize("method, path, status, code", [
    ("GET", "/v1/nothing", 404, "not_found"), ("POST", "/admin/nothing", 404, "not_found"),
    ("GET", "/v1/completions", 405, "method_not_allowed"), ("DELETE", "/v1/models", 405, "method_not_allowed")])
def test_unknown_paths_and_methods_answer_in_openais_error_shape(server, method, path, status, code):
    url, _ = server
    r = httpx.request(method, url + path, headers=ALICE, timeout=60)
    assert r.status_code == status and set(r.json()) == {"error"}, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] is None
    assert err["type"] == "invalid_request_error" and err["code"] == code and f"{method} {path}" in err["message"]
    if status == 405:
        assert r.headers["allow"] in err["message"] and r.headers["allow"] != ""
