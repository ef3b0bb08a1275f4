"""One copy of every adapter in memory (issue 31, item 1): the library's per-adapter tensors are views of the
stacked tensors its banks route with, before and after changes, with every value as given."""
from __future__ import annotations

import torch

from peft_factory import adapter_library, random_stats


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_banks_and_library_share_one_copy_of_every_b(tmp_path):
    lib = random_stats(adapter_library(tmp_path / "s", ["a", "b", "c"]))
    given = {n: {l: t.clone() for l, t in lib.adapter_weights(n)[1].items()} for n in lib.names}
    for layer in lib.layers:
        bank = lib.bank(layer)
        for i, n in enumerate(lib.names):
            B = lib.adapter_weights(n)[1][layer]
            assert _storage(B) == _storage(bank.B) and torch.equal(B, given[n][layer])  # a view, same values
            assert torch.equal(bank.B[i], given[n][layer])
    view = lib.with_stats({"a": lib.stats("b")})  # a derived view shares the same tensors
    assert _storage(view.adapter_weights("c")[1][lib.layers[0]]) == _storage(lib.bank(lib.layers[0]).B)
    lib.remove("b")
    lib.add("d", given["b"])
    layer = lib.layers[1]
    bank = lib.bank(layer)
    assert lib.names == ["a", "c", "d"] and bank.B.shape[0] == 3
    for i, n in enumerate(lib.names):
        assert _storage(lib.adapter_weights(n)[1][layer]) == _storage(bank.B)
        assert torch.equal(bank.B[i], given["b" if n == "d" else n][layer])


def test_unique_a_libraries_share_their_a_too(tmp_path):
    lib = adapter_library(tmp_path / "u", ["x", "y"], a_seed=None)
    layer = lib.layers[0]
    A_given = {n: lib.adapter_weights(n)[0][layer].clone() for n in lib.names}
    bank = lib.bank(layer)
    for i, n in enumerate(lib.names):
        A = lib.adapter_weights(n)[0][layer]
        assert _storage(A) == _storage(bank.A) and torch.equal(A, A_given[n]) and torch.equal(bank.A[i], A)

