"""scripts/dp_price.py on the tiny paper library: each (examples, epsilon, seed) pass runs once and resumes, the
released stats carry their guarantee and differ by seed, and the report normalises by the steps stage's oracle."""
from __future__ import annotations

import json
import math

import pytest
import torch

from seqr.store import files
from test_paper_scripts import _args, _script, pe, pl, setup  # noqa: F401 (module fixture)

dp = _script("dp_price")


def test_price_of_privacy_passes_stats_and_report(setup, tmp_path, monkeypatch):  # noqa: F811
    if not (setup / "art" / files.MANIFEST).exists():
        monkeypatch.setattr(pl, "OLD_SWEEPS", setup / "none.json")
        pl.main(_args(setup))
    monkeypatch.setattr(pe, "STEPS", (1, 2))
    monkeypatch.setattr(pe, "NOISE_N", 4)
    steps_out = tmp_path / "ev"
    base = ["--data", str(setup / "data"), "--model", str(setup / "model"), "--library", str(setup / "art")]
    assert pe.main(base + ["--out", str(steps_out), "--stage", "steps"]) == 0
    for name, value in (("SIZES", (12,)), ("EPSILONS", (1.0,)), ("SEEDS", (0, 1)), ("EVAL_N", 4), ("PUBLIC_N", 4),
                        ("STEPS", steps_out / "steps")):
        monkeypatch.setattr(dp, name, value)
    args = base + ["--out", str(tmp_path / "dp"), "--work", str(tmp_path / "work")]
    assert dp.main(args) == 0
    doc = json.loads((tmp_path / "dp" / files.EVAL_RESULTS).read_text())
    passes = ("n=12 eps=inf seed=0", "n=12 eps=1 seed=0", "n=12 eps=1 seed=1")
    assert set(doc["libraries"]) == {*passes, *(f"{p} release=centroids" for p in passes)}
    assert {lb: sorted(e["methods"]) for lb, e in doc["libraries"].items()} == {
        lb: ["centroid", "centroid-seqr@2"] if "release" in lb else ["seqr"] for lb in doc["libraries"]}

    from seqr import LoraLibrary
    from seqr.hf.models import load_model

    model, tok = load_model(str(setup / "model"), dtype="float32")
    from seqr.silo.private import dp_sums

    exs = dp.load_task("sst2", "train", data_dir=str(setup / "data"), max_examples=6, seed=0)
    adapter = LoraLibrary.load(setup / "art").to_peft("sst2", tmp_path / "one" / "sst2")
    free = dp_sums(model, tok, adapter, exs, 1.0, 1e9, batch_size=4, progress=False).centroids
    centre = {k: v / 6 for k, v in free.items()}  # (n,) each: any fixed point
    clipped, plain = dp.centroid_pass(model, tok, adapter, exs, 0.5, centre)  # one pass: the private and plain sums
    ref = dp_sums(model, tok, adapter, exs, 1.0, 0.5, centroid_center=centre, batch_size=4, progress=False).centroids
    dp.calibrate(model, tok, adapter, exs, progress=False)
    for layer, c in files.read_tensors(adapter / files.CENTROIDS_FILE, "centroids").items():
        torch.testing.assert_close(clipped[layer], ref[layer], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(plain[layer].float(), c, rtol=1e-5, atol=1e-6)
    kept = tmp_path / "dp" / "silos"  # the clip bounds and clipped sums the run kept beside its results
    tasks = {f"{t}.json" for t in LoraLibrary.load(setup / "art").names}
    assert {p.name for p in (kept / "sums-12").iterdir()} == {p.name for p in (kept / "clip").iterdir()} == tasks
    monkeypatch.setattr(dp, "dp_sums", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    monkeypatch.setattr(dp, "public_clip", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    assert {p.name for p in (kept / "calib-12").iterdir()} == tasks  # the eps=inf release, kept too
    assert {p.name for p in (kept / "centroids-12").iterdir()} == {t.replace(".json", ".safetensors") for t in tasks}
    assert {p.name for p in (kept / "clip-centroids").iterdir()} == tasks | {t.replace(".json", ".safetensors")
                                                                             for t in tasks}
    monkeypatch.setattr(dp, "calibrate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    monkeypatch.setattr(dp, "centroid_pass", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    silos = dp.Silos({"model": model, "tok": tok, "data": str(setup / "data"), "work": tmp_path / "work2",
                      "out": tmp_path / "dp", "commit": False}, LoraLibrary.load(setup / "art"))  # a fresh clone
    (s0, none), s1, plain = silos.release(12, 1.0, 0), silos.release(12, 1.0, 1)[0], silos.release(12, math.inf, 0)[0]
    assert none is None
    layer = next(iter(s0["sst2"]))
    g = s0["sst2"][layer].privacy
    assert (g.epsilon, g.delta, g.examples, g.centroid_clip) == (1.0, 1e-5, 12, None) and "public" in g.clip_rule
    assert s0["sst2"][layer].mean != s1["sst2"][layer].mean  # another seed, other noise
    assert silos.release(12, 1.0, 0)[0]["sst2"][layer].mean == s0["sst2"][layer].mean  # seeded: the pass repeats
    c_stats, c_means = silos.release(12, 1.0, 0, "centroids")  # the stats and the centroids, one guarantee
    gc = c_stats["sst2"][layer].privacy
    assert gc.centroid_clip > 0 and gc.epsilon == 1.0 and c_stats["sst2"][layer].mean != s0["sst2"][layer].mean
    assert gc.centroid_center.startswith("the mean of 4 public examples of") and gc.centroid_clip == silos.centre(
        "sst2")[0]
    assert set(c_means) == {t[:-5] for t in tasks} and c_means["sst2"][layer].shape == (silos.lib.meta.layers[layer][1],)
    assert plain["sst2"][layer].privacy is None and plain["sst2"][layer].count > 12  # per token, no DP

    import seqr.eval.evaluate

    boom = lambda *a, **k: (_ for _ in ()).throw(AssertionError("should have been reused"))  # noqa: E731
    monkeypatch.setattr(seqr.eval.evaluate, "run_pass", boom)
    assert dp.main(args) == 0  # every pass stored: nothing evaluated again
    assert dp.main(["report", "--out", str(tmp_path / "dp")]) == 0
    summary = json.loads((tmp_path / "dp" / "summary.json").read_text())
    assert list(summary) == ["seqr", "centroid", "centroid-seqr@2"]
    for router in summary:
        assert set(summary[router]["12"]) == {"inf", "1"} and len(summary[router]["12"]["1"]["seeds"]) == 2
        assert summary[router]["12"]["1"]["norm"] == pytest.approx(sum(summary[router]["12"]["1"]["seeds"]) / 2)
    assert (tmp_path / "dp" / "privacy.png").stat().st_size > 1000
    assert "Not yet run" not in (tmp_path / "dp" / "report.md").read_text()
    del doc["libraries"]["n=12 eps=1 seed=1"]  # a pass still to run, and one with a router still to run: named
    del doc["libraries"]["n=12 eps=1 seed=0 release=centroids"]["methods"]["centroid-seqr@2"]
    files.atomic_write_json(tmp_path / "dp" / files.EVAL_RESULTS, doc)
    assert dp.main(["report", "--out", str(tmp_path / "dp")]) == 0
    assert ("Not yet run (2 of 6 passes): n=12 eps=1 seed=1, n=12 eps=1 seed=0 release=centroids."
            in (tmp_path / "dp" / "report.md").read_text())
    with pytest.raises(SystemExit) as e:
        dp.main(["--data", str(tmp_path / "nowhere")])
    assert e.value.code == 2
