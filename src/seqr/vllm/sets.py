"""Allowed sets as the columns a request carries to vLLM's workers (no vLLM import here).

Every request carries its allowed set in its sampling parameters (`extra_args[SET_KEY]`: the set's columns, a
sorted list of ints); the workers read it from vLLM's input batch, which also tells them each token's request
(seqr/vllm/model.py), so every token is routed among its own request's adapters. Columns are assigned once per
adapter name and never reused while serving: a request in flight across a library change keeps its meaning, and
a removed adapter's column is simply unread.
"""
from __future__ import annotations

import torch

SET_KEY = "seqr_columns"  # the request's SamplingParams.extra_args key: its allowed set's columns


class Columns:
    """Adapter name -> set-mask column, for one serving process; a name keeps its column until the end."""

    def __init__(self, names, capacity: int):
        names = sorted(names)
        if capacity < len(names):
            raise ValueError(f"set-mask capacity {capacity} is below the library's {len(names)} adapters")
        self.capacity = capacity
        self.order: list[str | None] = names + [None] * (capacity - len(names))  # column c -> name
        self.col = {n: c for c, n in enumerate(names)}
        self.used = len(names)  # columns handed out so far (never reused)

    def sync(self, names) -> list[str | None]:
        """Give new names a fresh column and free the columns of names gone; returns the column order."""
        names = set(names)
        for n in sorted(names - set(self.col)):
            if self.used >= self.capacity:
                raise ValueError(f"no set-mask column left for adapter {n!r}: {self.capacity} columns were handed "
                                 f"out while serving; restart the server or give VllmEngine a larger set_capacity")
            self.col[n], self.order[self.used] = self.used, n
            self.used += 1
        for n in set(self.col) - names:
            self.order[self.col.pop(n)] = None
        return list(self.order)

    def of(self, allowed) -> list[int]:
        """The set's columns, sorted: what a request carries (`extra_args[SET_KEY]`)."""
        unknown = sorted(a for a in allowed if a not in self.col)
        if unknown:
            raise KeyError(f"unknown adapter(s) {unknown}; the library holds {sorted(self.col)}")
        return sorted(self.col[a] for a in allowed)

    def mask(self, allowed) -> torch.Tensor:
        """(C,) bool: the set's columns."""
        return column_mask(self.of(allowed), self.capacity)


def column_mask(columns, capacity: int) -> torch.Tensor:
    """(C,) bool mask of a request's columns (as it carried them), checked: a malformed list is refused, naming it."""
    if not isinstance(columns, (list, tuple)) or any(isinstance(c, bool) or not isinstance(c, int)
                                                     or not 0 <= c < capacity for c in columns):
        raise ValueError(f"a request's {SET_KEY} must be a list of column indices in [0, {capacity}), "
                         f"got {columns!r}")
    m = torch.zeros(capacity, dtype=torch.bool)  # (C,)
    m[list(columns)] = True
    return m


def library_banks(library_dir: str, method: str):
    """(library, {layer: AdapterBank}) loaded from disk and prepared for `method`, held in the dtype its files store:
    a half-precision library stays half in memory (the same values; the routing math still runs in float32), which
    halves what each routed layer reads per token."""
    from seqr.store.library import LoraLibrary

    lib = LoraLibrary.load(library_dir)
    if lib.resident_dtype != lib.storage_dtype:
        lib.set_resident_dtype(lib.storage_dtype)
    banks = {layer: lib.bank(layer).prepare(method) for layer in lib.layers}
    return lib, banks
