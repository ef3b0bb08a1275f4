"""One routing step, shared by both engines' routed layers (hf/layers.py for transformers, vllm/routing.py for
vLLM): each token's choice among its allowed adapters and its update, for one bank or for the packed parts of one
module (q | k | v of vLLM's qkv_proj).

    z   = A x                                   once per token, for the scores and the update (shared A only)
    i*  = argmax_{i in allowed} s_i(x, z)       the router's scores (SEQR: (||R_i z|| - mu_i) / sigma_i)
    upd = B_i* z   (or B_i* A_i* x)             the chosen adapter's update
"""
from __future__ import annotations

import torch

from seqr.core import fused
from seqr.core import routers as rt
from seqr.core.bank import AdapterBank
from seqr.core.packed import PackedBank


def token_step(bank: AdapterBank | PackedBank, xf: torch.Tensor, method: str, mask: torch.Tensor | None,
               k: int | None = None) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor], torch.Tensor | None]:
    """Route tokens xf (T, n), in the compute dtype, with `method` among the adapters of bool `mask` ((1, N),
    (T, N), or None: all) and apply the choice: (idx, update, z). A bank gives idx (T,) and update (T, m); a
    PackedBank idx (T, P) and [(T, m_p)]. z = A x, (T, r) or (T, sum r_p), is None without a shared A.
    SEQR on a few float32 CPU tokens takes the fused step (core/fused.py), the same in one call."""
    out = fused_step(bank, xf, method, mask)
    if out is not None:
        return out
    z = bank.z(xf) if bank.shared_a else None  # (T, r): computed once, reused by the scores and the update
    idx = bank.choose(xf, method, mask, k=k, z=z)  # (T,) or (T, P)
    return idx, bank.apply(xf, idx, z=z), z  # (T, m) or [(T, m_p)]


def fused_step(bank: AdapterBank | PackedBank, xf: torch.Tensor, method: str, mask: torch.Tensor | None,
               has: torch.Tensor | None = None, joined: bool = False):
    """`token_step` by the fused kernel, or None where it does not apply. `has` (T,) bool: tokens that carry a set
    (the others may take any adapter and get no update). `joined`: a PackedBank's update as one (T, sum m_p)."""
    if rt.compiling() or method != "seqr" or not fused.enabled():  # a compiled graph fuses the eager step itself
        return None
    args = fused.args_of(bank)
    out = None if args is None else fused.seqr_step(xf, args, mask, has)
    if out is None:
        return None
    idx, upd, z = out  # (T, P), (T, sum m_p), (T, P r)
    if isinstance(bank, AdapterBank):
        return idx[:, 0], upd, z  # (T,), (T, m), (T, r)
    return idx, upd if joined else list(upd.split(bank.sizes, dim=1)), z
