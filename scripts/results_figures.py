"""Figures of the measurements whose commands write JSON only, drawn from the committed JSON (no rerun):
docs/results/forward.png, serve_ray.png, fast_path_sst2_seeds.png, vllm_serve/serve_vllm.png and
vllm_serve/token_ratio.png.

Usage: python scripts/results_figures.py [--results docs/results]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from seqr.eval.plots import pyplot, save_png


def forward(doc: dict, out: Path) -> str:
    """`seqr bench forward`: median ms of one batched forward per method, at each N (bars), peft-static dashed."""
    plt = pyplot()
    points = doc["points"]
    methods = list(points[0]["results"])
    fig, ax = plt.subplots(figsize=(8, 3.8), layout="constrained")
    width = 0.8 / len(points)
    for j, p in enumerate(points):
        ms = [p["results"][m]["median_ms"] for m in methods]
        ax.bar([i + j * width for i in range(len(methods))], ms, width, label=f"N = {p['N']}")
    ax.set_xticks([i + width * (len(points) - 1) / 2 for i in range(len(methods))], methods, rotation=20)
    ax.set_ylabel("median ms per forward")
    ax.set_yscale("log")
    c = doc["config"]
    ax.set_title(f"{c['model_label']}: a forward of {c['batch']} x {c['seq']} tokens with N rank-{c['rank']} adapters")
    ax.legend(fontsize=8)
    return save_png(fig, out, "forward.png")


def serving(runs: dict[str, dict], keys: list[str], out: Path, name: str, title: str) -> str:
    """Requests/s and p50 / p95 latency of each engine (bars), one group per run."""
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    width = 0.8 / len(runs)
    for j, (label, doc) in enumerate(runs.items()):
        xs = [i + j * width for i in range(len(keys))]
        a1.bar(xs, [doc[k]["requests_per_s"] for k in keys], width, label=label)
        a2.bar(xs, [doc[k]["p50_s"] for k in keys], width, label=f"{label}: p50")
        a2.scatter(xs, [doc[k]["p95_s"] for k in keys], marker="_", s=200, color="k",
                   label="p95" if j == 0 else None, zorder=3)
    for ax, ylabel in ((a1, "requests per second"), (a2, "latency per request (s)")):
        ax.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(len(keys))], [k.replace("_", " ") for k in keys],
                      rotation=15, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return save_png(fig, out, name)


def fast_path(doc: dict, out: Path) -> str:
    """sst2 retrained per training path and seed: dev accuracy and training seconds."""
    plt = pyplot()
    runs = list(doc)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6), layout="constrained")
    a1.bar(runs, [100 * doc[r]["acc"] for r in runs], color="tab:blue")
    a1.set_ylim(80, 95)
    a1.set_ylabel("sst2 dev accuracy (%)")
    a2.bar(runs, [doc[r]["train_s"] for r in runs], color="tab:orange")
    a2.set_ylabel("training seconds")
    for ax in (a1, a2):
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle("the fast training path against the reference, per seed (300 dev examples)")
    return save_png(fig, out, "fast_path_sst2_seeds.png")


def compiled(read, n: int, key: str) -> list[float]:
    """A ratio of every committed run of the compiled engines' comparison at N = n (vllm_serve/compiled_n*.json)."""
    return [read(f"vllm_serve/compiled_n{n}_r{r}.json")[key]["requests_per_s"] for r in (1, 2, 3)]


def token_ratio(read, out: Path) -> str:
    """SEQR per token inside vLLM / vLLM without adapters (requests/s, `seqr bench serve`), each run a point, one
    column per version of the engine, N = 10 and 100."""
    plt = pyplot()
    ratio = lambda f: [read(f"vllm_serve/{f}.json")["vllm_vs_vllm_base_no_adapters"]["requests_per_s"]]  # noqa: E731
    runs = lambda key, n: [r["ratio"] for r in read("vllm_serve/token_in_place.json")[key]  # noqa: E731
                           if r["adapters"] == n]
    versions = {  # label -> {N: ratios}
        "probe GEMM\ncarries sets": {10: ratio("n10_run3"), 100: ratio("n100_run3")},
        "masks from\nvLLM's batch": {10: ratio("n10_token_batchmasks")},
        "sets in requests,\nno vLLM LoRA": {10: ratio("n10_token_sets_in_requests")},
        "fused step": {10: ratio("n10_token_fused"), 100: ratio("n100_token_fused")},
        "update added\nin place": {n: runs("in_place", n) for n in (10, 100)},
        "+ loop woken\nby outputs": {n: runs("in_place_and_loop_woken_by_outputs", n) for n in (10, 100)},
        "+ checks once\nper forward": {n: runs("and_checks_once_per_forward", n) for n in (10, 100)},
        "eager, beside\nthe compiled": {n: compiled(read, n, "vllm_vs_vllm_base_no_adapters") for n in (10, 100)},
        "compiled / vLLM\ncompiled": {n: compiled(read, n, "vllm_compiled_vs_vllm_base_compiled") for n in (10, 100)}}
    fig, ax = plt.subplots(figsize=(10.5, 3.8), layout="constrained")
    for n, dx, color in ((10, -0.1, "tab:blue"), (100, 0.1, "tab:orange")):
        xs = [(i + dx, v) for i, vals in enumerate(versions.values()) for v in vals.get(n, [])]
        ax.plot([x for x, _ in xs], [v for _, v in xs], "o", color=color, label=f"N = {n}", alpha=0.8)
    ax.axhline(0.8, color="gray", linestyle="--", linewidth=1, label="target 0.8")
    ax.set_xticks(range(len(versions)), list(versions), fontsize=8)
    ax.set_ylim(0.5, 1.05)
    ax.set_ylabel("requests/s, SEQR / no adapters")
    ax.set_title("SEQR per token inside vLLM against vLLM with no adapters, each run of seqr bench serve (2 cores)")
    ax.legend(fontsize=8, loc="upper left")
    return save_png(fig, out, "token_ratio.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default="docs/results", help="the results dir holding the JSON")
    root = Path(p.parse_args(argv).results)
    read = lambda f: json.loads((root / f).read_text())  # noqa: E731
    made = [forward(read("forward.json"), root),
            serving({"4 clients, 60 s": read("bench_serve_ray.json")}, ["one_process", "ray_2_replicas"], root,
                    "serve_ray.png", "seqr serve: one process against 2 Ray Serve replicas (ten-task library)"),
            fast_path(read("fast_path_sst2_seeds.json"), root),
            serving({f"N = {n}": read(f"vllm_serve/n{n}_run3.json") for n in (10, 100)},
                    ["one_process", "vllm", "vllm_lora_per_request", "vllm_base_no_adapters"], root / "vllm_serve",
                    "serve_vllm.png", "seqr serve: embedded engine, vLLM + SEQR, vLLM per-request LoRA, vLLM without "
                    "adapters (8 clients, 30 s)"),
            token_ratio(read, root / "vllm_serve")]
    print("\n".join(made))
    return 0


if __name__ == "__main__":
    sys.exit(main())
