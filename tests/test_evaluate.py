"""`seqr eval` on a tiny chat model: every method's accuracy against a direct scoring reference, trace tallies
against brute force over the same trace, resume, re-plot, tables against hand-computed numbers, the CLI."""
from __future__ import annotations

import json
import random

import pytest
import torch

import seqr
from seqr.eval import report as er
from seqr.eval import cli as eval_cli
from seqr.eval import evaluate as ev
from seqr.store import files
from seqr.eval import plots
from seqr.silo.calibrate import calibrate
from seqr.hf.choices import choice_logprobs
from seqr.hf.granularity import DEFAULT
from seqr.silo.tasks import Example
from peft_factory import make_adapter
from tiny_chat import tiny_chat_llama

TASKS = {"sst2": ("negative", "positive"), "cola": ("unacceptable", "acceptable"),
         "rte": ("entailment", "not_entailment")}


def task_examples(task: str, split: str, n: int) -> list[Example]:
    rnd = random.Random(f"{task}-{split}")
    words = {"sst2": "film plot actor scene", "cola": "the a of sentence grammar", "rte": "premise claim fact"}[task]
    out = []
    for i in range(n):
        text = " ".join(rnd.choice(words.split()) for _ in range(rnd.randint(2, 9)))
        pair = "does it follow" if task == "rte" else None
        out.append(Example(task=task, id=f"{task}-{split}-{i}", text=text, text_pair=pair, choices=TASKS[task],
                           label=rnd.randrange(2)))
    return out


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, tok, model):
    """Three shared-A peft adapters named like tasks, each calibrated on its own task's train examples."""
    root = tmp_path_factory.mktemp("adapters")
    dirs = {}
    for i, task in enumerate(TASKS):
        make_adapter(root / task, seed=i + 1, base=tiny_chat_llama(len(tok)), b_scale=0.5 + 0.3 * i)
        calibrate(model, tok, root / task, task_examples(task, "train", 6), progress=False)
        dirs[task] = root / task
    return dirs


@pytest.fixture(scope="module")
def library(adapter_dirs):
    return seqr.LoraLibrary.from_peft(adapter_dirs)


@pytest.fixture(scope="module")
def data():
    return {t: task_examples(t, "dev", 7) for t in TASKS}


def cfg(**kw):
    base = dict(tasks=list(TASKS), k=2, max_eval=7, noise=(0.5, 1.0), batch_size=3, model="tiny")
    return ev.EvalConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def doc(model, tok, library, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    return ev.evaluate(model, tok, {"shared-0": library}, data, cfg(), out_dir=out, progress=False), out


def reference_acc(model, tok, library, examples, route, k=None):
    """Accuracy of one method (route: routing's method= or adapter=) through the public API: attach, route, score
    every example in one call."""
    seqr.attach(model, library, method="base")
    try:
        with seqr.routing(model, **route, k=k, granularity="token"):
            scores = choice_logprobs(model, tok, examples, batch_size=len(examples), progress=False)
    finally:
        seqr.detach(model)
    return sum(max(range(len(s)), key=s.__getitem__) == ex.label for s, ex in zip(scores, examples)) / len(examples)


@pytest.mark.parametrize("method", ev.METHODS)
def test_pass_accuracy_matches_direct_scoring(doc, model, tok, library, data, method):
    d, _ = doc
    for task in TASKS:
        res = d["base"] if method == "base" else d["libraries"]["shared-0"]["methods"]["lag@2" if method == "lag"
                                                                                           else method]
        route = {"adapter": task} if method == "oracle" else {"method": method}
        want = reference_acc(model, tok, library, data[task], route, k=2 if method == "lag" else None)
        assert res["tasks"][task]["acc"] == pytest.approx(want, abs=1e-12), (method, task)
        assert res["tasks"][task]["n"] == 7 and len(res["tasks"][task]["pred"]) == 7


def real_token_count(tok, examples) -> int:
    """Every real token both scoring forwards route: prompt tokens plus each choice's tokens but the last."""
    from seqr.hf.choices import encode

    prompts, answers = encode(examples, tok)
    return sum(len(p) for p in prompts) + sum(len(a) - 1 for ch in answers for a in ch)


def test_traced_passes_count_every_real_token_and_layer(doc, tok, library, data):
    d, _ = doc
    for key in ("seqr", "spectr", "arrow", "lag@2"):
        for task in TASKS:
            r = d["libraries"]["shared-0"]["methods"][key]["tasks"][task]
            assert r["decisions"] == real_token_count(tok, data[task]) * len(library.layers)
            assert sum(r["counts"].values()) == r["decisions"]
    seqr_pass = d["libraries"]["shared-0"]["methods"]["seqr"]["tasks"]
    spectr_pass = d["libraries"]["shared-0"]["methods"]["spectr"]["tasks"]
    for task in TASKS:  # the exact-norm routers pick the calibrated norm-max on every decision
        assert seqr_pass[task]["agree"] == seqr_pass[task]["decisions"]
        assert spectr_pass[task]["agree"] == spectr_pass[task]["decisions"]
        w = seqr_pass[task]["would_agree"]
        assert w["lag@3"] == w["seqr"] == seqr_pass[task]["decisions"]  # LAG with every adapter = the norm-max
        assert w["arrow"] == w["lag@1"] <= w["lag@2"] <= w["lag@3"]


def test_trace_tally_matches_brute_force_over_the_same_trace(model, tok, library, data):
    """Mean raw norms = ||B_i A x|| recomputed densely from the traced layer inputs; LAG(k) choices by loops."""
    seqr.attach(model, library, method="seqr", granularity="token")
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, name=name: inputs.setdefault(name, []).append(a[0].detach()))
             for name, m in model.named_modules() if isinstance(m, seqr.hf.layers.RoutedLinear)]
    try:
        exs = data["sst2"][:3]
        ids = tok([e.text for e in exs], padding=True, return_tensors="pt")
        with torch.no_grad(), seqr.routing(model, trace=True) as tr:
            model(**ids)
    finally:
        for h in hooks:
            h.remove()
        seqr.detach(model)
    tally = ev.TraceTally.for_library(library, reference=True)
    tally.add(tr)
    got = tally.result()
    real = ids["attention_mask"].reshape(-1).bool()
    raw = torch.zeros(len(library), dtype=torch.float64)
    for layer in library.layers:
        x = inputs[layer][0].reshape(-1, inputs[layer][0].shape[-1])[real].double()  # (t, n)
        for i, name in enumerate(library.names):
            A, B = library.adapter_weights(name)
            raw[i] += (x @ A[layer].double().T @ B[layer].double().T).norm(dim=-1).sum()
    D = int(real.sum()) * len(library.layers)
    assert got["decisions"] == D
    for i, name in enumerate(library.names):
        assert got["mean_raw_norm"][name] == pytest.approx(raw[i].item() / D, rel=1e-4)
    d = tr.decisions()
    for k in (1, 2, 3):
        hits = 0
        for norm, arrow in zip(d["norm"].tolist(), d["arrow"].tolist()):
            short = sorted(range(3), key=lambda j: -arrow[j])[:k]
            hits += max(short, key=lambda j: norm[j]) == max(range(3), key=lambda j: norm[j])
        assert got["would_agree"][f"lag@{k}"] == hits


def test_noise_passes_use_noised_mu(doc, model, tok, library, data):
    d, _ = doc
    noise = d["libraries"]["shared-0"]["noise"]
    assert set(noise) == {"0.5@0", "1@0"}
    noisy = ev.noisy(library, 1.0, 0)
    for n in library.names:
        for layer in library.layers:
            s, t = library.stats(n)[layer], noisy.stats(n)[layer]
            assert t.std == s.std and t.mean != s.mean
    assert noisy.path is None and library.stats("sst2") is not noisy.stats("sst2")
    want = reference_acc(model, tok, noisy, data["cola"], {"method": "seqr"})
    assert noise["1@0"]["tasks"]["cola"]["acc"] == pytest.approx(want)


def test_rerun_reuses_passes_and_changed_settings_rerun(doc, model, tok, library, data, monkeypatch, capsys, tmp_path):
    d, first = doc
    out = tmp_path
    (out / files.EVAL_RESULTS).write_bytes((first / files.EVAL_RESULTS).read_bytes())
    calls = []
    real = ev.run_pass
    monkeypatch.setattr(ev, "run_pass", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    again = ev.evaluate(model, tok, {"shared-0": library}, data, cfg(), out_dir=out, progress=False)
    assert calls == [] and again["libraries"] == d["libraries"]
    assert "reusing" in capsys.readouterr().err
    more = ev.evaluate(model, tok, {"shared-0": library}, data, cfg(noise=(0.5, 1.0, 0.25), k=1), out_dir=out,
                       progress=False)
    assert sorted(calls) == ["lag", "seqr"]  # only the new LAG k and the new noise level ran
    assert {"lag@1", "lag@2"} <= set(more["libraries"]["shared-0"]["methods"])
    calls.clear()
    ev.evaluate(model, tok, {"shared-0": library}, {t: v[:5] for t, v in data.items()}, cfg(max_eval=5),
                out_dir=out, progress=False)
    assert "other settings" in capsys.readouterr().err and len(calls) == 7 + 2  # every method, both noise levels


def test_unique_a_library_runs_baselines_and_spectr_is_its_reference(model, tok, data, tmp_path):
    dirs = {}
    for i, task in enumerate(TASKS):
        make_adapter(tmp_path / task, seed=i + 1, a_seed=None, base=tiny_chat_llama(len(tok)))
        calibrate(model, tok, tmp_path / task, task_examples(task, "train", 4), progress=False)
        dirs[task] = tmp_path / task
    lib = seqr.LoraLibrary.from_peft(dirs)
    assert not lib.shared_a
    d = ev.evaluate(model, tok, {"unique-0": lib}, data, cfg(noise=()), progress=False)
    methods = d["libraries"]["unique-0"]["methods"]
    assert set(methods) == {"oracle", "mu", "arrow", "lag@2", "spectr"}  # no seqr without a shared A
    assert all("would_agree" in r for r in methods["spectr"]["tasks"].values())
    assert er.norms(d, "unique-0", "z") is not None


def test_errors_name_the_problem(model, tok, library, data):
    with pytest.raises(ValueError, match="unknown method"):
        cfg(methods=("seqr", "bogus"))
    with pytest.raises(ValueError, match="noise levels"):
        cfg(noise=(-1,))
    with pytest.raises(ValueError, match="oracle needs an adapter named like the task 'mnli'"):
        ev.evaluate(model, tok, {"s": library}, {"mnli": data["rte"]}, cfg(tasks=["mnli"], methods=("oracle",)),
                    progress=False)
    with pytest.raises(ValueError, match="no eval examples for task.*cola"):
        ev.evaluate(model, tok, {"s": library}, {"sst2": data["sst2"]}, cfg(tasks=["sst2", "cola"]), progress=False)


# ---------------------------------------------------------------------------------------------- tables
def fake_doc(accs: dict, base: dict, routing=None) -> dict:
    """A results document with given accuracies: accs[label][method][task], base[task]."""
    ts = list(base)

    def res(a):
        return {"tasks": {t: {"n": 10, "acc": a[t], "correct": round(10 * a[t]), "pred": []} for t in ts}}

    libs = {}
    for label, methods in accs.items():
        libs[label] = {"shared_a": not label.startswith("u"), "adapters": ts, "noise": {},
                       "methods": {m: res(a) for m, a in methods.items()}}
    return {"config": {"tasks": ts, "split": "dev", "max_eval": 10, "seed": 0, "scoring": "choices", "k": 3,
                       "model": "m"}, "base": res(base), "libraries": libs}


def test_normalised_table_mean_and_std_over_libraries_by_hand():
    d = fake_doc({"s0": {"oracle": {"a": 0.8, "b": 0.5}, "mu": {"a": 0.4, "b": 0.5}},
                  "s1": {"oracle": {"a": 0.5, "b": 1.0}, "mu": {"a": 0.5, "b": 0.5}}}, {"a": 0.2, "b": 0.25})
    s = er.accuracy_summary(d)
    assert list(s) == ["base", "mu", "oracle"]
    assert s["mu"]["norm"]["a"] == pytest.approx((0.75, 0.3535533905932738))  # 0.5 and 1.0
    assert s["mu"]["norm"]["avg"][0] == pytest.approx(((0.5 + 1.0) / 2 + (1.0 + 0.5) / 2) / 2)
    assert s["base"]["norm"]["b"][0] == pytest.approx((0.5 + 0.25) / 2)
    assert s["oracle"]["norm"]["avg"] == (1.0, 0.0)
    md = er.markdown(d)
    assert "| mu | 75.0 ± 35.4 | 75.0 ± 35.4 | 75.0 ± 0.0 |" in md


def test_report_and_figures_replot_from_json(doc, tmp_path, capsys):
    d, out = doc
    report, figs = plots.write_report(d, out)
    assert {"accuracy_shared.png", "routing_accuracy_shared.png", "confusion_shared.png", "norms.png",
            "noise.png"} == set(figs)
    for f in figs:
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.read_text()
    assert "Table 3" in text and "Figure 4" in text and "Figure 6" in text and "Table 4" in text
    assert "| seqr | 100.0 | 100.0 |" in text  # own pass and reference pass: the norm-max by construction
    before = text
    report.unlink()
    assert eval_cli.main(["--replot", "--out", str(out)]) == 0
    assert report.read_text() == before and "Table 3" in capsys.readouterr().out


def test_cli_end_to_end_from_a_model_dir_and_jsonl(adapter_dirs, model, tok, tmp_path, capsys):
    mdir, data_dir, out = tmp_path / "model", tmp_path / "data", tmp_path / "out"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    for t in TASKS:
        (data_dir / t).mkdir(parents=True)
        (data_dir / t / "dev.jsonl").write_text("".join(json.dumps(e.__dict__ | {"choices": list(e.choices)}) + "\n"
                                                        for e in task_examples(t, "dev", 4)))
    lib = seqr.LoraLibrary.from_peft(adapter_dirs).save(tmp_path / "lib")
    rc = eval_cli.main(["--library", str(lib), "--model", str(mdir), "--data", str(data_dir), "--max-eval", "3",
                        "--noise", "1", "--out", str(out), "--k", "2"])
    assert rc == 0
    saved = json.loads((out / files.EVAL_RESULTS).read_text())
    assert saved["config"]["max_eval"] == 3 and saved["libraries"]["shared-0"]["path"] == str(lib)
    assert saved["command"].startswith("seqr eval --library ")
    assert all(r["n"] == 3 for r in saved["base"]["tasks"].values())
    assert "accuracy normalised by the oracle" in capsys.readouterr().out
    # a routing variant joins the same results under its own label; the paper-routing tables stay as they were
    rc = eval_cli.main(["--library", str(lib), "--model", str(mdir), "--data", str(data_dir), "--max-eval", "3",
                        "--noise", "", "--out", str(out), "--methods", "seqr", "--normalise", "ratio",
                        "--granularity", "prompt"])
    assert rc == 0
    saved2 = json.loads((out / files.EVAL_RESULTS).read_text())
    var = saved2["libraries"]["shared-0 [normalise=ratio granularity=prompt]"]
    assert list(var["methods"]) == ["seqr"] and saved2["libraries"]["shared-0"] == saved["libraries"]["shared-0"]
    assert [label for label, _ in er.libraries(saved2, "shared")] == ["shared-0"]
    (label, key, cells, own), = er.variant_rows(saved2)
    oracle = saved2["libraries"]["shared-0"]["methods"]["oracle"]["tasks"]
    for t in TASKS:
        if oracle[t]["acc"]:
            assert cells[t] == pytest.approx(var["methods"]["seqr"]["tasks"][t]["acc"] / oracle[t]["acc"])
    assert "## Routing variants" in capsys.readouterr().out
    rc = eval_cli.main(["--library", str(lib), "--model", str(mdir), "--data", str(data_dir), "--max-eval", "3",
                        "--noise", "", "--out", str(out), "--methods", "seqr", "--granularity", "layers"])
    saved3 = json.loads((out / files.EVAL_RESULTS).read_text())
    assert rc == 0 and list(saved3["libraries"]["shared-0 [granularity=layers]"]["methods"]) == ["seqr"]
    rc = eval_cli.main(["--library", str(lib), "--model", str(mdir), "--data", str(data_dir), "--max-eval", "3",
                        "--noise", "", "--out", str(out), "--methods", "seqr", "--granularity", "request",
                        "--probe-depth", "0.5"])
    saved4 = json.loads((out / files.EVAL_RESULTS).read_text())
    req = saved4["libraries"]["shared-0 [granularity=request probe_depth=0.5]"]
    assert rc == 0 and list(req["methods"]) == ["seqr"] and req["routing"]["probe_depth"] == 0.5
    assert saved4["libraries"]["shared-0"] == saved["libraries"]["shared-0"]  # earlier passes kept, not redone
    with pytest.raises(SystemExit) as bad:  # a shortened probe only where a probe runs
        eval_cli.main(["--library", str(lib), "--model", str(mdir), "--data", str(data_dir), "--out", str(out),
                      "--granularity", "prompt", "--probe-depth", "0.5"])
    assert bad.value.code == 2 and "probe_depth applies to" in capsys.readouterr().err


def test_paired_sign_test_by_hand(doc):
    d, _ = doc
    entry = d["libraries"]["shared-0"]
    only_a, only_b, p = er.paired(d, entry, "seqr", "base")
    gold = {t: d["examples"][t]["gold"] for t in TASKS}
    a = [p_ == g for t in TASKS for p_, g in zip(entry["methods"]["seqr"]["tasks"][t]["pred"], gold[t])]
    b = [p_ == g for t in TASKS for p_, g in zip(d["base"]["tasks"][t]["pred"], gold[t])]
    assert (only_a, only_b) == (sum(x and not y for x, y in zip(a, b)), sum(y and not x for x, y in zip(a, b)))
    assert er.paired(d, entry, "seqr", "spectr")[:2] == (0, 0)  # identical choices, identical answers
    fake = {"examples": {"t": {"gold": [0] * 10}}, "config": {"tasks": ["t"]}, "base": None}
    ent = {"methods": {"x": {"tasks": {"t": {"pred": [0] * 9 + [1]}}}, "y": {"tasks": {"t": {"pred": [1] * 10}}}}}
    assert er.paired(fake, ent, "x", "y") == (9, 0, pytest.approx(2 / 2 ** 9))  # 9 discordant pairs, all one way


def test_calibration_variant_recalibrates_each_adapter_on_its_own_task(model, tok, library, adapter_dirs, data,
                                                                       tmp_path):
    from seqr.silo.calibrate import norm_stats, recalibrated
    from seqr.silo.tasks import load_task

    for t in TASKS:  # each silo's train split, as load_task reads it
        (tmp_path / "data" / t).mkdir(parents=True)
        (tmp_path / "data" / t / "train.jsonl").write_text("".join(
            json.dumps(e.__dict__ | {"choices": list(e.choices)}) + "\n" for e in task_examples(t, "train", 6)))
    c = cfg(methods=("seqr",), noise=(), calibration="answer@4")
    doc = ev.evaluate(model, tok, {"shared-0": library}, data, c, out_dir=tmp_path / "out", progress=False,
                      train_data=tmp_path / "data")
    entry = doc["libraries"]["shared-0 [calibration=answer@4]"]
    view = recalibrated(library, model, tok, "answer@4", data_dir=tmp_path / "data", progress=False)
    for t in TASKS:  # the silo's own 4 examples, answer tokens only, through the adapter's original peft dir
        own, _ = norm_stats(model, tok, adapter_dirs[t], load_task(t, "train", data_dir=tmp_path / "data",
                                                                   max_examples=4), tokens="answer", progress=False)
        for layer, s in own.items():
            assert view.stats(t)[layer].mean == pytest.approx(s.mean, rel=1e-6)
            assert view.stats(t)[layer].count == s.count < library.stats(t)[layer].count
        assert entry["methods"]["seqr"]["tasks"][t]["acc"] == pytest.approx(
            reference_acc(model, tok, view, data[t], {"method": "seqr"}))
    assert entry["fingerprint"] != doc["libraries"].get("shared-0", {}).get("fingerprint")
    renamed = seqr.LoraLibrary.from_peft({"silo-a": adapter_dirs["sst2"]})
    with pytest.raises(ValueError, match="cannot recalibrate adapter 'silo-a'"):
        recalibrated(renamed, model, tok, "all@2", data_dir=tmp_path / "data", progress=False)
    for bad in ("words@3", "all@0", "all@x"):
        with pytest.raises(ValueError, match="calibration must be TOKENS"):
            cfg(calibration=bad)


def test_overall_progress_line_counts_passes_and_estimates_the_rest(model, tok, library, data, capsys):
    ev.evaluate(model, tok, {"shared-0": library}, {t: v[:3] for t, v in data.items()},
                cfg(methods=("base", "seqr", "arrow"), noise=(0.5,), max_eval=3), progress=True)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("seqr eval: pass")]
    assert [ln.split(" (")[0] for ln in lines] == [f"seqr eval: pass {k} of at most 4" for k in (1, 2, 3, 4)]
    assert "left" not in lines[0] and all("elapsed, about" in ln and "left" in ln for ln in lines[1:])
    assert "(shared-0 noise 0.5 seqr)" in lines[-1]


def test_conclusion_states_what_the_sign_tests_and_shares_say():
    """The report's conclusion, against counts worked out here: 12 examples, gold all 0; seqr right on 0-9, mu on
    0-1 only (8 discordant, none for mu: p = 2/2^8), arrow right exactly where seqr is (no discordant pair)."""
    ts = ["a"]
    gold = [0] * 12

    def res(right: int, own: int = 0):
        pred = [0] * right + [1] * (12 - right)
        return {"tasks": {"a": {"n": 12, "acc": right / 12, "correct": right, "pred": pred, "decisions": 10,
                                "agree": 10, "counts": {"a": own, "b": 10 - own}}}}

    d = {"config": {"tasks": ts, "split": "dev", "max_eval": 12, "seed": 0, "scoring": "choices", "k": 3,
                    "model": "m"}, "base": res(1), "examples": {"a": {"ids": [str(i) for i in range(12)], "gold": gold}},
         "libraries": {"shared-0": {"shared_a": True, "adapters": ["a", "b"], "noise": {}, "methods": {
             "oracle": res(12), "seqr": res(10, own=7), "mu": res(2), "arrow": res(10, own=5)}}}}
    text = er.markdown(d)
    assert "## Conclusion" in text and "SEQR reaches 83.3% of the oracle's accuracy" in text
    assert "significantly better than base (+9/-0, p = 0.0039), mu (+8/-0, p = 0.0078)" in text
    assert "not significantly different from arrow (+0/-0, p = 1)" in text
    assert "70.0% of its decisions, against 50.0% by chance (1/2)" in text
    assert "## The default router" not in text  # no request-level pass in this document
    d["libraries"][f"shared-0 [granularity={DEFAULT}]"] = {  # the demo's default-router pass: right on 0-10
        "shared_a": True, "adapters": ["a", "b"], "noise": {}, "variant": f"granularity={DEFAULT}",
        "methods": {"seqr": res(11, own=9)}}
    text = er.markdown(d)
    head = text[text.index("## The default router"):text.index("## Conclusion")]
    assert "SEQR deciding once per request" in head and "reaches 91.7% of the oracle's accuracy" in head
    assert "routes 90.0% of its decisions to the input's own adapter" in head
    assert "significantly better than base (+10/-0, p = 0.002), mu (+9/-0, p = 0.0039)" in head
    assert "not significantly different from per-token SEQR (+1/-0, p = 1), arrow (+1/-0, p = 1)" in head
    lo, hi = (float(x) for x in head.split("95% bootstrap interval ")[1].split(")")[0].split(" – "))
    assert lo <= 91.7 <= hi and hi <= 100.0  # resampled 12 examples: never above the oracle's every-one-right
    assert "SEQR per token (the paper) reaches 83.3%" in text
    assert "to one adapter" not in head  # one task: its own adapter taking 90% is no warning


def test_the_default_router_section_warns_when_one_adapter_takes_every_request():
    """Two tasks whose every request-level decision went to adapter "a": the report says the choice ignored the
    input (the demo's tiny adapters did this); spread over both adapters, it says nothing of the kind."""
    ts, gold = ["a", "b"], [0] * 4

    def res(right: int, counts: dict):
        return {"tasks": {t: {"n": 4, "acc": right / 4, "correct": right, "pred": [0] * right + [1] * (4 - right),
                              "decisions": 10, "agree": 10, "counts": counts[t]} for t in ts}}

    spread = {"a": {"a": 6, "b": 4}, "b": {"a": 3, "b": 7}}
    d = {"config": {"tasks": ts, "split": "dev", "max_eval": 4, "seed": 0, "scoring": "choices", "k": 2, "model": "m"},
         "base": res(1, spread), "examples": {t: {"ids": ["0", "1", "2", "3"], "gold": gold} for t in ts},
         "libraries": {"shared-0": {"shared_a": True, "adapters": ["a", "b"], "noise": {}, "methods": {
             "oracle": res(4, spread), "seqr": res(3, spread)}},
             f"shared-0 [granularity={DEFAULT}]": {"shared_a": True, "adapters": ["a", "b"], "noise": {},
                                                  "variant": f"granularity={DEFAULT}",
                                                  "methods": {"seqr": res(3, spread)}}}}
    assert "to one adapter" not in er.markdown(d) and "(chance 50.0%)" in er.markdown(d)
    d["libraries"][f"shared-0 [granularity={DEFAULT}]"]["methods"]["seqr"] = res(3, {t: {"a": 10} for t in ts})
    assert "every request of every task to one adapter, a:" in er.markdown(d)
