"""Bootstrap confidence intervals over the eval examples (pure: numpy, no model, no I/O).

With 100 examples per task, one example is one point of accuracy, so the figures' error bars show how much a
number would move if other examples had been drawn: each draw resamples every task's examples with replacement
(the same indices for every method and the oracle, so normalised accuracy stays paired), recomputes the number,
and the interval is the draws' central `level` percentiles. With several libraries, each draw averages over
them, as the point estimate does; the tables' "± std" is the spread over libraries, a different thing.
"""
from __future__ import annotations

import numpy as np

from seqr.eval import report as er

DRAWS = 2000
LEVEL = 0.95


def _hits(doc: dict, res: dict, task: str) -> np.ndarray | None:
    """(n,) 1.0 where the pass predicted the gold label, or None if the pass kept no predictions."""
    gold, pred = doc["examples"][task]["gold"], res["tasks"][task].get("pred") or []
    if len(pred) != len(gold):
        return None
    return np.array([p == g for p, g in zip(pred, gold)], dtype=np.float64)  # (n,)


def resample(doc: dict, draws: int = DRAWS, seed: int = 0) -> dict[str, np.ndarray]:
    """{task: (draws, n) example indices drawn with replacement}, one stream per task."""
    if draws < 1:
        raise ValueError(f"draws must be positive, got {draws}")
    rng = np.random.default_rng(seed)
    return {t: rng.integers(0, len(doc["examples"][t]["gold"]), size=(draws, len(doc["examples"][t]["gold"])))
            for t in er.tasks(doc)}


def norm_draws(doc: dict, entry: dict, results: list[dict], idx: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """{task | "avg": (draws,) normalised accuracy}: the mean accuracy of `results` (one pass, or one per noise
    seed) over the oracle's on each draw's examples; NaN where the draw's oracle scored 0."""
    oracle = entry["methods"].get("oracle")
    if oracle is None:
        return None
    out = {}
    for t, ix in idx.items():
        o = _hits(doc, oracle, t)
        hs = [_hits(doc, r, t) for r in results]
        if o is None or not hs or any(h is None for h in hs):
            return None
        o = o[ix].mean(1)  # (draws,)
        a = np.mean([h[ix].mean(1) for h in hs], axis=0)  # (draws,)
        out[t] = np.where(o > 0, a / np.where(o > 0, o, 1.0), np.nan)  # (draws,)
    out["avg"] = np.mean([out[t] for t in idx], axis=0)  # (draws,)
    return out


def interval(draws: np.ndarray, level: float) -> tuple[float, float] | None:
    """The central `level` interval of bootstrap draws (NaN draws ignored); None when too many are NaN."""
    if np.isnan(draws).mean() > 1 - level:  # too many draws undefined to bound anything
        return None
    lo, hi = np.nanpercentile(draws, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def _over_libraries(per_lib: list[dict | None], keys, level: float) -> dict | None:
    if not per_lib or any(p is None for p in per_lib):
        return None
    return {c: interval(np.mean([p[c] for p in per_lib], axis=0), level) for c in keys}


def accuracy_intervals(doc: dict, kind: str = "shared", draws: int = DRAWS, seed: int = 0,
                       level: float = LEVEL) -> dict[str, dict]:
    """{method key: {task | "avg": (lo, hi) | None}} of the normalised accuracy (fractions, as accuracy_summary's
    "norm"); methods whose passes kept no predictions are left out."""
    if not doc.get("examples"):
        return {}
    libs, idx, out = er.libraries(doc, kind), resample(doc, draws, seed), {}
    for key in er.method_keys(doc, kind):
        if key == "oracle":
            continue
        per_lib = [norm_draws(doc, e, [r] if (r := er.pass_result(doc, e, key)) else [], idx) for _, e in libs]
        if (cells := _over_libraries(per_lib, [*idx, "avg"], level)) is not None:
            out[key] = cells
    return out


def noise_intervals(doc: dict, draws: int = DRAWS, seed: int = 0, level: float = LEVEL) -> dict[float, tuple]:
    """{noise level: (lo, hi)} of SEQR's average normalised accuracy, the levels of report.noise_summary."""
    if not doc.get("examples"):
        return {}
    libs, idx, out = er.libraries(doc, "shared"), resample(doc, draws, seed), {}
    for level_ in er.noise_summary(doc):
        per_lib = [norm_draws(doc, e, er.noise_passes(e, level_), idx) for _, e in libs]
        if (cells := _over_libraries(per_lib, ["avg"], level)) is not None and cells["avg"] is not None:
            out[level_] = cells["avg"]
    return out


def intervals(doc: dict) -> dict[str, dict]:
    """{kind: accuracy_intervals(doc, kind)}, what report.markdown takes."""
    return {kind: accuracy_intervals(doc, kind) for kind in er.KINDS}
