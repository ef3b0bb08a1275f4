"""seqr.eval.study: the paired studies over eval documents, against counts and binomial tails worked out here."""
from __future__ import annotations

from math import comb

import pytest

from seqr.eval import study


def _binom_two_sided(a: int, b: int) -> float:
    """Two-sided exact sign test by brute force: the probability, under Binomial(a+b, 1/2), of every outcome at most
    as likely as the one seen."""
    n = a + b
    if n == 0:
        return 1.0
    probs = [comb(n, k) / 2 ** n for k in range(n + 1)]
    return min(1.0, sum(p for p in probs if p <= probs[a] * (1 + 1e-12)))


def _res(pred, gold, counts=None, decisions=0, agree=0):
    acc = sum(p == g for p, g in zip(pred, gold)) / len(gold)
    return {"n": len(gold), "acc": acc, "pred": pred, "counts": counts or {}, "decisions": decisions, "agree": agree}


GOLD = {"a": [0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1], "b": [1, 1, 1, 1, 0, 0]}


def _doc(methods: dict, base: dict | None = None, ids=None, fingerprint="f0") -> dict:
    """methods: {key: {task: (pred, counts, decisions, agree)}}."""
    libs = {"lib": {"adapters": ["a", "b"], "fingerprint": fingerprint, "shared_a": True, "noise": {}, "methods": {
        k: {"tasks": {t: _res(v[0], GOLD[t], *v[1:]) for t, v in per.items()}} for k, per in methods.items()}}}
    ex = {t: {"ids": (ids or {}).get(t, [f"{t}-{i}" for i in range(len(g))]), "gold": g} for t, g in GOLD.items()}
    doc = {"config": {"tasks": ["a", "b"]}, "libraries": libs, "examples": ex}
    if base is not None:
        doc["base"] = {"tasks": {t: _res(p, GOLD[t]) for t, p in base.items()}}
    return doc


def test_learned_counts_discordant_pairs_and_tests_them():
    oracle = {"a": (GOLD["a"],), "b": ([1, 1, 1, 0, 1, 0],)}  # a: all right; b: 4 of 6
    base = {"a": [0] * 12, "b": [1, 1, 1, 1, 1, 1]}  # a: 6 of 12; b: 4 of 6 (different examples)
    res = study.learned(_doc({"oracle": oracle}, base), "lib")
    a, b = res["tasks"]["a"], res["tasks"]["b"]
    assert (a["only_oracle"], a["only_base"]) == (6, 0) and a["p"] == pytest.approx(_binom_two_sided(6, 0))
    assert (b["only_oracle"], b["only_base"]) == (1, 1) and b["p"] == pytest.approx(1.0)
    assert a["learned"] and not b["learned"] and res["learned"] == 1
    assert res["points"] == pytest.approx(100 * ((1 + 4 / 6) / 2 - (0.5 + 4 / 6) / 2))


def test_learned_names_a_missing_pass():
    with pytest.raises(ValueError, match="needs the base and oracle passes.*no base"):
        study.learned(_doc({"oracle": {"a": (GOLD["a"],), "b": (GOLD["b"],)}}), "lib")


def test_exactness_compares_answers_counts_and_norm_max_agreement():
    seqr = {"a": (GOLD["a"], {"a": 5, "b": 1}, 6, 6), "b": (GOLD["b"], {"b": 4}, 4, 4)}
    spectr = {"a": (GOLD["a"], {"a": 5, "b": 1}, 6, 6), "b": ([0] + GOLD["b"][1:], {"b": 3, "a": 1}, 4, 3)}
    res = study.exactness(_doc({"seqr": seqr, "spectr": spectr}), "lib")
    assert set(res) == {"spectr"}  # naive was not run: not reported
    assert res["spectr"] == {"same_answer": 17, "examples": 18, "same_counts": 1, "tasks": 2, "decisions": 10,
                             "agree": 9}


def test_routability_per_library_by_its_own_oracle():
    oracle = {"a": (GOLD["a"],), "b": ([1, 1, 1, 0, 1, 0],)}  # 1.0 and 4/6
    seqr = {"a": (GOLD["a"][:6] + [9] * 6, {"a": 3, "b": 1}, 4, 4), "b": ([1, 1, 0, 0, 0, 1], {"b": 1, "a": 3}, 4, 4)}
    res = study.routability(_doc({"oracle": oracle, "seqr": seqr}))["lib"]
    assert res["per_task"]["a"] == {"norm": pytest.approx(0.5), "own": pytest.approx(0.75)}
    assert res["per_task"]["b"]["norm"] == pytest.approx((3 / 6) / (4 / 6)) and res["per_task"]["b"]["own"] == 0.25
    assert res["norm"] == pytest.approx((0.5 + 0.75) / 2) and res["own"] == pytest.approx(0.5)


def test_lend_pass_only_between_documents_of_the_same_examples_and_library():
    oracle = {"a": (GOLD["a"],), "b": (GOLD["b"],)}
    donor = _doc({"oracle": oracle, "seqr": oracle})
    doc = _doc({"seqr": oracle})
    lent = study.lend_pass(doc, donor, "oracle", "lib", "lib")
    assert lent["libraries"]["lib"]["methods"]["oracle"] == donor["libraries"]["lib"]["methods"]["oracle"]
    assert "oracle" not in doc["libraries"]["lib"]["methods"]  # a copy: the input is left as it was
    other = _doc({"seqr": oracle}, ids={"b": [f"b-{i}" for i in range(1, 7)]})
    with pytest.raises(ValueError, match="task 'b'.*different examples"):
        study.lend_pass(other, donor, "oracle", "lib", "lib")
    with pytest.raises(ValueError, match="differ in fingerprint"):
        study.lend_pass(_doc({"seqr": oracle}, fingerprint="f1"), donor, "oracle", "lib", "lib")
    with pytest.raises(ValueError, match="no 'mu' pass"):
        study.lend_pass(doc, donor, "mu", "lib", "lib")
