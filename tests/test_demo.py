"""`seqr demo` end to end on a tiny chat model saved to disk and JSONL task data: caching and data sources."""
from __future__ import annotations

import json
import sys
import types

import pytest

from seqr.eval import demo

from seqr.hf.granularity import DEFAULT
from seqr.store import files
from test_evaluate import task_examples
from tiny_chat import save_chat_model, write_task_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    save_chat_model(root / "model")
    write_task_dir(root / "data", lambda t, split, n: [e.__dict__ | {"choices": list(e.choices)}
                                                       for e in task_examples(t, split, n)], ("sst2", "cola"))
    return root


def args(root, *extra):
    return ["--out", str(root / "out"), "--data", str(root / "data"), "--model", str(root / "model"), "--tasks",
            "sst2", "cola", "--max-train", "6", "--calib", "4", "--max-eval", "4", "--rank", "2", *extra]


def test_demo_runs_end_to_end_then_reuses_every_cached_step(setup, capsys, monkeypatch):
    assert demo.main(args(setup)) == 0
    out = setup / "out"
    cap = capsys.readouterr()
    assert "tasks: JSONL files under" in cap.err and "Table 3" in cap.out
    doc = json.loads((out / "eval" / files.EVAL_RESULTS).read_text())
    lib = doc["libraries"]["shared-0"]
    assert set(lib["methods"]) == {"oracle", "mu", "arrow", "lag@2", "spectr", "seqr"} and doc["base"]
    assert all(r["n"] == 4 for r in lib["methods"]["seqr"]["tasks"].values())
    default = doc["libraries"][f"shared-0 [granularity={DEFAULT}]"]  # the default router's pass, same examples
    assert set(default["methods"]) == {"seqr"} and default["routing"]["granularity"] == DEFAULT == "request-vote"
    assert default["fingerprint"] == lib["fingerprint"] and doc["config"]["granularity"] == "token"
    assert "## The default router" in cap.out and "SEQR deciding once per request" in cap.out
    assert (out / "eval" / "variants.png").stat().st_size > 1000  # the default router beside every method
    assert doc["demo"]["profile"]["tasks"] == ["sst2", "cola"]
    for t in ("sst2", "cola"):
        meta = json.loads((out / "adapters" / t / files.ADAPTER_META).read_text())
        assert meta["n_train"] == 6 and meta["config"]["rank"] == 2 and meta["shared_a"]
        assert (out / "adapters" / t / files.STATS_FILE).exists()
    assert (out / "eval" / "accuracy_shared.png").exists() and (out / "eval" / files.EVAL_REPORT).exists()
    weights = (out / "adapters" / "sst2" / files.PEFT_WEIGHTS).read_bytes()

    import seqr.eval.evaluate
    import seqr.silo.train
    boom = lambda *a, **k: (_ for _ in ()).throw(AssertionError("should have been cached"))  # noqa: E731
    monkeypatch.setattr(seqr.silo.train, "train", boom)
    monkeypatch.setattr(seqr.eval.evaluate, "run_pass", boom)
    assert demo.main(args(setup)) == 0  # second run: nothing is retrained or re-evaluated
    assert "reusing the trained adapter" in capsys.readouterr().err
    monkeypatch.undo()
    assert demo.main(args(setup, "--epochs", "2")) == 0  # other settings: retrained, stats recomputed
    assert "trained with epochs=1" in capsys.readouterr().err
    assert (out / "adapters" / "sst2" / files.PEFT_WEIGHTS).read_bytes() != weights


def test_data_source_says_which_and_why(setup, monkeypatch, tmp_path):
    import seqr.hf.models

    assert demo.data_source(str(setup / "data"))[0] == "jsonl"
    with pytest.raises(FileNotFoundError, match="not a directory"):
        demo.data_source(str(tmp_path / "nope"))
    monkeypatch.setattr(seqr.hf.models, "hub_reachable", lambda: (False, "HF_HUB_OFFLINE is set"))
    monkeypatch.setenv("SEQR_TASK_DATA", str(setup / "data"))
    src, d, msg = demo.data_source(None)
    assert (src, d) == ("jsonl", str(setup / "data")) and "HF_HUB_OFFLINE is set" in msg
    monkeypatch.delenv("SEQR_TASK_DATA")
    with pytest.raises(RuntimeError, match="no task data.*HF_HUB_OFFLINE is set.*--data DIR"):
        demo.data_source(None)
    assert demo.main(["--out", str(tmp_path / "o")]) == 2  # the CLI reports it without a traceback
    monkeypatch.setattr(seqr.hf.models, "hub_reachable", lambda: (True, ""))
    monkeypatch.setitem(sys.modules, "datasets", None)  # hub up, `datasets` missing: says how to get it
    with pytest.raises(RuntimeError, match="pip install 'seqr\\[hf\\]'"):
        demo.data_source(None)
    monkeypatch.setitem(sys.modules, "datasets", types.ModuleType("datasets"))
    src, d, msg = demo.data_source(None)
    assert (src, d) == ("hf", None) and "Hugging Face datasets (the hub is reachable)" in msg


def test_profiles_validate():
    assert demo.PROFILES["quick"].tasks == ("sst2", "agnews", "mrpc") and len(demo.PROFILES["full"].tasks) == 10
    with pytest.raises(ValueError, match="unknown task.*'nope'"):
        demo.Profile(tasks=("nope",), max_train=1, calib=1, max_eval=1, noise=())
    with pytest.raises(SystemExit):
        demo.main(["--tasks", "sst2", "--max-eval", "0"])
