"""`seqr bench routing`: tiny runs check the numbers are complete and consistent (never the speed)."""
from __future__ import annotations

import json
import math

import pytest

from seqr.bench.cli import main
from seqr.bench.routing import METHODS
from seqr.core.costs import costs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_routing_quick_json(tmp_path, capsys):
    path = tmp_path / "routing.json"
    assert main(["routing", "--quick", "--tokens", "64", "--repeats", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    data = json.loads(path.read_text())
    assert data["config"]["N"] == 100 and data["config"]["n"] == 512 and data["tokens"] == 64
    assert list(data["results"]) == list(METHODS)
    assert data["prep_ms"]["qr"] > 0 and data["prep_ms"]["svd"] > 0
    seqr_ms = data["results"]["seqr"]["median_ms"]
    for method, res in data["results"].items():
        assert res["runs"] == 1 and len(res["times_ms"]) == 1
        assert res["median_ms"] > 0 and res["min_ms"] > 0 and res["gmac_per_s"] > 0
        assert res["median_ms"] == pytest.approx(res["times_ms"][0])
        assert res["ratio_to_seqr"] == pytest.approx(res["median_ms"] / seqr_ms)
        c = costs(method, 100, 512, 512, 8, 20)
        assert res["macs_per_token"] == c.macs and res["shared_macs_per_token"] == c.shared_macs
        work = (c.macs + c.shared_macs) * 64
        assert res["gmac_per_s"] == pytest.approx(work / (res["median_ms"] / 1e3) / 1e9)
        assert f"| {method} |" in out
    for method, t in data["targets"].items():
        assert t["ratio"] == pytest.approx(data["results"][method]["ratio_to_seqr"])
        assert t["met"] == (t["ratio"] >= t["target"])
    assert "targets: ARROW ≥ 10×" in out and "SPECTR ≥ 100×" in out
    assert out.startswith("machine: ") and "threads" in out.splitlines()[0]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_routing_methods_subset_without_seqr(tmp_path):
    path = tmp_path / "r.json"
    args = ["routing", "--quick", "--tokens", "16", "--repeats", "2", "--methods", "arrow,lag", "--k", "3",
            "--threads", "1", "--json", str(path)]
    assert main(args) == 0
    data = json.loads(path.read_text())
    assert list(data["results"]) == ["arrow", "lag"] and data["k"] == 3
    assert all(len(r["times_ms"]) == 2 and "ratio_to_seqr" not in r for r in data["results"].values())
    assert data["targets"]["arrow"]["met"] is None and data["targets"]["spectr"]["ratio"] is None


@pytest.mark.parametrize("args,needle", [
    (["--methods", "seqr,magic"], "magic"),
    (["--tokens", "0"], "--tokens must be positive, got 0"),
    (["--r", "-1"], "--r must be positive, got -1"),
    (["--dtype", "int8"], "int8"),
])
def test_routing_bad_args(args, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(["routing", "--quick", *args])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_sweep_quick_writes_json_and_png(tmp_path, capsys):
    out_dir = tmp_path / "out"
    assert main(["routing", "--sweep", "--quick", "--skip-after", "0", "--out", str(out_dir)]) == 0
    data = json.loads((out_dir / "sweep.json").read_text())
    assert (out_dir / "sweep.png").read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in out_dir.iterdir()) == ["sweep.json", "sweep.png"]  # no temp files left
    axes = {"n": [64, 128, 512], "N": [10, 30, 100], "r": [2, 4, 8]}  # the base shape joins every axis
    for axis, values in axes.items():
        points = [p for p in data["points"] if p["axis"] == axis]
        assert [p["value"] for p in points] == values
        for p in points:
            assert p[axis] == p["value"] and list(p["results"]) == list(METHODS) and not p["skipped"]
            assert all(r["median_ms"] > 0 for r in p["results"].values())
            assert p["k"] == min(20, p["N"])
            if axis == "n":
                assert p["m"] == p["n"]
    text = capsys.readouterr().out
    assert "varying n (= m)" in text and "| ARROW × SEQR | SPECTR × SEQR |" in text


def test_sweep_skips_slow_methods_and_says_so(tmp_path, capsys):
    args = ["routing", "--sweep", "--quick", "--skip-after", "1e-9", "--methods", "seqr,naive",
            "--out", str(tmp_path)]
    assert main(args) == 0
    data = json.loads((tmp_path / "sweep.json").read_text())
    for axis in ("n", "N", "r"):
        first, *rest = [p for p in data["points"] if p["axis"] == axis]
        assert not first["skipped"] and set(first["results"]) == {"seqr", "naive"}
        assert all(set(p["skipped"]) == {"seqr", "naive"} and not p["results"] for p in rest)
    text = capsys.readouterr().out
    assert "skipped naive at r = 4, 8:" in text and "--skip-after" in text


def test_other_cpu_share_sees_a_busy_neighbour_and_not_itself():
    from seqr.bench.common import contention_note, cpu_snapshot, other_cpu_share
    import os, subprocess, sys, time
    s0 = cpu_snapshot()
    t = time.perf_counter()
    while time.perf_counter() - t < 0.5:  # our own work must not count as contention
        sum(range(1000))
    own_only = other_cpu_share(s0, cpu_snapshot())
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<1.5: pass"])
    s1 = cpu_snapshot()
    busy.wait()
    with_neighbour = other_cpu_share(s1, cpu_snapshot())
    cores = os.cpu_count() or 1  # /proc/stat's first line sums every CPU of the machine
    assert with_neighbour >= 0.5 / cores  # one core spinning is 1 / cores of the machine; allow half of that
    assert with_neighbour > own_only
    assert contention_note({"other_cpu_share": 0.3}) and contention_note({"other_cpu_share": 0.01}) is None


# --- `seqr bench forward` -----------------------------------------------------------------------------------

def test_forward_quick_json(tmp_path, capsys):
    from seqr.bench.forward import VARIANTS
    path = tmp_path / "forward.json"
    assert main(["forward", "--quick", "--repeats", "1", "--dtypes", "float32", "--threads", "1",
                 "--json", str(path)]) == 0
    out = capsys.readouterr().out
    data = json.loads(path.read_text())
    assert data["config"]["adapters"] == [4, 8] and data["config"]["batch"] == 2 and data["config"]["seq"] == 16
    assert data["config"]["dtypes"] == ["float32"] and data["config"]["dtype_note"] is None
    assert [(p["dtype"], p["N"]) for p in data["points"]] == [("float32", 4), ("float32", 8)]
    for p in data["points"]:
        res = p["results"]
        assert list(res) == list(VARIANTS)
        static, plain = res["peft-static"]["median_ms"], res["untouched"]["median_ms"]
        for variant, r in res.items():
            assert r["runs"] == 1 and len(r["times_ms"]) == 1
            assert r["median_ms"] > 0 and r["min_ms"] > 0 and r["first_call_ms"] > 0
            assert r["median_ms"] == pytest.approx(r["times_ms"][0]) and r["min_ms"] <= r["median_ms"]
            assert r["tokens_per_s"] == pytest.approx(2 * 16 / (r["median_ms"] / 1e3))
            assert r["ratio_to_peft_static"] == pytest.approx(r["median_ms"] / static)
            assert r["ratio_to_untouched"] == pytest.approx(r["median_ms"] / plain)
            assert f"| float32 | {p['N']} | {variant} |" in out
        checks = p["checks"]
        assert checks["seqr_fixed_vs_peft_static"]["ok"] and checks["seqr_base_vs_untouched"]["ok"]
        assert checks["seqr_fixed_vs_peft_static"]["tol"] == 1e-4
        assert checks["untouched_unchanged"]["ok"] and checks["isolation"]["ok"]
        assert checks["peft_static_changes_output"]["ok"]
        assert checks["seqr_arrow_vs_peft_arrow"]["ok"] is None  # reported only
        protos = checks["peft_arrow_prototypes"]
        assert protos["ok"] is None and protos["pairs"] == 2 * 4 * p["N"] and 0 <= protos["min_abs_cos"] <= 1 + 1e-6
        assert p["layouts"]["peft-arrow"]["lora_adapters"] == sorted(["arrow_router"] + [f"task_{i}" for i in range(p["N"])])
        assert p["layouts"]["seqr"]["routed_layers"] == 2 * 4 and p["layouts"]["untouched"]["lora_layers"] == 0
    assert list(data["targets"]) == ["float32"] and data["dtype_ratios"] == []
    t, last = data["targets"]["float32"], data["points"][-1]["results"]
    assert t["N"] == 8
    assert t["seqr_vs_peft_static"]["ratio"] == pytest.approx(last["seqr"]["median_ms"] / last["peft-static"]["median_ms"])
    assert t["peft_arrow_vs_seqr"]["ratio"] == pytest.approx(last["peft-arrow"]["median_ms"] / last["seqr"]["median_ms"])
    assert t["seqr_vs_peft_static"]["met"] == (t["seqr_vs_peft_static"]["ratio"] <= 1.15)
    assert t["peft_arrow_vs_seqr"]["met"] == (t["peft_arrow_vs_seqr"]["ratio"] >= 5)
    assert out.startswith("machine: ") and "targets, float32 at N=8: SEQR within 1.15× of peft-static" in out
    assert "bfloat16 / float32" not in out


def test_forward_quick_both_dtypes(tmp_path, capsys):
    """--dtypes float32,bfloat16 forces bf16 even where it is emulated: each dtype on its own model, compared
    within itself, the bf16 / fp32 ratio per variant, the bf16 model really in bf16."""
    from seqr.bench.forward import VARIANTS
    path = tmp_path / "forward.json"
    assert main(["forward", "--quick", "--adapters", "4", "--repeats", "1", "--warmup", "0", "--threads", "1",
                 "--dtypes", "bfloat16,float32", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    data = json.loads(path.read_text())
    assert data["config"]["dtypes"] == ["float32", "bfloat16"] and data["config"]["dtype_note"] is None
    assert data["setup_s"]["param_dtypes"] == {"float32": ["float32"], "bfloat16": ["bfloat16"]}
    points = {p["dtype"]: p for p in data["points"]}
    assert [p["dtype"] for p in data["points"]] == ["float32", "bfloat16"] and list(data["targets"]) == list(points)
    for dt, p in points.items():
        res = p["results"]
        assert list(res) == list(VARIANTS)
        for r in res.values():
            assert r["ratio_to_untouched"] == pytest.approx(r["median_ms"] / res["untouched"]["median_ms"])
            assert r["ratio_to_peft_static"] == pytest.approx(r["median_ms"] / res["peft-static"]["median_ms"])
        assert all(c["ok"] is not False for c in p["checks"].values())
        assert f"| {dt} | 4 | seqr |" in out
    fixed = points["bfloat16"]["checks"]["seqr_fixed_vs_peft_static"]
    assert fixed["ok"] and fixed["tol"] > 1e-4  # the bf16 tolerance: relative to the largest |logit|
    ratios = {r["variant"]: r["bf16_over_fp32"] for r in data["dtype_ratios"]}
    assert list(ratios) == list(VARIANTS) and all(r["N"] == 4 for r in data["dtype_ratios"])
    for v, ratio in ratios.items():
        bf, fp = points["bfloat16"]["results"][v]["median_ms"], points["float32"]["results"][v]["median_ms"]
        assert ratio == pytest.approx(bf / fp)
    assert "bfloat16 / float32 median time, per variant:" in out and "targets, bfloat16 at N=4" in out


def test_resolve_dtypes_auto_follows_native_bf16(monkeypatch):
    import seqr.hf.dtypes
    from seqr.bench.common import resolve_dtypes
    monkeypatch.setattr(seqr.hf.dtypes, "native_bf16", lambda: (False, "no bf16 here"))
    names, note = resolve_dtypes(None)
    assert names == ["float32"] and "bfloat16 skipped: no bf16 here" in note and "--dtypes float32,bfloat16" in note
    assert resolve_dtypes(["auto"]) == (names, note)
    assert resolve_dtypes(["bfloat16", "float32"]) == (["float32", "bfloat16"], None)
    assert resolve_dtypes(["auto", "bfloat16"]) == (["float32", "bfloat16"], None)
    monkeypatch.setattr(seqr.hf.dtypes, "native_bf16", lambda: (True, "the CPU has amx_bf16"))
    assert resolve_dtypes(None) == (["float32", "bfloat16"], None)
    assert resolve_dtypes(["float32"]) == (["float32"], None)


@pytest.mark.parametrize("args,needle", [
    (["--adapters", "4,x"], "positive integers"),
    (["--adapters", "0"], "positive integers"),
    (["--batch", "0"], "--batch must be positive, got 0"),
    (["--warmup", "-1"], "--warmup"),
    (["--dtypes", "float32,fp8"], "'fp8'"),
    (["--dtypes", ","], "unknown dtype"),
])
def test_forward_bad_args(args, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(["forward", "--quick", *args])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("dtype,native,want", [("auto", True, "bfloat16"), ("auto", False, "float32"),
                                               ("float32", True, "float32")])
def test_vllm_lora_reference_serves_in_the_dtype_seqr_serve_chooses(dtype, native, want, tmp_path, monkeypatch):
    """The per-request LoRA reference and seqr's engines must run in one dtype, or the ratio measures dtypes."""
    import argparse

    from seqr.bench import serve as bs
    from seqr.hf import dtypes

    monkeypatch.setattr(dtypes, "native_bf16", lambda: (native, "test"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    for n in ("a", "b"):
        (tmp_path / "peft" / n).mkdir(parents=True)
        (tmp_path / "peft" / n / "adapter_config.json").write_text(json.dumps({"r": 4}))
    p = argparse.ArgumentParser()
    bs.add_serve_args(p)
    a = p.parse_args(["lib", "--model", str(tmp_path / "model"), "--engines",
                      "embedded,vllm,vllm-lora,vllm-base,vllm-base-compiled",
                      "--peft-root", str(tmp_path / "peft"), "--dtype", dtype, "--clients", "3"])
    modes = bs._modes(a, p, ["a", "b"], "auth.json")
    _, args, models = modes["vllm_lora_per_request"]
    assert args[args.index("--dtype") + 1] == want and models == ["a", "b", "a"]
    assert args[args.index("--max-lora-rank") + 1] == "4" and "a=" + str(tmp_path / "peft" / "a") in args
    assert modes["vllm"][1][modes["vllm"][1].index("--dtype") + 1] == dtype  # seqr serve resolves auto the same way
    _, base, models = modes["vllm_base_no_adapters"]  # the ceiling: the same server with no adapter at all
    assert base == args[:len(base)] and "--enable-lora" not in base and models == ["base"] * 3
    assert "--enforce-eager" in base  # eager, as seqr's vLLM engine runs; the compiled one is vLLM's default
    _, compiled, _ = modes["vllm_base_compiled"]
    assert [x for x in base if x != "--enforce-eager"] == compiled
    assert "--granularity" not in modes["vllm"][1]  # the server's own default unless asked
    a.granularity = "token"  # the routing inside vLLM's layers: every seqr server routes per token
    assert all(m[1][m[1].index("--granularity") + 1] == "token" for m in
               (bs._modes(a, p, ["a", "b"], "auth.json")[k] for k in ("vllm", "one_process")))


def test_bench_scale_measures_each_size_in_its_own_process(tmp_path):
    from seqr.bench.cli import main as bench_main
    from seqr.bench.scale import formula_mib
    from tiny_chat import save_chat_model

    save_chat_model(tmp_path / "model")
    out = tmp_path / "scale"
    assert bench_main(["scale", "--quick", "--sizes", "3,6", "--model", str(tmp_path / "model"), "--rank", "4",
                       "--resident", "float16", "--prompt", "4", "--new-tokens", "2", "--out", str(out)]) == 0
    doc = json.loads((out / "scale.json").read_text())
    rows = doc["rows"]
    assert [r["N"] for r in rows] == [3, 6] and doc["resident"] == "float16"
    layers = {f"model.layers.{i}.self_attn.{p}_proj": ((32 if p in "qo" else 16), 32) for i in range(2) for p in "qkvo"}
    for r in rows:  # the formula: n r + N (m r + r(r+1)/2) float32 numbers per layer
        assert r["formula_mib"] == pytest.approx(sum(n * 4 + r["N"] * (m * 4 + 10) for m, n in layers.values()) * 4 / 2**20)
        assert r["formula_mib"] == pytest.approx(formula_mib(layers, r["N"], 4))
        assert r["load_s"] > 0 and r["add_s"] > 0 and r["remove_s"] > 0
        assert math.isfinite(r["anon_forward_mib"]) and r["anon_forward_mib"] <= r["rss_forward_mib"] + 1
        assert set(r["decode_ms"]) == {"1", "8"} and all(v["seqr"] > 0 and v["untouched"] > 0 and v["seqr_request"] > 0
                                                         for v in r["decode_ms"].values())
    assert (out / "scale.png").stat().st_size > 0 and "| 6 |" in (out / "scale.md").read_text()
    assert "(anon. " in (out / "scale.md").read_text()
    with pytest.raises(SystemExit):
        bench_main(["scale", "--sizes", "x"])
