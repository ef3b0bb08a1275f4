"""The routing methods, each declared once: what it needs, how it scores, what it costs, how a trace reads it,
and where and how reports show it. Everything that lists, validates, dispatches, costs, traces or reports
methods reads this registry; adding a router is one `register(Router(...))` and one pure scoring function.

Kinds:
  score      argmax of (T, N) scores over the allowed adapters (seqr, spectr, naive, arrow, centroid)
  shortlist  its own `route`: a top-k of one score, then the argmax of another among the k (lag, centroid-seqr)
  mean       the mean of the allowed updates (mu)
  none       no update at all (base)
  fixed      a reference that applies given adapters, one per batch row (oracle); routes nothing
Trace rules (which recorded score vector a router's choice and margin follow):
  norm   the calibrated exact norms (seqr, spectr, naive pick the same adapter from them)
  arrow  ARROW's |v_i . x|
  lag    ARROW's top-k, then the norms among them
  own    the router's own scores, recorded when it is the one routing
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from seqr.core import routers as rt

KINDS = ("score", "shortlist", "mean", "none", "fixed")
NEEDS = ("shared_a", "svd", "centroids")  # what a library / bank must hold (stats are optional for every router)


def _lag_scores(v: dict, k: int | None):
    """LAG's choice as scores: the calibrated norms of ARROW's top-k candidates only (the others -inf)."""
    N = v["arrow"].shape[-1]
    if k is None or not 1 <= k <= N:
        raise ValueError(f"lag needs k in [1, {N}], got {k!r}")
    keep = v["arrow"].new_zeros(v["arrow"].shape, dtype=bool).scatter_(-1, v["arrow"].topk(k, -1).indices, True)
    return v["norm"].masked_fill(~keep, float("-inf"))  # (D, N)


# Trace rules as code: (recorded score vectors {"norm", "arrow", "own"?: (D, N)}, k) -> the (D, N) scores whose
# argmax is the router's choice (None: its own scores were not recorded)
TRACE_RULES = {"norm": lambda v, k: v["norm"], "arrow": lambda v, k: v["arrow"], "lag": _lag_scores,
               "own": lambda v, k: v.get("own")}


@dataclass(frozen=True)
class Router:
    """One routing method. `score(bank, x (T, n), z (T, r) or None) -> (T, N)`; `route(bank, x, mask, k, z) -> (T,)`
    for kind shortlist; `prompt_score(bank, x (B, T, n), real (B, T) bool) -> (B, N)` scores a whole prompt
    (default: the mean of its real tokens' scores); `cost(N, n, m, r, k, shared_a) -> (MACs per token, of them
    reused by the update, routing state stored)`; `width(N, m, n, r, k)`: temporary elements per token;
    `packed(packed_bank, x, z) -> (T, P, N) or None` the scores of all parts of a `PackedBank` at once (optional)."""

    name: str
    label: str
    order: int  # report order: lower first
    kind: str = "score"
    needs: frozenset = frozenset()
    score: Callable | None = None
    route: Callable | None = None
    prompt_score: Callable | None = None
    cost: Callable | None = None
    width: Callable = lambda N, m, n, r, k=1: N
    trace: str = "own"
    percentile: bool = False  # takes the percentile score when the bank holds quantiles (calibrated norms)
    takes_k: bool = False  # a shortlist size k (reported as name@k)
    packed: Callable | None = None  # (PackedBank, x, z) -> (T, P, N) scores of packed parts at once, or None
    evaluated: bool = True  # one of `seqr eval`'s default passes
    table1: int | None = None  # position in the paper's Table 1 (`seqr costs` lists those first, in that order)
    help: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or "@" in self.name:
            raise ValueError(f"a router needs a non-empty name without '@', got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"router {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        bad = sorted(set(self.needs) - set(NEEDS))
        if bad:
            raise ValueError(f"router {self.name!r}: unknown needs {bad}; expected some of {NEEDS}")
        if self.trace not in TRACE_RULES:
            raise ValueError(f"router {self.name!r}: trace must be one of {tuple(TRACE_RULES)}, got {self.trace!r}")
        if self.kind == "score" and self.score is None:
            raise ValueError(f"router {self.name!r}: a score router needs a score function")
        if self.kind == "shortlist" and self.route is None:
            raise ValueError(f"router {self.name!r}: a shortlist router needs a route function")
        object.__setattr__(self, "needs", frozenset(self.needs))

    @property
    def routes(self) -> bool:
        """Chooses an adapter per token (score or shortlist)."""
        return self.kind in ("score", "shortlist")

    def used_scores(self, vectors: dict, k: int | None = None):
        """The recorded scores (D, N) whose argmax is this router's choice, by its trace rule (see TRACE_RULES)."""
        return TRACE_RULES[self.trace](vectors, k)

    def key(self, k: int | None) -> str:
        """The name results are stored under: lag@3 for a router that takes k."""
        return f"{self.name}@{k}" if self.takes_k and k is not None else self.name

    def check(self, *, shared_a: bool, centroids: bool, where: str = "this library") -> None:
        """Raise naming what `where` lacks for this router."""
        if "shared_a" in self.needs and not shared_a:
            others = [r.name for r in routers() if r.routes and "shared_a" not in r.needs]
            raise ValueError(f"method {self.name!r} needs a shared A (one frozen A for all adapters); {where} has one "
                             f"A per adapter, so use one of {others}")
        if "centroids" in self.needs and not centroids:
            raise ValueError(f"method {self.name!r} needs every adapter's centroids; {where} lacks them "
                             f"(seqr calibrate computes them unless --withhold-centroids)")


_REGISTRY: dict[str, Router] = {}


def register(router: Router, *, replace: bool = False) -> Router:
    if router.name in _REGISTRY and not replace:
        raise ValueError(f"a router named {router.name!r} is already registered")
    _REGISTRY[router.name] = router
    return router


def unregister(name: str) -> None:
    get(name)
    del _REGISTRY[name]


def get(name) -> Router:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown routing method {name!r}; expected one of {names()}")
    return _REGISTRY[name]


def routers(kind: str | tuple | None = None) -> list[Router]:
    """Registered routers in report order (optionally of some kinds)."""
    kinds = (kind,) if isinstance(kind, str) else kind
    return sorted((r for r in _REGISTRY.values() if kinds is None or r.kind in kinds), key=lambda r: r.order)


def names(kind: str | tuple | None = None) -> list[str]:
    return [r.name for r in routers(kind)]


def split_key(key: str) -> tuple[Router, int | None]:
    """'lag@3' -> (the lag router, 3); 'seqr' -> (seqr, None)."""
    name, _, k = key.partition("@")
    return get(name), (int(k) if k else None)


def routes(key: str) -> bool:
    """Whether a result key ('lag@3', 'seqr', 'base') names a registered router that picks adapters per token."""
    name = key.partition("@")[0]
    return name in _REGISTRY and _REGISTRY[name].routes


def label(key: str) -> str:
    """A report's label for a result key ('lag@3' -> 'LAG@3'); unknown keys are shown as they are."""
    name, at, k = key.partition("@")
    return (_REGISTRY[name].label + (f"@{k}" if at else "")) if name in _REGISTRY else key


def report_order(keys) -> list[str]:
    """Result keys sorted as reports list them (registered order; unknown keys last, alphabetically)."""
    def rank(key):
        name = key.partition("@")[0]
        return (0, _REGISTRY[name].order, key) if name in _REGISTRY else (1, 0, key)
    return sorted(keys, key=rank)


# --------------------------------------------------------------------------------------------- built-ins
def _seqr(bank, x, z):
    return bank.seqr_scores(x, z)  # (T, N) from z = A x: the Gram form, z-scored


def _seqr_packed(packed, x, z):
    return packed.seqr_scores(z)  # (T, P, N) from every part's z at once, or None (score part by part)


def _spectr(bank, x, z):
    S, Vt = bank.svd
    return rt.zscore_(rt.spectr_norms(x, S, Vt), bank.mu, bank.sigma)  # (T, N)


def _naive(bank, x, z):
    return rt.zscore_(rt.naive_norms(x, bank.A.to(x.dtype), bank.B.to(x.dtype)), bank.mu, bank.sigma)  # (T, N)


def _arrow(bank, x, z):
    return rt.arrow_scores(x, bank.prototypes)  # (T, N)


def _centroid(bank, x, z):
    return rt.cosine_scores(x, bank.centroids)  # (T, N)


def _centroid_prompt(bank, x, real):
    return rt.cosine_scores(rt.masked_mean(x, real), bank.centroids)  # (B, N): the prompt's mean input


def _lag(bank, x, mask, k, z):
    S, Vt = bank.svd
    return rt.lag_route(x, bank.prototypes, S, Vt, k, mask, bank.mu, bank.sigma)  # (T,)


def _centroid_seqr(bank, x, mask, k, z):
    short = rt.cosine_scores(x, bank.centroids)  # (T, N)
    return rt.shortlist_argmax(short, bank.seqr_scores(x, z), k, mask)  # (T,)


def _gram(N, r):
    return N * r * (r + 1) // 2


def _sum(a: tuple, b: tuple) -> tuple:
    return tuple(x + y for x, y in zip(a, b))


def _seqr_cost(N, n, m, r, k, shared_a):
    return (N * r * r, r * n, _gram(N, r)) if shared_a else (N * (r * n + r * r), 0, _gram(N, r))


for _r in (
    Router("oracle", "oracle", 99, kind="fixed", help="each input's own task adapter (a reference, not a router)"),
    Router("base", "base", 0, kind="none", help="the untouched model: no update"),
    Router("mu", "MU", 1, kind="mean", help="the mean of the allowed adapters' updates"),
    Router("arrow", "ARROW", 2, score=_arrow, needs={"svd"}, trace="arrow", table1=3,
           cost=lambda N, n, m, r, k, sa: (N * n, 0, N * n), help="|v_i . x|, v_i the top right singular vector"),
    Router("lag", "LAG", 3, kind="shortlist", route=_lag, needs={"svd"}, trace="lag", takes_k=True, table1=2,
           cost=lambda N, n, m, r, k, sa: (N * n + k * (r * n + r), 0, N * n + N * (n * r + r)),
           width=lambda N, m, n, r, k=1: N + ((N * r + N) if rt.lag_dense(N, k) else k * r * n), help="ARROW's top k, then SPECTR among them"),
    Router("spectr", "SPECTR", 4, score=_spectr, needs={"svd"}, trace="norm", percentile=True, table1=1,
           cost=lambda N, n, m, r, k, sa: (N * (r * n + r), 0, N * (n * r + r)), width=lambda N, m, n, r, k=1: 2 * N * r,
           help="||S_i V_i^T x||, z-scored"),
    Router("seqr", "SEQR", 5, score=_seqr, packed=_seqr_packed, needs={"shared_a"}, trace="norm", percentile=True,
           table1=4, cost=_seqr_cost, width=lambda N, m, n, r, k=1: N + r * (r + 1),
           help="||R_i A x|| from the Grams, z-scored"),
    Router("naive", "naive", 6, score=_naive, trace="norm", percentile=True, evaluated=False, table1=0,
           cost=lambda N, n, m, r, k, sa: (N * (r * n + m * r), 0, 0), width=lambda N, m, n, r, k=1: 2 * N,
           help="every ||B_i A_i x|| formed directly (the exactness check)"),
    Router("centroid", "centroid", 7, score=_centroid, prompt_score=_centroid_prompt, needs={"centroids"},
           evaluated=False, cost=lambda N, n, m, r, k, sa: (N * n + n, 0, N * n),
           help="cosine of x to each silo's mean input at this layer"),
    Router("centroid-seqr", "centroid→SEQR", 8, kind="shortlist", route=_centroid_seqr,
           needs={"centroids", "shared_a"}, takes_k=True, evaluated=False,
           cost=lambda N, n, m, r, k, sa: _sum((N * n + n, 0, N * n), _seqr_cost(N, n, m, r, k, sa)),
           width=lambda N, m, n, r, k=1: 2 * N + r * (r + 1), help="the centroid's top k, then SEQR among them"),
):
    register(_r)
