"""Per-token routing inside vLLM's layers, in plain torch (no vLLM import: unit-testable without it).

Every request carries its *allowed set* as columns in its sampling parameters (sets.py); vLLM's input batch
gives each step's requests in token order. `SetRouting` turns both into each token's allowed mask over the
library's columns once per forward; every adapted layer then routes each token among its own request's adapters
only, with the same bank functions as the transformers path (hf/layers.py):
y = W x + B_i* A x, i* = the router's choice restricted to the token's mask.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch
from torch import nn

from seqr.core import fused, registry
from seqr.core import routers as rt
from seqr.core.bank import AdapterBank
from seqr.core.threads import one_thread
from seqr.core.packed import PackedBank
from seqr.core.step import fused_step, token_step
from seqr.core.trace import Trace
from seqr.vllm.sets import column_mask


class SetRouting:
    """What every routed vLLM layer of one model reads on a forward: the banks' column order, the method, and
    the current forward's per-token allowed mask."""

    def __init__(self, names: Sequence[str], columns: Sequence[str | None], method: str, k: int | None = None):
        self.configure(names, columns, method, k)
        self.mask: torch.Tensor | None = None  # (T, N) bool: the tokens' allowed adapters (bank order)
        self.has: torch.Tensor | None = None  # (T,) bool: tokens with at least one allowed adapter
        self.every, self.choose_mask = True, None  # all tokens have a set; the mask routing chooses under
        self.fused_flags: tuple | None = None  # this forward's masks as the fused step takes them (SEQR), or None
        self.single = False  # every token's set holds at most one adapter (request-level serving)
        self.tracing = False
        self.counting = False  # per-request decision counts (the serving engine's routing shares)
        self.token_request: torch.Tensor | None = None  # (T,) each token's row in `req_ids` (this step's batch)
        self.token_columns: torch.Tensor | None = None  # (T, C) each token's allowed columns, from its request's set
        self._set_masks: dict[tuple, torch.Tensor] = {}  # a request's columns -> (C,) its mask
        self.req_ids: list[str] = []  # this step's requests, in token order (vLLM's input batch)
        self._chosen: list[torch.Tensor] = []  # [(T, P)] this forward's choices, for the per-request counts
        self.per_request: dict[str, Counter] = {}  # request id -> adapter -> decisions ("" key: outside its set)
        self.mask_sources: Counter = Counter()  # forwards with the "batch"'s masks, or "none" (warm-up: no set)
        self._traced: Trace | None = None  # decisions since the last `trace()`, in core.trace's format
        self._set_rows: dict[bytes, int] = {}  # an allowed mask (bank order) -> its row in the trace

    def configure(self, names: Sequence[str], columns: Sequence[str | None], method: str, k: int | None) -> None:
        """Bank order `names`; `columns[c]` the adapter whose allowed bit is the set mask's column c (None: free)."""
        router = registry.get(method)
        if not router.routes:
            raise ValueError(f"the vLLM engine routes with {registry.names(('score', 'shortlist'))}, got {method!r}")
        col = {n: c for c, n in enumerate(columns) if n is not None}
        missing = [n for n in names if n not in col]
        if missing:
            raise ValueError(f"adapter(s) {missing} have no set-mask column; columns: {list(columns)}")
        if getattr(self, "names", None) not in (None, list(names)):  # a new library: its trace starts afresh
            self._traced, self._set_rows = None, {}
        self.names, self.method, self.k, self.n_columns = list(names), method, k, len(columns)
        self.col_index = torch.tensor([col[n] for n in names], dtype=torch.long)  # (N,)

    def requests(self, req_ids: Sequence[str], tokens: Sequence[int], sets: Sequence[Sequence[int] | None]) -> None:
        """The next forward's requests in token order, each one's scheduled tokens and the columns of its allowed
        set (None: a request that carries none gets no update), from vLLM's input batch: each token's request and
        allowed columns."""
        self.req_ids = list(req_ids)
        self.token_request = torch.repeat_interleave(torch.arange(len(self.req_ids)),
                                                     torch.as_tensor(tokens, dtype=torch.long))  # (T,)
        masks = [self._set_mask(s) for s in sets]  # [(C,)]
        self.token_columns = torch.stack(masks)[self.token_request] if masks else None  # (T, C)

    def _set_mask(self, columns: Sequence[int] | None) -> torch.Tensor:
        """(C,) bool mask of one request's columns (None: no set), made once per distinct set."""
        key = None if columns is None else tuple(columns)
        if key not in self._set_masks:
            self._set_masks[key] = (torch.zeros(self.n_columns, dtype=torch.bool) if key is None
                                    else column_mask(list(key), self.n_columns))
        return self._set_masks[key]

    def batch_columns(self, T: int) -> torch.Tensor | None:
        """(T, C) the tokens' allowed columns from this step's input batch, or None when this forward is not that
        batch's (vLLM's warm-up and dummy runs, which then route no token)."""
        cols, self.token_columns = self.token_columns, None  # one forward per step: never reused by another
        return cols if cols is not None and cols.shape[0] == T else None

    def begin(self, columns: torch.Tensor | None, T: int | None = None, device=None) -> None:
        """A forward's tokens' allowed columns, (T, C) bool or 0/1 (`batch_columns`); None: a forward of T tokens
        none of which has a set (vLLM's warm-up), so none is updated."""
        self._chosen = []
        self.mask_sources["none" if columns is None else "batch"] += 1
        if columns is None:
            columns = torch.zeros(T, self.n_columns, dtype=torch.bool, device=device)  # (T, C)
        elif device is not None:
            columns = columns.to(device)
        mask = columns[:, self.col_index.to(columns.device)].bool()  # (T, N)
        self.mask, self.has = mask, mask.any(dim=1)  # (T, N), (T,)
        self.every = bool(self.has.all())  # every token has a set: no masking of updates (read once per forward)
        self.single = bool((mask.sum(1) <= 1).all())  # every set holds one adapter (request-level): no scoring
        choose = mask if self.every else mask | ~self.has[:, None]  # (T, N) maskless rows: any choice
        self.choose_mask = None if bool(choose.all()) else choose  # None: every token may use every adapter
        self.fused_flags = fused.prepare(self.choose_mask, None if self.every else self.has, mask.shape[0],
                                         mask.shape[1], mask.device) if self.method == "seqr" else None

    def update_into(self, packed: PackedBank, x: torch.Tensor, y: torch.Tensor, names: Sequence[str]) -> bool:
        """The routed updates of tokens x (T, n), in the model's dtype, added into the layer's output y (T, sum m_p)
        in place by the fused step (one call, x read and y rounded inside it), as `update` with `joined` and then
        (y + upd).to(y.dtype) would. False (y untouched) where the fused step does not serve: call `update`."""
        mask, prepared = self.mask, self.fused_flags  # prepared: the fused step serves this forward (begin)
        if prepared is None or mask.shape[0] != x.shape[0] or x.dtype == torch.float64 or x.stride(1) != 1 \
                or rt.compiling():
            return False
        args = fused.args_of(packed)
        if args is None:
            return False
        self._note(names, fused.step_into_prepared(x, y, args, prepared), mask, self.has)
        return True

    def update(self, packed: PackedBank, xf: torch.Tensor, names: Sequence[str] | None = None,
               joined: bool = False) -> list[torch.Tensor] | torch.Tensor:
        """The routed updates B_i* A x of tokens xf (T, n), in the compute dtype (fp32 under a bf16 model, like
        peft), for each part of `packed` (HF layer `names`, for the trace): [(T, m_p)], or with `joined` one
        (T, sum m_p). A token with no allowed adapter (no set: vLLM's warm-up, a request without one) gets no
        update."""
        mask, has, every, choose = self.mask, self.has, self.every, self.choose_mask
        if mask is None or mask.shape[0] != xf.shape[0]:
            raise RuntimeError(f"routing mask for {None if mask is None else mask.shape[0]} tokens, got "
                               f"{xf.shape[0]}: `begin` did not run for this forward")
        fused = None if rt.compiling() else fused_step(packed, xf, self.method, choose, None if every else has, joined)
        if fused is not None:  # SEQR on a few tokens: one call (core/fused.py; a set of one is not scored there);
            # tokens without a set get no update
            idx, upds, _ = fused  # (T, P), (T, sum m_p) or [(T, m_p)]
            self._note(names, idx, mask, has)
            return upds
        with one_thread(xf.device):  # the eager step's tiny ops ((T, r) products, T gathered B's) on one thread
            if self.single and not rt.compiling():  # each token's one allowed adapter, applied without scoring
                idx = mask.to(torch.uint8).argmax(1)[:, None].expand(-1, packed.num_parts)  # (T, P)
                upds = packed.apply(xf, idx, z=packed.z(xf))  # [(T, m_p)]: the fixed-adapter path
            else:
                if rt.compiling():  # one graph for every forward: no branch on this forward's masks (rt.compiling)
                    choose, every = mask | ~has[:, None], False  # (T, N): maskless rows may choose any, no update
                idx, upds, _ = token_step(packed, xf, self.method, choose, self.k)  # (T, P), [(T, m_p)]
            self._note(names, idx, mask, has)
            upds = upds if every else [u * has[:, None].to(u.dtype) for u in upds]  # [(T, m_p)]
            return torch.cat(upds, dim=-1) if joined and len(upds) > 1 else upds[0] if joined else upds

    def _note(self, names: Sequence[str] | None, idx: torch.Tensor, mask: torch.Tensor, has: torch.Tensor) -> None:
        """A layer's choices (T, P) into the trace (when tracing) and this forward's counts (when counting)."""
        if self.tracing:
            self._record(names or [f"part{p}" for p in range(idx.shape[1])], idx, mask, has)
        if self.counting:
            self._chosen.append(idx)  # (T, P): counted per request once the forward is done (end())

    def end(self) -> None:
        """After a forward: add its decisions to each request's counts (one pass over every layer's choices).
        A forward whose tokens are not this step's requests' (vLLM's warm-up and dummy runs) counts nothing."""
        chosen, self._chosen = self._chosen, []
        tr, self.token_request = self.token_request, None  # this step's batch, counted once
        if not chosen or tr is None or tr.shape[0] != chosen[0].shape[0]:
            return
        idx = torch.cat(chosen, dim=1).cpu()  # (T, L): every routed part of every layer
        mask, has = self.mask.cpu(), self.has.cpu()  # (T, N), (T,)
        inside = mask.gather(1, idx)  # (T, L) chosen adapter allowed for its token
        N, R = len(self.names), len(self.req_ids)
        req = tr[:, None].expand_as(idx)[has]  # (t, L) tokens with a set only: the others got no update
        counts = torch.bincount((req * N + idx[has]).flatten(), minlength=R * N).view(R, N)  # (R, N)
        outside = torch.zeros(R, dtype=torch.long).index_add_(0, tr[has], (~inside[has]).sum(1))  # (R,)
        for r, i in counts.nonzero().tolist():
            self.per_request.setdefault(self.req_ids[r], Counter())[self.names[i]] += int(counts[r, i])
        for r in outside.nonzero()[:, 0].tolist():
            self.per_request.setdefault(self.req_ids[r], Counter())[""] += int(outside[r])

    def take(self, request_ids: Sequence[str]) -> dict[str, dict]:
        """{id: {"counts": {adapter: decisions}, "outside": decisions outside its set}} of these requests, which
        are forgotten here. vLLM's internal ids carry a suffix ("<id>-<8 chars>"): `request_ids` are the ids
        given to vLLM, matched to the internal ones with it."""
        want, out = set(request_ids), {}
        for rid in list(self.per_request):
            given = rid if rid in want else rid.rsplit("-", 1)[0]  # the id given to vLLM
            if given in want:
                c = self.per_request.pop(rid)
                out[given] = {"counts": {n: v for n, v in c.items() if n}, "outside": c.get("", 0)}
        return out

    def _record(self, names: Sequence[str], idx: torch.Tensor, mask: torch.Tensor, has: torch.Tensor) -> None:
        """Each token with a set: its choice per part (layer), under the trace row of its allowed set."""
        if self._traced is None:
            self._traced = self._new_trace()
        idx, mask = idx.cpu(), mask.cpu()  # (T, P), (T, N)
        tokens = has.cpu().nonzero()[:, 0]  # (t,) tokens with a set; the others got no update
        rows = torch.tensor([self._set_rows.setdefault(mask[t].numpy().tobytes(), len(self._set_rows))
                             for t in tokens.tolist()], dtype=torch.long)  # (t,)
        for p, name in enumerate(names):
            self._traced.record(name, rows=rows, chosen=idx[tokens, p])

    def _new_trace(self) -> Trace:
        return Trace(list(self.names), self.method, self.k, light=True, router=self.method)

    def trace(self, reset: bool = True) -> Trace:
        """The decisions traced since the last reset, as a light `core.trace.Trace` whose rows are the allowed sets
        seen (`by_set()`, `outside()`, `counts(row)`), with the forwards per mask source in `notes["masks"]`."""
        tr = self._traced or self._new_trace()
        keys = sorted(self._set_rows, key=self._set_rows.get)
        tr.allowed = torch.stack([torch.frombuffer(bytearray(k), dtype=torch.bool) for k in keys]) if keys else None
        tr.notes = {"masks": dict(self.mask_sources)}
        if reset:
            self._traced, self._set_rows, self.mask_sources = None, {}, Counter()
        return tr


class RoutedPacked(nn.Module):
    """A vLLM linear layer (returning (y, bias)) plus the routed updates of its packed parts: e.g. qkv_proj =
    q | k | v, each part routed on its own (the library adapts q, k and v as separate layers) and the adapted
    parts' routing work shared (`PackedBank`). A part without a bank (not adapted) adds nothing.

    Under vLLM's compilation the update is one opaque op (`seqr::routed_add_`, keyed by `key`, as vLLM's own
    attention reads its layer by name): the graph holds no bank, mask or branch of this forward, so a library change
    and any forward's sets reach the compiled model, which vLLM traces once and runs without guards."""

    def __init__(self, base: nn.Module, parts: Sequence[tuple[str, AdapterBank | None, int]], routing: SetRouting,
                 key: str = ""):
        super().__init__()
        self.base, self.routing, self.key = base, routing, key
        self.parts = [(name, bank, size) for name, bank, size in parts]  # plain list: banks are not parameters
        for name, bank, size in self.parts:
            if bank is not None and bank.shape[1] != size:
                raise ValueError(f"adapters of {name} have {bank.shape[1]} outputs; vLLM's layer has {size}")
        self.packed = PackedBank([bank for _, bank, _ in self.parts if bank is not None])
        self.names = [name for name, bank, _ in self.parts if bank is not None]  # the adapted parts' HF layers
        self.full = len(self.names) == len(self.parts)  # every part adapted: the updates cover the whole output
        if key:
            _LAYERS[key] = self  # the op's layer from now on (a reload's new wrapper replaces the old one)

    def forward(self, x: torch.Tensor):
        y, bias = self.base(x)  # (T, sum of part sizes)
        x2 = x.reshape(-1, x.shape[-1])  # (T, n)
        if not y.is_contiguous():  # (not a layout vLLM's linear layers return) the update added out of place
            return (y + self.joined_update(x2).view_as(y)).to(y.dtype), bias  # one rounding, as in transformers
        y2 = y.view(x2.shape[0], -1)  # (T, m): y's own storage
        if torch.compiler.is_compiling() and self.key:
            torch.ops.seqr.routed_add_(x2, y2, self.key)  # y += update: one op, run outside the graph
        else:
            self.add_update_(x2, y2)  # y += B_i* A x per part, in place, rounded once
        return y, bias

    def joined_update(self, x2: torch.Tensor) -> torch.Tensor:
        """(T, m) float32: every part's routed update of tokens x2 (T, n) side by side, zeros for a part with no
        adapters."""
        xf = rt.in_compute_dtype(x2)  # (T, n), cast once for every part
        if self.full:  # their updates side by side, (T, m)
            return self.routing.update(self.packed, xf, self.names, joined=True)
        adapted = iter(self.routing.update(self.packed, xf, self.names))  # [(T, m_p)] of the adapted parts
        return torch.cat([next(adapted) if bank is not None  # (T, m_p)
                          else xf.new_zeros(xf.shape[0], size, dtype=torch.float32)
                          for _, bank, size in self.parts], dim=-1)  # (T, m)

    def add_update_(self, x2: torch.Tensor, y2: torch.Tensor) -> None:
        """y2 (T, m) += the routed updates of x2 (T, n), in place, rounded once as (y2 + update).to(y2.dtype):
        the fused step where it serves, else the update computed by `joined_update` and added."""
        if not (self.full and y2.is_contiguous() and self.routing.update_into(self.packed, x2, y2, self.names)):
            y2.copy_((y2 + self.joined_update(x2)).to(y2.dtype))


_LAYERS: dict[str, RoutedPacked] = {}  # op key -> the routed layer it updates (RoutedPacked.key)


@torch.library.custom_op("seqr::routed_add_", mutates_args=("y",))
def routed_add_(x: torch.Tensor, y: torch.Tensor, layer: str) -> None:
    """y (T, m) += routed layer `layer`'s updates of x (T, n), with the routing state of the forward running."""
    _LAYERS[layer].add_update_(x, y)


@routed_add_.register_fake
def _(x: torch.Tensor, y: torch.Tensor, layer: str) -> None:
    return None


def packed_parts(module_name: str, packed: dict[str, list[str]]) -> list[str]:
    """HF layer names packed into one vLLM module: "….qkv_proj" -> ["….q_proj", "….k_proj", "….v_proj"]."""
    prefix, _, leaf = module_name.rpartition(".")
    return [f"{prefix}.{p}" if prefix else p for p in packed.get(leaf, [leaf])]


def install(model: nn.Module, banks: dict[str, AdapterBank], routing: SetRouting,
            packed: dict[str, list[str]], linear_types: tuple[type, ...], skip: frozenset | set = frozenset(),
            key: str = "") -> list[str]:
    """Wrap every vLLM linear module of `model` one of whose (packed) HF parts has a bank in a RoutedPacked
    (re-wrapping an already routed one with the new banks). Returns the HF layer names routed; every bank must
    find its layer. Modules named in `skip` are left alone. With `key` (the model's, unique in the process) each
    layer's update is one op keyed `key:module name` under compilation."""
    done: list[str] = []
    for name, mod in list(model.named_modules()):
        base = mod.base if isinstance(mod, RoutedPacked) else mod
        if not isinstance(base, linear_types) or name.endswith(".base") or name in skip:
            continue
        parts = packed_parts(name, packed)
        if not any(p in banks for p in parts):
            if isinstance(mod, RoutedPacked):  # its adapters are all gone
                _replace(model, name, base)
            continue
        sizes = list(getattr(base, "output_sizes", None) or [base.output_size])
        if len(sizes) != len(parts):
            raise ValueError(f"vLLM layer {name} packs {len(sizes)} outputs but {len(parts)} parts {parts}")
        _replace(model, name, RoutedPacked(base, [(p, banks.get(p), s) for p, s in zip(parts, sizes)], routing,
                                           f"{key}:{name}" if key else ""))
        done += [p for p in parts if p in banks]
    missing = sorted(set(banks) - set(done))
    if missing:
        raise ValueError(f"library layer(s) {missing[:4]} have no matching linear layer in the vLLM model")
    return done


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
