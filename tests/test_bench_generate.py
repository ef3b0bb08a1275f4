"""`seqr bench generate`: --quick runs check the numbers are complete and consistent (never the speed)."""
from __future__ import annotations

import json
import statistics

import pytest

import seqr.hf.dtypes
from seqr.bench.cli import main
from seqr.bench.generate import TARGET, VARIANTS


def _run(tmp_path, *args) -> dict:
    path = tmp_path / "generate.json"
    assert main(["generate", "--quick", "--threads", "1", "--json", str(path), *args]) == 0
    return json.loads(path.read_text())


def _check_consistent(data: dict, dtypes: list[str], batches: list[int], G: int) -> None:
    """Every (dtype, batch, variant) present; per-token and tokens/s from the medians; ratios within (dtype, batch);
    the target computed from those ratios."""
    assert [(p["dtype"], p["batch"]) for p in data["points"]] == [(d, b) for d in dtypes for b in batches]
    for p in data["points"]:
        res = p["results"]
        assert list(res) == list(VARIANTS) and p["N"] == 4
        for r in res.values():
            assert r["runs"] == len(r["times_ms"]) and r["min_ms"] <= r["median_ms"]
            assert r["median_ms"] == pytest.approx(statistics.median(r["times_ms"]))
            assert r["median_ms_per_token"] == pytest.approx(r["median_ms"] / G)
            assert r["min_ms_per_token"] == pytest.approx(min(r["times_ms"]) / G)
            assert r["tokens_per_s"] == pytest.approx(p["batch"] * G / (r["median_ms"] / 1e3))
            assert r["ratio_to_untouched"] == pytest.approx(r["median_ms"] / res["untouched"]["median_ms"])
            assert r["ratio_to_peft_static"] == pytest.approx(r["median_ms"] / res["peft-static"]["median_ms"])
        assert p["checks"]["untouched_unchanged"]["ok"] is True
        fixed = p["checks"]["seqr_fixed_vs_peft_static"]
        assert fixed["ok"] is (True if p["dtype"] == "float32" else None)  # bf16: reported only
    t = data["targets"]
    assert t["target"] == TARGET and t["N"] == 4
    assert [(r["dtype"], r["batch"]) for r in t["points"]] == [(p["dtype"], p["batch"]) for p in data["points"]]
    for r, p in zip(t["points"], data["points"]):
        assert r["ratio"] == pytest.approx(p["results"]["seqr"]["ratio_to_untouched"])
        assert r["met"] == (r["ratio"] <= TARGET)
    assert t["met"] == all(r["met"] for r in t["points"])
    assert t["worst_ratio"] == pytest.approx(max(r["ratio"] for r in t["points"]))


def test_generate_quick_json_and_profile(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(seqr.hf.dtypes, "native_bf16", lambda: (False, "no bf16 here"))  # the default: float32 only
    data = _run(tmp_path, "--repeats", "2", "--profile")
    out = capsys.readouterr().out
    cfg = data["config"]
    assert cfg["adapters"] == [4] and cfg["batch"] == [1, 2] and cfg["prompt"] == 8 and cfg["new_tokens"] == 4
    assert cfg["dtypes"] == ["float32"] and "bfloat16 skipped: no bf16 here" in cfg["dtype_note"]
    assert cfg["repeats"] == 2 and data["machine"]["processor"] and data["setup_s"]["model_load"]["float32"] > 0
    _check_consistent(data, ["float32"], [1, 2], 4)
    assert all(r["runs"] == 2 for p in data["points"] for r in p["results"].values())
    prof = data["profile"]
    assert (prof["dtype"], prof["N"], prof["batch"]) == ("float32", 4, 1)
    assert prof["seqr"]["ops_per_step"] > prof["untouched"]["ops_per_step"] > 0
    assert 0 < len(prof["top_ops"]) <= 25 and all(op["calls"] > 0 for op in prof["top_ops"])
    assert out.startswith("machine: ") and "bfloat16 skipped: no bf16 here; `--dtypes float32,bfloat16` forces it" in out
    assert "| float32 | 4 | 2 | seqr |" in out and "profile of one decode step (float32, N=4, batch 1" in out
    assert f"target at N=4: seqr within 1.2× of untouched at every (dtype, batch) measured: " \
           f"{'met' if data['targets']['met'] else 'NOT met'}" in out


def test_generate_quick_both_dtypes(tmp_path, capsys):
    data = _run(tmp_path, "--dtypes", "float32,bfloat16", "--batch", "2", "--repeats", "1", "--warmup", "0")
    out = capsys.readouterr().out
    assert data["config"]["dtypes"] == ["float32", "bfloat16"] and data["config"]["dtype_note"] is None
    assert data["setup_s"]["param_dtypes"] == {"float32": ["float32"], "bfloat16": ["bfloat16"]}
    assert data["profile"] is None and "profile of one decode step" not in out
    _check_consistent(data, ["float32", "bfloat16"], [2], 4)
    fp32, bf16 = (p["results"] for p in data["points"])
    assert [r["variant"] for r in data["dtype_ratios"]] == list(VARIANTS)
    for r in data["dtype_ratios"]:
        assert (r["N"], r["batch"]) == (4, 2)
        assert r["bf16_over_fp32"] == pytest.approx(bf16[r["variant"]]["median_ms"] / fp32[r["variant"]]["median_ms"])
    assert "bfloat16 / float32 median time, per variant:" in out and "| bfloat16 | 4 | 2 | seqr-fixed |" in out


@pytest.mark.parametrize("args,needle", [
    (["--dtypes", "float16"], "'float16'"),
    (["--dtypes", "float32,bf16"], "'bf16'"),
    (["--batch", "0"], "positive integers"),
    (["--new-tokens", "0"], "--new-tokens must be positive, got 0"),
    (["--prompt", "-2"], "--prompt must be positive, got -2"),
])
def test_generate_bad_args(args, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--quick", *args])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
