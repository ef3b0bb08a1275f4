"""A library's per-layer `AdapterBank`s: built from its adapters on first use, then kept in step with each added or
removed adapter in place (O(m r) per layer for the adapter's rows, not a rebuild of every bank). The banks' stacked
rows are the storage: each adapter's own B (and A, with one A per adapter) is read from them (`Views`), so the
library holds every adapter once."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from seqr.core.bank import AdapterBank
from seqr.core.threads import one_thread
from seqr.store.loaded import Loaded


class Views(Mapping):
    """One adapter's B (or its own A) per layer, as one library holds it: its own tensors for some layers; for the
    layers of the library's cached banks, its row there, a view taken when read; for the rest, what the library
    it was derived from holds (`parent`, a `with_stats` view's source), or its row of the rows the library was
    loaded into (`Loaded`). No view object is kept per adapter and layer: at N = 1000 on SmolLM2 (120 layers) those
    120 000 small tensors alone cost 0.1x the formula (measured)."""

    __slots__ = ("_own", "_banks", "_name", "_attr", "_layers", "_parent", "_row")

    def __init__(self, tensors: dict | None, banks: dict | None, name: str, attr: str, layers: dict,
                 parent: "Views | None" = None):
        self._own = dict(tensors or {})  # layer -> tensor, for the layers read neither from a bank nor the parent
        self._banks, self._name, self._attr = banks, name, attr  # the library's bank cache (None: not in one)
        self._layers, self._parent = layers, parent  # the library's layers (its meta's dict, shared): their order
        self._row: tuple[Loaded, int] | None = None  # (the rows loaded, this adapter's index there)

    def __getitem__(self, layer: str) -> torch.Tensor:
        t = self._own.get(layer)
        if t is not None:
            return t
        if self._banks is not None and layer in self._banks:
            bank = self._banks[layer]
            return getattr(bank, self._attr)[bank.index[self._name]]  # (m, r) B or (r, n) A: a view of its row
        if self._row is not None and self._row[0].has(self._attr, layer):
            return self._row[0].row(self._attr, layer, self._row[1])
        if self._parent is not None:
            return self._parent[layer]
        raise KeyError(layer)

    def __iter__(self):
        return (layer for layer in self._layers if layer in self._own or (self._banks and layer in self._banks)
                or (self._row is not None and self._row[0].has(self._attr, layer))
                or (self._parent is not None and layer in self._parent))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def owned_by(self, lib) -> bool:
        return self._banks is lib._banks

    def banked(self, layer: str) -> None:
        """Read `layer` from the library's bank from now on (the bank holds this adapter's row)."""
        if self._own.pop(layer, None) is not None and not self._own:
            self._own = {}  # an emptied dict keeps its table (1.6 KiB at 120 layers)

    def keep(self, copy: bool = False) -> None:
        """Read no cached bank any more: hold views of this adapter's rows (the banks are about to be dropped, their rows
        never written again), or with `copy` a copy of every layer, the parent's too (the adapter leaves the
        library: its rows are about to be overwritten)."""
        if copy:
            self._own = {layer: self[layer].clone() for layer in self}
            self._parent = self._banks = self._row = None
        else:  # still the library's: read from the banks it builds next
            self._own.update({layer: self[layer] for layer in (self._banks or ()) if isinstance(layer, str)})

    def __repr__(self) -> str:
        return f"Views({self._attr} of {self._name!r}, {len(self)} layers, {len(self._own)} held apart from a bank)"


def views(lib, name: str, tensors: dict | None, attr: str) -> Views | None:
    """`tensors` (B, or a unique A, per layer) as adapter `name` of `lib` holds them."""
    return None if tensors is None else Views(tensors, lib._banks, name, attr, lib.meta.layers)


def loaded_views(lib, name: str, attr: str, i: int) -> Views:
    """Adapter `name`'s B (or own A) as a library just loaded holds it: row `i` of the rows it was loaded into."""
    v = Views(None, lib._banks, name, attr, lib.meta.layers)
    v._row = (lib._loaded, i)
    return v


def derived(lib, name: str, parent: Views | None, attr: str) -> Views | None:
    """What `lib`, derived from another library (`with_stats`), holds of adapter `name`: the other library's
    tensors (`parent`) until `lib` builds banks of its own."""
    return None if parent is None else Views(None, lib._banks, name, attr, lib.meta.layers, parent)


def drop(lib) -> None:
    """Forget every cached bank (rebuilt on next use): the adapters first take views of their rows to hold."""
    for ad in lib._adapters.values():
        for v in (ad.B, ad.A):
            if isinstance(v, Views) and v.owned_by(lib):
                v.keep()
    lib._banks.clear()


def build(lib, layer: str, device) -> AdapterBank:
    """The AdapterBank of one layer on `device` (None: where the library's tensors are), from every adapter."""
    ads = list(lib._adapters.values())
    Bt, A = (None, None) if device is not None or lib._loaded is None else lib._loaded.take(lib, layer)
    if Bt is None:
        Bt = torch.stack([a.B[layer].T for a in ads]).to(device)  # (N, r, m): the bank's own layout
        A = None if lib.shared_a else torch.stack([a.A[layer] for a in ads]).to(device)  # (N, r, n)
    A = lib.shared_A[layer].to(device) if lib.shared_a else A
    mu, sigma, q = _stats(lib, ads, layer, not lib.uncalibrated)
    c = torch.stack([a.centroids[layer] for a in ads]) if lib.has_centroids else None  # (N, n)
    return AdapterBank(A, Bt.transpose(1, 2), mu=mu, sigma=sigma, quantiles=q, centroids=c, names=lib.names)


def _stats(lib, ads: list, layer: str, calibrated: bool):
    """mu, sigma (N,) and quantiles (N, Q) of `ads` at one layer, as the library's banks hold them (None each
    when the banks are uncalibrated; quantiles only for a percentile view)."""
    if not calibrated:
        return None, None, None
    mu = torch.tensor([a.stats[layer].mean for a in ads], dtype=torch.float64)  # (N,)
    sigma = torch.tensor([a.stats[layer].std for a in ads], dtype=torch.float64)  # (N,)
    q = torch.tensor([a.stats[layer].quantiles for a in ads], dtype=torch.float64) if lib.percentile else None
    return mu, sigma, q  # q: (N, Q)


def bind(lib, layer: str, bank: AdapterBank, only: list[str] | None = None) -> None:
    """Read the adapters' B (and unique A) at `layer` from the bank's rows (those named in `only`, default all)
    when it is the library's own bank of that layer (where its tensors are): one copy of every adapter in memory."""
    if lib._banks.get(layer) is not bank:
        return
    if lib._loaded is not None:
        lib._loaded.release(layer)
    for name in lib._adapters if only is None else only:
        ad = lib._adapters[name]
        for v in (ad.B, ad.A):
            if isinstance(v, Views) and v.owned_by(lib):
                v.banked(layer)


def added(lib, name: str, flags: tuple) -> None:
    """Append the adapter just added (the library's last) to every cached bank; a bank whose kind changes
    (e.g. the first uncalibrated adapter of a calibrated library: no stats any more) is dropped and rebuilt on
    next use. `flags`: `lib.bank_flags()` before the change."""
    if lib.bank_flags() != flags:
        drop(lib)
        return
    ad = lib._adapters[name]
    try:
        with one_thread():
            _append_all(lib, name, ad)
    except (ValueError, RuntimeError):  # the change is on disk already: the rebuild on next use raises it again
        drop(lib)


def _append_all(lib, name: str, ad) -> None:
    """The new adapter's rows for every cached bank of one kind (e.g. all q_proj layers) from one bank built over
    them at once: one batched QR, Gram and check instead of one small bank per layer."""
    groups: dict[tuple, list] = {}
    for layer, bank in _cached(lib):
        groups.setdefault(bank.row_kind, []).append((layer, bank))
    for group in groups.values():
        src = _rows(lib, ad, group)
        for j, (layer, bank) in enumerate(group):
            bank.append_row(name, src, j)  # a grown store needs nothing more: rows are read by name
            bind(lib, layer, bank, [name])


def _rows(lib, ad, group: list) -> AdapterBank:
    """One bank whose row j is adapter `ad` at the layer of group[j] (banks of one `row_kind`), named by layer."""
    layers, first = [layer for layer, _ in group], group[0][1]
    dev = first.B.device
    B = torch.stack([ad.B[layer] for layer in layers]).to(device=dev, dtype=first.B.dtype)  # (L, m, r)
    A = first.A if lib.shared_a else torch.stack([ad.A[layer] for layer in layers]).to(dev, first.B.dtype)
    stats = [_stats(lib, [ad], layer, first.mu is not None) for layer in layers]
    mu, sigma, q = (None if stats[0][k] is None else torch.cat([s[k] for s in stats]) for k in range(3))  # (L,) ...
    c = torch.stack([ad.centroids[layer] for layer in layers]).to(dev) if first.centroids is not None else None
    return AdapterBank(A, B, mu=mu, sigma=sigma, quantiles=q, centroids=c, names=layers)


def removed(lib, name: str, ad, flags: tuple) -> None:
    """Take the adapter `ad` just removed out of every cached bank: the last adapter moves into
    its slot, as it did in the library's order (`swap_last`); `ad` keeps copies of its tensors (whoever still holds it, e.g. a
    `with_stats` view, never sees the moved rows). `flags`: `lib.bank_flags()` before the change."""
    for v in (ad.B, ad.A):  # `ad`'s rows are about to be overwritten by the moved ones
        if isinstance(v, Views):
            v.keep(copy=True)
    if not lib._adapters or lib.bank_flags() != flags:
        drop(lib)  # the banks are dropped, their rows never overwritten
        return
    with one_thread():
        for _, bank in _cached(lib):
            bank.remove(name)  # the moved adapter's rows are read by name: nothing to rebind


def _cached(lib):
    """(layer, bank) of every cached bank (keyed by layer, or by (layer, device) off the library's device)."""
    return ((key if isinstance(key, str) else key[0], bank) for key, bank in lib._banks.items())


def swap_last(adapters: dict, name: str) -> dict:
    """The adapters without `name`, the last one moved into its place: the order the banks keep after a removal."""
    names = list(adapters)
    i, last = names.index(name), names.pop()
    if last != name:
        names[i] = last
    return {n: adapters[n] for n in names}
