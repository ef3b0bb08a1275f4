"""Hashed API keys in the auth file (and the migration of plaintext ones), the admin audit log, and the
Prometheus metrics' bounded, escaped label sets."""
from __future__ import annotations

import hashlib
import json
import secrets
import threading

import pytest

from seqr.serve.auth import AuthStore

KNOWN = {"alpha", "beta", "gamma"}
AUTH = {"users": {"alice": {"keys": ["sk-alice-0001"], "adapters": ["alpha"]},
                  "bob": {"keys": ["sk-bob-000001", "sk-bob-000002"], "adapters": ["beta", "gamma"]}},
        "admin_keys": ["sk-admin-0001"], "comment": "kept"}
PLAIN = ["sk-alice-0001", "sk-bob-000001", "sk-bob-000002", "sk-admin-0001"]


def sha256_entry(key: str) -> str:
    """The stored form, made here independently of seqr.serve.auth."""
    salt = secrets.token_bytes(16)
    return f"sha256${salt.hex()}${hashlib.sha256(salt + key.encode()).hexdigest()}"


def all_entries(d: dict) -> list[str]:
    return [k for u in d["users"].values() for k in u["keys"]] + d["admin_keys"]


# ------------------------------------------------------------------------------------------------ auth
def test_keys_are_stored_hashed_and_still_look_up(tmp_path):
    path = tmp_path / "auth.json"
    path.write_text(json.dumps({"users": {}, "admin_keys": [sha256_entry("sk-admin-0001")]}))
    store = AuthStore.load(path)
    store.put_user("carol", ["sk-carol-0001", "sk-carol-0002"], ["gamma"], KNOWN)
    raw = path.read_text()
    assert "sk-carol-0001" not in raw and "sk-carol-0002" not in raw and "sk-admin-0001" not in raw
    saved = json.loads(raw)
    entries = all_entries(saved)
    assert len(entries) == 3 and all(e.startswith("sha256$") and len(e.split("$")) == 3 for e in entries)
    salt, digest = saved["users"]["carol"]["keys"][0].split("$")[1:]
    assert len(bytes.fromhex(salt)) == 16
    assert digest == hashlib.sha256(bytes.fromhex(salt) + b"sk-carol-0001").hexdigest()
    assert store.to_dict() == saved  # to_dict writes only the hashes
    again = AuthStore.load(path)  # a restart reads the hashed file
    for s in (store, again):
        assert s.lookup("sk-carol-0001").user.name == "carol" and s.lookup("sk-carol-0002").user.name == "carol"
        assert s.lookup("sk-admin-0001").admin
        assert s.lookup("sk-carol-0003") is None and s.lookup("sk-carol-000") is None and s.lookup("") is None
        assert s.lookup(None) is None
        assert s.lookup(saved["users"]["carol"]["keys"][0]) is None  # the hash is not a key
    assert "sk-carol" not in repr(again.users) and "sk-carol" not in repr(again.lookup("sk-carol-0001"))


def test_the_same_key_gets_a_different_salt_in_each_store(tmp_path):
    a = AuthStore({}, (), tmp_path / "a.json")
    b = AuthStore({}, (), tmp_path / "b.json")
    a.put_user("u1", ["sk-same-key-01"], ["alpha"], KNOWN)
    b.put_user("u2", ["sk-same-key-01"], ["alpha"], KNOWN)
    ea = json.loads((tmp_path / "a.json").read_text())["users"]["u1"]["keys"][0]
    eb = json.loads((tmp_path / "b.json").read_text())["users"]["u2"]["keys"][0]
    assert ea.split("$")[1] != eb.split("$")[1] and ea != eb
    assert a.lookup("sk-same-key-01").user.name == "u1" and b.lookup("sk-same-key-01").user.name == "u2"


def test_a_plaintext_file_is_hashed_on_load_and_rewritten(tmp_path, capsys):
    path = tmp_path / "auth.json"
    path.write_text(json.dumps(AUTH))
    store = AuthStore.load(path)
    err = capsys.readouterr().err
    assert f"seqr: hashed 4 plaintext API key(s) in {path}" in err and not any(k in err for k in PLAIN)
    raw = path.read_text()
    assert not any(k in raw for k in PLAIN)
    saved = json.loads(raw)
    assert saved["comment"] == "kept" and saved["users"]["bob"]["adapters"] == ["beta", "gamma"]
    assert all(e.startswith("sha256$") for e in all_entries(saved)) and len(all_entries(saved)) == 4
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temp file left
    assert store.lookup("sk-bob-000002").user.name == "bob" and store.lookup("sk-admin-0001").admin
    again = AuthStore.load(path)  # already hashed: nothing to say, nothing rewritten
    assert capsys.readouterr().err == "" and path.read_text() == raw
    assert again.lookup("sk-alice-0001").user.name == "alice"
    # a mix: one new plaintext key beside hashed ones is hashed too, the rest kept as they were
    saved["users"]["dave"] = {"keys": ["sk-dave-00001"], "adapters": ["alpha"]}
    path.write_text(json.dumps(saved))
    mixed = AuthStore.load(path)
    assert "hashed 1 plaintext API key(s)" in capsys.readouterr().err
    now = json.loads(path.read_text())
    assert now["users"]["bob"]["keys"] == saved["users"]["bob"]["keys"] and "sk-dave-00001" not in path.read_text()
    assert mixed.lookup("sk-dave-00001").user.name == "dave"
    # without a path (from_dict) keys are hashed in memory and nothing is written or said
    mem = AuthStore.from_dict(AUTH)
    assert capsys.readouterr().err == "" and mem.lookup("sk-alice-0001").user.name == "alice"
    assert not any(k in json.dumps(mem.to_dict()) for k in PLAIN)


def test_bad_plaintext_and_malformed_hashes_are_refused_without_naming_them(tmp_path):
    for bad, what in [({"users": {"eve": {"keys": ["short"], "adapters": []}}}, "8+"),
                      ({"users": {"eve": {"keys": ["sha256$zz$secretish-0001"], "adapters": []}}}, "well-formed"),
                      ({"users": {}, "admin_keys": ["tiny"]}, "8+")]:
        with pytest.raises(ValueError, match=what) as e:
            AuthStore.from_dict(bad)
        assert "short" not in str(e.value) and "secretish" not in str(e.value) and "tiny" not in str(e.value)
    store = AuthStore.from_dict(AUTH)
    for keys in (["short"], [], "sk-not-a-list"):
        with pytest.raises(ValueError, match="8\\+ characters"):
            store.put_user("carol", keys, ["alpha"], KNOWN)
    assert "carol" not in store.users


def test_a_key_names_one_principal_across_hashed_and_new_plaintext_keys(tmp_path, capsys):
    path = tmp_path / "auth.json"
    path.write_text(json.dumps({"users": {"alice": {"keys": [sha256_entry("sk-shared-0001")], "adapters": ["alpha"]}},
                                "admin_keys": [sha256_entry("sk-admin-0001")]}))
    store = AuthStore.load(path)
    before = path.read_text()
    for key, owner in (("sk-shared-0001", "alice"), ("sk-admin-0001", "admin")):
        with pytest.raises(ValueError, match="every key must name one principal") as e:
            store.put_user("bob", ["sk-bob-000001", key], ["beta"], KNOWN)
        assert owner in str(e.value) and key not in str(e.value)
    assert "bob" not in store.users and path.read_text() == before  # refused: nothing changed on disk
    assert store.lookup("sk-shared-0001").user.name == "alice" and store.lookup("sk-bob-000001") is None
    store.put_user("alice", ["sk-shared-0001", "sk-alice-0002"], ["alpha", "beta"], KNOWN)  # her own key: fine
    assert store.lookup("sk-alice-0002").user.adapters == {"alpha", "beta"}
    # in a file: a plaintext key equal to another principal's hashed one is refused too
    d = json.loads(path.read_text())
    d["users"]["mallory"] = {"keys": ["sk-shared-0001"], "adapters": ["alpha"]}
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="every key must name one principal") as e:
        AuthStore.load(path)
    assert "sk-shared" not in str(e.value) and "mallory" in str(e.value)
    assert "sk-shared-0001" in path.read_text()  # a refused file is not rewritten
    assert "sk-shared" not in capsys.readouterr().err


def test_drop_adapter_and_reload_keep_the_hashes(tmp_path):
    path = tmp_path / "auth.json"
    path.write_text(json.dumps(AUTH))
    store = AuthStore.load(path)
    other = AuthStore.load(path)  # another process's copy of the same file
    store.put_user("carol", ["sk-carol-0001"], ["gamma"], KNOWN)
    store.drop_adapter("gamma")
    assert store.users["bob"].adapters == {"beta"} and store.lookup("sk-bob-000001").user.adapters == {"beta"}
    assert other.lookup("sk-carol-0001") is None
    other.reload()
    assert other.lookup("sk-carol-0001").user.adapters == frozenset()
    assert other.users["bob"].keys == store.users["bob"].keys and not any(k in path.read_text() for k in PLAIN)
    with pytest.raises(ValueError, match="unknown adapter"):
        store.put_user("carol", ["sk-carol-0009"], ["omega"], KNOWN)
    assert store.lookup("sk-carol-0001") is not None and store.lookup("sk-carol-0009") is None


# ------------------------------------------------------------------------------------------------ audit
def test_audit_lines_are_appended_parseable_and_never_hold_a_key(tmp_path):
    from seqr.serve import audit

    path = tmp_path / "logs" / "audit.jsonl"
    log = audit.AuditLog(path)
    log.record("admin", "put_user", "carol", "ok", adapters=["gamma"])
    with pytest.raises(ValueError, match="keys are never written"):
        log.record("admin", "put_user", "dave", "ok", keys=["sk-dave-00001"])
    for name in ("api_key", "KEY", "bearer_Key"):
        with pytest.raises(ValueError):
            log.record("admin", "put_user", "dave", "ok", **{name: "sk-dave-00001"})
    threads = [threading.Thread(target=lambda i=i: [log.record("admin", "remove_adapter", f"a{i}-{j}", "ok")
                                                     for j in range(25)]) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.record("admin", "remove_adapter", "weird\n\"name", "error", status=404, message="line\nbreak")
    raw = path.read_text()
    assert "sk-dave" not in raw
    lines = raw.splitlines()
    assert len(lines) == 102 and all(json.loads(line) for line in lines)  # one JSON object a line, none torn
    entries = audit.read(path)
    assert len(entries) == 102
    first, last = entries[0], entries[-1]
    assert {k: first[k] for k in ("who", "action", "target", "result", "adapters")} == {
        "who": "admin", "action": "put_user", "target": "carol", "result": "ok", "adapters": ["gamma"]}
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert last["target"] == 'weird\n"name' and last["status"] == 404
    assert sorted(e["target"] for e in entries[1:-1]) == sorted(f"a{i}-{j}" for i in range(4) for j in range(25))
    audit.AuditLog(path).record("admin", "add_adapter", "delta", "ok")  # a new AuditLog appends, never truncates
    assert len(audit.read(path)) == 103
    with open(path, "a") as f:
        f.write('{"time": "2')  # a write cut short by a crash
    assert len(audit.read(path)) == 103
    noop = audit.AuditLog(None)
    noop.record("admin", "put_user", "x", "ok")  # records nothing, writes nowhere
    with pytest.raises(ValueError):
        noop.record("admin", "put_user", "x", "ok", keys=["sk-x-0000001"])
    assert audit.read(tmp_path / "missing.jsonl") == []


# ------------------------------------------------------------------------------------------------ metrics
def families(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(text: str, name: str) -> list:
    return [s for f in families(text).values() for s in f.samples if s.name == name]


def test_label_values_with_quotes_backslashes_and_newlines_do_not_break_the_text():
    from seqr.serve.metrics import Metrics

    m = Metrics()
    evil_path = '/v1/x"} 1\nfoo{'
    evil_adapter = 'we"ird\\na\nme} 9'
    m.done(evil_path, 0.3, 2, 3, {evil_adapter: 0.5, "alpha": 0.5})
    m.done("/v1/completions", 0.01, 1, 1, {"alpha": 1.0})
    m.error(evil_path, 404)
    m.error("/v1/completions", 1000)  # not an HTTP status
    m.error("/v1/completions", 99)
    m.error("/v1/completions", 401)
    text = m.render()
    assert "\nfoo{" not in text
    req = {s.labels["endpoint"]: s.value for s in samples(text, "seqr_requests_total")}
    assert req == {"other": 1.0, "/v1/completions": 1.0}
    routed = {s.labels["adapter"]: s.value for s in samples(text, "seqr_routed_tokens_total")}
    assert routed == {evil_adapter: 2.5, "alpha": 4.5}  # the library escaped the name; parsed back intact
    errors = {(s.labels["endpoint"], s.labels["status"]): s.value for s in samples(text, "seqr_errors_total")}
    assert errors == {("other", "404"): 1.0, ("/v1/completions", "other"): 2.0, ("/v1/completions", "401"): 1.0}
    assert [s.value for s in samples(text, "seqr_routed_outside_total")] == [0.0]
    assert [s.value for s in samples(text, "seqr_prompt_tokens_total")] == [3.0]
    buckets = [s for s in samples(text, "seqr_request_seconds_bucket") if s.labels["endpoint"] == "/v1/completions"]
    assert [float(s.labels["le"]) for s in buckets] == [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                                                         float("inf")]
    assert [s.value for s in buckets] == [1.0] * 11


def test_unknown_endpoints_add_no_series_and_templates_bound_paths():
    from seqr.serve.metrics import Metrics

    m = Metrics()
    m.done("/v1/unknown-0", 0.1, 1, 1, {})
    m.error("/v1/unknown-0", 404)
    m.error("/admin/adapters/alpha", 404)
    before = len(m.render().splitlines())
    for i in range(1000):
        m.done(f"/v1/unknown-{i}", 0.1, 1, 1, {})
        m.error(f"/v1/unknown-{i}?q={i}", 404)
        m.error(f"/admin/adapters/name-{i}", 404)  # one series: the route template
        m.error("/v1/completions", 600 + i)
    text = m.render()
    assert len(text.splitlines()) == before + 1  # the one new series: status "other" of /v1/completions
    errors = {(s.labels["endpoint"], s.labels["status"]): s.value for s in samples(text, "seqr_errors_total")}
    assert errors == {("other", "404"): 1001.0, ("/admin/adapters/{name}", "404"): 1001.0,
                      ("/v1/completions", "other"): 1000.0}
    assert {s.labels["endpoint"] for s in samples(text, "seqr_requests_total")} == {"other"}
    for status in ('401"}', "404", True, 404.0, None):  # only an int 100-599 is its own label
        m.error("/v1/completions", status)
    errors = {(s.labels["endpoint"], s.labels["status"]): s.value for s in samples(m.render(), "seqr_errors_total")}
    assert errors[("/v1/completions", "other")] == 1005.0 and len(errors) == 3
    assert "/admin/adapters/{name}" in Metrics().routes and "/admin/users/{user}" in Metrics().routes
    only = Metrics(routes=("/v1/completions",))
    only.done("/health", 0.1, 1, 1, {})
    assert {s.labels["endpoint"] for s in samples(only.render(), "seqr_requests_total")} == {"other"}


def test_render_public_leaves_out_adapter_names_and_registries_are_per_instance():
    from seqr.serve.metrics import Metrics

    a, b = Metrics(), Metrics()
    a.done("/v1/completions", 0.2, 4, 6, {"secret-silo-alpha": 0.25, "secret-silo-beta": 0.75})
    a.error("/v1/completions", 401)
    full, public = a.render(), a.render_public()
    assert "secret-silo-alpha" in full and "secret-silo-beta" in full
    assert "secret-silo" not in public and "adapter" not in public and "seqr_routed_tokens" not in public
    fam = families(public)
    assert {"seqr_requests", "seqr_errors", "seqr_request_seconds", "seqr_prompt_tokens", "seqr_completion_tokens",
            "seqr_routed_outside"} <= set(fam)
    assert [s.value for s in samples(public, "seqr_completion_tokens_total")] == [6.0]
    assert [s.value for s in samples(public, "seqr_routed_outside_total")] == [0.0]
    assert samples(b.render(), "seqr_requests_total") == []  # b counts nothing of a's
    from prometheus_client import REGISTRY, generate_latest

    assert b"seqr_" not in generate_latest(REGISTRY)  # nothing in the process-wide registry
