"""scripts/paper_library.py and scripts/paper_eval.py (issue 28) on a tiny chat model: the store in git is what
resumes, sweeps widen at an edge, snapshots rebuild bit-for-bit, eval passes are reused, pieces get committed."""
from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch

from seqr import LoraLibrary
from seqr.eval.evaluate import EvalConfig
from seqr.hf import dtypes
from seqr.store import files
from test_evaluate import task_examples
from tiny_chat import save_chat_model, write_task_dir

ROOT = Path(__file__).parents[1]
AUTO_DTYPE = dtypes.name(dtypes.choose("auto")[0])  # the machine's pick: bfloat16 where native, else float32


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


pl, pe = _script("paper_library"), _script("paper_eval")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    save_chat_model(root / "model")
    write_task_dir(root / "data", lambda t, split, n: [e.__dict__ | {"choices": list(e.choices)}
                                                       for e in task_examples(t, split, n)], ("sst2", "cola"),
                   sizes=(("train", 16), ("dev", 6)))
    return root


def _args(root, *extra):
    return ["--data", str(root / "data"), "--model", str(root / "model"), "--artifacts", str(root / "art"),
            "--work", str(root / "work"), "--tasks", "sst2", "cola", "--checkpoints", "1,2", "--rank", "4", *extra]


def _pt(lr, acc, lp=None):
    return {"lr": lr, "accuracy": acc, "gold_logprob": lp}


def test_sweep_choice_and_widening():
    pts = [_pt(5e-4, 0.8, -0.5), _pt(1e-3, 0.8, -0.4), _pt(2e-3, 0.7, -0.1)]
    assert pl.best_point(pts, None)["lr"] == 1e-3  # tie on accuracy: the better gold log-probability
    assert pl.next_rate(pts, None) is None  # best inside the range: no widening
    pts = [_pt(5e-4, 0.7), _pt(1e-3, 0.8), _pt(2e-3, 0.9)]
    assert pl.next_rate(pts, None) == 4e-3  # best at the top edge: one rate beyond it
    assert pl.next_rate(pts + [_pt(4e-3, 0.95), _pt(8e-3, 0.97)], None) is None  # at most WIDEN per side
    old = [_pt(5e-4, 0.86), _pt(1e-3, 0.86), _pt(2e-3, 0.81)]  # a committed sweep without log-probabilities
    assert pl.best_point(old, 1e-3)["lr"] == 1e-3 and pl.next_rate(old, 1e-3) is None
    assert pl.best_point(old, None)["lr"] == 5e-4 and pl.next_rate(old, None) == 2.5e-4


def test_build_commits_pieces_resumes_from_the_store_and_rebuilds_snapshots(setup, monkeypatch, capsys):
    monkeypatch.setattr(pl, "OLD_SWEEPS", setup / "none.json")
    assert pl.main(_args(setup)) == 0
    art = setup / "art"
    lib = LoraLibrary.load(art)
    assert sorted(lib.names) == ["cola", "sst2"] and lib.storage_dtype == "float16" and lib.has_centroids
    assert not lib.uncalibrated
    for step in (1, 2):
        assert sorted(LoraLibrary.load(art / "checkpoints" / f"step-{step}").names) == ["cola", "sst2"]
    run = json.loads((art / "runs" / "sst2.json").read_text())
    assert run["steps"] == 4 and run["epochs"] == 2 and len(run["loss"]) == 4 and run["base_dtype"] == AUTO_DTYPE
    assert {"lr", "sweep", "tokens_per_s", "wall_seconds", "machine", "device"} <= set(run)
    sweep = json.loads((art / "sweeps" / "sst2.json").read_text())
    assert sweep["lr"] == run["lr"] and len(sweep["points"]) >= 3 and "base" in sweep
    snap = next((art / "checkpoints" / "step-1" / "adapters").glob("cola-*")).read_bytes()

    boom = lambda *a, **k: (_ for _ in ()).throw(AssertionError("should have been skipped"))  # noqa: E731
    monkeypatch.setattr(pl, "train", boom)
    assert pl.main(_args(setup)) == 0  # everything is in the store: nothing to train
    assert "to do: []" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(pl, "OLD_SWEEPS", setup / "none.json")

    LoraLibrary.load(art / "checkpoints" / "step-1").remove("cola")  # a snapshot the store lacks
    weights = next((art / "adapters").glob("cola-*")).read_bytes()
    assert pl.main(_args(setup, "--snapshots-only")) == 0
    assert next((art / "checkpoints" / "step-1" / "adapters").glob("cola-*")).read_bytes() == snap  # bit for bit
    assert next((art / "adapters").glob("cola-*")).read_bytes() == weights  # the final adapter untouched
    assert json.loads((art / "runs" / "cola.json").read_text())["snapshots"]["1"]["rerun"]


def test_unique_a_build_trains_and_stores_each_adapters_own_a(setup):
    """--unique-a: ordinary LoRA (A trained, stored per adapter) into its own store, swept afresh, no snapshots."""
    args = _args(setup, "--unique-a")
    args[args.index("--artifacts") + 1], args[args.index("--work") + 1] = str(setup / "uniq"), str(setup / "uwork")
    args.remove("--checkpoints"), args.remove("1,2")
    assert pl.main(args) == 0
    lib = LoraLibrary.load(setup / "uniq")
    assert sorted(lib.names) == ["cola", "sst2"] and not lib.shared_a and lib.storage_dtype == "float16"
    assert not lib.uncalibrated and not (setup / "uniq" / "checkpoints").exists()
    layer = next(iter(lib.layers))
    a_sst2, a_cola = lib.adapter_weights("sst2")[0][layer], lib.adapter_weights("cola")[0][layer]  # (r, n), apart
    assert a_sst2.shape == a_cola.shape and not torch.equal(a_sst2, a_cola)
    run = json.loads((setup / "uniq" / "runs" / "sst2.json").read_text())
    assert run["shared_a"] is False and run["checkpoints"] == [] and run["steps"] == 4
    assert all("source" not in p for p in json.loads((setup / "uniq" / "sweeps" / "sst2.json").read_text())["points"])


def test_eval_runs_each_pass_once_in_float32(setup, monkeypatch, capsys):
    if not (setup / "art" / files.MANIFEST).exists():
        monkeypatch.setattr(pl, "OLD_SWEEPS", setup / "none.json")
        pl.main(_args(setup))
    args = ["--data", str(setup / "data"), "--model", str(setup / "model"), "--library", str(setup / "art"),
            "--out", str(setup / "ev"), "--stage", "main"]
    assert pe.main(args) == 0
    doc = json.loads((setup / "ev" / "main" / files.EVAL_RESULTS).read_text())
    assert doc["config"]["dtype"] == "float32" and doc["config"]["max_eval"] is None and doc["base"]
    assert set(doc["libraries"]["shared-0"]["methods"]) == {"oracle", "seqr", "mu", "arrow", "centroid",
                                                           "centroid-seqr@2", "lag@2"}
    import seqr.eval.evaluate

    boom = lambda *a, **k: (_ for _ in ()).throw(AssertionError("should have been reused"))  # noqa: E731
    monkeypatch.setattr(seqr.eval.evaluate, "run_pass", boom)
    assert pe.main(args) == 0
    with pytest.raises(SystemExit) as e:
        pe.main(args[:4] + ["--library", str(setup / "nowhere")])
    assert e.value.code == 2 and "no library there yet" in capsys.readouterr().err


def _git_repo(path, monkeypatch) -> None:
    """An empty git repository at `path`, made the working directory."""
    monkeypatch.chdir(path)
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@t"], ["git", "config", "user.name", "t"]):
        subprocess.run(cmd, check=True)


def test_committer_commits_only_the_pieces_it_names(tmp_path, monkeypatch):
    _git_repo(tmp_path, monkeypatch)
    Path("piece.json").write_text("{}")
    Path("other.txt").write_text("not mine")
    pl.git_committer(True)("sweep x", [Path("piece.json")])
    pl.git_committer(True)("nothing new", [Path("piece.json")])  # no change: no empty commit
    log = subprocess.run(["git", "log", "--format=%s", "--name-only"], capture_output=True, text=True).stdout
    assert log.split() == ["Issue", "28:", "sweep", "x", "piece.json"]
    pl.git_committer(False)("off", [Path("other.txt")])
    assert "other.txt" not in subprocess.run(["git", "ls-files"], capture_output=True, text=True).stdout


def test_eval_commits_only_its_results_file(tmp_path, monkeypatch):
    _git_repo(tmp_path, monkeypatch)
    Path("eval.json").write_text("{}")
    Path("staged.txt").write_text("someone else's")
    subprocess.run(["git", "add", "staged.txt"], check=True)  # staged by another hand: must stay out of the commit
    pe.commit_only(Path("eval.json"), "Issue 28: eval main seqr pass")
    pe.commit_only(Path("eval.json"), "again")  # unchanged: no empty commit
    log = subprocess.run(["git", "log", "--format=%s", "--name-only"], capture_output=True, text=True).stdout
    assert log.split() == ["Issue", "28:", "eval", "main", "seqr", "pass", "eval.json"]
    assert "staged.txt" in subprocess.run(["git", "diff", "--cached", "--name-only"], capture_output=True, text=True).stdout


def test_report_from_every_stage(setup, monkeypatch, tmp_path):
    """Every stage on the tiny library (snapshots at steps 1 and 2), then scripts/paper_report.py's report."""
    if not (setup / "art" / files.MANIFEST).exists():
        monkeypatch.setattr(pl, "OLD_SWEEPS", setup / "none.json")
        pl.main(_args(setup))
    monkeypatch.setattr(pe, "STEPS", (1, 2))
    monkeypatch.setattr(pe, "NOISE_LEVELS", (0.5, 1.0))
    monkeypatch.setattr(pe, "EXACT_N", 4)
    monkeypatch.setattr(pe, "NOISE_N", 4)
    monkeypatch.setattr(pe, "CHECKPOINT", 2)
    if not (setup / "uniq" / files.MANIFEST).exists():
        test_unique_a_build_trains_and_stores_each_adapters_own_a(setup)
    base = ["--data", str(setup / "data"), "--model", str(setup / "model"), "--library", str(setup / "art"),
            "--unique-library", str(setup / "uniq"), "--out", str(setup / "ev")]
    assert pe.main(base + ["--stage", "all"]) == 0
    pr = _script("paper_report")
    monkeypatch.setattr(pr, "final_steps", lambda: 4)
    text = pr.write(setup / "ev").read_text()
    summary = json.loads((setup / "ev" / "summary.json").read_text())
    assert set(summary) == {"learned", "seqr_vs", "exactness", "noise", "routability", "variants", "shared_vs_unique",
                            "variants_per_task", "checkpoint"}
    uniq = summary["shared_vs_unique"]  # Table 2: own adapters each way, routers each way, the native setting
    assert set(uniq["oracle"]) == {"sst2", "cola"} and set(uniq["methods"]) == set(pe.UNIQUE) - {"lag"} | {"lag@2"}
    assert set(uniq["native"]) == set(uniq["methods"]) - {"oracle"}
    main_doc, uniq_doc = (json.loads((setup / "ev" / st / files.EVAL_RESULTS).read_text()) for st in ("main", "unique"))
    for t, r in uniq["oracle"].items():  # each side is its own document's own-adapter pass, example for example
        ps, pu = (d["libraries"][lb]["methods"]["oracle"]["tasks"][t] for d, lb in ((main_doc, "shared-0"),
                                                                                   (uniq_doc, "unique-0")))
        gold = main_doc["examples"][t]["gold"]
        assert (r["shared"], r["unique"]) == (ps["acc"], pu["acc"])
        assert r["only_shared"] == sum(a == g != b for a, b, g in zip(ps["pred"], pu["pred"], gold))
    assert set(summary["variants"]) == {EvalConfig(tasks=["_"], **v).variant() for v in pe.VARIANTS}
    for v in summary["variants"].values():  # each variant tested against every main method on the same examples
        assert set(v["vs"]) == {"base", "oracle", "seqr", "mu", "arrow", "lag@2", "centroid", "centroid-seqr@2"}
    assert set(summary["routability"]) == {"step-1", "step-2", "final"}
    ckpt_doc = json.loads((setup / "ev" / "checkpoint" / files.EVAL_RESULTS).read_text())
    one = {EvalConfig(tasks=["_"], **p[1]).variant() for p in pe.CHECKPOINT_PASSES if isinstance(p, tuple)}
    assert one == {f"granularity={g}" for g in ("request", "layers", "request-vote")}
    assert set(ckpt_doc["libraries"]) == {"step-2"} | {f"step-2 [{v}]" for v in one} and not ckpt_doc.get("base")
    ckpt = summary["checkpoint"]
    assert set(ckpt["variants"]) == one and set(ckpt["per_task"]["variants"]) == one
    for v in one:  # against every method of the snapshot, the untouched model's pass taken from the main stage
        assert set(ckpt["variants"][v]["vs"]) == {"base", "oracle", "seqr", "mu", "arrow", "lag@2", "centroid",
                                                   "centroid-seqr@2"}
    snap, gold = ckpt_doc["libraries"]["step-2"]["methods"], ckpt_doc["examples"]
    for t, r in ckpt["per_task"]["tasks"].items():  # per task, the mode against per-token SEQR, counted from preds
        mode = ckpt_doc["libraries"]["step-2 [granularity=layers]"]["methods"]["seqr"]["tasks"][t]["pred"]
        tok = snap["seqr"]["tasks"][t]["pred"]
        g = gold[t]["gold"]
        assert r["vs"]["granularity=layers"]["only_variant"] == sum(a == y != b for a, b, y in zip(mode, tok, g))
        assert r["vs"]["granularity=layers"]["only_other"] == sum(b == y != a for a, b, y in zip(mode, tok, g))
        assert r["acc"]["oracle"] == snap["oracle"]["tasks"][t]["acc"]
        assert r["acc"]["base"] == main_doc["base"]["tasks"][t]["acc"]  # the main stage's untouched pass
    every = {EvalConfig(tasks=["_"], **v).variant() for v in pe.VARIANTS}
    assert set(summary["variants_per_task"]["variants"]) == every
    assert set(summary["seqr_vs"]) == {"base", "mu", "arrow", "lag@2", "centroid", "centroid-seqr@2"}
    assert set(summary["exactness"]) == {"spectr", "naive"} and set(summary["noise"]) == {"0", "0.5", "1"}
    for section in ("Did each adapter learn", "Does SEQR beat", "Exactness", "under noise", "Routability vs",
                    "Routing variants", "Against the default router (SEQR, granularity=request-vote)",
                    "shared frozen A cost",
                    "one-decision modes on the step-2 snapshot", "Per-token SEQR here", "granularity=layers vs seqr"):
        assert section in text
    assert "Not yet evaluated" not in text
    assert "Passes still to run on this snapshot" not in text  # every main method is in, whatever k allowed (2)
    for png in ("main/accuracy_shared.png", "noise/noise.png", "routability_vs_training.png", "variants.png"):
        assert (setup / "ev" / png).stat().st_size > 1000
    steps = json.loads((setup / "ev" / "steps" / files.EVAL_RESULTS).read_text())  # SEQR's step passes pending
    for e in steps["libraries"].values():
        e["methods"].pop("seqr")
        e["noise"] = {}
    (tmp_path / "steps").mkdir()
    (tmp_path / "steps" / files.EVAL_RESULTS).write_text(json.dumps(steps))
    text = pr.write(tmp_path).read_text()
    assert "own adapters so far" in text and "| step-1 |" in text and "| final |" in text
    assert "Not yet evaluated: main, exact, variants, unique, checkpoint, noise" in text


def test_finished_passes_name_base_methods_and_noise(tmp_path):
    assert pe.finished_passes(tmp_path / "none.json") == set()
    f = tmp_path / "eval.json"
    f.write_text(json.dumps({"base": {"tasks": {}}, "libraries": {
        "shared-0": {"methods": {"seqr": {}, "lag@3": {}}, "noise": {"0.5@0": {}}}, "step-12": {"methods": {}, "noise": {}}}}))
    assert pe.finished_passes(f) == {"base", "shared-0 seqr", "shared-0 lag@3", "shared-0 0.5@0"}


def test_report_says_what_was_tried_for_a_task_that_did_not_learn():
    pr = _script("paper_report")
    learned = {"tasks": {"sst2": {"learned": True, "p": 1e-9}, "cola": {"learned": False, "p": 0.5}}}
    run = {"steps": 250, "loss": [5.7] + [1.0] * 149 + [0.2] * 50}
    training = {"tasks": [{"task": t, "sweep": {"rates": {"0.002": 0.7, "0.0005": 0.78}, "base_accuracy": 0.78,
                                                "chosen_lr": 0.0005}, "run": run} for t in ("sst2", "cola")]}
    lines = pr.tried_lines(learned, training)
    rows = [ln for ln in lines if ln.startswith("| ") and "task" not in ln]
    assert rows == ["| cola | 78 | 0.0005: 78, 0.002: 70 | 0.0005 | 250 | 5.70 | 0.20 | 0.5 |"]  # only the stuck one
    assert pr.tried_lines(learned, None) == [] and pr.tried_lines({"tasks": {"sst2": {"learned": True}}}, training) == []

