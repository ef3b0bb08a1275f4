"""PNG figures of a `seqr eval` results document (matplotlib, Agg): drawn from the JSON alone, so a finished
evaluation is re-plotted without rerunning anything."""
from __future__ import annotations

from pathlib import Path

from seqr.core import registry
from seqr.eval import bootstrap as eb
from seqr.eval import report as er
from seqr.store import files


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, out: Path, name: str) -> str:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    files.atomic_write_bytes(out / name, buf.getvalue())
    return name


def accuracy(doc: dict, out: Path, kind: str = "shared", ci: dict | None = None) -> str | None:
    """Table 3 as grouped bars: normalised accuracy per task and on average, one bar per method; `ci`:
    bootstrap.accuracy_intervals(doc, kind), computed here when not given."""
    summ = er.accuracy_summary(doc, kind)
    keys = [k for k in summ if k != "oracle"]
    if not keys:
        return None
    plt = pyplot()
    cols = er.tasks(doc) + ["avg"]
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(cols)), 4))
    width, ci = 0.8 / len(keys), eb.accuracy_intervals(doc, kind) if ci is None else ci
    for j, key in enumerate(keys):
        means = [c[0] if c else None for c in (summ[key]["norm"][c] for c in cols)]
        xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(cols))]
        err = _yerr(means, [ci.get(key, {}).get(c) for c in cols])
        ax.bar(xs, [100 * m if m is not None else 0 for m in means], width, label=key, yerr=err, capsize=2,
               error_kw={"lw": 0.8})
    ax.axhline(100, color="k", lw=0.8, ls="--", label="oracle (100%)")
    ax.set_xticks(range(len(cols)), cols, rotation=30)
    ax.set_xlabel("task")
    ax.set_ylabel("accuracy / oracle accuracy (%)")
    ax.set_title(f"{kind}-A library: normalised accuracy per task (error bars: {eb.LEVEL:.0%} bootstrap CI "
                 "over examples)", fontsize=10)
    ax.legend(ncol=min(len(keys) + 1, 6), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22))  # off the bars
    return save_png(fig, out, f"accuracy_{kind}.png")


def _yerr(means: list, intervals: list) -> list[list[float]] | None:
    """matplotlib's asymmetric (2, n) yerr in % from point estimates and (lo, hi) intervals (0 where absent)."""
    lo = [100 * max(0.0, m - iv[0]) if m is not None and iv else 0.0 for m, iv in zip(means, intervals)]
    hi = [100 * max(0.0, iv[1] - m) if m is not None and iv else 0.0 for m, iv in zip(means, intervals)]
    return [lo, hi] if any(lo) or any(hi) else None


def routing_accuracy(doc: dict, out: Path, kind: str = "shared") -> str | None:
    """Figure 4: share of decisions picking the norm-maximising adapter, per router, and LAG by k."""
    r = er.routing_summary(doc, kind)
    if not r["own"] and not r["would"]:
        return None
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained")
    keys = list(r["own"])
    err = [100 * (r["own"][k][1] or 0) for k in keys]
    a1.bar(keys, [100 * r["own"][k][0] for k in keys], yerr=err if any(err) else None, capsize=3, color="tab:blue")
    a1.set_ylim(0, 105)
    a1.tick_params(axis="x", labelrotation=30)
    a1.set_ylabel("% decisions = norm-max")
    a1.set_title("each router, its own pass")
    lag = sorted((int(k.split("@")[1]), v[0]) for k, v in r["would"].items() if k.startswith("lag@"))
    if lag:
        a2.plot([k for k, _ in lag], [100 * v for _, v in lag], "o-", label="LAG(k)")
        a2.axhline(100 * r["would"]["arrow"][0], color="tab:orange", ls="--", label="ARROW")
        a2.axhline(100, color="tab:green", ls=":", label="SEQR = SPECTR" if kind == "shared" else "SPECTR")
        a2.set_xticks([k for k, _ in lag])
        a2.set_xlabel("k (ARROW shortlist)")
        a2.set_ylabel("% decisions LAG(k) would make = norm-max")
        a2.set_ylim(0, 105)
        a2.legend(fontsize=8)
        a2.set_title("on the reference pass's hidden states")
    fig.suptitle(f"{kind}-A library: routing accuracy")
    return save_png(fig, out, f"routing_accuracy_{kind}.png")


def confusion(doc: dict, out: Path, kind: str = "shared") -> str | None:
    """Which adapter each task's decisions went to, per router (first library of the kind)."""
    libs = er.libraries(doc, kind)
    if not libs:
        return None
    label, entry = libs[0]
    keys = registry.report_order(k for k in entry["methods"] if registry.routes(k))
    if not keys:
        return None
    plt = pyplot()
    mats = {key: er.confusion(doc, label, key) for key in keys}
    top = max(v for _, _, mat in mats.values() for row in mat for v in row) or 1.0  # one colour scale for all
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys) + 1.5, 4.4), squeeze=False, layout="constrained")
    for i, (ax, key) in enumerate(zip(axes[0], keys)):
        ts, names, mat = mats[key]
        im = ax.imshow(mat, vmin=0, vmax=top, cmap="viridis")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(ts)), ts if i == 0 else [], fontsize=7)  # the same tasks on every row: named once
        _cell_numbers(ax, mat, top, "{:.0%}")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("adapter", fontsize=8)
    axes[0][0].set_ylabel("input task", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="share of decisions")
    fig.suptitle(f"routing confusion ({label}): share of each task's decisions per adapter", y=1.05)
    return save_png(fig, out, f"confusion_{kind}.png")


def _cell_numbers(ax, mat, top: float, fmt: str) -> None:
    """Each cell's value written in it (dark text on light cells), for matrices small enough to read."""
    if len(mat) > 16 or (mat and len(mat[0]) > 16):
        return
    for i, row in enumerate(mat):
        for j, v in enumerate(row):
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=6,
                    color="black" if v > 0.6 * top else "white")


def norms(doc: dict, out: Path) -> str | None:
    """Figure 3: mean raw and z-scored activation norm of every adapter (columns) on every task (rows)."""
    panels = []
    for kind in er.KINDS:
        for label, _ in er.libraries(doc, kind)[:1]:
            for which in ("raw", "z"):
                nm = er.norms(doc, label, which)
                if nm is not None:
                    panels.append((f"{label}: {'raw' if which == 'raw' else 'z-scored'} norm", nm))
    if not panels:
        return None
    plt = pyplot()
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(11, 4.4 * rows), squeeze=False, layout="constrained")
    for ax, (title, (ts, names, mat)) in zip(axes.flat, panels):
        im = ax.imshow(mat, cmap="magma")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(ts)), ts, fontsize=7)
        for i, row in enumerate(mat):  # mark each row's largest mean
            j = max(range(len(row)), key=row.__getitem__)
            ax.text(j, i, "*", ha="center", va="center", color="cyan", fontsize=10)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("adapter", fontsize=8)
        ax.set_ylabel("input task", fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.8, label="mean z-score" if "z-scored" in title else "mean ||B A x||")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("mean activation norm per task (rows) and adapter (columns); * = row max")
    return save_png(fig, out, "norms.png")


def noise(doc: dict, out: Path) -> str | None:
    """Figure 6: SEQR's normalised accuracy against noise on mu, with ARROW and LAG as flat references."""
    curve = er.noise_summary(doc)
    if len(curve) < 2:
        return None
    plt = pyplot()
    summ = er.accuracy_summary(doc, "shared")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    xs, ci = sorted(curve), eb.noise_intervals(doc)
    ax.errorbar(xs, [100 * curve[x][0] for x in xs], yerr=_yerr([curve[x][0] for x in xs], [ci.get(x) for x in xs]),
                fmt="o-", capsize=3, label=f"seqr ({eb.LEVEL:.0%} bootstrap CI)")
    for key, style in (("arrow", "--"), ("lag", ":")):
        hit = [k for k in summ if k.split("@")[0] == key]
        if hit and summ[hit[0]]["norm"]["avg"]:
            ax.axhline(100 * summ[hit[0]]["norm"]["avg"][0], ls=style, color="gray", label=hit[0])
    ax.set_xlabel("noise on mu (standard deviations)")
    ax.set_ylabel("avg normalised accuracy (%)")
    top = max([110.0] + [100 * ci[x][1] + 5 for x in xs if ci.get(x)])
    ax.set_ylim(0, top)  # the whole scale (a few examples' difference is not drawn as a cliff), bars unclipped
    ax.legend(fontsize=8)
    ax.set_title("robustness to noisy calibration")
    return save_png(fig, out, "noise.png")


def routability(study: dict, steps: dict[str, int], n_adapters: int, out: Path, key: str = "seqr") -> str | None:
    """Routability vs training: `key`'s normalised accuracy and own-adapter share (study.routability) against
    the training steps of each library (`steps`: label -> step), the average bold and each task thin."""
    labels = sorted((lb for lb in study if lb in steps), key=steps.__getitem__)
    if len(labels) < 2:
        return None
    plt = pyplot()
    xs = [steps[lb] for lb in labels]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, what, title in ((axes[0], "norm", f"{key}'s accuracy / oracle's (%)"),
                            (axes[1], "own", "decisions routed to the own adapter (%)")):
        for t in study[labels[0]]["per_task"]:
            ys = [study[lb]["per_task"][t][what] for lb in labels]
            if None not in ys:
                ax.plot(xs, [100 * y for y in ys], color="0.75", lw=0.8)
        ax.plot(xs, [100 * study[lb][what] for lb in labels], "o-", lw=2, color="C0", label="average over tasks")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(xs, [f"{x}\n{lb}" for x, lb in zip(xs, labels)])
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[1].axhline(100 / n_adapters, ls=":", color="gray", label=f"chance (1/{n_adapters})")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle("routability vs training (thin: one task each)")
    fig.tight_layout()
    return save_png(fig, out, "routability_vs_training.png")


def variants(main: dict, study: dict, out: Path, label: str = "shared-0") -> str | None:
    """Routing variants beside the main methods: average normalised accuracy with its bootstrap CI (left) and
    own-adapter share (right), one horizontal bar each (`study`: seqr.eval.study.variants)."""
    if not study:
        return None
    summ, ci = er.accuracy_summary(main), eb.accuracy_intervals(main)
    entry = main["libraries"][label]
    rows = [(k, summ[k]["norm"]["avg"][0], ci.get(k, {}).get("avg"),
             er.pass_own_share(entry["methods"][k], er.tasks(main)) if k in entry["methods"] else None)
            for k in summ if k != "oracle" and summ[k]["norm"]["avg"]]
    rows += [(f"seqr [{v}]", r["norm"], r["ci"], r["own"]) for v, r in study.items()]
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.38 * len(rows) + 1.4), sharey=True)
    ys = range(len(rows))
    colors = ["C1" if name.startswith("seqr [") else "C0" for name, *_ in rows]
    means = [r[1] for r in rows]
    axes[0].barh(ys, [100 * m for m in means], color=colors, xerr=_yerr(means, [r[2] for r in rows]), capsize=2)
    axes[0].axvline(100, color="k", lw=0.8, ls="--")
    axes[0].set_xlabel(f"accuracy / oracle accuracy (%), {eb.LEVEL:.0%} bootstrap CI")
    axes[1].barh(ys, [100 * (r[3] or 0) for r in rows], color=colors)
    n = len(entry["adapters"])
    axes[1].axvline(100 / n, color="gray", ls=":", label=f"chance (1/{n})")
    axes[1].set_xlabel("(token, layer) decisions routed to the own adapter (%)")
    axes[1].legend(fontsize=8)
    axes[0].set_yticks(list(ys), [r[0] for r in rows])
    axes[0].invert_yaxis()
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("routing variants (orange) against the main methods (blue), on the same examples")
    fig.tight_layout()
    return save_png(fig, out, "variants.png")


def privacy(res: dict, noise: dict, out: Path) -> str:
    """The price of privacy: each router's accuracy over the oracle's and its own-adapter share against epsilon
    (log x; "no DP" at the right), one line per router (colour) and calibration size (line style), SEQR's with its
    bootstrap band; beside it the noise-on-mu curve of the same examples (`noise`: report.noise_summary), when
    there is one. `res`: {router: {n: {eps: {"norm", "ci", "own"}}}}."""
    plt = pyplot()
    panels = 3 if noise else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.8 * panels, 4.0))
    styles = ("o-", "s--", "^:", "d-.")
    every = sorted({e for by_n in res.values() for r in by_n.values() for e in r})  # one x axis for all lines
    at = {e: e if e != float("inf") else 2 * max([x for x in every if x != float("inf")], default=0.5)
          for e in every}  # "no DP" drawn at twice the largest epsilon
    for ax in axes[:2]:
        ax.set_xscale("log")
        ax.set_xticks([at[e] for e in every], [f"{e:g}" if e != float("inf") else "no DP" for e in every])
        ax.minorticks_off()
    for i, (router, by_n) in enumerate(res.items()):
        for j, (n, r) in enumerate(by_n.items()):
            keys = sorted(r)
            xs = [at[e] for e in keys]
            for ax, what in ((axes[0], "norm"), (axes[1], "own")):
                if any(r[e][what] is None for e in keys):
                    continue
                ax.plot(xs, [100 * r[e][what] for e in keys], styles[j % len(styles)], color=f"C{i}",
                        label=f"{router}, {n} examples")
                if what == "norm" and i == 0 and all(r[e]["ci"] for e in keys):
                    ax.fill_between(xs, [100 * r[e]["ci"][0] for e in keys], [100 * r[e]["ci"][1] for e in keys],
                                    color=f"C{i}", alpha=0.12)
    axes[0].set_ylabel("accuracy / oracle's (%)")
    axes[1].set_ylabel("decisions routed to the own adapter (%)")
    for ax in axes[:2]:
        ax.set_xlabel("epsilon (delta 1e-5)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if noise:
        lv = sorted(noise)
        axes[2].plot(lv, [100 * noise[v][0] for v in lv], "o-", color="C0")
        axes[2].set_xlabel("noise on mu (std multiples), no DP")
        axes[2].set_ylabel("SEQR accuracy / oracle's (%)")
        axes[2].set_title("the paper's noise curve, same examples", fontsize=9)
        axes[2].grid(alpha=0.3)
    fig.suptitle("Routing with differentially private calibration")
    fig.tight_layout()
    return save_png(fig, out, "privacy.png")


def all_figures(doc: dict, out: str | Path, intervals: dict | None = None) -> list[str]:
    """Every figure the document has data for; returns their file names (relative to `out`). `intervals`:
    bootstrap.intervals(doc), computed here when not given."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    intervals = eb.intervals(doc) if intervals is None else intervals
    made = [accuracy(doc, out, k, intervals[k]) for k in er.KINDS] + [routing_accuracy(doc, out, k) for k in er.KINDS]
    made += [confusion(doc, out, k) for k in er.KINDS] + [norms(doc, out), noise(doc, out)]
    libs = er.libraries(doc, "shared")
    if libs and "oracle" in libs[0][1]["methods"] and doc.get("examples"):  # routing variants, e.g. the default's
        from seqr.eval import study
        made.append(variants(doc, study.variants(doc, doc, libs[0][0]), out, libs[0][0]))
    return [m for m in made if m]


def write_report(doc: dict, out: str | Path) -> tuple[Path, list[str]]:
    """Figures plus report.md (tables + the figures) into `out`; returns (report path, figure names)."""
    out = Path(out)
    intervals = eb.intervals(doc)  # the bootstrap once, for the figures and the tables
    figs = all_figures(doc, out, intervals)
    path = out / files.EVAL_REPORT
    files.atomic_write_bytes(path, er.markdown(doc, figs, intervals).encode())
    return path, figs
