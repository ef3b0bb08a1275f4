"""Tests of `AdapterBank` against independent dense float64 brute-force references (see conftest.Ref): every
router's scores and choices, the applied update, Theorem 3.1's counterexample."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from seqr import AdapterBank
from bank_checks import seeded  # noqa: F401 (an autouse fixture: every test from seed 0)
from bank_checks import (M, NIN, DTYPES, METHODS, MIN_GAP, NORM_METHODS, SCORE_RTOL, TIE_FRACTION, _arrow_tol,
                         _assert_choice, _assert_scores, _bank, _norm_tol, _np, ref_scale)


# ---------------------------------------------------------------------------------------------------
# 1. SEQR's choice == brute-force argmax of ||B_i A x|| (raw or z-scored)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("calibrated", [False, True])
@pytest.mark.parametrize("r", [1, 4, 8, 16])
@pytest.mark.parametrize("N", [1, 2, 10, 1000])
def test_seqr_route_matches_brute_force(N, r, calibrated, dtype, make_lora, make_stats, make_tokens, ref):
    bank, W, mu, sigma = _bank(make_lora, make_stats, ref, N, r, dtype, calibrated=calibrated, seed=N + r)
    x = make_tokens(4, 32, n=NIN, dtype=dtype, seed=N * r)  # leading batch dims (B, T, n)
    got = bank.route(x, "seqr")
    assert got.shape == (4, 32) and got.dtype == torch.long
    want = ref.zscore(ref.norms(W, x), mu, sigma)
    _assert_choice(got, want, _norm_tol(W, x, sigma, dtype), what="seqr")
    # the precomputed projection z = A x gives the same choice
    assert torch.equal(bank.route(x, "seqr", z=bank.z(x)), got)


def test_calibration_changes_the_choice(make_lora, make_stats, make_tokens, ref):
    """The z-scored test above is only meaningful if z-scoring moves choices: check it does."""
    raw, W, _, _ = _bank(make_lora, make_stats, ref, 10, 4, torch.float64)
    cal, _, mu, sigma = _bank(make_lora, make_stats, ref, 10, 4, torch.float64, calibrated=True)
    x = make_tokens(128, n=NIN, dtype=torch.float64)
    norms = ref.norms(W, x)
    want_raw, want_cal = norms.argmax(-1), ref.zscore(norms, mu, sigma).argmax(-1)
    assert (want_raw != want_cal).mean() > 0.2  # precondition on the seeded data
    assert raw.route(x).tolist() == want_raw.tolist()
    assert cal.route(x).tolist() == want_cal.tolist()


def test_route_single_token_and_empty_batch(make_lora, make_stats, ref, make_tokens):
    bank, W, _, _ = _bank(make_lora, make_stats, ref, 10, 4, torch.float64)
    x = make_tokens(NIN, n=1, dtype=torch.float64).reshape(NIN)  # (n,)
    for method in METHODS:
        got = bank.route(x, method)
        assert got.shape == () and got.dtype == torch.long
    assert int(bank.route(x, "seqr")) == int(ref.norms(W, x).argmax())
    assert bank.scores(x, "naive").shape == (10,)
    empty = torch.zeros(0, 3, NIN, dtype=torch.float64)
    for method in METHODS:
        assert bank.route(empty, method).shape == (0, 3)
        assert bank.scores(empty, method).shape == (0, 3, 10)
    assert bank.route(empty, "lag", k=2).shape == (0, 3)


# ---------------------------------------------------------------------------------------------------
# 2. scores == ||B_i A_i x|| (z-scored when calibrated); shared and per-adapter A
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("calibrated", [False, True])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("N,r", [(1, 1), (2, 4), (10, 8), (50, 16)])
def test_norm_scores_match_brute_force(N, r, shared, calibrated, dtype, make_lora, make_stats, make_tokens, ref):
    bank, W, mu, sigma = _bank(make_lora, make_stats, ref, N, r, dtype, shared=shared, calibrated=calibrated,
                               seed=3 * N + r)
    x = make_tokens(3, 11, n=NIN, dtype=dtype)
    want = ref.zscore(ref.norms(W, x), mu, sigma)
    tol = _norm_tol(W, x, sigma, dtype)
    methods = NORM_METHODS if shared else ("spectr", "naive")
    for method in methods:
        got = bank.scores(x, method)
        assert got.shape == (3, 11, N) and got.dtype == dtype
        _assert_scores(got, want, tol, method)
        _assert_choice(bank.route(x, method), want, tol, what=method)
    if not shared:
        for call in (lambda: bank.scores(x, "seqr"), lambda: bank.route(x, "seqr"), lambda: bank.z(x)):
            with pytest.raises(ValueError, match="shared A"):
                call()
    else:
        np.testing.assert_array_equal(_np(bank.scores(x, "seqr", z=bank.z(x))), _np(bank.scores(x, "seqr")))


# ---------------------------------------------------------------------------------------------------
# 3. ARROW == |v_i . x| (dense SVD); LAG between ARROW (k=1) and SPECTR (k=N)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("N,r", [(1, 1), (2, 4), (10, 8), (40, 16)])
def test_arrow_scores_match_dense_svd(N, r, shared, dtype, make_lora, make_stats, make_tokens, ref):
    bank, W, _, _ = _bank(make_lora, make_stats, ref, N, r, dtype, shared=shared, seed=5 * N + r)
    x = make_tokens(5, 13, n=NIN, dtype=dtype)
    want, gap = ref.arrow(W, x)
    ok = gap >= MIN_GAP
    assert ok.mean() >= 0.9  # precondition: the seeded adapters have well-defined top singular vectors
    got = bank.scores(x, "arrow")
    assert got.shape == (5, 13, N) and got.dtype == dtype
    got = _np(got).reshape(-1, N)
    tol = _arrow_tol(x, gap, dtype)
    _assert_scores(got[:, ok], want[:, ok], tol[:, ok], "arrow")
    _assert_choice(bank.route(x, "arrow"), want, tol, what="arrow")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("calibrated", [False, True])
@pytest.mark.parametrize("shared", [True, False])
def test_lag_extremes_are_arrow_and_spectr(shared, calibrated, dtype, make_lora, make_stats, make_tokens, ref):
    N, r = 20, 4
    bank, W, mu, sigma = _bank(make_lora, make_stats, ref, N, r, dtype, shared=shared, calibrated=calibrated,
                               seed=11)
    x = make_tokens(4, 32, n=NIN, dtype=dtype)
    spectr_ref = ref.zscore(ref.norms(W, x), mu, sigma)
    lag_n = bank.route(x, "lag", k=N)
    assert lag_n.shape == (4, 32)
    _assert_choice(lag_n, spectr_ref, _norm_tol(W, x, sigma, dtype), what="lag k=N")
    assert (lag_n == bank.route(x, "spectr")).float().mean() >= 1 - TIE_FRACTION
    # k=1 is ARROW's choice: the same arrow scores feed both, so the choice is identical
    assert torch.equal(bank.route(x, "lag", k=1), bank.route(x, "arrow"))
    arrow_ref, gap = ref.arrow(W, x)
    _assert_choice(bank.route(x, "lag", k=1), arrow_ref, _arrow_tol(x, gap, dtype), what="lag k=1")


def _lag_reference(arrow, spectr, k, arrow_tol, spectr_tol, mask=None):
    """Per token: SPECTR argmax among ARROW's top-k allowed adapters; also a flag for tokens whose answer
    depends on a near-tie (at ARROW's k-th cut or between SPECTR's best two candidates), given per-entry
    tolerances (T, N) of both scores."""
    T, N = arrow.shape
    if mask is not None:
        mask = np.broadcast_to(mask, (T, N))
        arrow = np.where(mask, arrow, -np.inf)
    want, ambiguous = np.empty(T, dtype=np.int64), np.zeros(T, dtype=bool)
    for t in range(T):
        order = np.argsort(-arrow[t], kind="stable")
        cand = order[:k]
        if mask is not None:
            cand = cand[mask[t, cand]]
        s = spectr[t, cand]
        want[t] = cand[np.argmax(s)]
        a, at = arrow[t, order], arrow_tol[t, order]
        if k < N and np.isfinite(a[k]) and a[k - 1] - a[k] <= at[k - 1] + at[k]:
            ambiguous[t] = True
        if len(s) > 1:
            best2 = np.argsort(s)[-2:]
            if s[best2[1]] - s[best2[0]] <= spectr_tol[t, cand[best2]].sum():
                ambiguous[t] = True
    return want, ambiguous


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("calibrated", [False, True])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("k", [2, 5, 13])
def test_lag_intermediate_k_brute_force(k, shared, calibrated, dtype, make_lora, make_stats, make_tokens, ref):
    N, r = 20, 4
    bank, W, mu, sigma = _bank(make_lora, make_stats, ref, N, r, dtype, shared=shared, calibrated=calibrated,
                               seed=13)
    x = make_tokens(4, 32, n=NIN, dtype=dtype, seed=k)
    arrow, gap = ref.arrow(W, x)
    assert gap.min() >= MIN_GAP  # precondition: every prototype well-defined on this seed
    spectr = ref.zscore(ref.norms(W, x), mu, sigma)
    want, ambiguous = _lag_reference(arrow, spectr, k, _arrow_tol(x, gap, dtype), _norm_tol(W, x, sigma, dtype))
    got = bank.route(x, "lag", k=k).reshape(-1).numpy()
    assert ambiguous.mean() <= TIE_FRACTION
    bad = (got != want) & ~ambiguous
    assert not bad.any(), f"lag k={k}: tokens {np.nonzero(bad)[0].tolist()} got {got[bad]} want {want[bad]}"
    # and LAG really is between the two: for k < N it must differ from SPECTR somewhere on this data
    assert (got != spectr.argmax(-1)).any() or k == N


# ---------------------------------------------------------------------------------------------------
# 4. delta / mean_delta
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [True, False])
def test_delta_matches_dense(shared, dtype, make_lora, make_stats, make_tokens, ref):
    N, r = 7, 4
    names = [f"ad{i}" for i in range(N)]
    bank, W, _, _ = _bank(make_lora, make_stats, ref, N, r, dtype, shared=shared, seed=17, names=names)
    x = make_tokens(3, 10, n=NIN, dtype=dtype)
    U = ref.updates(W, x)  # (T, N, m)
    tol = SCORE_RTOL[dtype] * ref_scale(W, x)  # (T, N), per-entry bound on |B_i A_i x|
    idx = torch.randint(0, N, (3, 10))
    got = bank.delta(x, idx)
    assert got.shape == (3, 10, M) and got.dtype == dtype
    want = U[np.arange(30), idx.reshape(-1).numpy()]
    assert np.all(np.abs(_np(got).reshape(30, M) - want) <= tol[np.arange(30), idx.reshape(-1).numpy()][:, None])
    for index, i in ((4, 4), ("ad2", 2), (0, 0)):
        got = _np(bank.delta(x, index)).reshape(30, M)
        assert np.all(np.abs(got - U[:, i]) <= tol[:, i, None]), index
    if shared:
        np.testing.assert_array_equal(_np(bank.delta(x, idx, z=bank.z(x))), _np(bank.delta(x, idx)))
    # routed delta: index straight from route()
    chosen = bank.route(x, "spectr")
    got = _np(bank.delta(x, chosen)).reshape(30, M)
    c = chosen.reshape(-1).numpy()
    assert np.all(np.abs(got - U[np.arange(30), c]) <= tol[np.arange(30), c][:, None])
    # MU baseline
    got = _np(bank.mean_delta(x)).reshape(30, M)
    assert bank.mean_delta(x).shape == (3, 10, M)
    assert np.all(np.abs(got - U.mean(axis=1)) <= tol.max(axis=1, keepdims=True))


def test_delta_bad_index(make_lora, make_stats, make_tokens, ref):
    bank, _, _, _ = _bank(make_lora, make_stats, ref, 5, 2, torch.float32, names=list("abcde"))
    x = make_tokens(6, n=NIN)
    with pytest.raises(ValueError, match="index"):
        bank.delta(x, torch.zeros(5, dtype=torch.long))  # wrong length
    with pytest.raises(ValueError, match="out of range"):
        bank.delta(x, torch.tensor([0, 1, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match="out of range"):
        bank.delta(x, torch.tensor([0, 1, -1, 3, 4, 2]))
    with pytest.raises(KeyError, match="'zz'"):
        bank.delta(x, "zz")
    with pytest.raises(KeyError, match="7"):
        bank.delta(x, 7)


# ---------------------------------------------------------------------------------------------------
# 5. Theorem 3.1 (Appendix A): ARROW picks the wrong adapter, norm routers the right one
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [True, False])
def test_theorem_3_1_counterexample(shared, dtype):
    C = torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))
    V = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2)  # columns v1, v2
    D = torch.eye(2, dtype=torch.float64) @ torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)) @ V.T
    A = torch.eye(2, dtype=torch.float64) if shared else torch.eye(2, dtype=torch.float64).expand(2, 2, 2).clone()
    bank = AdapterBank(A.to(dtype), torch.stack([C, D]).to(dtype), names=["C", "D"])
    x = torch.tensor([1.0, 0.0], dtype=dtype)
    tol = SCORE_RTOL[dtype]
    np.testing.assert_allclose(_np(bank.scores(x, "arrow")), [1.0, 1 / math.sqrt(2)], rtol=tol, atol=tol)
    methods = NORM_METHODS if shared else ("spectr", "naive")
    for method in methods:
        np.testing.assert_allclose(_np(bank.scores(x, method)), [2.0, math.sqrt(5)], rtol=tol, atol=tol)
        assert int(bank.route(x, method)) == 1, method
    assert int(bank.route(x, "arrow")) == 0
    assert int(bank.route(x, "lag", k=1)) == 0
    assert int(bank.route(x, "lag", k=2)) == 1
    # the routed update is D x = (3/sqrt2, 1/sqrt2)
    np.testing.assert_allclose(_np(bank.delta(x, bank.route(x, "spectr"))), [3 / math.sqrt(2), 1 / math.sqrt(2)],
                               rtol=tol, atol=tol)
