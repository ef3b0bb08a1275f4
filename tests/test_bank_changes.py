"""Adding and removing one adapter in place (issue 31, item 3): a bank changed by `append` / `remove`, and a
library's cached banks changed by `add` / `remove`, route, score and update exactly as banks built from scratch
on the same adapters, without rebuilding or copying the other adapters' rows."""
from __future__ import annotations

import pytest
import torch

from seqr import AdapterBank
from seqr.core import rows
from seqr.core.stats import QUANTILE_LEVELS
from peft_factory import adapter_library, random_stats

METHODS = [("seqr", None), ("spectr", None), ("naive", None), ("arrow", None), ("lag", 2), ("centroid", None),
           ("centroid-seqr", 2)]


def _adapter(i: int, m: int, n: int, r: int, shared: bool) -> dict:
    """One seeded adapter's tensors and stats, as `append` takes them."""
    g = torch.Generator().manual_seed(100 + i)
    mu, sigma = 1 + torch.rand(1, generator=g).item(), 0.2 + torch.rand(1, generator=g).item()
    q = torch.sort(mu + sigma * torch.randn(len(QUANTILE_LEVELS), generator=g)).values
    return {"B": torch.randn(m, r, generator=g) * (1 + i % 3), "A": None if shared else torch.randn(r, n, generator=g) / r,
            "mu": mu, "sigma": sigma, "quantiles": q, "centroid": torch.randn(n, generator=g)}


def _fresh(A_shared, ads: dict, quantiles: bool = True) -> AdapterBank:
    """The reference: a bank built from scratch on the adapters in this order."""
    v = list(ads.values())
    A = A_shared if A_shared is not None else torch.stack([a["A"] for a in v])
    return AdapterBank(A, torch.stack([a["B"] for a in v]), mu=[a["mu"] for a in v], sigma=[a["sigma"] for a in v],
                       quantiles=torch.stack([a["quantiles"] for a in v]) if quantiles else None,
                       centroids=torch.stack([a["centroid"] for a in v]), names=list(ads))


def _assert_same(bank: AdapterBank, ref: AdapterBank, x: torch.Tensor) -> None:
    assert bank.names == ref.names and bank.index == ref.index and bank.shape == ref.shape
    for a, b in ((bank.B, ref.B), (bank.A, ref.A), (bank.mu, ref.mu), (bank.sigma, ref.sigma),
                 (bank.centroids, ref.centroids)):
        assert torch.equal(a, b)
    assert (bank._cdf is None) == (ref._cdf is None) and (bank._cdf is None or torch.equal(bank._cdf[0], ref._cdf[0]))
    if bank.shared_a:
        assert torch.allclose(bank.G_packed, ref.G_packed) and torch.allclose(bank._R_stacked, ref._R_stacked)
    for method, k in METHODS:
        if ("seqr" in method and not bank.shared_a) or (k and bank._cdf is not None):  # not routable by this bank
            continue
        assert torch.equal(bank.route(x, method, k=k), ref.route(x, method, k=k)), method
    assert torch.allclose(bank.scores(x, "spectr"), ref.scores(x, "spectr"), rtol=1e-5, atol=1e-6)
    idx = torch.arange(x.shape[0]) % bank.num_adapters
    assert torch.allclose(bank.delta(x, idx), ref.delta(x, idx), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quantiles", [False, True], ids=["z-score", "percentile"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-A", "unique-A"])
def test_appends_and_removes_match_a_bank_built_from_scratch(shared, quantiles):
    m, n, r = 12, 16, 3
    g = torch.Generator().manual_seed(0)
    A = torch.randn(r, n, generator=g) / r if shared else None
    ads = {f"a{i}": _adapter(i, m, n, r, shared) for i in range(3)}
    bank = _fresh(A, ads, quantiles)
    bank.prepare("arrow")  # the SVD factors exist: they must follow the changes too
    x = torch.randn(40, n, generator=g)
    grew = []
    for step in range(20):  # past the first reallocation (capacity 3 + GROWTH)
        i = 3 + step
        ads[f"a{i}"] = ad = _adapter(i, m, n, r, shared)
        grew.append(bank.append(f"a{i}", ad["B"], A=ad["A"], mu=ad["mu"], sigma=ad["sigma"],
                                quantiles=ad["quantiles"] if quantiles else None, centroid=ad["centroid"]))
        if step % 3 == 2:  # now and then remove one from the middle, the front or the end
            name = list(ads)[[1, 0, -1][step % 9 // 3]]
            moved_from = bank.remove(name)
            names = list(ads)
            assert moved_from == len(names) - 1
            ads = {nm: ads[nm] for nm in _swap_last(names, name)}
        _assert_same(bank, _fresh(A, ads, quantiles), x)
    # built with 3 rows; 20 appends and 6 removals peak at 17: 3 -> 3 + GROWTH -> 3 + 2 GROWTH rows, two copies
    assert grew.count(True) == 2 and bank._Bt.store.shape[0] == 3 + 2 * rows.GROWTH and bank.num_adapters == 17


def _swap_last(names: list[str], name: str) -> list[str]:
    i, last = names.index(name), names.pop()
    if last != name:
        names[i] = last
    return names


def test_append_and_remove_refuse_what_the_bank_cannot_hold():
    m, n, r = 8, 10, 2
    A = torch.randn(r, n) / r
    ads = {f"a{i}": _adapter(i, m, n, r, True) for i in range(2)}
    bank = _fresh(A, ads)
    new = _adapter(5, m, n, r, True)
    kw = {k: new[k] for k in ("mu", "sigma", "quantiles", "centroid")}
    with pytest.raises(ValueError, match="'a0' is already in this bank"):
        bank.append("a0", new["B"], **kw)
    with pytest.raises(ValueError, match=r"B of adapter 'z' must have shape \(8, 2\), got shape \(2, 8\)"):
        bank.append("z", new["B"].T, **kw)
    with pytest.raises(ValueError, match="adapters have mu and sigma, so the one added must have them too"):
        bank.append("z", new["B"], **{**kw, "mu": None, "sigma": None})
    with pytest.raises(ValueError, match="adapters have no its own A"):
        bank.append("z", new["B"], A=torch.randn(r, n), **kw)
    with pytest.raises(ValueError, match="sigma of adapter 'z' must be positive, got -1"):
        bank.append("z", new["B"], **{**kw, "sigma": -1.0})
    with pytest.raises(KeyError, match="unknown adapter 'nope'"):
        bank.remove("nope")
    bank.remove("a0")
    with pytest.raises(ValueError, match="cannot remove 'a1': an AdapterBank needs at least one adapter"):
        bank.remove("a1")
    _assert_same(bank, _fresh(A, {"a1": ads["a1"]}), torch.randn(5, n))  # the refused calls changed nothing


@pytest.mark.parametrize("shared", [True, False], ids=["shared-A", "unique-A"])
def test_rows_built_for_many_banks_at_once_append_as_if_built_from_scratch(shared):
    """`append_row`: one new adapter's rows for three layers' banks from one bank built over them (what a
    library's `add` does per kind of layer), equal to a bank built from scratch on each layer's adapters."""
    m, n, r = 12, 10, 3
    A = None if not shared else torch.randn(r, n, generator=torch.Generator().manual_seed(7)) / r
    layers = [{f"a{i}": _adapter(10 * j + i, m, n, r, shared) for i in range(3)} for j in range(3)]
    new = [_adapter(50 + j, m, n, r, shared) for j in range(3)]  # the added adapter at each of the 3 layers
    banks = [_fresh(A, ads) for ads in layers]
    src = _fresh(A, {f"layer{j}": new[j] for j in range(3)})  # row j: the new adapter's rows at layer j
    x = torch.randn(20, n, generator=torch.Generator().manual_seed(8))
    for j, bank in enumerate(banks):
        if not shared:
            bank.prepare("arrow")  # a unique A's SVD rows follow the appended row too
        bank.append_row("z", src, j)
        _assert_same(bank, _fresh(A, {**layers[j], "z": new[j]}), x)
    with pytest.raises(ValueError, match="already in this bank"):
        banks[0].append_row("z", src, 0)
    plain = AdapterBank(src.A, src.B, names=src.names)  # no stats: another kind of bank
    with pytest.raises(ValueError, match="built for another kind of bank"):
        banks[0].append_row("y", plain, 0)


def test_rows_grow_by_an_eighth_and_swap_remove():
    rw = rows.Rows(torch.arange(3.0)[:, None])
    assert [rw.append(torch.tensor([v])) for v in (3.0, 4.0)] == [True, False]  # 3 full -> 3 + GROWTH
    assert rw.store.shape[0] == 3 + rows.GROWTH and rw.view[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert rw.swap_remove(1) == 4 and rw.view[:, 0].tolist() == [0, 4, 2, 3]
    assert rw.swap_remove(3) == 3 and rw.view[:, 0].tolist() == [0, 4, 2]
    with pytest.raises(IndexError, match="row 3 is out of range for 3 rows"):
        rw.swap_remove(3)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("a_seed", [0, None], ids=["shared-A", "unique-A"])
def test_library_add_and_remove_update_its_cached_banks_in_place(tmp_path, a_seed):
    lib = adapter_library(tmp_path / "lib", ["a", "b", "c"], a_seed=a_seed)
    if a_seed is not None:
        random_stats(lib)
    extra = adapter_library(tmp_path / "more", ["d", "e"], a_seed=a_seed)
    lib.save(tmp_path / "saved")
    layers = lib.layers
    banks = {layer: lib.bank(layer).prepare("arrow") for layer in layers}
    before = {n: {layer: lib.adapter_weights(n)[1][layer].clone() for layer in layers} for n in lib.names}
    held = lib.with_stats({})  # a derived view holding the same adapters
    stats = None if a_seed is None else random_stats(extra, seed=3).stats
    for name in ("d", "e"):
        A, B = extra.adapter_weights(name)
        lib.add(name, B, A=None if a_seed is not None else A, stats=None if stats is None else stats(name))
    lib.remove("a")  # the last ("e") takes its slot
    assert lib.names == ["e", "b", "c", "d"]
    for layer in layers:
        bank = lib.bank(layer)
        assert bank is banks[layer] and bank.names == lib.names  # updated in place, not rebuilt
        for n in lib.names:  # the library's tensors are still views of the bank's rows
            assert _storage(lib.adapter_weights(n)[1][layer]) == _storage(bank.B)
        assert torch.equal(held.adapter_weights("a")[1][layer], before["a"][layer])  # a's own values, kept
    fresh = type(lib).load(tmp_path / "saved")  # the same adapters, from disk, built from scratch
    assert fresh.names == lib.names
    x = torch.randn(30, lib.meta.layers[layers[0]][1], generator=torch.Generator().manual_seed(2))
    for layer in layers[:4]:
        for method, k in (("seqr", None), ("arrow", None), ("lag", 2), ("spectr", None)):
            if method == "seqr" and a_seed is None:
                continue
            assert torch.equal(lib.bank(layer).route(x, method, k=k), fresh.bank(layer).route(x, method, k=k))


def test_a_change_of_bank_kind_rebuilds_instead(tmp_path):
    lib = random_stats(adapter_library(tmp_path / "lib", ["a", "b"]))
    extra = adapter_library(tmp_path / "more", ["u"])
    layer = lib.layers[0]
    bank = lib.bank(layer)
    assert bank.mu is not None
    lib.add("u", extra.adapter_weights("u")[1])  # uncalibrated: the banks can no longer z-score
    assert lib.bank(layer) is not bank and lib.bank(layer).mu is None
    uncal = lib.bank(layer)
    lib.remove("u")  # calibrated again
    assert lib.bank(layer) is not uncal and lib.bank(layer).mu is not None
