"""`PackedBank`: the banks of layers that read the same input (q, k and v of one attention block, packed into one
qkv module by vLLM), routed together.

Each part p keeps its own choice i*_p per token, exactly as if it were routed alone; only the work is shared:
one z = [A_1; ...; A_P] x GEMM for every part, and for a router with a packed form (SEQR) the P x N scores of a
few tokens from one product with the block-diagonal stack of the parts' R factors, then one masked argmax over
(T, P, N). A router without a packed form scores part by part with the same z. The update is each part's
B_{p, i*_p} z_p, side by side.
"""
from __future__ import annotations

from typing import Sequence

import torch

from seqr.core import registry
from seqr.core import routers as rt
from seqr.core.bank import AdapterBank


class PackedBank:
    """P AdapterBanks over the same adapters (same names, same order) and the same input width n."""

    def __init__(self, banks: Sequence[AdapterBank]):
        banks = list(banks)
        if not banks or not all(isinstance(b, AdapterBank) for b in banks):
            raise ValueError(f"a PackedBank needs one or more AdapterBanks, got {[type(b).__name__ for b in banks]}")
        first = banks[0]
        for p, b in enumerate(banks[1:], start=1):
            if b.names != first.names:
                raise ValueError(f"packed part {p} holds adapters {b.names}, part 0 holds {first.names}")
            if b.shape[2] != first.shape[2]:
                raise ValueError(f"packed part {p} reads inputs of width {b.shape[2]}, part 0 of {first.shape[2]}")
        self.banks, self.names = banks, first.names
        self.sizes = [b.shape[1] for b in banks]  # each part's output width m_p
        cdt = rt.compute_dtype(first.B.dtype)
        self.shared_a = all(b.shared_a for b in banks)
        self.At = torch.cat([b.A.T.to(cdt) for b in banks], dim=1) if self.shared_a else None  # (n, sum r_p)
        self._splits = [b.shape[3] for b in banks]  # z's columns per part: r_p
        self._few = self._few_factors() if self.shared_a else None

    def _few_factors(self):
        """SEQR's few-token factors of all parts as one: block-diagonal R stack (sum r_p, sum N r_p), offsets
        (P N,) or None, percentile knots (P N, Q) and target, or None when the parts cannot score as one."""
        facts = [b.seqr_factors() for b in self.banks]  # [(R_stacked, offset, cdf)]
        if len(set(self._splits)) != 1 or len({f[1] is None for f in facts}) != 1 or \
                len({f[2] is None for f in facts}) != 1:
            return None  # ranks differ, or only some parts are calibrated: part by part
        R_bd = torch.block_diag(*[f[0] for f in facts])  # (P r, P N r)
        offset = None if facts[0][1] is None else torch.cat([f[1] for f in facts])  # (P N,)
        cdf = None if facts[0][2] is None else (torch.cat([f[2][0] for f in facts]), facts[0][2][1])  # (P N, Q), (Q,)
        return R_bd, offset, cdf

    @property
    def num_parts(self) -> int:
        return len(self.banks)

    def z(self, xf: torch.Tensor) -> torch.Tensor | None:
        """Every part's z = A_p x from one GEMM, (T, n) -> (T, sum r_p); None without shared A's."""
        return None if self.At is None else xf @ self.At.to(xf.dtype)  # (T, sum r_p)

    def part_z(self, z: torch.Tensor | None) -> list[torch.Tensor | None]:
        return [None] * self.num_parts if z is None else list(torch.split(z, self._splits, dim=1))  # [(T, r_p)]

    def seqr_scores(self, z: torch.Tensor) -> torch.Tensor | None:
        """(T, P, N) SEQR scores of a few tokens in one product, or None where the parts must score one by one
        (many tokens: each part's Gram form costs less)."""
        if self._few is None or (not rt.compiling() and z.shape[0] > rt.GATHER_TOKENS):
            return None
        R_bd, offset, cdf = self._few
        s = rt.seqr_scores_few(z, R_bd, offset, r=self._splits[0])  # (T, P N)
        if cdf is not None:
            s = rt.percentile_scores(s, *cdf)  # (T, P N)
        return s.view(z.shape[0], self.num_parts, -1)  # (T, P, N)

    def choose(self, xf: torch.Tensor, method: str, mask: torch.Tensor | None, *, k: int | None = None,
               z: torch.Tensor | None = None) -> torch.Tensor:
        """Each part's chosen adapter per token, (T, P), among the allowed adapters of bool `mask` (1, N) or
        (T, N) (None: all). xf (T, n) in the compute dtype, z = self.z(xf) or None."""
        router = registry.get(method)
        s = router.packed(self, xf, z) if router.packed is not None and z is not None else None  # (T, P, N)
        if s is not None:
            return rt.masked_argmax_(s, None if mask is None else mask[:, None, :])  # (T, P)
        return torch.stack([b.choose(xf, method, mask, k=k, z=zp)  # (T,) per part
                            for b, zp in zip(self.banks, self.part_z(z))], dim=1)  # (T, P)

    def apply(self, xf: torch.Tensor, idx: torch.Tensor, z: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Each part's update B_{p, idx[:, p]} A_p x, [(T, m_p)]."""
        return [b.apply(xf, idx[:, p], z=zp) for p, (b, zp) in enumerate(zip(self.banks, self.part_z(z)))]
