"""Numbers and Markdown tables from a `seqr eval` results document (pure: no model, no I/O).

Layouts follow the paper: Table 3 (rows methods, columns tasks, accuracy normalised by the oracle's, plus
the average), Table 4 (oracle vs untouched model), Table 2 (shared vs unique A), Figure 4 (routing
accuracy against the calibrated norm-maximising adapter), Figure 6 (SEQR under noise on mu). Several
libraries of one kind give mean and standard deviation (sample std, over libraries).
"""
from __future__ import annotations

import statistics

from seqr.core import registry
from seqr.core.stats import sign_test_p

KINDS = ("shared", "unique")


def _mean_std(values: list[float | None]) -> tuple[float, float | None] | None:
    vals = [v for v in values if v is not None]
    if not vals or len(vals) != len(values):
        return None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def libraries(doc: dict, kind: str) -> list[tuple[str, dict]]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return [(label, e) for label, e in doc["libraries"].items()
            if e["shared_a"] == (kind == "shared") and not e.get("variant")]  # routing variants: variant_rows


def pass_own_share(res: dict, ts: list[str]) -> float | None:
    """Share of a pass's (token, layer) decisions routed to the input's own task adapter, averaged over the tasks
    (None unless every task has traced decisions)."""
    own = [res["tasks"][t]["counts"].get(t, 0) / res["tasks"][t]["decisions"] for t in ts
           if res["tasks"][t].get("decisions")]
    return statistics.fmean(own) if own and len(own) == len(ts) else None


def variant_rows(doc: dict) -> list[tuple[str, str, dict, float | None]]:
    """Routing-variant passes (seqr eval --score/--granularity/...): (label, method, {task | "avg": normalised
    accuracy}, own-adapter share), normalised by the oracle of the paper-routing library with the same adapters."""
    ts, rows = tasks(doc), []
    for label, e in doc["libraries"].items():
        if not e.get("variant"):
            continue
        base = next((b for _, b in libraries(doc, "shared" if e["shared_a"] else "unique")
                     if b["adapters"] == e["adapters"] and "oracle" in b["methods"]), None)
        for key, res in e["methods"].items():
            cells = {t: (res["tasks"][t]["acc"] / base["methods"]["oracle"]["tasks"][t]["acc"]
                         if base and base["methods"]["oracle"]["tasks"][t]["acc"] else None) for t in ts}
            vals = list(cells.values())
            cells["avg"] = None if None in vals else statistics.fmean(vals)
            rows.append((label, key, cells, pass_own_share(res, ts)))
    return rows


def method_keys(doc: dict, kind: str) -> list[str]:
    """Method keys (e.g. "lag@3") evaluated on every library of the kind, in the paper's row order."""
    libs = libraries(doc, kind)
    if not libs:
        return []
    common = set.intersection(*(set(e["methods"]) for _, e in libs))
    if doc.get("base") is not None:
        common.add("base")
    return registry.report_order(common)


def tasks(doc: dict) -> list[str]:
    return list(doc["config"]["tasks"])


def pass_result(doc: dict, entry: dict, key: str) -> dict | None:
    return doc["base"] if key == "base" else entry["methods"].get(key)


def task_acc(doc: dict, entry: dict, key: str, task: str) -> float | None:
    res = pass_result(doc, entry, key)
    return None if res is None or task not in res["tasks"] else res["tasks"][task]["acc"]


def normalised(doc: dict, entry: dict, key: str, task: str) -> float | None:
    """Accuracy over the oracle's accuracy on the same task and library (None when the oracle scored 0)."""
    acc, oracle = task_acc(doc, entry, key, task), task_acc(doc, entry, "oracle", task)
    return None if acc is None or not oracle else acc / oracle


def accuracy_summary(doc: dict, kind: str = "shared") -> dict:
    """{key: {"acc"|"norm": {task | "avg": (mean, std)}}}: the average is over tasks within a library,
    then mean and std over libraries."""
    libs, ts, out = libraries(doc, kind), tasks(doc), {}
    for key in method_keys(doc, kind):
        row = {}
        for what, fn in (("acc", task_acc), ("norm", normalised)):
            per_lib = [{t: fn(doc, e, key, t) for t in ts} for _, e in libs]
            cells = {t: _mean_std([p[t] for p in per_lib]) for t in ts}
            avgs = [None if None in p.values() else statistics.fmean(p.values()) for p in per_lib]
            cells["avg"] = _mean_std(avgs)
            row[what] = cells
        out[key] = row
    return out


def routing_summary(doc: dict, kind: str = "shared") -> dict:
    """Per router key: "own" = share of its own pass's decisions that picked the norm-max; from the reference
    pass's traces, "would" = the share every router would have matched on those same hidden states."""
    libs, ts = libraries(doc, kind), tasks(doc)
    out: dict = {"own": {}, "would": {}}
    for key in method_keys(doc, kind):
        if not registry.routes(key):
            continue
        shares = []
        for _, e in libs:
            per = [e["methods"][key]["tasks"][t] for t in ts]
            shares.append(sum(p["agree"] for p in per) / max(1, sum(p["decisions"] for p in per)))
        out["own"][key] = _mean_std(shares)
    refs = [r for r in (_reference(e) for _, e in libs) if r is not None]
    if refs:
        routers = list(refs[0]["tasks"][ts[0]]["would_agree"])
        for router in routers:
            out["would"][router] = _mean_std([
                sum(r["tasks"][t]["would_agree"][router] for t in ts) / max(1, sum(r["tasks"][t]["decisions"] for t in ts))
                for r in refs])
    return out


def _reference(entry: dict) -> dict | None:
    res = entry["methods"].get("seqr" if entry["shared_a"] else "spectr")  # the library's default_method
    return res if res and all("would_agree" in v for v in res["tasks"].values()) else None


def own_share(doc: dict, kind: str = "shared") -> dict:
    """{router key: {task: (mean, std)}}: share of a task's decisions routed to the adapter named like it."""
    libs, out = libraries(doc, kind), {}
    for key in method_keys(doc, kind):
        if not registry.routes(key):
            continue
        cells = {}
        for t in tasks(doc):
            vals = []
            for _, e in libs:
                r = e["methods"][key]["tasks"][t]
                vals.append(r["counts"].get(t, 0) / r["decisions"] if t in r["counts"] and r["decisions"] else
                            (0.0 if r["decisions"] and t in e["adapters"] else None))
            cells[t] = _mean_std(vals)
        vals = [c[0] for c in cells.values() if c is not None]
        cells["avg"] = (statistics.fmean(vals), None) if vals and len(vals) == len(cells) else None
        out[key] = cells
    return out


def paired(doc: dict, entry: dict, a: str, b: str) -> tuple[int, int, float] | None:
    """Over every eval example: (only `a` right, only `b` right, two-sided exact sign-test p-value)."""
    gold = doc.get("examples")
    ra, rb = pass_result(doc, entry, a), pass_result(doc, entry, b)
    if not gold or ra is None or rb is None:
        return None
    only_a = only_b = 0
    for t in tasks(doc):
        for pa, pb, g in zip(ra["tasks"][t]["pred"], rb["tasks"][t]["pred"], gold[t]["gold"]):
            only_a += pa == g and pb != g
            only_b += pb == g and pa != g
    return only_a, only_b, sign_test_p(only_a, only_b)


def confusion(doc: dict, label: str, key: str) -> tuple[list[str], list[str], list[list[float]]]:
    """(tasks, adapters, share[task][adapter]) of one library's pass."""
    e = doc["libraries"][label]
    ts, names = tasks(doc), e["adapters"]
    res = e["methods"][key]["tasks"]
    return ts, names, [[res[t]["counts"].get(n, 0) / max(1, res[t]["decisions"]) for n in names] for t in ts]


def norms(doc: dict, label: str, which: str = "raw") -> tuple[list[str], list[str], list[list[float]]] | None:
    """(tasks, adapters, mean norm[task][adapter]) from a library's reference pass: Figure 3."""
    e = doc["libraries"][label]
    ref = _reference(e)
    if ref is None:
        return None
    ts, names = tasks(doc), e["adapters"]
    return ts, names, [[ref["tasks"][t][f"mean_{which}_norm"][n] for n in names] for t in ts]


def noise_passes(entry: dict, level: float) -> list[dict]:
    """A shared library's SEQR passes at one noise level (one per noise seed); level 0 is the seqr pass itself."""
    if level:
        return [r for k, r in entry["noise"].items() if float(k.split("@")[0]) == level]
    return [entry["methods"]["seqr"]] if "seqr" in entry["methods"] else []


def noise_summary(doc: dict) -> dict[float, tuple[float, float | None]]:
    """{noise level: SEQR's average normalised accuracy (mean, std over shared libraries)}; level 0 is the
    seqr pass itself."""
    libs, ts = libraries(doc, "shared"), tasks(doc)
    levels = sorted({float(k.split("@")[0]) for _, e in libs for k in e["noise"]} | {0.0})
    out = {}
    for level in levels:
        per_lib = []
        for _, e in libs:
            seeds = noise_passes(e, level)
            if not seeds or "oracle" not in e["methods"]:
                per_lib.append(None)
                continue
            oracle = e["methods"]["oracle"]["tasks"]
            vals = [r["tasks"][t]["acc"] / oracle[t]["acc"] for r in seeds for t in ts if oracle[t]["acc"]]
            per_lib.append(statistics.fmean(vals) if vals else None)
        if (s := _mean_std(per_lib)) is not None:
            out[level] = s
    return out


# ---------------------------------------------------------------------------------------------- markdown
def _pct(cell, digits: int = 1) -> str:
    if cell is None:
        return "–"
    m, s = cell
    return f"{100 * m:.{digits}f}" + ("" if s is None else f" ± {100 * s:.{digits}f}")


def _interval(iv: tuple[float, float] | None) -> str:
    return "–" if iv is None else f"{100 * iv[0]:.1f} – {100 * iv[1]:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def variants_table(res: dict) -> list[str]:
    """`seqr.eval.study.variants`' result as a Markdown table: per variant its normalised accuracy, 95% bootstrap
    interval, the same over the learned tasks only, own-adapter share, and its paired sign test against each main
    method (+examples only the variant answers right / -only the other, p)."""
    vs = next(iter(res.values()))["vs"]
    others = ["seqr"] + [k for k in vs if k not in ("seqr", "base", "oracle")] + ["oracle"]
    one = lambda v: _pct(None if v is None else (v, None))  # noqa: E731
    rows = [[v, one(r["norm"]), _interval(r["ci"]), one(r["norm_learned"]), one(r["own"]),
             *(f"+{r['vs'][k]['only_variant']}/-{r['vs'][k]['only_other']} (p={r['vs'][k]['p']:.2g})" for k in others)]
            for v, r in res.items()]
    return _table(["variant", "normalised %", "95% CI", "learned tasks only %", "own share %",
                   *[f"vs {k}" for k in others]], rows)


def markdown(doc: dict, figures: list[str] | None = None, intervals: dict | None = None) -> str:
    """The report; `intervals` ({kind: bootstrap.accuracy_intervals}) adds the average's confidence interval."""
    cfg, ts = doc["config"], tasks(doc)
    lines = ["# seqr eval", "",
             f"Model `{cfg.get('model') or '?'}`, split `{cfg['split']}`, up to {cfg['max_eval'] or 'all'} examples "
             f"per task (seed {cfg['seed']}), scoring `{cfg['scoring']}`, LAG k = {cfg['k']}. Libraries: "
             + ", ".join(f"`{label}` ({'shared' if e['shared_a'] else 'unique'} A, {len(e['adapters'])} adapters)"
                         for label, e in doc["libraries"].items()) + ".", ""]
    if doc.get("command"):
        lines += [f"Command: `{doc['command']}`", ""]
    if doc.get("demo"):
        demo = doc["demo"]
        lines += [f"`seqr demo`: {demo['data']}; seconds per step: "
                  + ", ".join(f"{k.removesuffix('_s')} {v:g}" for k, v in demo["timings"].items()) + ".", ""]
    passes = [r for r in [doc.get("base"), *(r for e in doc["libraries"].values()
                                              for r in [*e["methods"].values(), *e["noise"].values()])] if r]
    if passes:
        lines += [f"{len(passes)} evaluation passes, {sum(r.get('seconds', 0) for r in passes) / 60:.1f} minutes in all.", ""]
    n = examples_per_task(doc)
    if n:
        lines += ["Examples per task: " + ", ".join(f"{t} {n[t]}" for t in ts) + ".", ""]
    lines += _default_lines(doc) + _conclusion_lines(doc, (intervals or {}).get("shared") or {})
    for kind in KINDS:
        summ = accuracy_summary(doc, kind)
        if not summ:
            continue
        nlib = len(libraries(doc, kind))
        sd = f" (mean ± std over {nlib} libraries)" if nlib > 1 else ""
        for what, title in (("norm", "accuracy normalised by the oracle's, % (the paper's Table 3)"),
                            ("acc", "accuracy, %")):
            ci = (intervals or {}).get(kind) if what == "norm" else None
            lines += [f"## {kind.capitalize()}-A library: {title}{sd}", ""]
            lines += _table(["method", *ts, "average"] + (["average, 95% bootstrap CI"] if ci else []),
                            [[key] + [_pct(summ[key][what][t]) for t in ts] + [_pct(summ[key][what]["avg"])]
                             + ([_interval(ci.get(key, {}).get("avg"))] if ci else []) for key in summ]) + [""]
    lines += _paired_lines(doc) + _oracle_lines(doc, ts) + _routing_lines(doc, ts) + _noise_lines(doc)
    rows = variant_rows(doc)
    if rows:
        lines += ["## Routing variants: accuracy normalised by the oracle, % (own share: decisions routed to the "
                  "input's own task adapter)", ""]
        lines += _table(["library [variant]", "method", *ts, "average", "own share"],
                        [[label, key] + [_pct((c[t], None) if c[t] is not None else None) for t in [*ts, "avg"]]
                         + [_pct((own, None) if own is not None else None)] for label, key, c, own in rows]) + [""]
    if figures:
        lines += ["## Figures", ""] + [f"![{f.rsplit('.', 1)[0]}]({f})" for f in figures] + [""]
    return "\n".join(lines)


def _sign_sentence(tests: list[tuple[str, int, int, float]], subject: str) -> str:
    """One sentence of paired sign tests (method, only the subject right, only the method right, p), grouped into
    significantly better / worse / not different at p < 0.05; '' without tests."""
    groups = {"significantly better than": [], "significantly worse than": [], "not significantly different from": []}
    for key, a, b, p in tests:
        words = "significantly better than" if p < 0.05 and a > b else "significantly worse than" if p < 0.05 \
            else "not significantly different from"
        groups[words].append(f"{key} (+{a}/-{b}, p = {p:.2g})")
    parts = [f"{words} {', '.join(keys)}" for words, keys in groups.items() if keys]
    return (f"Example by example (+only {subject} right / -only the other right, two-sided sign test, p < 0.05), "
            f"{subject} is {'; '.join(parts)}.") if parts else ""


def _default_lines(doc: dict) -> list[str]:
    """The library's default router first, when the document holds its pass (a `seqr eval --granularity request-vote`
    pass of seqr beside the main library, as `seqr demo` runs): its accuracy over the oracle's with a 95% bootstrap
    interval, its own-adapter share, and its paired sign test against every method of the main library."""
    from seqr.eval import study
    from seqr.hf.granularity import DEFAULT

    libs = libraries(doc, "shared")
    if not libs or "oracle" not in libs[0][1]["methods"] or not doc.get("examples"):
        return []
    label, entry = libs[0]
    res = study.variants(doc, doc, label).get(f"granularity={DEFAULT}")
    if res is None or res["norm"] is None:
        return []
    tests = [("per-token SEQR" if k == "seqr" else k, v["only_variant"], v["only_other"], v["p"])
             for k, v in sorted(res["vs"].items(), key=lambda kv: kv[0] != "seqr") if k != "oracle"]  # seqr first
    out = [f"The default router, SEQR deciding once per request (`granularity=\"{DEFAULT}\"`: each prompt token votes "
           f"for the adapter its calibrated scores summed over the routed layers favour, and the most-voted adapter "
           f"serves the whole request), reaches "
           f"{100 * res['norm']:.1f}% of the oracle's accuracy"
           + (f" (95% bootstrap interval {_interval(res['ci'])})" if res["ci"] else "")
           + (f" and routes {100 * res['own']:.1f}% of its decisions to the input's own adapter (chance "
              f"{100 / len(entry['adapters']):.1f}%)" if res["own"] is not None else "")
           + ".", _one_adapter_sentence(doc, f"{label} [granularity={DEFAULT}]"), _sign_sentence(tests, "it")]
    return ["## The default router", "", " ".join(filter(None, out)), ""]


def _one_adapter_sentence(doc: dict, label: str, key: str = "seqr", share: float = 0.9) -> str:
    """A warning when one adapter took at least `share` of a pass's decisions on every task ('' otherwise): the
    router then ignores its input, e.g. one adapter's calibrated scores sit above the others' everywhere."""
    res = doc["libraries"].get(label, {}).get("methods", {}).get(key)
    if not res or len(tasks(doc)) < 2 or not all(res["tasks"][t].get("decisions") for t in tasks(doc)):
        return ""
    tops = {max(res["tasks"][t]["counts"].items(), key=lambda kv: kv[1]) + (res["tasks"][t]["decisions"],)
            for t in tasks(doc)}
    names = {name for name, _, _ in tops}
    if len(names) != 1 or any(c < share * n for _, c, n in tops):
        return ""
    return (f"It sent (nearly) every request of every task to one adapter, {names.pop()}: with these adapters one "
            f"silo's calibrated scores outweigh the others' on every prompt, and the choice ignores the input.")


def _conclusion_lines(doc: dict, ci: dict) -> list[str]:
    """What the numbers below say, computed from them: SEQR's average with its interval, which differences the
    paired sign tests call significant, what a normalised accuracy above 100% and SEQR's routing accuracy mean,
    and the own-adapter share against chance."""
    libs = libraries(doc, "shared")
    summ = accuracy_summary(doc, "shared")
    if not libs or "seqr" not in summ or summ["seqr"]["norm"]["avg"] is None:
        return []
    label, entry = libs[0]
    avg, iv = summ["seqr"]["norm"]["avg"][0], ci.get("seqr", {}).get("avg")
    out = [f"SEQR{' per token (the paper)' if len(doc['libraries']) > 1 else ''} reaches {100 * avg:.1f}% of the "
           f"oracle's accuracy on average"
           + (f" (95% bootstrap interval {_interval(iv)})." if iv else ".")]
    out.append(_sign_sentence([(key, *pr) for key in method_keys(doc, "shared") if key not in ("seqr", "oracle")
                               and (pr := paired(doc, entry, "seqr", key)) is not None], "SEQR"))
    out.append("Overlapping intervals of the averages do not decide a ranking; the paired sign tests are the sharper "
               "test. Normalised accuracy divides by the oracle's (each task's own adapter): above 100% on a task, "
               "routing did better there than the own adapter alone.")
    share = own_share(doc, "shared").get("seqr", {}).get("avg")
    if share:
        n = len(entry["adapters"])
        out.append(f"SEQR picks the calibrated norm-maximising adapter on every decision by construction (its "
                   f"routing accuracy is 100%, like SPECTR's); whether that is the input's own task adapter is what the "
                   f"own-adapter share measures: {100 * share[0]:.1f}% of its decisions, against {100 / n:.1f}% by "
                   f"chance (1/{n}).")
    return ["## Conclusion", "", " ".join(filter(None, out)), ""]


def examples_per_task(doc: dict) -> dict[str, int]:
    results = [doc.get("base"), *(r for e in doc["libraries"].values() for r in e["methods"].values())]
    for res in results:
        if res:
            return {t: res["tasks"][t]["n"] for t in tasks(doc)}
    return {}


def _paired_lines(doc: dict) -> list[str]:
    libs = libraries(doc, "shared")
    if not libs or "seqr" not in libs[0][1]["methods"] or not doc.get("examples"):
        return []
    label, entry = libs[0]
    rows = []
    for key in method_keys(doc, "shared"):
        if key != "seqr" and (pr := paired(doc, entry, "seqr", key)) is not None:
            rows.append([key, str(pr[0]), str(pr[1]), f"{pr[2]:.2g}"])
    n = sum(len(v["gold"]) for v in doc["examples"].values())
    return [f"## SEQR against each method, example by example (`{label}`, {n} examples)", "",
            "How many examples only SEQR answers right, how many only the other method does, and the two-sided "
            "exact sign test on those discordant pairs (small p: a real difference, not sampling noise).", ""] + \
        _table(["method", "only seqr right", "only it right", "sign-test p"], rows) + [""]


def _oracle_lines(doc: dict, ts: list[str]) -> list[str]:
    shared, unique = accuracy_summary(doc, "shared"), accuracy_summary(doc, "unique")
    if "oracle" not in shared and "oracle" not in unique:
        return []
    cols = [("untouched model", shared.get("base") or unique.get("base")),
            ("oracle, shared A", shared.get("oracle")), ("oracle, unique A", unique.get("oracle"))]
    cols = [(name, c) for name, c in cols if c]
    lines = ["## Oracle: each task's own adapter vs the untouched model, accuracy % (the paper's Table 4)", ""]
    lines += _table(["task", *(name for name, _ in cols)],
                    [[t] + [_pct(c["acc"][t]) for _, c in cols] for t in ts]
                    + [["average"] + [_pct(c["acc"]["avg"]) for _, c in cols]]) + [""]
    if shared and unique:
        keys = [k for k in shared if k in unique]
        lines += ["## Shared vs unique A: average accuracy and normalised accuracy, % (the paper's Table 2)", ""]
        lines += _table(["method", "shared A acc", "unique A acc", "shared A norm.", "unique A norm."],
                        [[k, _pct(shared[k]["acc"]["avg"]), _pct(unique[k]["acc"]["avg"]),
                          _pct(shared[k]["norm"]["avg"]), _pct(unique[k]["norm"]["avg"])] for k in keys]) + [""]
    return lines


def _routing_lines(doc: dict, ts: list[str]) -> list[str]:
    lines = []
    for kind in KINDS:
        r = routing_summary(doc, kind)
        if not r["own"] and not r["would"]:
            continue
        ref = "seqr" if kind == "shared" else "spectr"
        lines += [f"## {kind.capitalize()}-A library: routing accuracy, % of (token, layer) decisions that pick the "
                  f"calibrated norm-maximising adapter (the paper's Figure 4)", "",
                  f"`own pass`: each router's decisions in its own evaluation pass. `on {ref}'s pass`: the choice each "
                  f"router would make on the hidden states of the {ref} pass (one trace, every router).", ""]
        keys = list(dict.fromkeys([*r["own"], *(k for k in r["would"] if not k.startswith("lag@")
                                                and (kind == "shared" or k != "seqr"))]))  # no SEQR without a shared A
        lines += _table(["router", "own pass", f"on {ref}'s pass"],
                        [[k, _pct(r["own"].get(k)), _pct(r["would"].get(k))] for k in keys]) + [""]
        lag = {int(k.split("@")[1]): v for k, v in r["would"].items() if k.startswith("lag@")}
        if lag:
            lines += [f"LAG by shortlist size k (on {ref}'s pass): "
                      + ", ".join(f"k={k}: {_pct(v)}" for k, v in sorted(lag.items())), ""]
        share = own_share(doc, kind)
        if share:
            lines += [f"Share of each task's decisions routed to the task's own adapter, % ({kind} A; 1/N is chance):", ""]
            lines += _table(["router", *ts, "average"],
                            [[k] + [_pct(share[k][t]) for t in ts] + [_pct(share[k]["avg"])] for k in share]) + [""]
        for label, _ in libraries(doc, kind)[:1]:
            for which in ("raw", "z"):
                nm = norms(doc, label, which)
                if nm is None:
                    continue
                tt, names, mat = nm
                wins = sum(1 for t, row in zip(tt, mat) if t in names and max(range(len(row)), key=row.__getitem__)
                           == names.index(t))
                lines += [f"Mean {'raw' if which == 'raw' else 'z-scored'} activation norm (`{label}`, Figure 3): the "
                          f"task's own adapter has the largest mean on {wins} of {sum(t in names for t in tt)} tasks.", ""]
    return lines


def _noise_lines(doc: dict) -> list[str]:
    noise = noise_summary(doc)
    if len(noise) < 2:
        return []
    summ = accuracy_summary(doc, "shared")
    refs = [(k, summ[k]["norm"]["avg"]) for k in summ if k.split("@")[0] in ("arrow", "lag")]
    lines = ["## Robustness: SEQR's average normalised accuracy with Gaussian noise on mu, % (the paper's Figure 6)", ""]
    lines += _table(["noise (std of mu)", "seqr", *(k + " (no noise)" for k, _ in refs)],
                    [[f"{level:g}", _pct(v), *(_pct(c) for _, c in refs)] for level, v in noise.items()]) + [""]
    return lines
