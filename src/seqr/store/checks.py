"""What a library accepts: each check names the adapter and layer it refuses (`where`), or returns the value in
the form the library stores (float32, contiguous; NormStats)."""
from __future__ import annotations

import torch

from seqr.core.stats import NormStats, z_scorable

A_REL_TOL = 1e-6  # two A matrices closer than this (relative Frobenius) count as the same shared A


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius distance ||a - b|| / ||b||."""
    if a.shape != b.shape:
        return float("inf")
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def tensors(meta, d: dict, where: str, kind: str) -> dict[str, torch.Tensor]:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: {kind} must be a dict layer -> tensor, got {type(d).__name__}")
    missing, extra = sorted(set(meta.layers) - set(d)), sorted(set(d) - set(meta.layers))
    if missing or extra:
        raise ValueError(f"{where}: {kind} layers do not match the library (missing {missing}, unexpected {extra})")
    r, out = meta.rank, {}
    for layer, t in d.items():
        m, n = meta.layers[layer]
        want = (m, r) if kind == "B" else (r, n)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
            raise ValueError(f"{where}, layer {layer}: {kind} must have shape {want}, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{where}, layer {layer}: {kind} must be floating point, got {t.dtype}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{where}, layer {layer}: {kind} contains NaN or inf")
        out[layer] = t.detach().float().contiguous()
    return out

def same_A(meta, shared_A: dict[str, torch.Tensor], A: dict[str, torch.Tensor], where: str) -> None:
    bad = [f"{layer} (relative difference {d:.2e})" for layer in A
           if (d := rel_diff(A[layer], shared_A[layer])) > A_REL_TOL]
    if bad:
        seed = f" (train with --a-seed {meta.a_seed})" if meta.a_seed is not None else ""
        raise ValueError(f"{where}: A differs from the library's shared A{seed} at layers: {bad}")

def centroids(meta, centroids, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(centroids, dict) or set(centroids) != set(meta.layers):
        got = sorted(centroids) if isinstance(centroids, dict) else type(centroids).__name__
        raise ValueError(f"{where}: centroids must cover exactly the library's layers; got {got}")
    out = {}
    for layer, c in centroids.items():
        n = meta.layers[layer][1]
        if not isinstance(c, torch.Tensor) or c.shape != (n,) or not c.is_floating_point():
            raise ValueError(f"{where}, layer {layer}: a centroid must be a float tensor of shape ({n},), got "
                             f"{tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__}")
        if not torch.isfinite(c).all() or not c.any():
            raise ValueError(f"{where}, layer {layer}: the centroid is not finite or is the zero vector")
        out[layer] = c.float()
    return out

def stats(meta, stats: dict, where: str) -> dict[str, NormStats]:
    if not isinstance(stats, dict) or set(stats) != set(meta.layers):
        got = sorted(stats) if isinstance(stats, dict) else type(stats).__name__
        raise ValueError(f"{where}: stats must cover exactly the library's layers; got {got}")
    out = {}
    for layer, s in stats.items():
        s = s if isinstance(s, NormStats) else NormStats.from_dict(s)
        if s.count < 2 or not s.std > 0:
            raise ValueError(f"{where}, layer {layer}: stats need count >= 2 and std > 0, got "
                             f"count={s.count}, std={s.std if s.count else None}")
        if not z_scorable(s.mean, s.std):
            raise ValueError(f"{where}, layer {layer}: stats overflow float32 when z-scoring (mu / sigma or "
                             f"1 / sigma^2 is not finite): mu={s.mean:.6g}, sigma={s.std:.6g}")
        out[layer] = s
    return out
