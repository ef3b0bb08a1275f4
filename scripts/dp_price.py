"""Issue 33's price of privacy on the paper-budget library: SEQR's accuracy and own-adapter share when every silo
releases its calibration (epsilon, DELTA)-differentially private, for EPSILONS (and no DP), SIZES calibration
examples, SEEDS repeats of the noise; every pass committed as it finishes, so a fresh clone resumes.

Usage: SEQR_TASK_DATA=../shared/data/tasks python scripts/dp_price.py [run|report] [--commit] [--device cuda]

Per silo and calibration size n (each on its own training examples, the first n of a seeded order):
- the clip bound C by the public rule (seqr.silo.private.public_clip): the largest per-example row norm on
  PUBLIC_N training examples of another task (PUBLIC[task]), data the silo may publish;
- the clipped per-example sums (dp_sums), once, kept with the clip bounds as small JSON under OUT/silos (committed
  with --commit, so a fresh clone does not recompute them): they do not depend on epsilon or the seed; each (epsilon, seed)
  then only draws the Gaussian noise (dp_release, seeded here so the study repeats; a real release draws from OS
  entropy), centroids withheld so the whole budget goes to mu and sigma;
- epsilon = inf: the ordinary calibration (no DP) on the same n examples.
The centroid routers (CENTROID_METHODS) get the same grid from a second release per pass, the stats and the centroids
together (two composed Gaussian releases under one (epsilon, DELTA), seqr.core.privacy): the public centre p and C_c
from the same public sample, each silo's clipped per-example mean inputs (less p) summed once per n (kept as float16
safetensors, the sum over n; its rounding is far below the noise), and beside them the ordinary token-mean centroids
of the same pass for epsilon = inf.
Each library is evaluated with SEQR on the steps stage's EVAL_N dev examples per task, whose oracle pass
(docs/results/paper_library/steps) normalises the accuracy; the report adds bootstrap intervals, the spread over
seeds, and the figure beside the noise-on-mu curve of the same examples.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

from seqr.eval.evaluate import EvalConfig, evaluate, load_data
from seqr.hf.models import load_model
from seqr.silo.calibrate import calibrate
from seqr.silo.calibrate import traced_batches
from seqr.silo.private import ClippedSums, dp_release, dp_sums, example_rows, layer_row, public_clip
from seqr.silo.tasks import load_task
from seqr.store import files
from seqr.store.library import LoraLibrary
from seqr.core import registry
from seqr.core.privacy import DPConfig, clipped_sum
from seqr.core.stats import NormStats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from longrun import commit_only, data_and_device  # noqa: E402

LIBRARY = Path("artifacts/paper-library")
OUT = Path("docs/results/dp_price")
EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0)
DELTA = 1e-5
SIZES = (200, 1000)
SEEDS = (0, 1, 2)
EVAL_N = 100  # the steps stage's examples (seed 0): its oracle pass normalises
PUBLIC_N = 16
SEED = 0
CENTROID_METHODS = ("centroid", "centroid-seqr")  # the centroid routers (centroid-seqr@3), on their release
RELEASES = {"stats": ("seqr",), "centroids": CENTROID_METHODS}  # release -> the routers evaluated on it


def public_task(task: str, tasks: list[str]) -> str:
    """Another silo's task whose training examples stand for public data (never the silo's own)."""
    return next(t for t in ("sst2", "cola", *tasks) if t != task)


def label(n: int, eps: float, seed: int, release: str = "stats") -> str:
    core = f"n={n} eps={'inf' if math.isinf(eps) else f'{eps:g}'} seed={seed}"
    return core if release == "stats" else f"{core} release={release}"


def plan() -> list[tuple[int, float, int, str]]:
    """Every (calibration examples, epsilon, seed, release) pass in the order they run: SEQR's (the stats alone)
    first, then the centroid routers'; per size no-DP first."""
    return [(n, eps, seed, release) for release in RELEASES for n in SIZES for eps in (math.inf, *EPSILONS)
            for seed in ((SEED,) if math.isinf(eps) else SEEDS)]


class Silos:
    """Each silo's exported adapter dir, clip bound and clipped sums per n (computed once, kept in WORK)."""

    def __init__(self, ctx: dict, lib: LoraLibrary):
        self.ctx, self.lib, self.work = ctx, lib, Path(ctx["work"])
        self.kept = Path(ctx["out"]) / "silos"  # clip bounds and clipped sums, small JSON kept with the results
        self.dirs = {t: lib.to_peft(t, self.work / "adapters" / t) for t in lib.names}

    def examples(self, task: str, n: int):
        return load_task(task, "train", data_dir=self.ctx["data"], max_examples=n, seed=SEED)

    def _public(self, task: str):
        return load_task(public_task(task, self.lib.names), "train", data_dir=self.ctx["data"],
                         max_examples=PUBLIC_N, seed=SEED)

    def clip(self, task: str) -> float:
        """C by the public rule, on PUBLIC_N examples of another silo's task."""
        f = self.kept / "clip" / f"{task}.json"
        if not f.exists():
            c = public_clip(self.ctx["model"], self.ctx["tok"], self.dirs[task], self._public(task), progress=False)
            self._keep(f, {"clip": c.clip, "public_task": public_task(task, self.lib.names),
                           "public_examples": PUBLIC_N}, f"clip bound of {task}")
        return float(files.read_json(f, "clip bound")["clip"])

    def centre(self, task: str) -> tuple[float, dict[str, torch.Tensor]]:
        """(C_c, the centre p) by the public rule: the mean of the public sample's centroid rows (kept in float16,
        and used as kept) and the largest distance of one of them from it."""
        f = self.kept / "clip-centroids" / f"{task}.json"
        if not f.exists():
            b = public_clip(self.ctx["model"], self.ctx["tok"], self.dirs[task], self._public(task), centroids=True,
                            progress=False)
            self._keep(f.with_suffix(".safetensors"), {k: v.half() for k, v in b.center.items()},
                       f"public centre of {task}'s centroid rows")
            self._keep(f, {"centroid_clip": b.centroid_clip, "public_task": public_task(task, self.lib.names),
                           "public_examples": PUBLIC_N}, f"centroid clip bound of {task}")
        p = files.read_tensors(f.with_suffix(".safetensors"), "public centre")
        return float(files.read_json(f, "centroid clip bound")["centroid_clip"]), {k: v.double() for k, v in p.items()}

    def sums(self, task: str, n: int) -> ClippedSums:
        f = self.kept / f"sums-{n}" / f"{task}.json"
        if not f.exists():
            s = dp_sums(self.ctx["model"], self.ctx["tok"], self.dirs[task], self.examples(task, n), self.clip(task),
                        progress=False)
            self._keep(f, {"examples": s.examples, "layers": {k: v.tolist() for k, v in s.stats.items()}},
                       f"clipped sums of {task}, n={n}")
        d = files.read_json(f, "clipped sums")
        return ClippedSums({k: torch.tensor(v, dtype=torch.float64) for k, v in d["layers"].items()}, None,
                           d["examples"])

    def ordinary(self, task: str, n: int) -> dict[str, NormStats]:
        """One silo's release without DP on its first n examples (the eps=inf reference), kept beside the results
        like the sums (what calibrate writes into the adapter dir): a fresh clone resumes without recomputing it."""
        f = self.kept / f"calib-{n}" / f"{task}.json"
        if not f.exists():
            calibrate(self.ctx["model"], self.ctx["tok"], self.dirs[task], self.examples(task, n), seed=SEED,
                      progress=False, centroids=False)
            self._keep(f, files.read_json(self.dirs[task] / files.STATS_FILE, "calibration"),
                       f"ordinary calibration of {task}, n={n}")
        d = files.read_json(f, "ordinary calibration")
        return {layer: NormStats.from_dict(v) for layer, v in d["layers"].items()}

    def centroids(self, task: str, n: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(layer -> the clipped sum of the first n examples' mean inputs, layer -> their ordinary token-mean
        centroid), from one traced pass kept beside the results (float16; the sum stored over n)."""
        f = self.kept / f"centroids-{n}" / f"{task}.safetensors"
        if not f.exists():
            clipped, plain = centroid_pass(self.ctx["model"], self.ctx["tok"], self.dirs[task],
                                           self.examples(task, n), *self.centre(task))
            half = {**{f"dp/{k}": (v / n).half() for k, v in clipped.items()},
                    **{f"plain/{k}": v.half() for k, v in plain.items()}}  # (n_layer,) each
            if bad := [k for k, v in half.items() if not torch.isfinite(v).all()]:
                raise ValueError(f"centroids of {task} overflow float16 in {bad[:3]}")
            self._keep(f, half, f"clipped and ordinary centroids of {task}, n={n}")
        t = files.read_tensors(f, "centroid sums")
        return ({k[3:]: v.double() * n for k, v in t.items() if k.startswith("dp/")},
                {k[6:]: v.float() for k, v in t.items() if k.startswith("plain/")})

    def _keep(self, f: Path, obj: dict, what: str) -> None:
        """Write one silo's clip bound or pre-noise sums (JSON; tensors as safetensors) beside the results (and
        commit it with --commit): a fresh clone resumes without recomputing them."""
        f.parent.mkdir(parents=True, exist_ok=True)
        if f.suffix == ".safetensors":
            files.atomic_write_bytes(f, files.tensors_to_bytes(obj))
        else:
            files.atomic_write_json(f, obj)
        if self.ctx["commit"]:
            commit_only(f, f"Issue 33: price of privacy, {what}")

    def release(self, n: int, eps: float, seed: int, release: str = "stats") -> tuple[dict, dict | None]:
        """({task: per-layer NormStats}, {task: layer -> centroid} or None) every silo releases for this pass:
        the stats alone, or the stats and the centroids together (`release="centroids"`)."""
        cents = release == "centroids"
        stats, means = {}, ({} if cents else None)
        for i, task in enumerate(self.lib.names):
            if math.isinf(eps):  # the ordinary release on the same n examples
                stats[task] = self.ordinary(task, n)
                if cents:
                    means[task] = self.centroids(task, n)[1]
                continue
            public = f"{PUBLIC_N} public examples of {public_task(task, self.lib.names)}"
            cc, p = self.centre(task) if cents else (None, None)
            g = DPConfig(eps, DELTA, self.clip(task), cc, clip_rule=f"largest row norm on {public}",
                         centroid_center=p, center_rule=f"the mean of {public}").guarantee(n, centroids=cents)
            sums = self.sums(task, n)
            sums = replace(sums, centroids=self.centroids(task, n)[0], center=p) if cents else sums
            gen = torch.Generator().manual_seed(1000 * seed + i)  # the study's repeats (a real release: OS entropy)
            stats[task], m = dp_release(sums, g, gen)
            if cents:
                means[task] = m
        return stats, means


def centroid_pass(model, tok, adapter_dir: Path, examples, centroid_clip: float,
                  center: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """One traced pass over a silo's examples: (layer -> its slice of sum_e clip(c_e - p, C_c), c_e the example's
    mean inputs and p the public `center`, as seqr.silo.private.dp_sums sums them; layer -> the mean input over all
    real tokens, the ordinary centroid seqr.silo.calibrate computes)."""
    clipped, sums, tokens = 0.0, {}, 0
    for b in traced_batches(model, tok, adapter_dir, examples, batch_size=8, progress=False, scoring="choices",
                            inputs=True):
        clipped = clipped + clipped_sum(example_rows(b)[1] - layer_row(center, b.inputs), centroid_clip)  # (sum n,)
        for layer, x in b.inputs.items():
            sums[layer] = sums.get(layer, 0.0) + x.sum(0)  # (n,)
        tokens += int(b.tokens.sum())
    parts = clipped.split([v.shape[0] for v in sums.values()])
    return dict(zip(sums, parts)), {k: v / max(tokens, 1) for k, v in sums.items()}


def run(ctx: dict, commit: bool) -> None:
    lib = LoraLibrary.load(ctx["library"])
    silos = Silos(ctx, lib)
    cfg = EvalConfig(tasks=lib.names, max_eval=EVAL_N, noise=(), model=ctx["name"], methods=("seqr",))
    data = load_data(cfg.tasks, cfg.split, data_dir=ctx["data"], max_eval=EVAL_N, seed=cfg.seed)
    out = Path(ctx["out"])
    for n, eps, seed, release in plan():
        name, methods = label(n, eps, seed, release), RELEASES[release]
        results = out / files.EVAL_RESULTS  # re-read each pass: evaluate rewrites it
        if results.exists() and _finished(files.read_json(results, "price-of-privacy results"),
                                          (n, eps, seed, release)):
            continue
        print(f"[dp-price] {name}", file=sys.stderr, flush=True)
        stats, means = silos.release(n, eps, seed, release)
        evaluate(ctx["model"], ctx["tok"], {name: lib.with_stats(stats, centroids=means)}, data,
                 replace(cfg, methods=methods), out_dir=out)
        if commit:
            commit_only(out / files.EVAL_RESULTS, f"Issue 33: price of privacy, {name} {', '.join(methods)} pass")


# ---------------------------------------------------------------------------------------------- report
STEPS = Path("docs/results/paper_library/steps")


def summarise(doc: dict, steps: dict) -> dict:
    """{router: {n: {eps: {"norm", "ci", "seeds": [norm per seed], "own"}}}}: each router's accuracy over the steps
    stage's final oracle (same examples, checked), averaged over the tasks and the seeds; the 95% bootstrap interval
    resamples the examples (the seeds averaged within each draw)."""
    from seqr.eval import bootstrap, report as er

    for t in er.tasks(doc):
        if doc["examples"][t]["ids"] != steps["examples"][t]["ids"]:
            raise ValueError(f"task {t!r}: the DP passes and the steps stage evaluated different examples")
    oracle_entry, idx, out = steps["libraries"]["final"], bootstrap.resample(steps), {}
    groups: dict = {}
    for lb, e in doc["libraries"].items():
        kv = dict(part.split("=") for part in lb.split())
        for method, res in e["methods"].items():
            groups.setdefault((method, int(kv["n"]), float(kv["eps"])), []).append(res)
    ts = er.tasks(doc)
    for (method, n, eps), passes in sorted(groups.items(), key=lambda g: (_router_order(g[0][0]), *g[0][1:])):
        norms = []
        for res in passes:
            entry = {**oracle_entry, "methods": {**oracle_entry["methods"], "_dp": res}}
            norms.append(sum(er.normalised(steps, entry, "_dp", t) for t in ts) / len(ts))
        draws = bootstrap.norm_draws(steps, oracle_entry, passes, idx)
        own = [er.pass_own_share(r, ts) for r in passes]
        out.setdefault(method, {}).setdefault(n, {})[eps] = {
            "norm": sum(norms) / len(norms), "seeds": norms, "ci": bootstrap.interval(draws["avg"], bootstrap.LEVEL),
            "own": None if None in own else sum(own) / len(own)}
    return out


def _router_order(key: str) -> int:
    """Where a stored method key (centroid-seqr@3) comes in RELEASES' order."""
    order = [m for methods in RELEASES.values() for m in methods]
    name = key.partition("@")[0]
    return order.index(name) if name in order else len(order)


def _finished(doc: dict, key: tuple[int, float, int, str]) -> bool:
    """Whether the results hold every router's pass of this (n, epsilon, seed, release), as evaluate keys them."""
    entry = doc["libraries"].get(label(*key))
    k = min(doc["config"]["k"], len(entry["adapters"])) if entry else 0
    return entry is not None and all(registry.get(m).key(k) in entry["methods"] for m in RELEASES[key[3]])


def _eps(e: float) -> str:
    return "inf" if math.isinf(e) else f"{e:g}"


def _table(res: dict) -> list[str]:
    rows = ["| router | calibration examples | epsilon | accuracy / oracle % | 95% CI | per seed | own share % |",
            "|---|---:|---:|---:|---|---|---:|"]
    for router, by_n in res.items():
        for n, r in by_n.items():
            for e, v in r.items():
                ci = f"{100 * v['ci'][0]:.1f}-{100 * v['ci'][1]:.1f}" if v["ci"] else "-"
                own = "-" if v["own"] is None else f"{100 * v['own']:.1f}"
                rows.append(f"| {router} | {n} | {'no DP' if math.isinf(e) else f'{e:g}'} | {100 * v['norm']:.1f} | "
                            f"{ci} | {', '.join(f'{100 * x:.1f}' for x in v['seeds'])} | {own} |")
    return rows


def report(out: Path) -> Path:
    from seqr.eval import plots, report as er

    doc = files.read_json(out / files.EVAL_RESULTS, "price-of-privacy results")
    steps = files.read_json(STEPS / files.EVAL_RESULTS, "steps results")
    res = summarise(doc, steps)
    files.atomic_write_json(out / "summary.json", {router: {str(n): {_eps(e): v for e, v in r.items()}
                                                            for n, r in by_n.items()} for router, by_n in res.items()})
    final = steps["libraries"]["final"]
    noise = er.noise_summary({**steps, "libraries": {"shared-0": final}}) if final.get("noise") else {}
    fig = plots.privacy(res, noise, out)
    lines = ["# The price of privacy: routing with differentially private calibration", "",
             f"Paper-budget library, {EVAL_N} dev examples per task (the steps stage's, whose oracle normalises), "
             f"delta = {DELTA:g}, clip bounds from {PUBLIC_N} public examples of another task. SEQR: the stats "
             "released alone (centroids withheld). The centroid routers: the stats and the centroids released "
             "together under the same (epsilon, delta), the centroid rows clipped around the public sample's mean "
             "row. Made by `python scripts/dp_price.py`.", "",
             *_table(res), "", f"![price of privacy]({fig})", ""]
    keys = plan()
    missing = [label(*key) for key in keys if not _finished(doc, key)]
    if missing:  # the passes still to run (`dp_price.py run --commit` resumes with them)
        lines += [f"Not yet run ({len(missing)} of {len(keys)} passes): {', '.join(missing)}.", ""]
    path = out / "report.md"
    files.atomic_write_bytes(path, "\n".join(lines).encode())
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", nargs="?", choices=("run", "report"), default="run")
    p.add_argument("--data", default=os.environ.get("SEQR_TASK_DATA"), help="task dir (default $SEQR_TASK_DATA)")
    p.add_argument("--library", default=str(LIBRARY), help=f"the library (default {LIBRARY})")
    p.add_argument("--out", default=str(OUT), help=f"results (default {OUT})")
    p.add_argument("--work", default="runs/dp-price", help="the silos' exported adapter dirs, kept out of git")
    p.add_argument("--model", default="smollm2-135m-instruct", help="base model")
    p.add_argument("--device", default="cpu", help="cpu, or cuda where a GPU is available")
    p.add_argument("--commit", action="store_true", help="git commit every finished pass at once")
    a = p.parse_args(argv)
    if a.stage == "report":
        print(report(Path(a.out)))
        return 0
    device = data_and_device(p, a)
    if not (Path(a.library) / files.MANIFEST).exists():
        p.error(f"--library {a.library}: no library there")
    model, tok = load_model(a.model, dtype="float32", device=device)
    run({"model": model, "tok": tok, "data": a.data, "name": a.model, "library": a.library, "out": a.out,
         "work": a.work, "commit": a.commit}, a.commit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
