"""Batched text generation with per-row routing permissions: the core the HTTP service runs.

Rows of one batch may belong to different users: each row is routed only among its own allowed adapters
(`routing(..., allowed=[set, ...])`), never a union. Greedy or temperature sampling per row, stop on the
eos token or per-row token limits, a KV cache, and a callback per generated token (for streaming). The
trace of the whole generation gives each row's routing summary: its share of decisions per adapter.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from seqr.hf.layers import routing
from seqr.hf.compat import cache_kw as cache_kw_of, forward_params, returned_cache


SEED_RANGE = (0, 2**63 - 1)  # what torch.Generator.manual_seed takes, non-negative


@dataclass
class Request:
    """One row: prompt token ids, the adapters it may use, and its sampling settings."""

    prompt: list[int]
    allowed: set[str]
    max_tokens: int = 16
    temperature: float = 0.0
    seed: int | None = None
    on_token: Callable[[int], None] | None = None  # called with each new token id as it is produced
    cancel: threading.Event | None = None  # set it (e.g. the client went away) to stop this row at the next step
    ignore_eos: bool = False  # generate max_tokens tokens, eos included (fixed-length benchmarks)

    def __post_init__(self):
        """Everything the worker will do with these values is checked here, so a request that passes cannot
        fail its batch-mates' generation."""
        if not self.prompt or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.prompt):
            raise ValueError("prompt must be a non-empty list of non-negative token ids")
        if not self.allowed:
            raise ValueError("allowed must name at least one adapter")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {self.max_tokens!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 <= t <= 10:
            raise ValueError(f"temperature must be a number in [0, 10], got {t!r}")
        lo, hi = SEED_RANGE
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not lo <= self.seed <= hi):
            raise ValueError(f"seed must be an integer in [{lo}, {hi}], got {self.seed!r}")


@dataclass
class Result:
    tokens: list[int]
    finish_reason: str  # "stop" (eos), "length", or "cancelled" (its client went away)
    routing: dict[str, float] = field(default_factory=dict)  # adapter -> share of this row's decisions
    prompt_tokens: int = 0
    outside: int = 0  # decisions routed outside the row's allowed set, from the server-side trace (must be 0)
    manifest: dict = field(default_factory=dict)  # what routed it (a serving engine's routing_manifest)


@torch.no_grad()
def generate(model, requests: list[Request], *, eos_id: int | None, pad_id: int, method: str | None = None,
             k: int | None = None, granularity: str | None = None, probe_depth: float | None = None) -> list[Result]:
    """Generate for every request in one left-padded batch (the model must have a library attached; `method`,
    `granularity` and `probe_depth`: the attached ones unless given, see `seqr.routing`)."""
    if not requests:
        return []
    dev, cache_kw = next(model.parameters()).device, cache_kw_of(forward_params(model))
    B, L = len(requests), max(len(r.prompt) for r in requests)
    ids = torch.full((B, L), pad_id, dtype=torch.long)  # (B, L) left-padded prompts
    mask = torch.zeros((B, L), dtype=torch.long)  # (B, L)
    for b, r in enumerate(requests):
        ids[b, L - len(r.prompt):] = torch.tensor(r.prompt)
        mask[b, L - len(r.prompt):] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    gens = [None if r.seed is None else torch.Generator().manual_seed(r.seed) for r in requests]
    out: list[list[int]] = [[] for _ in requests]
    done = [False] * B
    reasons = ["length"] * B
    with routing(model, method, k=k, allowed=[set(r.allowed) for r in requests], trace="choices",
                 granularity=granularity, probe_depth=probe_depth) as tr:
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        cache = returned_cache(res)
        while True:
            logits = res.logits[:, -1].float()  # (B, V)
            nxt = []
            for b, r in enumerate(requests):
                if not done[b] and r.cancel is not None and r.cancel.is_set():
                    done[b], reasons[b] = True, "cancelled"
                if done[b]:
                    nxt.append(pad_id)
                    continue
                tok = _pick(logits[b], r.temperature, gens[b])
                if eos_id is not None and tok == eos_id and not r.ignore_eos:
                    done[b], reasons[b] = True, "stop"
                    nxt.append(pad_id)
                    continue
                out[b].append(tok)
                if r.on_token is not None and not _deliver(r, tok):
                    done[b], reasons[b] = True, "cancelled"
                if len(out[b]) >= r.max_tokens:
                    done[b] = True
                nxt.append(tok)
            if all(done):
                break
            step = torch.tensor(nxt, device=dev)[:, None]  # (B, 1)
            live = torch.tensor([0 if d else 1 for d in done], device=dev)[:, None]  # (B, 1) finished rows: masked
            mask = torch.cat([mask, live], dim=1)  # (B, L + t)
            pos = mask.sum(-1, keepdim=True) - 1  # (B, 1)
            res = model(input_ids=step, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_kw: cache})
            cache = returned_cache(res)
    outside = tr.outside([r.allowed for r in requests]) if len(tr) else [0] * B
    results = []
    for b, r in enumerate(requests):
        counts = tr.counts(b) if len(tr) else {}
        total = sum(counts.values())
        share = {n: c / total for n, c in counts.items() if n in r.allowed} if total else {}
        results.append(Result(out[b], reasons[b], share, len(r.prompt), outside[b]))
    return results


def _deliver(r: Request, tok: int) -> bool:
    """Hand a token to the row's callback; a callback that fails (its client is gone) stops that row only."""
    try:
        r.on_token(tok)
        return True
    except Exception:
        return False


def _pick(logits: torch.Tensor, temperature: float, gen: torch.Generator | None) -> int:
    """Greedy at temperature 0, else a sample from softmax(logits / temperature), computed from the logits minus
    their maximum so that no positive temperature, however small, overflows (it tends to greedy)."""
    if temperature == 0:
        return int(logits.argmax())
    shifted = logits.double() - logits.max()  # (V,) <= 0; float64, where any positive float temperature is non-zero
    probs = (shifted / temperature).softmax(-1)  # (V,) finite: the maximum's entry is exactly 0 before exp
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))
