"""How far one routing decision reaches: the granularities of the score routers inside a transformers model.

  token        per token and layer (the paper): `AdapterBank.choose` on each layer's input
  prompt       per row and layer, the best mean score over the prompt at prefill, kept for later tokens
  prompt-vote  per row and layer, the adapter most prompt tokens pick (ties: the better mean)
  depth        per token and layer, the argmax of the scores summed over this and the earlier routed layers
  layers       per token for all layers: a probe forward routed per token sums each token's scores over the
               routed layers; the real forward gives every layer of the token the argmax of that sum
  request      per row for all layers and all later tokens: at prefill a probe forward sums the scores of every
               real prompt token over the routed layers; the row's argmax applies everywhere after (one extra
               prefill, no decode cost, the fixed-adapter path from then on); on the paper-budget library it
               beat per-token SEQR (sign test p = 0.0025, 2925 dev examples)
  request-reuse  "request" with its probe reused as the prefill: the one prefill forward routes the prompt per
               token (the paper) and keeps its KV cache while it sums the same scores; the row's argmax serves
               every later token (no extra prefill, no decode cost; the prompt itself is not re-run)
  request-vote "request" decided by a vote instead of a sum: each real prompt token's own argmax of its scores
               summed over the routed layers (the "layers" choice) is one vote; the row's adapter is the one most
               tokens chose (ties: the better summed score). A few tokens whose scores run far above one adapter's
               calibration can no longer outweigh the rest of the prompt (same cost as "request"). SEQR's
               DEFAULT: on the paper-budget library it beat "request" (+207/-98, p = 4e-10) and every baseline

`probe_depth` < 1 (layers, request, request-vote) sums only the first share of the routed layers, in forward
order, and stops the probe forward there: a cheaper probe. Each function reads and writes the model's
`RoutingState` (`st`).
"""
from __future__ import annotations

import math

import torch

from seqr.core import registry
from seqr.core import routers as rt

GRANULARITIES = ("token", "prompt", "prompt-vote", "layers", "depth", "request", "request-reuse", "request-vote")
REQUEST_PROBED = ("request", "request-vote")  # one adapter per row for all layers and tokens, chosen by a probe
PROBED = ("layers", *REQUEST_PROBED)  # the granularities that run a probe forward first
VLLM_SERVED = ("token", *REQUEST_PROBED)  # what the vLLM engine serves: per token inside vLLM, per request before it
DEFAULT = "request-vote"  # SEQR's granularity unless one is given: it beat "request" (docs/results/layer-routing.md)
DEFAULT_METHOD = "seqr"  # the router DEFAULT applies to; every other method routes per token unless told otherwise
REQUEST = "__request__"  # the sticky key of a request-level choice (one per row for every layer)
REUSE = "request-reuse"  # the request-level granularity whose prefill is its own probe


class _ProbeDone(Exception):
    """Raised inside the probe forward once it has scored the layers it needs (probe_depth < 1)."""


def default_for(method: str | None, adapter=None) -> str:
    """The granularity `attach`, `routing` and the engines use when none is given: DEFAULT for SEQR (the library's
    default router for a shared A, where request-level routing was measured to win), "token" (the paper's) for
    every other method and for fixed adapters."""
    return DEFAULT if adapter is None and method == DEFAULT_METHOD else "token"


def check_probe_depth(probe_depth, granularity: str) -> None:
    """ValueError naming the value unless `probe_depth` is a share of the routed layers in (0, 1], and below 1 only
    for a probing granularity."""
    if isinstance(probe_depth, bool) or not isinstance(probe_depth, (int, float)) or not 0 < probe_depth <= 1:
        raise ValueError(f"probe_depth must be a share of the routed layers in (0, 1], got {probe_depth!r}")
    if probe_depth != 1 and granularity not in PROBED:
        raise ValueError(f"probe_depth applies to the probing granularities {PROBED}, not {granularity!r}")


def probed_layers(n_layers: int, probe_depth: float) -> int:
    """How many routed layers (in forward order) the probe scores: at least one."""
    return max(1, math.ceil(probe_depth * n_layers - 1e-9))


def probe(st, model, args, kwargs, past) -> None:
    """Granularities "layers" and "request": run the forward once routed per token (the paper's way) summing the
    scores of the first `probed_layers` routed layers, stop there, crop the KV cache back to what it held, and
    leave the decision for the real forward: per token (st.shared) or per row (st.sticky[REQUEST])."""
    before = past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else None
    st.probe_limit = probed_layers(st.n_layers, st.cfg.probe_depth)
    saved, st.trace, st.probing, st.layer_sum, st.shared, st.probe_calls = st.trace, None, True, None, None, 0
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except _ProbeDone:
        pass
    finally:
        st.probing, st.trace = False, saved
    if before is not None:
        _crop(past, before)
    if st.layer_sum is None:
        return
    if st.cfg.granularity == "layers":
        B, T = st.probe_rows
        st.shared = rt.masked_argmax_(st.layer_sum, st.token_mask(B, T))  # (B*T,)
    elif st.cfg.granularity == "request-vote":
        _vote_rows(st)
    else:
        _decide_rows(st)


def _decide_rows(st) -> None:
    """Each row's request-level choice: the argmax of its summed scores among its allowed adapters."""
    B = st.layer_sum.shape[0]
    m = st.cfg.allowed
    m = None if m is None else m.to(st.layer_sum.device).expand(B, -1)  # (B, N)
    st.sticky[REQUEST] = rt.masked_argmax_(st.layer_sum, m)  # (B,)


def _vote_rows(st) -> None:
    """Granularity "request-vote": each row's adapter is the one most of its real tokens pick by their own summed
    scores (st.layer_sum (B*T, N)) among the allowed; ties go to the better sum over the row."""
    B, T = st.probe_rows
    summed = _row_sums(st, st.layer_sum, B, T)  # (B, N) "request"'s row sums, taken before the argmax masks in place
    summed = summed.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)  # (B, N) NaN never wins a tie
    real = st.real_tokens(B, T).view(B, T).to(summed.dtype)  # (B, T)
    top = rt.masked_argmax_(st.layer_sum, st.token_mask(B, T)).view(B, T)  # (B, T) each token's pick
    votes = torch.zeros_like(summed).scatter_add_(1, top, real)  # (B, N) real tokens per adapter
    rank = summed.argsort(1).argsort(1).to(votes.dtype) / summed.shape[1]  # (B, N) in [0, 1), the sums' order
    st.layer_sum = votes + 0.5 * rank  # (B, N) the tie-break moves a score by under 0.5: never one vote
    _decide_rows(st)


def _crop(past, before: int) -> None:
    """Every cache layer back to `before` positions (a stopped probe filled only the first ones)."""
    if not hasattr(past, "layers"):
        if past.get_seq_length() == before:
            return
        raise ValueError(f"a probing granularity needs a cache it can crop back, got {type(past).__name__}")
    for i, layer in enumerate(past.layers):
        added = past.get_seq_length(i) - before
        if added > 0:
            layer.crop(-added)


def probe_choice(bank, xf, z, st, mask, B: int, T: int) -> torch.Tensor:
    """Inside the probe: route per token, add this layer's scores to the sum (per token for "layers" and
    "request-vote", per row over its real tokens for "request"), and stop the probe after its last layer."""
    s = bank.scores(xf, st.cfg.method, z=z)  # (B*T, N)
    if st.cfg.granularity == "request":
        _add_row_sums(st, s, B, T)
    else:
        st.layer_sum = s.clone() if st.layer_sum is None else st.layer_sum.add_(s)  # (B*T, N)
    st.probe_rows = (B, T)
    st.probe_calls += 1
    if st.probe_calls >= st.probe_limit:
        raise _ProbeDone
    return rt.masked_argmax_(s, mask)  # (B*T,)


def _row_sums(st, s: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """Scores s (B*T, N) summed over each row's real tokens: (B, N)."""
    real = st.real_tokens(B, T).view(B, T, 1)  # (B, T, 1) bool
    return torch.where(real, s.view(B, T, -1), 0.0).sum(1)  # (B, N)


def _add_row_sums(st, s: torch.Tensor, B: int, T: int) -> None:
    """Add one layer's scores s (B*T, N) over each row's real tokens to the rows' sums st.layer_sum (B, N)."""
    s_add = _row_sums(st, s, B, T)  # (B, N) this layer's scores over the prompt
    st.layer_sum = s_add if st.layer_sum is None else st.layer_sum.add_(s_add)  # (B, N)


def reuse_choice(bank, xf, z, st, mask, B: int, T: int) -> torch.Tensor:
    """Granularity "request-reuse". At prefill: route per token (the paper) and add this layer's scores over each
    row's real tokens to the row's sum; after the forward's last routed layer, each row's argmax becomes its
    choice. Later forwards of the same rows: that choice, in every layer (the fixed-adapter path)."""
    if not st.prefill:
        return request_choice(st, B, T)  # (B*T,)
    s = bank.scores(xf, st.cfg.method, z=z)  # (B*T, N)
    _add_row_sums(st, s, B, T)
    st.probe_calls += 1
    if st.probe_calls == st.n_layers:
        _decide_rows(st)
    return rt.masked_argmax_(s, mask)  # (B*T,)


def layers_choice(st, B: int, T: int) -> torch.Tensor:
    """Granularity "layers" in the real forward: every layer uses the probe's argmax of the summed scores."""
    if st.shared is None or st.shared.shape[0] != B * T:
        raise ValueError(f"granularity 'layers': the probe chose for {None if st.shared is None else st.shared.shape[0]}"
                         f" tokens but this layer sees {B * T}")
    return st.shared  # (B*T,)


def request_choice(st, B: int, T: int) -> torch.Tensor:
    """Granularity "request" in the real forward and every later one of the same rows: the row's choice."""
    rows = st.sticky.get(REQUEST)
    if rows is None or rows.shape[0] != B:
        raise ValueError(f"granularity 'request': {B} rows continue {None if rows is None else rows.shape[0]} "
                         f"prefilled ones; after a KV cache's batch_select_indices call "
                         f"seqr.hf.layers.select_rows(model, index) too")
    return rows if T == 1 else rows.repeat_interleave(T)  # (B*T,): a decode step's is the rows' own


def prompt_choice(bank, xf, z, st, name: str, B: int, T: int) -> torch.Tensor:
    """Granularity "prompt": at prefill, per row, the adapter with the best mean score over the row's real
    tokens (an exact argmax of that mean); "prompt-vote": the adapter most of those tokens pick (ties go to the
    better mean). Later forwards of the same rows (generated or answer tokens) keep the choice."""
    if st.prefill or name not in st.sticky:
        s = bank.scores(xf, st.cfg.method, z=z).view(B, T, -1)  # (B, T, N)
        real = st.real_tokens(B, T).view(B, T, 1).to(s.dtype)  # (B, T, 1)
        pooled = registry.get(st.cfg.method).prompt_score
        mean = ((s * real).sum(1) / real.sum(1).clamp(min=1) if pooled is None  # (B, N) mean score over the prompt
                else pooled(bank, xf.view(B, T, -1), real[..., 0].bool()))  # (B, N) the router's own prompt score
        m = st.cfg.allowed
        m = None if m is None else m.to(mean.device).expand(B, -1)  # (B, N)
        if st.cfg.granularity == "prompt-vote":
            mt = None if m is None else m.repeat_interleave(T, dim=0)  # (B*T, N)
            top = rt.masked_argmax_(s.reshape(B * T, -1).clone(), mt).view(B, T)  # (B, T) each token's pick
            votes = torch.zeros_like(mean).scatter_add_(1, top, real[..., 0])  # (B, N) real tokens per adapter
            mean = votes + 0.5 * torch.sigmoid(mean)  # (B, N) the tie-break never outweighs one vote
        st.sticky[name] = rt.masked_argmax_(mean, m)  # (B,)
    rows = st.sticky[name]
    if rows.shape[0] != B:
        raise ValueError(f"granularity 'prompt': {B} rows continue {rows.shape[0]} prefilled ones; after a "
                         f"KV cache's batch_select_indices call seqr.hf.layers.select_rows(model, index) too")
    return rows.repeat_interleave(T)  # (B*T,)


def depth_choice(bank, xf, z, st, mask) -> torch.Tensor:
    """Granularity "depth": per token, the argmax of its scores summed over this and every routed layer called
    before it in the same forward (one pass: the decision firms up with depth)."""
    s = bank.scores(xf, st.cfg.method, z=z)  # (B*T, N)
    prev = st.depth_sum
    st.depth_sum = s if prev is None or prev.shape != s.shape else prev + s  # (B*T, N)
    return rt.masked_argmax_(st.depth_sum.clone(), mask)  # (B*T,)
