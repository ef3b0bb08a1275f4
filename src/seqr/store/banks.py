"""A library's per-layer `AdapterBank`s: built from its adapters on first use, then kept in step with each added or
removed adapter in place (O(m r) per layer for the adapter's rows, not a rebuild of every bank). The banks' stacked
rows are the storage: each adapter's own B (and A, with one A per adapter) is a view into them, so the library
holds every adapter once (issue 31)."""
from __future__ import annotations

import torch

from seqr.core.bank import AdapterBank
from seqr.core.threads import one_thread


def build(lib, layer: str, device) -> AdapterBank:
    """The AdapterBank of one layer on `device` (None: where the library's tensors are), from every adapter."""
    ads = list(lib._adapters.values())
    Bt = torch.stack([a.B[layer].T for a in ads]).to(device)  # (N, r, m): the bank's own layout
    A = (lib.shared_A[layer] if lib.shared_a else torch.stack([a.A[layer] for a in ads])).to(device)
    mu, sigma, q = _stats(lib, ads, layer, not lib.uncalibrated)
    c = torch.stack([a.centroids[layer] for a in ads]) if lib.has_centroids else None  # (N, n)
    bank = AdapterBank(A, Bt.transpose(1, 2), mu=mu, sigma=sigma, quantiles=q, centroids=c, names=lib.names)
    bind(lib, layer, bank)
    return bank


def _stats(lib, ads: list, layer: str, calibrated: bool):
    """mu, sigma (N,) and quantiles (N, Q) of `ads` at one layer, as the library's banks hold them (None each
    when the banks are uncalibrated; quantiles only for a percentile view)."""
    if not calibrated:
        return None, None, None
    mu = torch.tensor([a.stats[layer].mean for a in ads], dtype=torch.float64)  # (N,)
    sigma = torch.tensor([a.stats[layer].std for a in ads], dtype=torch.float64)  # (N,)
    q = torch.tensor([a.stats[layer].quantiles for a in ads], dtype=torch.float64) if lib.percentile else None
    return mu, sigma, q  # q: (N, Q)


def bind(lib, layer: str, bank: AdapterBank, only: list[int] | None = None) -> None:
    """Make the adapters' B (and unique A) at `layer` views of the bank's rows (those at indices `only`, default
    all), when the bank lives where the library's tensors do: one copy of every adapter in memory."""
    ads = list(lib._adapters.values())
    if bank.B.device != ads[0].B[layer].device:
        return
    for i in range(len(ads)) if only is None else only:
        ads[i].B[layer] = bank.B[i]  # (m, r) view of the bank's (N, r, m) rows
        if not lib.shared_a:
            ads[i].A[layer] = bank.A[i]  # (r, n)


def added(lib, name: str, flags: tuple) -> None:
    """Append the adapter just added (the library's last) to every cached bank; a bank whose kind changes
    (e.g. the first uncalibrated adapter of a calibrated library: no stats any more) is dropped and rebuilt on
    next use. `flags`: `lib.bank_flags()` before the change."""
    if lib.bank_flags() != flags:
        lib._banks.clear()
        return
    ad = lib._adapters[name]
    try:
        with one_thread():
            _append_all(lib, name, ad)
    except (ValueError, RuntimeError):  # the change is on disk already: the rebuild on next use raises it again
        lib._banks.clear()


def _append_all(lib, name: str, ad) -> None:
    """The new adapter's rows for every cached bank of one kind (e.g. all q_proj layers) from one bank built over
    them at once: one batched QR, Gram and check instead of one small bank per layer."""
    groups: dict[tuple, list] = {}
    for layer, bank in _cached(lib):
        groups.setdefault(bank.row_kind, []).append((layer, bank))
    for group in groups.values():
        src = _rows(lib, ad, group)
        for j, (layer, bank) in enumerate(group):
            grew = bank.append_row(name, src, j)
            bind(lib, layer, bank, None if grew else [bank.num_adapters - 1])


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


def removed(lib, name: str, ad, index: int, flags: tuple) -> None:
    """Take the adapter `ad` just removed (it was at `index`) out of every cached bank: the last adapter moves into
    its slot, as it did in the library's order (`swap_last`); `ad` keeps copies of its tensors (whoever still holds it, e.g. a
    `with_stats` view, never sees the moved rows). `flags`: `lib.bank_flags()` before the change."""
    if not lib._adapters or lib.bank_flags() != flags:
        lib._banks.clear()  # the banks are dropped, their rows never overwritten
        return
    for d in (ad.B, ad.A):  # `ad`'s views are about to be overwritten by the moved rows
        for layer, t in (d or {}).items():
            d[layer] = t.clone()
    with one_thread():
        for layer, bank in _cached(lib):
            bank.remove(name)
            if index < bank.num_adapters:
                bind(lib, layer, bank, [index])


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
