"""Analytic cost model of the routers: multiply-accumulates per token and numbers stored (the paper's Table 1).

One adapted layer W (m x n) carries N rank-r updates B_i A_i. Per token x (n,), routing costs (MACs):

    naive    N (r n + m r)        ||B_i A_i x|| formed adapter by adapter
    spectr   N (r n + r)          ||S_i V_i^T x|| with explicit V_i (n x r)
    arrow    N n                  |v_i . x| with one prototype v_i (n,) per adapter
    lag      N n + k (r n + r)    ARROW's top k, then SPECTR on those k
    seqr     N r^2                ||R_i z||, z = A x shared with the update (shared_macs = r n)
    seqr, one A_i per adapter:    N (r n + r^2), nothing shared
    centroid N n + n              cos(x, c_i) with one unit centroid c_i (n,) per adapter (and ||x||)
    centroid-seqr                 centroid + seqr: the centroid's top k, then SEQR among them

The baselines are costed as their papers compute them, whether or not A is shared. `shared_macs` is routing work
left out of `macs` because the chosen adapter's update needs it anyway; the timed routing work is macs + shared_macs.
LAG is costed as gathered (k r n per token); with few adapters (N <= LAG_DENSE_PER_K k, `routers.lag_dense`)
the bank runs N (r n + r) dense MACs instead, which is faster than gathering k adapters' vectors per token.

Numbers stored for routing AND applying the updates: the updates, n r + N m r with a shared A or N (r n + m r)
otherwise, plus each router's state: naive none; spectr N (n r + r) (V_i, S_i); arrow N n (prototypes);
lag N n + N (n r + r); seqr N r (r + 1) / 2 (packed Grams G_i = R_i^T R_i); centroid N n. The formulas live in
each router's registry entry (`seqr.core.registry`). A shared-A SEQR library thus holds
n r + N (m r + r (r + 1) / 2) numbers, what `AdapterBank.numel` reports.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field

from seqr.core import registry
from seqr.core.argfmt import Parser


def methods() -> list[str]:
    """Every registered router with a cost formula: Table 1's order first, then the others in report order."""
    costed = [r for r in registry.routers() if r.cost is not None]
    return [r.name for r in sorted(costed, key=lambda r: (r.table1 is None, r.table1 or 0, r.order))]


METHODS = tuple(methods())  # at import: the built-ins (`methods()` also lists routers registered later)


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be positive, got {value}")


@dataclass(frozen=True)
class Cost:
    """Per-token routing MACs and library storage of one method; derived fields are computed, not passed."""

    method: str
    N: int
    n: int
    m: int
    r: int
    k: int | None = None
    shared_a: bool = True
    bytes_per_param: float = 4
    macs: int = field(init=False)  # routing MACs per token
    shared_macs: int = field(init=False)  # per-token routing work reused by the update (SEQR's z = A x)
    params: int = field(init=False)  # numbers stored for the whole library: routing state + updates
    bytes: float = field(init=False)  # params * bytes_per_param

    def __post_init__(self):
        if self.method not in methods():
            raise ValueError(f"unknown method {self.method!r}; expected one of {methods()}")
        router = registry.get(self.method)
        for name in ("N", "n", "m", "r"):
            _check_count(name, getattr(self, name))
        if router.takes_k:
            if self.k is None or isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= self.N:
                raise ValueError(f"{self.method} needs an integer k in [1, N={self.N}], got k={self.k!r}")
        else:
            object.__setattr__(self, "k", None)  # k only means something for shortlist routers
        bpp = self.bytes_per_param
        if isinstance(bpp, bool) or not isinstance(bpp, (int, float)) or not 0 < bpp < math.inf:
            raise ValueError(f"bytes_per_param must be a positive number, got {bpp!r}")
        macs, shared, state = self._formulas()
        N, n, m, r = self.N, self.n, self.m, self.r
        updates = n * r + N * m * r if self.shared_a else N * (r * n + m * r)
        params = updates + state
        for name, value in (("macs", macs), ("shared_macs", shared), ("params", params)):
            object.__setattr__(self, name, value)
        nbytes = params * bpp
        object.__setattr__(self, "bytes", int(nbytes) if float(nbytes).is_integer() else nbytes)

    def _formulas(self) -> tuple[int, int, int]:
        """(routing MACs per token, shared MACs per token, routing state stored): the router's registry entry."""
        return registry.get(self.method).cost(self.N, self.n, self.m, self.r, self.k, self.shared_a)

    def as_dict(self) -> dict:
        return asdict(self)


def costs(method: str, N: int, n: int, m: int, r: int, k: int | None = None, *, shared_a: bool = True,
          bytes_per_param: float = 4) -> Cost:
    """Cost of routing with `method` over N adapters of rank r on an m x n layer (k: LAG's candidates)."""
    return Cost(method, N, n, m, r, k, shared_a=shared_a, bytes_per_param=bytes_per_param)


def costs_table(N: int, n: int, m: int, r: int, k: int | None, shared_a: bool = True,
                bytes_per_param: float = 4) -> list[Cost]:
    """Every method's cost, in Table 1's order."""
    return [costs(meth, N, n, m, r, k, shared_a=shared_a, bytes_per_param=bytes_per_param) for meth in methods()
            if registry.get(meth).takes_k <= (k is not None)]


def human(value: float, base: int = 1000, units=("", "K", "M", "G", "T", "P")) -> str:
    """3 significant digits with a unit suffix: 65536000 -> '65.5M', 4096000 -> '4.1M', 64000 -> '64K'."""
    i = 0
    while i + 1 < len(units) and abs(value) >= base ** (i + 1):
        i += 1
    scaled = float(f"{value / base ** i:.3g}")
    if abs(scaled) >= base and i + 1 < len(units):  # 999.96K rounds to 1000K: move up a unit
        i, scaled = i + 1, float(f"{value / base ** (i + 1):.3g}")
    return f"{scaled:g}{units[i]}"


def human_bytes(nbytes: float) -> str:
    """Binary units: 131347072 -> '125 MiB'."""
    return human(nbytes, 1024, (" B", " KiB", " MiB", " GiB", " TiB", " PiB"))


def format_table(rows: list[Cost]) -> str:
    """Markdown table of MACs per token and library storage."""
    lines = ["| method | routing MACs/token | shared MACs/token | params stored | memory |",
             "|---|---:|---:|---:|---:|"]
    for c in rows:
        lines.append(f"| {c.method} | {human(c.macs)} | {human(c.shared_macs) if c.shared_macs else '-'} "
                     f"| {human(c.params)} | {human_bytes(c.bytes)} |")
    return "\n".join(lines)


# granularity -> (extra model positions, routing-scored positions per routed layer) per request of P prompt and
# G generated tokens, with a probe over the first `d` share of the routed layers (seqr.hf.granularity)
GRANULARITY_RULES = {
    "token": lambda P, G, d: ((0, 0), (P, G)),  # every position scored in every layer
    "depth": lambda P, G, d: ((0, 0), (P, G)),  # the same scores, summed over the layers so far
    "prompt": lambda P, G, d: ((0, 0), (P, 0)),  # decided at prefill, kept while decoding
    "prompt-vote": lambda P, G, d: ((0, 0), (P, 0)),
    "layers": lambda P, G, d: ((d * P, d * G), (d * P, d * G)),  # every forward probed first
    "request": lambda P, G, d: ((d * P, 0), (d * P, 0)),  # one probe prefill, then the fixed-adapter path
    "request-reuse": lambda P, G, d: ((0, 0), (P, 0)),  # the prefill is the probe, then the fixed-adapter path
    "request-vote": lambda P, G, d: ((d * P, 0), (d * P, 0)),  # "request"'s probe, a vote instead of a sum
}


def granularity_costs(prompt: int, new_tokens: int, probe_depth: float = 1.0) -> list[dict]:
    """Per granularity, for one request of `prompt` + `new_tokens` tokens: the extra model forward positions (a
    probe's share of a whole forward) and the positions whose routing scores each routed layer computes (each
    costs a router's MACs/token), at prefill and while decoding."""
    _check_count("prompt", prompt)
    _check_count("new_tokens", new_tokens)
    if isinstance(probe_depth, bool) or not isinstance(probe_depth, (int, float)) or not 0 < probe_depth <= 1:
        raise ValueError(f"probe_depth must be in (0, 1], got {probe_depth!r}")
    rows = []
    for g, rule in GRANULARITY_RULES.items():
        (xp, xd), (sp, sd) = rule(prompt, new_tokens, probe_depth)
        rows.append({"granularity": g, "extra_positions_prefill": xp, "extra_positions_decode": xd,
                     "scored_prefill": sp, "scored_decode": sd,
                     "extra_compute": (xp + xd) / (prompt + new_tokens)})  # share of the request's own forwards
    return rows


def format_granularity(rows: list[dict], prompt: int, new_tokens: int, probe_depth: float) -> str:
    lines = [f"one request of {prompt} prompt + {new_tokens} generated tokens, probes over {probe_depth:g} of the "
             "routed layers:", "",
             "| granularity | extra model positions: prefill | decode | extra compute | positions scored per routed "
             "layer (mean): prefill | decode |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['granularity']} | {r['extra_positions_prefill']:g} | {r['extra_positions_decode']:g} | "
                     f"{r['extra_compute']:.0%} | {r['scored_prefill']:g} | {r['scored_decode']:g} |")
    return "\n".join(lines)


DEFAULT_SHAPE = {"N": 1000, "n": 4096, "m": 4096, "r": 8, "k": 20}  # Table 1's setting
_SHAPE_HELP = {"N": "number of adapters", "n": "layer input size", "m": "layer output size", "r": "LoRA rank",
               "k": "LAG's number of candidates"}


def add_shape_args(parser: argparse.ArgumentParser, defaults: dict) -> None:
    """--N --n --m --r --k, shared by `seqr costs` and `seqr bench`; a default of None is shown as Table 1's."""
    for name, help_ in _SHAPE_HELP.items():
        parser.add_argument(f"--{name}", type=int, default=defaults[name], metavar="INT",
                            help=f"{help_} (default {defaults[name] or DEFAULT_SHAPE[name]})")


def main(argv: list[str] | None = None) -> int:
    """`seqr costs`: print Table 1 for a layer and library size."""
    p = Parser(prog="seqr costs", description="Routing MACs per token and storage per method.")
    add_shape_args(p, dict(DEFAULT_SHAPE, k=None))
    p.add_argument("--unique-a", action="store_true", help="one A_i per adapter instead of a shared A")
    p.add_argument("--bytes-per-param", type=float, default=4, help="bytes per stored number (default 4, fp32)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    g = p.add_argument_group("routing granularities (seqr.routing(granularity=...)): what each adds per request")
    g.add_argument("--granularities", action="store_true",
                   help="print what each granularity adds per request instead of the methods' table")
    g.add_argument("--prompt", type=int, default=64, help="prompt tokens per request (default 64)")
    g.add_argument("--new-tokens", type=int, default=16, help="generated tokens per request (default 16)")
    g.add_argument("--probe-depth", type=float, default=1.0, help="share of routed layers a probe sums (default 1)")
    args = p.parse_args(argv)
    if args.k is None:
        args.k = min(DEFAULT_SHAPE["k"], args.N)  # the default k=20 shrinks to the library when it is smaller
    bpp = int(args.bytes_per_param) if float(args.bytes_per_param).is_integer() else args.bytes_per_param
    try:
        rows = costs_table(args.N, args.n, args.m, args.r, args.k, shared_a=not args.unique_a, bytes_per_param=bpp)
        grains = granularity_costs(args.prompt, args.new_tokens, args.probe_depth)
    except ValueError as e:
        p.error(str(e))
    if args.granularities:
        print(json.dumps(grains, indent=2) if args.json else
              format_granularity(grains, args.prompt, args.new_tokens, args.probe_depth))
    elif args.json:
        print(json.dumps([c.as_dict() for c in rows], indent=2))
    else:
        A = "one A_i per adapter" if args.unique_a else "shared A"
        print(f"N={args.N} adapters, n={args.n}, m={args.m}, r={args.r}, k={args.k} (lag), {A}, "
              f"{bpp} bytes/param\n")
        print(format_table(rows))
    return 0
