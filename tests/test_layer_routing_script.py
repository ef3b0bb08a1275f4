"""scripts/layer_routing.py on a tiny chat model and two tiny tasks: the library is built once (a rerun trains
nothing), every eval pass runs once, and the report tests every variant against every main method."""
from __future__ import annotations

import json

import pytest

from seqr import LoraLibrary
from seqr.store import files
from test_paper_scripts import _script, setup  # noqa: F401 (the module fixture: tiny model and task dir)

lr = _script("layer_routing")


def test_build_eval_and_report_resume_from_what_is_stored(setup, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(lr, "TASKS", ("sst2", "cola"))
    monkeypatch.setattr(lr, "MAX_TRAIN", 8)
    monkeypatch.setattr(lr, "MAX_EVAL", 4)
    monkeypatch.setattr(lr, "RANK", 4)
    monkeypatch.setattr(lr, "ARTIFACTS", tmp_path / "art")
    monkeypatch.setattr(lr, "OUT", tmp_path / "out")
    args = ["--data", str(setup / "data"), "--model", str(setup / "model"), "--work", str(tmp_path / "work")]
    assert lr.main(["build", *args]) == 0
    lib = LoraLibrary.load(tmp_path / "art")
    assert sorted(lib.names) == ["cola", "sst2"] and not lib.uncalibrated and lib.storage_dtype == "float16"
    meta = json.loads((tmp_path / "work" / "sst2" / files.ADAPTER_META).read_text())
    assert meta["steps"] == 1 and meta["n_train"] == 8  # 8 examples, batch 8, one epoch

    assert lr.main(["eval", *args]) == 0
    doc = json.loads((tmp_path / "out" / files.EVAL_RESULTS).read_text())
    assert set(doc["libraries"]["shared-0"]["methods"]) == {"oracle", "seqr", "mu", "arrow", "centroid",
                                                           "centroid-seqr@2"}
    tags = {e["variant"] for label, e in doc["libraries"].items() if label != "shared-0"}
    assert tags == {"granularity=layers", "granularity=request", "granularity=prompt", "granularity=depth",
                    "granularity=request probe_depth=0.5", "granularity=layers probe_depth=0.5",
                    "granularity=request-reuse"}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary) == tags and all({"seqr", "mu", "arrow", "oracle"} <= set(v["vs"]) for v in summary.values())
    text = (tmp_path / "out" / "variants.md").read_text()
    assert all(f"| {t} |" in text for t in tags) and (tmp_path / "out" / "variants.png").stat().st_size > 1000

    import seqr.eval.evaluate

    boom = lambda *a, **k: (_ for _ in ()).throw(AssertionError("should have been reused"))  # noqa: E731
    monkeypatch.setattr(lr, "train", boom)
    monkeypatch.setattr(seqr.eval.evaluate, "run_pass", boom)
    assert lr.main(["all", *args]) == 0  # everything stored: nothing trained, nothing evaluated again
    with pytest.raises(SystemExit) as e:
        lr.main(["build", "--data", str(tmp_path / "nowhere")])
    assert e.value.code == 2
