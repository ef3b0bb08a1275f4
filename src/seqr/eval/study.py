"""Studies over `seqr eval` results documents (pure: no model, no I/O): did each adapter learn its task, do the
exact routers make the same decisions, how routable are adapters as they train, and routing variants of one
document against every method of another that evaluated the same examples.

Every test here is paired, example by example: the two-sided exact sign test on the discordant pairs.
"""
from __future__ import annotations

import statistics

from seqr.core.stats import sign_test_p
from seqr.eval import report as er


def _only(pa: list[int], pb: list[int], gold: list[int]) -> tuple[int, int]:
    """(examples only a answers right, examples only b does)."""
    a = sum(x == g and y != g for x, y, g in zip(pa, pb, gold))
    b = sum(y == g and x != g for x, y, g in zip(pa, pb, gold))
    return a, b


def learned(doc: dict, label: str, alpha: float = 0.05) -> dict:
    """Each task's own adapter (the oracle pass) against the untouched model, on every example of the task:
    {"tasks": {task: {base, oracle, only_oracle, only_base, p, learned}}, "learned": count, "points": oracle's
    mean accuracy minus the base's, in percentage points}."""
    e, gold = doc["libraries"][label], doc["examples"]
    base, oracle = doc.get("base"), e["methods"].get("oracle")
    if base is None or oracle is None:
        raise ValueError(f"library {label!r}: learned() needs the base and oracle passes, got "
                         f"{'base' if base else 'no base'} and {'oracle' if oracle else 'no oracle'}")
    rows = {}
    for t in er.tasks(doc):
        b, o = base["tasks"][t], oracle["tasks"][t]
        only_o, only_b = _only(o["pred"], b["pred"], gold[t]["gold"])
        p = sign_test_p(only_o, only_b)
        rows[t] = {"base": b["acc"], "oracle": o["acc"], "only_oracle": only_o, "only_base": only_b, "p": p,
                   "learned": o["acc"] > b["acc"] and p < alpha}
    mean = statistics.fmean
    return {"tasks": rows, "learned": sum(r["learned"] for r in rows.values()), "alpha": alpha,
            "points": 100 * (mean(r["oracle"] for r in rows.values()) - mean(r["base"] for r in rows.values()))}


def exactness(doc: dict, label: str, ref: str = "seqr", others: tuple[str, ...] = ("spectr", "naive")) -> dict:
    """Whether routers that compute the same calibrated norm make the same decisions as `ref`: per method, the
    examples whose answer equals ref's, the tasks whose (token, layer) decision counts per adapter equal ref's,
    and how many of its own (token, layer) decisions picked the calibrated norm-maximising adapter."""
    e = doc["libraries"][label]
    base = e["methods"][ref]["tasks"]
    out = {}
    for key in (k for k in others if k in e["methods"]):
        res = e["methods"][key]["tasks"]
        ts = er.tasks(doc)
        out[key] = {"same_answer": sum(x == y for t in ts for x, y in zip(res[t]["pred"], base[t]["pred"])),
                    "examples": sum(len(base[t]["pred"]) for t in ts),
                    "same_counts": sum(res[t]["counts"] == base[t]["counts"] for t in ts), "tasks": len(ts),
                    "decisions": sum(res[t]["decisions"] for t in ts), "agree": sum(res[t]["agree"] for t in ts)}
    return out


def routability(doc: dict, key: str = "seqr") -> dict:
    """Per library of the document (e.g. snapshots at several training steps): `key`'s average normalised
    accuracy (over the tasks, each by its own library's oracle), its own-adapter share averaged over the tasks,
    and both per task."""
    out = {}
    for label, e in doc["libraries"].items():
        if key not in e["methods"] or "oracle" not in e["methods"]:
            continue
        ts = er.tasks(doc)
        norm = {t: er.normalised(doc, e, key, t) for t in ts}
        res = e["methods"][key]["tasks"]
        own = {t: res[t]["counts"].get(t, 0) / res[t]["decisions"] if res[t]["decisions"] else None for t in ts}
        known = [v for v in norm.values() if v is not None]
        out[label] = {"norm": statistics.fmean(known) if known else None,
                      "own": statistics.fmean(v for v in own.values() if v is not None),
                      "acc": statistics.fmean(res[t]["acc"] for t in ts),
                      "oracle": statistics.fmean(e["methods"]["oracle"]["tasks"][t]["acc"] for t in ts),
                      "per_task": {t: {"norm": norm[t], "own": own[t]} for t in ts}}
    return out


def variants(main: dict, other: dict, label: str, key: str = "seqr") -> dict:
    """Each routing variant of `other` (a document of `seqr eval` variant passes, e.g. --granularity layers, on the
    very same examples as `main`) against `main`'s library `label`: {variant: {"norm": average accuracy over the
    oracle's, "norm_learned": the same over the tasks whose oracle beats the untouched model, "ci": 95% bootstrap
    interval of "norm", "own": own-adapter share, "vs": {main method: {only_variant, only_other, p}}}}."""
    from seqr.eval import bootstrap

    entry = main["libraries"][label]
    same_examples(main, other, "the variant passes")
    ts, gold, idx = er.tasks(main), main["examples"], bootstrap.resample(main)
    learned_ts = [t for t in ts if _above_base(main, entry, t) is not False]
    out = {}
    for var_label, e in other["libraries"].items():
        if not e.get("variant") or key not in e["methods"] or e["adapters"] != entry["adapters"]:
            continue
        res = e["methods"][key]
        merged = {**entry, "methods": {**entry["methods"], "_variant": res}}
        norm = {t: er.normalised(main, merged, "_variant", t) for t in ts}
        draws = bootstrap.norm_draws(main, entry, [res], idx)
        vs = {}
        for other_key in er.method_keys(main, "shared"):
            r = er.pass_result(main, entry, other_key)
            a, b = _only_all(res, r, gold, ts)
            vs[other_key] = {"only_variant": a, "only_other": b, "p": sign_test_p(a, b)}
        out[e["variant"]] = {
            "norm": statistics.fmean(norm.values()) if None not in norm.values() else None,
            "norm_learned": statistics.fmean(norm[t] for t in learned_ts) if learned_ts else None,
            "learned_tasks": learned_ts, "per_task": norm,
            "acc": statistics.fmean(res["tasks"][t]["acc"] for t in ts),
            "ci": None if draws is None else bootstrap.interval(draws["avg"], bootstrap.LEVEL),
            "own": er.pass_own_share(res, ts), "vs": vs}
    return out


def against(main: dict, other: dict, ref: str, key: str = "seqr") -> dict:
    """Each variant pass of `other` against its variant `ref` (e.g. the default router's, "granularity=request") on
    `main`'s examples: {variant: {"only_variant", "only_other", "p"}} (paired exact sign test); {} without `ref`."""
    same_examples(main, other, "the variant passes")
    passes = {e["variant"]: e["methods"][key] for e in other["libraries"].values()
              if e.get("variant") and key in e["methods"]}
    if ref not in passes:
        return {}
    ts, out = er.tasks(main), {}
    for v, res in passes.items():
        if v != ref:
            a, b = _only_all(res, passes[ref], main["examples"], ts)
            out[v] = {"only_variant": a, "only_other": b, "p": sign_test_p(a, b)}
    return out


def per_task(main: dict, other: dict, label: str, ref: str = "seqr", key: str = "seqr") -> dict:
    """Task by task, every method of `main`'s library `label` and every variant pass of `other` on it (the same
    examples): {"methods": main's keys, "variants": the variants, "tasks": {task: {"acc": {method or variant:
    accuracy}, "learned": own adapter above the untouched model (None without a base pass), "vs": {variant: its
    paired sign test against `main`'s `ref` on the task}}}}; where a variant wins and where it does not."""
    same_examples(main, other, "the variant passes")
    entry, gold = main["libraries"][label], main["examples"]
    keys = er.method_keys({**main, "libraries": {label: entry}}, "shared" if entry["shared_a"] else "unique")
    variants = {e["variant"]: e["methods"][key] for e in other["libraries"].values()
                if e.get("variant") and key in e["methods"] and e["adapters"] == entry["adapters"]}
    rows = {}
    for t in er.tasks(main):
        acc = {k: er.task_acc(main, entry, k, t) for k in keys} | {v: r["tasks"][t]["acc"] for v, r in variants.items()}
        vs = {}
        if ref in entry["methods"]:
            for v, r in variants.items():
                a, b = _only(r["tasks"][t]["pred"], entry["methods"][ref]["tasks"][t]["pred"], gold[t]["gold"])
                vs[v] = {"only_variant": a, "only_other": b, "p": sign_test_p(a, b)}
        rows[t] = {"acc": acc, "vs": vs, "learned": _above_base(main, entry, t)}
    return {"methods": keys, "variants": list(variants), "tasks": rows}


def _above_base(doc: dict, entry: dict, task: str) -> bool | None:
    """Whether the library's own adapter (its oracle pass) scores above the untouched model on the task; None
    without either pass."""
    oracle, base = entry["methods"].get("oracle"), doc.get("base")  # a document may have no base pass at all
    return None if oracle is None or base is None else oracle["tasks"][task]["acc"] > base["tasks"][task]["acc"]


def _only_all(ra: dict, rb: dict, gold: dict, ts: list[str]) -> tuple[int, int]:
    """(examples only pass a answers right, only pass b does) over every task."""
    pairs = [_only(ra["tasks"][t]["pred"], rb["tasks"][t]["pred"], gold[t]["gold"]) for t in ts]
    return sum(p[0] for p in pairs), sum(p[1] for p in pairs)


def same_examples(main: dict, other: dict, what: str) -> None:
    """Raise unless `other` evaluated exactly `main`'s examples (same ids, task by task)."""
    for t in er.tasks(main):
        if main["examples"].get(t, {}).get("ids") != other["examples"].get(t, {}).get("ids"):
            raise ValueError(f"task {t!r}: {what} evaluated other examples than the main document")


def _pair(shared: dict, ra: dict, rb: dict, ts: list[str]) -> dict:
    """Two passes on the same examples: mean accuracy over the tasks, own-adapter share, the sign test."""
    a, b = _only_all(ra, rb, shared["examples"], ts)
    return {"shared": statistics.fmean(ra["tasks"][t]["acc"] for t in ts),
            "unique": statistics.fmean(rb["tasks"][t]["acc"] for t in ts), "own_shared": er.pass_own_share(ra, ts),
            "own_unique": er.pass_own_share(rb, ts), "only_shared": a, "only_unique": b, "p": sign_test_p(a, b)}


def shared_vs_unique(shared: dict, unique: dict, s_label: str, u_label: str) -> dict:
    """Does a shared frozen A cost accuracy (the paper's Table 2)? Two documents on the same examples: a shared-A
    library (`s_label` of `shared`) and ordinary LoRA with each adapter's A trained (`u_label` of `unique`).
    {"oracle": {task: own adapter's accuracy each way, sign test}, "methods": {router: each way, sign test; the
    exact norm router is seqr on shared A, spectr on unique A}, "native": {unique-A router: against shared-A seqr}}."""
    same_examples(shared, unique, "the unique-A passes")
    es, eu, ts = shared["libraries"][s_label]["methods"], unique["libraries"][u_label]["methods"], er.tasks(shared)
    gold = shared["examples"]
    oracle = {}
    if "oracle" in es and "oracle" in eu:
        for t in ts:
            a, b = _only(es["oracle"]["tasks"][t]["pred"], eu["oracle"]["tasks"][t]["pred"], gold[t]["gold"])
            oracle[t] = {"shared": es["oracle"]["tasks"][t]["acc"], "unique": eu["oracle"]["tasks"][t]["acc"],
                         "only_shared": a, "only_unique": b, "p": sign_test_p(a, b)}
    methods = {ku: _pair(shared, es["seqr" if ku == "spectr" else ku], eu[ku], ts)
               for ku in eu if ("seqr" if ku == "spectr" else ku) in es}
    native = {ku: _pair(shared, es["seqr"], eu[ku], ts) for ku in eu if ku != "oracle" and "seqr" in es}
    return {"oracle": oracle, "methods": methods, "native": native}
