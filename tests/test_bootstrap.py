"""Bootstrap intervals of the eval figures, against the binomial normal approximation and exact cases."""
from __future__ import annotations

import math
import random

import pytest

from seqr.eval import bootstrap as eb
from seqr.eval import plots
from seqr.eval import report as er


def doc_with(preds: dict, gold: dict, noise: dict | None = None) -> dict:
    """A results document from per-example predictions: preds[label][method][task] = [int], gold[task] = [int]."""
    ts = list(gold)

    def res(p):
        return {"tasks": {t: {"n": len(gold[t]), "pred": p[t], "correct": sum(a == b for a, b in zip(p[t], gold[t])),
                              "acc": sum(a == b for a, b in zip(p[t], gold[t])) / len(gold[t])} for t in ts}}

    libs = {label: {"shared_a": True, "adapters": ts, "methods": {m: res(p) for m, p in methods.items()},
                    "noise": {k: res(p) for k, p in (noise or {}).get(label, {}).items()}}
            for label, methods in preds.items()}
    return {"config": {"tasks": ts, "split": "dev", "max_eval": None, "seed": 0, "scoring": "choices", "k": 2,
                       "model": "m"}, "libraries": libs,
            "examples": {t: {"ids": list(range(len(g))), "gold": g} for t, g in gold.items()}}


def bernoulli(n: int, p: float, seed: int) -> list[int]:
    rng = random.Random(seed)
    k = round(n * p)
    hits = [1] * k + [0] * (n - k)
    rng.shuffle(hits)
    return hits


@pytest.mark.parametrize("p", [0.5, 0.7, 0.9])
def test_interval_matches_the_binomial_normal_approximation(p):
    n = 400
    gold = {"a": [1] * n}
    d = doc_with({"lib": {"oracle": {"a": [1] * n}, "seqr": {"a": bernoulli(n, p, 1)}}}, gold)
    lo, hi = eb.accuracy_intervals(d, draws=4000)["seqr"]["a"]
    half = 1.959964 * math.sqrt(p * (1 - p) / n)  # oracle always right: normalised accuracy = accuracy
    assert lo == pytest.approx(p - half, abs=0.008) and hi == pytest.approx(p + half, abs=0.008)


def test_paired_resampling_a_method_equal_to_the_oracle_has_no_width():
    gold = {"a": [0, 1, 1, 0, 1, 0, 1, 1], "b": [1, 1, 0, 0, 1, 1, 0, 1]}
    pred = {"a": [0, 1, 0, 0, 1, 1, 1, 0], "b": [1, 0, 0, 1, 1, 1, 0, 0]}
    d = doc_with({"lib": {"oracle": pred, "mu": pred}}, gold)
    ci = eb.accuracy_intervals(d)
    assert ci["mu"]["a"] == (1.0, 1.0) and ci["mu"]["b"] == (1.0, 1.0) and ci["mu"]["avg"] == (1.0, 1.0)
    assert "oracle" not in ci


def test_average_contains_the_point_estimate_and_libraries_are_averaged_per_draw():
    n, gold = 200, {"a": [1] * 200, "b": [1] * 200}
    lib = {"oracle": {"a": bernoulli(n, 0.9, 2), "b": bernoulli(n, 0.8, 3)},
           "seqr": {"a": bernoulli(n, 0.6, 4), "b": bernoulli(n, 0.7, 5)}}
    one = eb.accuracy_intervals(doc_with({"s0": lib}, gold))
    two = eb.accuracy_intervals(doc_with({"s0": lib, "s1": lib}, gold))
    assert one == two  # two identical libraries: the same draws, the same mean
    m = er.accuracy_summary(doc_with({"s0": lib}, gold))["seqr"]["norm"]["avg"][0]
    lo, hi = one["seqr"]["avg"]
    assert lo < m < hi and hi - lo < 0.2


def test_passes_without_predictions_get_no_interval_and_figures_still_draw(tmp_path):
    gold = {"a": [1, 0, 1, 1]}
    d = doc_with({"lib": {"oracle": {"a": [1, 0, 1, 1]}, "seqr": {"a": [1, 1, 1, 1]}}}, gold)
    d["libraries"]["lib"]["methods"]["seqr"]["tasks"]["a"]["pred"] = []  # an older document kept none
    assert eb.accuracy_intervals(d) == {}
    assert plots.accuracy(d, tmp_path) == "accuracy_shared.png"


def test_noise_intervals_follow_the_noise_levels():
    n, gold = 300, {"a": [1] * 300}
    d = doc_with({"lib": {"oracle": {"a": [1] * n}, "seqr": {"a": bernoulli(n, 0.8, 6)}}}, gold,
                 noise={"lib": {"0.5@0": {"a": bernoulli(n, 0.6, 7)}, "0.5@1": {"a": bernoulli(n, 0.7, 8)}}})
    curve, ci = er.noise_summary(d), eb.noise_intervals(d)
    assert set(ci) == set(curve) == {0.0, 0.5}
    for level, (m, _) in curve.items():
        assert ci[level][0] < m < ci[level][1]
    # two seeds averaged per draw: narrower than one seed's binomial interval
    assert ci[0.5][1] - ci[0.5][0] < 2 * 1.96 * math.sqrt(0.65 * 0.35 / n)


def test_report_shows_the_average_interval(tmp_path):
    gold = {"a": [1] * 50}
    d = doc_with({"lib": {"oracle": {"a": [1] * 50}, "mu": {"a": bernoulli(50, 0.5, 9)}}}, gold)
    lo, hi = eb.accuracy_intervals(d)["mu"]["avg"]
    path, _ = plots.write_report(d, tmp_path)
    text = path.read_text()
    assert "average, 95% bootstrap CI" in text and f"| mu | 50.0 | 50.0 | {100 * lo:.1f} – {100 * hi:.1f} |" in text


def test_draws_must_be_positive():
    d = doc_with({"lib": {"oracle": {"a": [1]}, "seqr": {"a": [1]}}}, {"a": [1]})
    with pytest.raises(ValueError, match="draws must be positive, got 0"):
        eb.accuracy_intervals(d, draws=0)
