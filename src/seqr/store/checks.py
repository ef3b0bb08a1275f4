"""What a library accepts: each check names the adapter and layer it refuses (`where`), or returns the value in
the form the library stores (float32, contiguous; NormStats)."""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from seqr.core.stats import NormStats, z_scorable
from seqr.store import files

A_REL_TOL = 1e-6  # two A matrices closer than this (relative Frobenius) count as the same shared A


def one_shared_a(ads) -> bool:
    """Whether peft adapters share one A: every A equal to the first's (to A_REL_TOL) and none trained with its
    own (seqr meta `shared_a: false`, e.g. `seqr train --unique-a`), even when alone."""
    first = ads[0]
    return all(a.meta.get("shared_a", True) for a in ads) and all(
        rel_diff(a.A[layer], first.A[layer]) <= A_REL_TOL for a in ads[1:] for layer in first.A)


def natural_key(layer: str) -> list:
    """Sort key that orders `layers.10` after `layers.9`."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", layer)]


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius distance ||a - b|| / ||b||."""
    if a.shape != b.shape:
        return float("inf")
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def shape(meta, layer: str, kind: str) -> tuple[int, int]:
    """The shape the library holds `layer`'s B (m, r) or A (r, n) in."""
    m, n = meta.layers[layer]
    return (m, meta.rank) if kind == "B" else (meta.rank, n)


def tensors(meta, d: Mapping, where: str, kind: str) -> dict[str, torch.Tensor]:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: {kind} must be a dict layer -> tensor, got {type(d).__name__}")
    missing, extra = sorted(set(meta.layers) - set(d)), sorted(set(d) - set(meta.layers))
    if missing or extra:
        raise ValueError(f"{where}: {kind} layers do not match the library (missing {missing}, unexpected {extra})")
    out = {}
    for layer, t in d.items():
        want = shape(meta, layer, kind)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
            raise ValueError(f"{where}, layer {layer}: {kind} must have shape {want}, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{where}, layer {layer}: {kind} must be floating point, got {t.dtype}")
        out[layer] = t.detach().float().contiguous()
    if out and not torch.isfinite(torch.cat([t.reshape(-1) for t in out.values()])).all():  # one check, not L
        bad = next(layer for layer, t in out.items() if not torch.isfinite(t).all())
        raise ValueError(f"{where}, layer {bad}: {kind} contains NaN or inf")
    return out

def stored(meta, shape_of, where: str, kinds: tuple[str, ...]) -> None:
    """An adapter file's tensors, from its header alone (`shape_of(key)`: a tensor's shape, None when absent):
    `<layer>.<kind>` for every layer and kind ("B", "A"), in the library's shapes."""
    for kind in kinds:
        missing = sorted(layer for layer in meta.layers if shape_of(f"{layer}.{kind}") is None)
        if missing:
            raise ValueError(f"{where}: {kind} layers do not match the library (missing {missing})")
        for layer in meta.layers:
            if (got := shape_of(f"{layer}.{kind}")) != (want := shape(meta, layer, kind)):
                raise ValueError(f"{where}, layer {layer}: {kind} must have shape {want}, got {got}")


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
    out = {layer: s if isinstance(s, NormStats) else NormStats.from_dict(s) for layer, s in stats.items()}
    if min(s.count for s in out.values()) >= 2 and z_scorable([s.mean for s in out.values()],
                                                              [s.std for s in out.values()]):
        return out  # every layer checked at once; else the loop names the first that fails
    for layer, s in out.items():
        if s.count < 2 or not s.std > 0:
            raise ValueError(f"{where}, layer {layer}: stats need count >= 2 and std > 0, got "
                             f"count={s.count}, std={s.std if s.count else None}")
        if not z_scorable(s.mean, s.std):
            raise ValueError(f"{where}, layer {layer}: stats overflow float32 when z-scoring (mu / sigma or "
                             f"1 / sigma^2 is not finite): mu={s.mean:.6g}, sigma={s.std:.6g}")
    return out


def manifest_header(path: Path, man: dict, storage_dtypes) -> str:
    """The manifest's format, version and storage dtype checked; returns the storage dtype."""
    if man.get("format") != files.LIBRARY_FORMAT:
        raise ValueError(f"{path / files.MANIFEST} is not a seqr library manifest (format={man.get('format')!r})")
    if man.get("format_version") != files.LIBRARY_FORMAT_VERSION:
        raise ValueError(f"library {path} has format_version {man.get('format_version')!r}; this seqr reads "
                         f"version {files.LIBRARY_FORMAT_VERSION} (upgrade seqr to read newer libraries)")
    storage = man.get("storage_dtype", "float32")
    if storage not in storage_dtypes:
        raise ValueError(f"library {path}: unknown storage_dtype {storage!r}; expected one of {list(storage_dtypes)}")
    return storage


def manifest_entries(path: Path, man: dict) -> tuple[list[dict], dict | None]:
    """The manifest's adapter entries and shared-A entry, each checked for the fields loading reads; errors name
    the library, the adapter (or entry index) and the field."""
    where = f"library manifest {path / files.MANIFEST}"
    entries = man.get("adapters")
    if not isinstance(entries, list):
        raise ValueError(f"{where}: field 'adapters' must be a list of adapter objects, got "
                         f"{type(entries).__name__}")
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise ValueError(f"{where}: adapters[{i}] must be an object, got {type(e).__name__}")
        name = e.get("name")
        if not isinstance(name, str):
            raise ValueError(f"{where}: adapters[{i}] has no string 'name' (got {name!r})")
        for key in ("file", "sha256"):
            if not isinstance(e.get(key), str) or not e[key]:
                raise ValueError(f"{where}: adapter {name!r} has no {key!r} (got {e.get(key)!r})")
    sa = man.get("shared_a_file")
    if man.get("shared_a") and not (isinstance(sa, dict) and all(isinstance(sa.get(k), str) and sa[k]
                                                                  for k in ("file", "sha256"))):
        raise ValueError(f"{where}: 'shared_a' is true but 'shared_a_file' is not an object with 'file' and "
                         f"'sha256' (got {sa!r})")
    return entries, sa


def compatible(ads: list) -> None:
    """One error listing every adapter and layer that does not match the first adapter."""
    first, problems = ads[0], []
    names = [a.name for a in ads]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"adapter name {dup!r} is used more than once")
    for a in ads[1:]:
        tag = f"adapter {a.name!r} ({a.path})"
        if a.base_model and first.base_model and a.base_model != first.base_model:
            problems.append(f"{tag}: base model {a.base_model!r} differs from {first.name!r}'s {first.base_model!r}")
        if a.rank != first.rank:
            problems.append(f"{tag}: rank {a.rank} differs from {first.name!r}'s rank {first.rank}")
        if a.target_modules != first.target_modules:
            problems.append(f"{tag}: target modules {a.target_modules} differ from {first.target_modules}")
        missing, extra = sorted(set(first.A) - set(a.A)), sorted(set(a.A) - set(first.A))
        if missing or extra:
            problems.append(f"{tag}: layers differ (missing {missing}, extra {extra})")
        for layer in sorted(set(first.A) & set(a.A)):
            if a.A[layer].shape[1] != first.A[layer].shape[1] or a.B[layer].shape[0] != first.B[layer].shape[0]:
                problems.append(f"{tag}, layer {layer}: shape {tuple(a.B[layer].shape[:1]) + tuple(a.A[layer].shape[1:])}"
                                f" differs from {tuple(first.B[layer].shape[:1]) + tuple(first.A[layer].shape[1:])}")
    if problems:
        raise ValueError(f"{len(problems)} incompatible adapter(s):\n  " + "\n  ".join(problems))
