"""Routed inference inside a transformers model: `attach`, `detach` and the `routing` context.

`attach` swaps every adapted `nn.Linear` (or GPT-2 `Conv1D`) named in a `LoraLibrary` for a small
`RoutedLinear` that computes y = W x + B_i* A x, with i* chosen per token by the model's `RoutingState`:
the method, LAG's k, the adapters each batch row may use, and an optional trace. A forward pre-hook on
the model captures the attention mask (so traces skip padding) and counts forward passes.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from seqr.core import fused
from seqr.core import registry
from seqr.core import routers as rt
from seqr.core.bank import AdapterBank
from seqr.core.step import token_step
from seqr.core.memory import trim_heap
from seqr.core.trace import Trace
from seqr.hf import granularity as gr
from seqr.hf.compat import passed_cache
from seqr.hf.granularity import GRANULARITIES
from seqr.store.library import LoraLibrary

STATE_ATTR = "_seqr_state"


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return ()


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out m, in n) of an nn.Linear or a GPT-2 Conv1D (weight stored n x m); None for anything else."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, _conv1d_type()):
        n, m = module.weight.shape
        return m, n
    return None


@dataclass
class _Config:
    method: str | None = "seqr"  # a registered method; None when fixed adapters apply
    kind: str = "score"  # the method's registry kind, or "fixed"
    k: int | None = None
    allowed: torch.Tensor | None = None  # (R, N) bool: R = 1 (whole batch) or one row per batch row
    fixed: torch.Tensor | None = None  # (R,) adapter index per batch row for fixed-adapter methods
    granularity: str = "token"  # GRANULARITIES: see `routing`
    mix: int | None = None  # top-`mix` adapters per token, weighted by softmax(score / temperature)
    temperature: float = 1.0
    adapter: str | tuple | None = None  # the fixed adapter(s) as given (kind "fixed")
    probe_depth: float = 1.0  # granularities layers / request: the share of routed layers the probe sums
    given: bool = False  # granularity set by the caller (inherited by routing blocks), not the method's default


class RoutingState:
    """What every routed layer of one model reads on each call (shared by all of them)."""

    def __init__(self, library: LoraLibrary):
        self.names = library.names
        self.shared_a = library.shared_a
        self.centroids = library.has_centroids
        self.cfg = _Config()
        self.trace: Trace | None = None
        self.attention_mask: torch.Tensor | None = None  # (B, S) of the current forward, if given
        self.device = torch.device("cpu")  # the model's, where per-token masks are built
        self.hook = None
        self.prefill = True  # the current forward starts new sequences (no KV cache yet)
        self.sticky: dict[str, torch.Tensor] = {}  # layer (or gr.REQUEST) -> (B,) per-row choices made at prefill
        self.probing = False  # granularities "layers" / "request": inside the first (score-summing) forward
        self.layer_sum: torch.Tensor | None = None  # (B*T, N) or (B, N): scores summed over layers by the probe
        self.shared: torch.Tensor | None = None  # (B*T,) the probe's per-token choice, used by every layer
        self.probe_rows = (0, 0)  # (B, T) the probe saw
        self.probe_calls, self.probe_limit = 0, len(library.layers)  # routed layers the probe scored / will (gr.probe)
        self.n_layers = len(library.layers)  # routed layers per forward
        self.depth_sum: torch.Tensor | None = None  # (B*T, N) granularity "depth": scores of the layers so far
        self._mask: tuple | None = None  # ((B, T, allowed), (B*T, N) or (1, N)): the forward's token mask, built once

    # ------------------------------------------------------------------------------------------ config
    def configure(self, method=None, k=None, allowed=None, granularity="token", mix=None, temperature=1.0,
                  adapter=None, probe_depth=1.0) -> _Config:
        """Validate a method (or fixed adapters) / k / allowed / granularity / mixture combination; return a config."""
        N, index = len(self.names), {n: i for i, n in enumerate(self.names)}
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        gr.check_probe_depth(probe_depth, granularity)
        if mix is not None and (isinstance(mix, bool) or not isinstance(mix, int) or not 1 <= mix <= N):
            raise ValueError(f"mix must be an integer in [1, {N}] (adapters mixed per token), got {mix!r}")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if granularity != "token" and mix is not None:
            raise ValueError(f"mix is per token and layer; it cannot be combined with granularity {granularity!r}")
        mask = None if allowed is None else self._allowed_mask(allowed, index)
        if adapter is not None:
            if method is not None:
                raise ValueError(f"give a routing method or fixed adapter(s), not both: method={method!r}, "
                                 f"adapter={adapter!r}")
            if granularity != "token" or mix is not None:
                raise ValueError("granularity / mix apply to routers, not to fixed adapters")
            fixed = self._fixed(adapter, index)
            self._check_fixed_allowed(fixed, mask)
            return _Config(None, "fixed", None, mask, fixed, granularity, None, float(temperature),
                           adapter if isinstance(adapter, str) else tuple(adapter))
        router = self._router(method, index)
        if (granularity != "token" or mix is not None) and router.kind != "score":
            raise ValueError(f"granularity / mix apply to the score routers {registry.names('score')}; got method "
                             f"{method!r}")
        if router.takes_k and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= N):
            raise ValueError(f"method {method!r} needs an integer k in [1, {N}], got k={k!r}")
        return _Config(method, router.kind, k if router.takes_k else None, mask, None, granularity, mix,
                       float(temperature), probe_depth=float(probe_depth))

    def _router(self, method, index) -> registry.Router:
        try:
            router = registry.get(method)
        except ValueError:
            hint = f"; to apply adapter {method!r} itself, pass adapter={method!r}" if method in index else ""
            raise ValueError(f"unknown routing method {method!r}; expected one of {registry.names()}{hint}") from None
        if router.kind == "fixed":
            raise ValueError(f"method {method!r} applies given adapters; pass them as adapter=NAME or one name per "
                             f"batch row")
        router.check(shared_a=self.shared_a, centroids=self.centroids)
        return router

    def _fixed(self, adapter, index) -> torch.Tensor:
        rows = [adapter] if isinstance(adapter, str) else list(adapter) if isinstance(adapter, (list, tuple)) else None
        unknown = [a for a in rows or [adapter] if not isinstance(a, str) or a not in index]
        if rows is None or not rows or unknown:
            raise ValueError(f"unknown adapter(s) {unknown or adapter!r}; expected an adapter name of {self.names} "
                             f"or one per batch row")
        return torch.tensor([index[a] for a in rows])

    def _allowed_mask(self, allowed, index) -> torch.Tensor:
        if isinstance(allowed, str):
            raise ValueError(f"allowed must be a set of adapter names (or one set per row), got the string {allowed!r}")
        items = list(allowed)
        sets = [isinstance(a, (set, frozenset, list, tuple)) for a in items]
        if any(sets) and not all(sets):
            bad = next(a for a, is_set in zip(items, sets) if not is_set)
            raise ValueError(f"allowed must be one set of adapter names, or one set per batch row; got a mix of sets "
                             f"and single names (e.g. {bad!r}): write {{{bad!r}}} for a row allowed only {bad!r}")
        bad = [a for a in items if not sets[0] and not isinstance(a, str)] if items and not sets[0] else []
        if bad:
            raise ValueError(f"allowed names adapters by name (strings); got {bad[:3]!r}")
        per_row = bool(items) and all(sets)
        rows = items if per_row else [items]
        mask = torch.zeros(len(rows), len(self.names), dtype=torch.bool)
        for r, row in enumerate(rows):
            unknown = [a for a in row if a not in index]
            if unknown:
                raise KeyError(f"allowed set {'of row ' + str(r) + ' ' if per_row else ''}names unknown adapter(s) "
                               f"{unknown}; the library holds {self.names}")
            if not row:
                raise ValueError(f"allowed set {'of row ' + str(r) + ' ' if per_row else ''}is empty")
            mask[r, [index[a] for a in row]] = True
        return mask

    def _check_fixed_allowed(self, fixed: torch.Tensor, mask: torch.Tensor | None) -> None:
        if mask is None:
            return
        if fixed.shape[0] > 1 and mask.shape[0] > 1 and fixed.shape[0] != mask.shape[0]:
            raise ValueError(f"{fixed.shape[0]} per-row adapters but {mask.shape[0]} per-row allowed sets")
        R = max(fixed.shape[0], mask.shape[0])
        f, m = fixed.expand(R), mask.expand(R, -1)
        bad = [(r, self.names[int(f[r])]) for r in range(R) if not m[r, f[r]]]
        if bad:
            raise PermissionError("adapter not in the allowed set: " + ", ".join(f"row {r}: {a!r}" for r, a in bad))

    # ------------------------------------------------------------------------------------------ per call
    def rows(self, x: torch.Tensor) -> tuple[int, int]:
        """(batch rows B, tokens per row) of a layer input (B, T, n) or (T, n)."""
        return (x.shape[0], x.shape[1]) if x.dim() == 3 else (1, x.shape[0])

    def _per_row(self, t: torch.Tensor, B: int, T: int, what: str) -> torch.Tensor:
        """Expand a per-row tensor (R, ...) with R = 1 or B to one entry per token (B*T, ...)."""
        if t.shape[0] not in (1, B):
            raise ValueError(f"{what} has {t.shape[0]} rows but the batch has {B}")
        return t.to(self.device).expand(B, *t.shape[1:]).repeat_interleave(T, dim=0)

    def token_mask(self, B: int, T: int) -> torch.Tensor | None:
        """The tokens' allowed mask, (1, N) or (B*T, N), None: every adapter; built once per forward and shape."""
        m = self.cfg.allowed
        if m is None:
            return None
        if self._mask is None or self._mask[0][0] != (B, T) or self._mask[0][1] is not m:
            tokens = m.to(self.device) if m.shape[0] == 1 else self._per_row(m, B, T, "allowed")  # (1 or B*T, N)
            self._mask = (((B, T), m), tokens)
        return self._mask[1]

    def fixed_index(self, B: int, T: int) -> torch.Tensor:
        return self._per_row(self.cfg.fixed, B, T, "the per-row adapter list")

    def real_tokens(self, B: int, T: int) -> torch.Tensor:
        """(B*T,) True for real tokens: the last T columns of the forward's attention mask, if it had one."""
        am = self.attention_mask
        if am is None or am.dim() != 2 or am.shape[0] != B or am.shape[1] < T:
            return torch.ones(B * T, dtype=torch.bool, device=self.device)
        return am[:, -T:].reshape(-1).bool()

    def select_rows(self, index: torch.Tensor) -> None:
        """The next forwards continue rows `index` of the sequences prefilled last (a KV cache's
        batch_select_indices): per-row choices follow them."""
        self.sticky = {k: v[index.to(v.device)] for k, v in self.sticky.items()}

    def pre_hook(self, module, args, kwargs):
        am = kwargs.get("attention_mask")
        self.attention_mask = am if isinstance(am, torch.Tensor) else None
        past = passed_cache(kwargs)
        self.prefill = past is None or not hasattr(past, "get_seq_length") or past.get_seq_length() == 0
        self.depth_sum, self._mask = None, None
        if self.probing:
            return
        if self.prefill:
            self.sticky = {}
            self.layer_sum, self.probe_calls = None, 0  # granularity "request-reuse" sums during this forward
        if self.trace is not None:
            self.trace.next_step()
        g = self.cfg.granularity
        if g == "layers" or (g in gr.REQUEST_PROBED and (self.prefill or gr.REQUEST not in self.sticky)):
            gr.probe(self, module, args, kwargs, past)


class RoutedLinear(nn.Module):
    """A linear layer plus the routed LoRA update of its `AdapterBank`: y = W x + B_i* A x."""

    def __init__(self, base: nn.Module, bank: AdapterBank, state: RoutingState, name: str):
        super().__init__()
        self.base, self.bank, self.state, self.name = base, bank, state, name

    @property
    def weight(self) -> torch.Tensor:  # code that inspects q_proj.weight keeps working
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., m)
        if self.state.cfg.kind == "none":
            return y
        upd = routed_update(self.bank, x, self.state, self.name).view_as(y)  # (..., m) fp32 under a bf16 model
        return y + upd if y.dtype == upd.dtype else (y + upd).to(y.dtype)  # one rounding


def routed_update(bank: AdapterBank, x: torch.Tensor, st: RoutingState, name: str) -> torch.Tensor:
    """The per-token update of one layer under the state's method; records the trace when one is on."""
    B, T = st.rows(x)
    # like peft's default (autocast_adapter_dtype), the adapters run in fp32 under a bf16/fp16 base model
    xf = rt.in_compute_dtype(x.reshape(B * T, x.shape[-1]))  # (B*T, n)
    mask = st.token_mask(B, T)  # None, (1, N) or (B*T, N)
    cfg, z = st.cfg, None
    if cfg.kind == "mean":
        upd, idx = bank.mean_delta(xf, allowed=mask), None
    elif cfg.kind == "fixed":
        idx = st.fixed_index(B, T)  # (B*T,)
        upd = bank.apply(xf, idx)  # (B*T, m)
    elif cfg.mix is None and not st.probing and cfg.granularity == "token":  # the paper's: the shared step
        idx, upd, z = token_step(bank, xf, cfg.method, mask, cfg.k)  # (B*T,), (B*T, m), (B*T, r) or None
    else:
        z = bank.z(xf) if bank.shared_a else None  # (B*T, r): A x once, for scoring and the update
        if cfg.mix is not None:
            upd, idx = _mixture(bank, xf, z, cfg, mask)  # (B*T, m), (B*T,) each token's top adapter
        else:
            if st.probing:
                idx = gr.probe_choice(bank, xf, z, st, mask, B, T)  # (B*T,)
            elif cfg.granularity in ("prompt", "prompt-vote"):
                idx = gr.prompt_choice(bank, xf, z, st, name, B, T)  # (B*T,)
            elif cfg.granularity == "layers":
                idx = gr.layers_choice(st, B, T)  # (B*T,)
            elif cfg.granularity in gr.REQUEST_PROBED:
                idx = gr.request_choice(st, B, T)  # (B*T,)
            elif cfg.granularity == gr.REUSE:
                idx = gr.reuse_choice(bank, xf, z, st, mask, B, T)  # (B*T,)
            else:
                idx = gr.depth_choice(bank, xf, z, st, mask)  # (B*T,) granularity "depth"
            upd = bank.apply(xf, idx, z=z)  # (B*T, m)
    if st.trace is not None:
        _record(st, bank, name, xf, z, idx, mask, B, T)
    return upd


def _mixture(bank: AdapterBank, xf, z, cfg: _Config, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`mix` adapters per token, their updates weighted by softmax(score / temperature): (update, top-1)."""
    s = bank.scores(xf, cfg.method, z=z)  # (B*T, N)
    k = min(cfg.mix, int(mask.sum(-1).min()) if mask is not None else cfg.mix)
    top, idx = rt.masked_topk_(s, None if mask is None else mask.expand_as(s), k)  # (B*T, k) allowed only
    hi = torch.finfo(top.dtype).max
    w = (top / cfg.temperature).clamp_(-hi, hi).softmax(-1)  # (B*T, k) finite weights even for +-inf scores
    upd = sum(w[:, j, None] * bank.apply(xf, idx[:, j], z=z) for j in range(k))  # (B*T, m)
    return upd, idx[:, 0]


def _record(st: RoutingState, bank: AdapterBank, name: str, xf, z, idx, mask, B: int, T: int) -> None:
    real = st.real_tokens(B, T)  # (B*T,)
    real = real.to(xf.device)
    rows = torch.arange(B).repeat_interleave(T)[real.cpu()]
    if st.trace.light:  # only what was used: per-row counts and the outside-set check, no score vectors
        chosen = torch.full((int(real.sum()),), -1, dtype=torch.long) if idx is None else idx[real].cpu()
        st.trace.record(name, rows=rows, chosen=chosen)
        return
    xr, zr = xf[real], None if z is None else z[real]
    mr = None if mask is None else mask.expand(B * T, -1)[real]
    vectors = {"norm": bank.scores(xr, "seqr" if bank.shared_a else "spectr", z=zr),  # (t, N) calibrated exact norms
               "arrow": bank.scores(xr, "arrow")}  # (t, N)
    router = registry.get(st.cfg.method) if st.cfg.kind in ("score", "shortlist") else None
    if router is not None and router.trace == "own" and router.score is not None:
        vectors["own"] = bank.scores(xr, st.cfg.method, z=zr)  # (t, N) the routing method's own scores
    if mr is not None:
        vectors = {key: v.masked_fill(~mr, float("-inf")) for key, v in vectors.items()}
    chosen = torch.full((xr.shape[0],), -1, dtype=torch.long, device=xr.device) if idx is None else idx[real]
    used = None if router is None else router.used_scores(vectors, st.cfg.k)
    margin = torch.full((xr.shape[0],), float("nan"), device=xr.device) if used is None else _margin(used, chosen)
    st.trace.record(name, rows=rows, chosen=chosen, margin=margin, **{k: v.float() for k, v in vectors.items()})


def _margin(used: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The chosen adapter's score minus the best other one's, per decision."""
    top = used.gather(1, chosen[:, None])[:, 0]  # (t,)
    return top - used.scatter(1, chosen[:, None], float("-inf")).max(-1).values  # (t,)


# ---------------------------------------------------------------------------------------------- public API
def attach(model: nn.Module, library: LoraLibrary, *, method: str | None = None, adapter=None,
           k: int | None = None, granularity: str | None = None, probe_depth: float = 1.0) -> nn.Module:
    """Replace each linear layer named in the library by a routed layer; returns the model. It routes with
    `method`, by default the library's (`LoraLibrary.default_method`: seqr for a shared A, spectr otherwise), at
    `granularity` (see `routing`; by default SEQR decides once per request, "request-vote", and every other method
    per token: `granularity="token"` is the paper's per-token routing), or applies fixed `adapter`(s) (a
    name, or one per batch row) until a `routing` block says otherwise."""
    method = library.default_method if method is None and adapter is None else method
    given, granularity = granularity is not None, gr.default_for(method, adapter) if granularity is None else granularity
    if hasattr(model, STATE_ATTR):
        raise ValueError("a seqr library is already attached to this model; call seqr.detach(model) first")
    modules = dict(model.named_modules())
    problems = []
    for layer in library.layers:
        mod, want = modules.get(layer), library.meta.layers[layer]
        if mod is None:
            problems.append(f"{layer}: no such module in the model")
        elif linear_shape(mod) is None:
            problems.append(f"{layer}: is a {type(mod).__name__}, not an nn.Linear or Conv1D")
        elif linear_shape(mod) != tuple(want):
            problems.append(f"{layer}: the model's layer is (out, in) = {linear_shape(mod)}, the library's {tuple(want)}")
    if problems:
        raise ValueError(f"the library ({library.meta.base_model or 'unknown base model'}) does not match this "
                         f"model ({len(problems)} layer(s)):\n  " + "\n  ".join(problems[:20]))
    state = RoutingState(library)
    state.cfg = state.configure(method, k, granularity=granularity, adapter=adapter, probe_depth=probe_depth)
    state.cfg.given = given
    state.device = next(model.parameters()).device
    for layer in library.layers:
        bank = library.bank(layer, device=state.device)  # the routing math runs where the model does
        if state.cfg.kind in ("score", "shortlist"):
            bank.prepare(method)
        parent, _, child = layer.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, RoutedLinear(modules[layer], bank, state, layer))
    state.hook = model.register_forward_pre_hook(state.pre_hook, with_kwargs=True)
    setattr(model, STATE_ATTR, state)
    if method == "seqr" and library.shared_a:
        fused.available()  # the fused step built now (once per venv and CPU), not inside the first request
    trim_heap()  # the per-adapter tensors the banks replaced: their pages back to the OS
    return model


def detach(model: nn.Module) -> nn.Module:
    """Put the original linear modules back (the very same objects) and remove the routing hook."""
    state = _state(model)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, RoutedLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, mod.base)
    state.hook.remove()
    delattr(model, STATE_ATTR)
    return model


@contextlib.contextmanager
def routing(model: nn.Module, method: str | None = None, *, adapter=None, allowed=None, k: int | None = None,
            trace: bool | str = False, granularity: str | None = None, mix: int | None = None,
            temperature: float = 1.0, probe_depth: float | None = None):
    """Route the calls inside the block with `method` (default: the attached one), or apply fixed `adapter`s (a
    name, or one name per batch row: no routing, e.g. an oracle), only among `allowed`
    adapters (a set of names, or one set per batch row), recording a `Trace` when `trace=True` (every
    router's scores too) or `trace="choices"` (only the adapter each decision used: cheap, for serving).
    `granularity="prompt"`: one adapter per row and layer, chosen at prefill by the mean score over the prompt
    and kept for the tokens that follow ("prompt-vote": by the majority of the prompt tokens' picks);
    `granularity="layers"`: one adapter per token for all layers, the argmax of its scores summed over layers
    (a first forward measures them: twice the compute); `granularity="request"`: one adapter per row for all
    layers and every later token, the argmax of the prompt's scores summed over its real tokens and the layers (one
    extra prefill, nothing extra per decoded token); `granularity="request-reuse"`: the same choice made inside the
    one prefill, which routes the prompt per token and keeps its KV cache (no extra prefill);
    `granularity="request-vote"`: "request" with each real prompt token voting for its own layer-summed argmax,
    the row taking the most-voted adapter; `probe_depth` < 1 (layers, request, request-vote): only the first share
    of the routed layers, in forward order, decides, and the probe forward stops after them; `granularity="depth"`:
    per token and layer, the argmax of the scores summed over that layer and the routed layers before it (one
    forward); `mix=K`: the top K adapters per token, softmax(score/temperature)-weighted. Without `granularity`
    (and `probe_depth`), a score router keeps the ones given to `attach` or an enclosing block, else its default:
    request-level for SEQR, per token for every other router (`seqr.hf.granularity.default_for`)."""
    state = _state(model)
    saved, saved_trace = state.cfg, state.trace
    if method is None and adapter is None:  # keep the current choice: its method, or its fixed adapters
        method, adapter = state.cfg.method, state.cfg.adapter
    if adapter is None:
        k = (state.cfg.k if method == state.cfg.method else None) if k is None else k
    granularity, probe_depth, given = _inherited(state, method, adapter, mix, granularity, probe_depth)
    state.cfg = state.configure(method, k, allowed, granularity, mix, temperature, adapter=adapter,
                                probe_depth=probe_depth)
    state.cfg.given = given
    if trace not in (False, True, "choices"):
        raise ValueError(f"trace must be False, True or 'choices' (adapters used only), got {trace!r}")
    shown = method if adapter is None else (adapter if isinstance(adapter, str) else tuple(adapter))
    state.trace = Trace(list(state.names), shown, state.cfg.k, light=trace == "choices", router=state.cfg.method,
                        allowed=state.cfg.allowed) if trace else None
    try:
        yield state.trace
    finally:
        state.cfg, state.trace = saved, saved_trace


def _inherited(state: RoutingState, method, adapter, mix, granularity, probe_depth) -> tuple[str, float, bool]:
    """(granularity, probe_depth, given) of a routing block: as given; else, for a score router without a mixture,
    the enclosing one (attach's or an outer block's) when its caller gave it, or the method's default
    (`gr.default_for`: request-level for SEQR); else per token."""
    depth = 1.0 if probe_depth is None else probe_depth
    if granularity is not None:
        return granularity, depth, True
    if not (adapter is None and mix is None and method in registry.names("score")):
        return "token", depth, False
    if state.cfg.given:
        return state.cfg.granularity, state.cfg.probe_depth if probe_depth is None else probe_depth, True
    g = gr.default_for(method)
    keep = g == state.cfg.granularity and probe_depth is None  # the attached probe_depth goes with it
    return g, state.cfg.probe_depth if keep else depth, False


@torch.no_grad()
def request_choices(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                    method: str | None = None, allowed=None, probe_depth: float | None = None,
                    position_ids: torch.Tensor | None = None, granularity: str = gr.DEFAULT) -> list[str]:
    """The adapter `granularity` ("request-vote", the default, or "request") gives each row of a prompt batch
    (input_ids (B, T), left-padded with `attention_mask`, and `position_ids` when given), found by its probe alone:
    the forward routed per token that sums each row's scores over its real tokens and the routed layers (the first
    `probe_depth` share; "request-vote": each token's sum is its vote), stopped there. For engines that then serve
    each request with that one adapter (e.g. vLLM)."""
    if granularity not in gr.REQUEST_PROBED:
        raise ValueError(f"request_choices decides per request: granularity must be one of {gr.REQUEST_PROBED}, "
                         f"got {granularity!r}")
    state = _state(model)
    with routing(model, method, allowed=allowed, granularity=granularity, probe_depth=probe_depth):
        state.prefill, state.sticky = True, {}
        state.attention_mask = attention_mask
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        gr.probe(state, model, (), {k: v for k, v in kwargs.items() if v is not None}, None)
        rows = state.sticky.pop(gr.REQUEST)  # (B,)
    return [state.names[int(i)] for i in rows]


def select_rows(model: nn.Module, index: torch.Tensor) -> None:
    """Tell a routed model that its next forwards continue rows `index` of the last prefill (call it with a
    KV cache's batch_select_indices); a model without a seqr library attached is left alone."""
    state = getattr(model, STATE_ATTR, None)
    if state is not None:
        state.select_rows(index)


def _state(model: nn.Module) -> RoutingState:
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ValueError("no seqr library is attached to this model; call seqr.attach(model, library) first")
    return state
