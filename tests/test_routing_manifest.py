"""Every reply says what routed it (router, granularity, library generation, a digest of its allowed adapters'
calibration, the set's size) in its `seqr` field and in the audit log, so an operator can trace any answer."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from seqr import LoraLibrary, NormStats  # noqa: E402
from seqr.serve import audit  # noqa: E402
from seqr.serve.auth import AuthStore  # noqa: E402
from seqr.serve.engine import Engine  # noqa: E402
from seqr.serve.server import ServeSettings, create_app  # noqa: E402
from seqr.store import files  # noqa: E402
from peft_factory import make_adapter  # noqa: E402
from tiny_chat import chat_tokenizer, tiny_chat_llama  # noqa: E402

NAMES = ["alpha", "beta", "gamma"]
AUTH = {"users": {"alice": {"keys": ["sk-alice-0001"], "adapters": ["alpha"]},
                  "bob": {"keys": ["sk-bob-000001"], "adapters": ["beta", "gamma"]}},
        "admin_keys": ["sk-admin-0001"]}


def _stats(lib, seed):
    g = torch.Generator().manual_seed(seed)
    return {layer: NormStats().update(torch.rand(30, generator=g) + 1) for layer in lib.layers}


@pytest.fixture
def app(tmp_path):
    tok = chat_tokenizer()
    for i, n in enumerate(NAMES):
        make_adapter(tmp_path / n, seed=i, base=tiny_chat_llama(len(tok)), b_scale=1.0)
    lib = LoraLibrary.from_peft({n: tmp_path / n for n in NAMES})
    for i, n in enumerate(lib.names):
        lib.set_stats(n, _stats(lib, i))
    lib.save(tmp_path / "library")
    (tmp_path / "auth.json").write_text(json.dumps(AUTH))
    engine = Engine(tiny_chat_llama(len(tok)), tok, lib, granularity="request")
    settings = ServeSettings(model_name="tiny", max_prompt_tokens=200, max_tokens_limit=16,
                             audit_log=str(tmp_path / "audit.jsonl"))
    yield TestClient(create_app(engine, AuthStore.load(tmp_path / "auth.json"), settings)), engine, tmp_path
    engine.close()


def _ask(client, key, **extra):
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "route me", "max_tokens": 3, **extra},
                    headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return r.json()


def test_each_reply_and_its_audit_line_name_what_routed_it(app):
    client, engine, root = app
    a, b = _ask(client, "sk-alice-0001"), _ask(client, "sk-bob-000001")
    gen = files.manifest_generation(root / "library")  # read from disk, not from the engine
    for reply, n in ((a, 1), (b, 2)):
        s = reply["seqr"]
        assert (s["router"], s["granularity"], s["library_generation"], s["allowed"]) == ("seqr", "request", gen, n)
        assert len(s["routing"]) == 1  # request-level: one adapter per reply
    assert a["seqr"]["calibration"] != b["seqr"]["calibration"]
    assert _ask(client, "sk-alice-0001")["seqr"]["calibration"] == a["seqr"]["calibration"]
    assert "seqr" not in _ask(client, "sk-alice-0001", seqr=False)  # the summary is optional, the audit is not

    engine.call(lambda e: e.change(lambda lib: lib.set_stats("beta", _stats(lib, 99)))).result(timeout=60)
    a2, b2 = _ask(client, "sk-alice-0001"), _ask(client, "sk-bob-000001")
    assert a2["seqr"]["calibration"] == a["seqr"]["calibration"]  # alice's set was not recalibrated
    assert b2["seqr"]["calibration"] != b["seqr"]["calibration"]  # bob's was: his replies say so
    assert b2["seqr"]["library_generation"] == files.manifest_generation(root / "library") == gen + 1

    log = [e for e in audit.read(root / "audit.jsonl") if e["action"] == "generate"]
    assert [e["who"] for e in log] == ["user:alice", "user:bob", "user:alice", "user:alice", "user:alice", "user:bob"]
    for entry, reply in zip([log[0], log[1], log[5]], [a, b, b2]):
        assert entry["target"] == reply["id"] and entry["result"] == "ok"
        assert {k: entry[k] for k in reply["seqr"] if k != "adapters"} == \
               {k: v for k, v in reply["seqr"].items() if k != "adapters"}
    raw = (root / "audit.jsonl").read_text()
    assert "sk-alice-0001" not in raw and "sk-bob-000001" not in raw
