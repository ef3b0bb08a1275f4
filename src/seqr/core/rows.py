"""`Rows`: a tensor that grows and shrinks along its first axis in place, the storage behind a bank's stacked
per-adapter tensors (B, a unique A, centroids) so that adding or removing one adapter touches one row."""
from __future__ import annotations

import torch

GROWTH = 8  # spare rows added when full: at least this many, or one eighth of the rows held (amortised O(1))


class Rows:
    """The first `n` rows of a store with spare capacity: `view` is what the owner uses, appends write into
    the spare rows (the store is reallocated only when full, by a factor 1 + 1/GROWTH, so a library at N holds
    at most N/GROWTH rows of slack), and removing row i moves the last row into it."""

    def __init__(self, t: torch.Tensor):
        self.store, self.n = t, t.shape[0]

    @property
    def view(self) -> torch.Tensor:
        return self.store[: self.n]  # (n, ...): a contiguous view when the store is

    def append(self, row: torch.Tensor) -> bool:
        """Write `row` (the store's trailing shape) after the last row; True when the store was reallocated
        (views of the old store, e.g. the library's per-adapter tensors, must then be taken again)."""
        grew = self.n == self.store.shape[0]
        if grew:
            cap = self.n + max(GROWTH, self.n // GROWTH)
            new = self.store.new_empty((cap, *self.store.shape[1:]))  # (cap, ...)
            new[: self.n] = self.store[: self.n]
            self.store = new
        self.store[self.n] = row
        self.n += 1
        return grew

    def swap_remove(self, i: int) -> int:
        """Drop row i by moving the last row into it; returns the index the last row had (== i when i was last)."""
        last = self.n - 1
        if not 0 <= i <= last:
            raise IndexError(f"row {i} is out of range for {self.n} rows")
        if i != last:
            self.store[i] = self.store[last]
        self.n = last
        return last
