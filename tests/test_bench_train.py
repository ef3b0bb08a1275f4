"""`seqr bench train` on a tiny chat model saved to disk and JSONL tasks: the numbers are complete and consistent
(never the speed)."""
from __future__ import annotations

import json

import pytest

from seqr.bench import train as bench_train

from seqr.store import files
from seqr.bench.cli import main
from seqr.core.stats import sign_test_p
from test_demo import setup  # noqa: F401  (the module fixture: tiny model + sst2/cola JSONL)


def _args(root, *extra):
    return ["train", "--model", str(root / "model"), "--data", str(root / "data"), "--tasks", "sst2", "cola",
            "--max-train", "6", "--max-eval", "5", "--calib", "4", "--rank", "2", "--dtype", "bfloat16", *extra]


def test_bench_train_json_is_complete_and_consistent(setup, tmp_path, capsys):  # noqa: F811
    path = tmp_path / "train.json"
    assert main(_args(setup, "--json", str(path), "--out", str(tmp_path / "adapters"))) == 0
    out = capsys.readouterr().out
    doc = json.loads(path.read_text())
    r = doc["result"]
    assert r["fast_dtype"] == "bfloat16" and doc["config"]["dtype"] == "bfloat16"
    for key in ("fp32_tokens_per_s", "fast_tokens_per_s", "speedup", "fp32_dev_acc", "fast_dev_acc"):
        assert doc[key] == r[key]
    assert r["speedup"] == pytest.approx(r["fast_tokens_per_s"] / r["fp32_tokens_per_s"])
    for task, res in r["tasks"].items():
        fp32, fast = res["train"]["fp32"], res["train"]["fast"]
        assert fp32["tokens"] == fast["tokens"] > 0  # both paths see every example once per epoch
        assert fp32["steps"] == fast["steps"] == 1  # 6 examples, batch 8, 1 epoch
        meta = json.loads((tmp_path / "adapters" / f"{task}-fast" / files.ADAPTER_META).read_text())
        assert meta["base_dtype"] == "bfloat16" and meta["config"]["path"] == "fast"
        ref = json.loads((tmp_path / "adapters" / f"{task}-fp32" / files.ADAPTER_META).read_text())
        assert ref["base_dtype"] == "float32" and ref["config"]["path"] == "reference"
        d = res["dev"]
        assert d["n"] == 5 and len(d["pred_fp32"]) == len(d["pred_fast"]) == 5
        assert d["sign_test_p"] == sign_test_p(d["only_fp32"], d["only_fast"])
    pooled = sum(t["dev"]["fp32_acc"] * 5 for t in r["tasks"].values()) / 10
    assert r["fp32_dev_acc"] == pytest.approx(pooled) and r["dev_examples"] == 10
    ev = r["eval"]
    assert ev["examples"] == 10 and ev["routing_decisions"] > 0
    assert 0 <= ev["routing_agreement"] <= 1 and 0 <= ev["prediction_agreement"] <= 1
    assert ev["eval_speedup"] == pytest.approx(ev["fast_examples_per_s"] / ev["fp32_examples_per_s"])
    t = doc["targets"]
    assert t["speedup"]["met"] == (r["speedup"] >= bench_train.TARGETS["speedup"])
    assert t["routing_agreement"]["met"] == (ev["routing_agreement"] >= 0.99)
    assert out.strip().splitlines()[-1] == f"speedup {r['speedup']:.2f}x"
    assert "| sst2 | fast |" in out and "sign test" in out


@pytest.mark.parametrize("extra,needle", [(["--max-train", "0"], "--max-train must be positive, got 0"),
                                          (["--dtype", "int4"], "int4")])
def test_bench_train_bad_args(setup, extra, needle, capsys):  # noqa: F811
    with pytest.raises(SystemExit) as e:
        main(_args(setup, *extra))
    assert e.value.code == 2 and needle in capsys.readouterr().err
