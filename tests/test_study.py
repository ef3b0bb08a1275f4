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


def test_variants_against_every_main_method_by_hand():
    """A variant pass of another document on the same examples: normalised accuracy by the main oracle, the same
    over the learned tasks only, own share, and a paired sign test against each main method (and the base)."""
    oracle = {"a": (GOLD["a"],), "b": ([1, 1, 1, 0, 1, 0],)}  # a: 12/12; b: 4/6
    seqr = {"a": (GOLD["a"][:6] + [9] * 6,), "b": ([1, 1, 0, 0, 0, 1],)}  # a: 6/12; b: 3/6
    main = _doc({"oracle": oracle, "seqr": seqr}, base={"a": [0] * 12, "b": [1, 1, 1, 1, 1, 1]})  # base b: 4/6
    var = {"a": (GOLD["a"][:10] + [9] * 2, {"a": 30, "b": 10}, 40), "b": ([1, 1, 1, 0, 0, 0], {"b": 5, "a": 15}, 20)}
    other = _doc({"seqr": var})
    other["libraries"]["lib"]["variant"] = "granularity=layers"
    res = study.variants(main, other, "lib")["granularity=layers"]
    assert res["per_task"] == {"a": pytest.approx(10 / 12), "b": pytest.approx((5 / 6) / (4 / 6))}
    assert res["norm"] == pytest.approx((10 / 12 + 1.25) / 2)
    assert res["learned_tasks"] == ["a"] and res["norm_learned"] == pytest.approx(10 / 12)  # b's oracle ties base
    assert res["own"] == pytest.approx((30 / 40 + 5 / 20) / 2)
    assert res["ci"][0] <= res["norm"] <= res["ci"][1]
    # by hand: a: variant right on 0-9, seqr on 0-5 -> +4/-0; b: against gold [1,1,1,1,0,0] the variant is right
    # on 0,1,2,4,5, seqr on 0,1,4, the oracle on 0,1,2,5 -> vs seqr +2/-0, vs oracle +1/-0 (a: +0/-2)
    assert res["vs"]["seqr"] == {"only_variant": 6, "only_other": 0, "p": pytest.approx(_binom_two_sided(6, 0))}
    assert (res["vs"]["oracle"]["only_variant"], res["vs"]["oracle"]["only_other"]) == (1, 2)
    assert set(res["vs"]) == {"base", "oracle", "seqr"}
    moved = _doc({"seqr": var}, ids={"b": [f"b-{i}" for i in range(1, 7)]})
    moved["libraries"]["lib"]["variant"] = "granularity=layers"
    with pytest.raises(ValueError, match="task 'b'.*other examples"):
        study.variants(main, moved, "lib")


def test_each_variant_against_the_default_variant_by_hand():
    """study.against: every other variant pass against the reference variant (the default router), paired."""
    main = _doc({"oracle": {"a": (GOLD["a"],), "b": (GOLD["b"],)}})
    ref = {"a": (GOLD["a"][:6] + [9] * 6,), "b": ([1, 1, 0, 0, 0, 1],)}  # right on a 0-5; b 0,1,4
    win = {"a": (GOLD["a"][:10] + [9] * 2,), "b": ([1, 1, 1, 0, 0, 0],)}  # right on a 0-9; b 0,1,2,4,5
    other = _doc({"seqr": ref})
    other["libraries"] = {"request": {**other["libraries"]["lib"], "variant": "granularity=request"},
                          "layers": {**_doc({"seqr": win})["libraries"]["lib"], "variant": "granularity=layers"}}
    res = study.against(main, other, "granularity=request")
    # by hand: a: +4 (6-9) / -0; b: +2 (2, 5) / -0 (4 is right for both, 3 for neither)
    assert res == {"granularity=layers": {"only_variant": 6, "only_other": 0, "p": pytest.approx(_binom_two_sided(6, 0))}}
    assert study.against(main, other, "granularity=depth") == {}  # no such reference pass
