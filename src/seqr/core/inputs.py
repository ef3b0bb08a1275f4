"""What an `AdapterBank` checks of its input tensors and names before it holds them: one-line errors naming the
offending adapter or shape."""
from __future__ import annotations

from typing import Sequence

import torch


def first_nonfinite(t: torch.Tensor) -> int | None:
    """Index of the first adapter whose slice of t (adapter axis first) holds NaN or inf, else None."""
    bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)  # (N,)
    return int(bad.nonzero()[0]) if bad.any() else None


def check_finite(t: torch.Tensor, what: str, names: Sequence[str]) -> None:
    """Raise naming the first adapter whose slice of t (adapter axis first) holds NaN or inf."""
    i = first_nonfinite(t)
    if i is not None:
        raise ValueError(f"{what} of adapter {names[i]!r} (index {i}) contains NaN or inf")


def check_inputs(A, B, names: Sequence[str] | None) -> list[str]:
    """Check B (N, m, r), A (r, n) shared or (N, r, n) one per adapter, and the N names (default "0".."N-1");
    returns the names as a list."""
    if not isinstance(B, torch.Tensor) or B.dim() != 3:
        raise ValueError(f"B must be a tensor of shape (N, m, r), got {shape_of(B)}")
    N, m, r = B.shape
    if N == 0:
        raise ValueError("an AdapterBank needs at least one adapter, got N=0")
    if r == 0 or m == 0:
        raise ValueError(f"B must have positive m and r, got shape {tuple(B.shape)}")
    names = [str(i) for i in range(N)] if names is None else list(names)
    bad = [nm for nm in names if not isinstance(nm, str) or not nm]
    if bad:
        raise ValueError(f"adapter names must be non-empty strings, got {bad[:5]}")
    if len(names) != N:
        raise ValueError(f"got {len(names)} names for {N} adapters")
    if len(set(names)) != N:
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"adapter names must be unique, got duplicates {dup}")
    if not isinstance(A, torch.Tensor) or A.dim() not in (2, 3):
        raise ValueError(f"A must be a tensor of shape (r, n) or (N, r, n), got {shape_of(A)}")
    if A.shape[-2] != r or (A.dim() == 3 and A.shape[0] != N):
        want = f"({r}, n)" if A.dim() == 2 else f"({N}, {r}, n)"
        raise ValueError(f"A has shape {tuple(A.shape)} but B {tuple(B.shape)} needs {want}")
    for t, what in ((A, "A"), (B, "B")):
        if not t.is_floating_point():
            raise ValueError(f"{what} must be a floating-point tensor, got dtype {t.dtype}")
    if A.dtype != B.dtype:
        raise ValueError(f"A and B must share a dtype, got {A.dtype} and {B.dtype}")
    check_finite(B, "B", names)
    if A.dim() == 3:
        check_finite(A, "A", names)
    elif not torch.isfinite(A).all():
        raise ValueError("the shared A contains NaN or inf")
    return names


def shape_of(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else f"{type(x).__name__}"
