"""Tests of `AdapterBank` against independent dense float64 brute-force references (see conftest.Ref)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import seqr.core.routers as rt
from seqr import AdapterBank

DTYPES = (torch.float32, torch.float64)
METHODS = ("seqr", "spectr", "arrow", "naive")
NORM_METHODS = ("seqr", "spectr", "naive")

# Score tolerance relative to the natural scale ||B_i A_i||_F * ||x|| of each (token, adapter) score
# (observed worst case on these shapes: 4e-7 fp32, 1.5e-15 fp64).
SCORE_RTOL = {torch.float32: 5e-6, torch.float64: 1e-13}
# ARROW tolerance relative to ||x|| / relgap_i (a top singular vector is only as stable as its gap;
# observed worst case: 2e-7 fp32, 5e-16 fp64).
ARROW_RTOL = {torch.float32: 2e-6, torch.float64: 1e-13}
# Adapters whose relative singular gap (s1 - s2) / s1 is below this are not compared for ARROW.
MIN_GAP = 1e-2
# Largest fraction of tokens whose choice may differ from the reference (only on near-exact ties).
TIE_FRACTION = 0.01
# Main layer shape for the parametrized tests (m != n to catch transposes).
M, NIN = 24, 40


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def _np(t):
    return np.asarray(t, dtype=np.float64) if isinstance(t, np.ndarray) else t.detach().double().numpy()


def _assert_scores(got, want, tol, what=""):
    got = _np(got).reshape(want.shape)
    err = np.abs(got - want)
    bad = err > tol
    assert not bad.any(), (f"{what}: {bad.sum()} of {bad.size} scores off; worst err {err.max():.3g}, "
                           f"first bad at {np.argwhere(bad)[0].tolist()}")


def _assert_choice(got, ref_scores, tol, mask=None, what=""):
    """got (T,) equals the masked argmax of ref_scores (T, N), except where the two picked adapters'
    reference scores agree within tolerance (rounding ties), and only on a tiny fraction of tokens."""
    got = got.reshape(-1).numpy()
    T, N = ref_scores.shape
    s = ref_scores if mask is None else np.where(np.broadcast_to(mask, (T, N)), ref_scores, -np.inf)
    want = s.argmax(axis=-1)
    if mask is not None:
        assert np.broadcast_to(mask, (T, N))[np.arange(T), got].all(), f"{what}: a disallowed adapter was chosen"
    diff = np.nonzero(got != want)[0]
    tol = np.broadcast_to(tol, (T, N))
    for t in diff:
        g, w = got[t], want[t]
        assert s[t, g] >= s[t, w] - tol[t, g] - tol[t, w], (
            f"{what}: token {t} chose {g} (ref score {s[t, g]:.9g}) over {w} (ref score {s[t, w]:.9g})")
    assert len(diff) <= TIE_FRACTION * T, f"{what}: {len(diff)} of {T} choices differ (only near-ties)"


def _bank(make_lora, make_stats, ref, N, r, dtype, *, shared=True, calibrated=False, seed=0, m=M, n=NIN,
          names=None, x=None):
    A, B = make_lora(N, m, n, r, dtype, shared=shared, seed=seed)
    W = ref.dense(A, B)
    mu = sigma = None
    if calibrated:
        # typical norm scale of an adapter on unit-variance tokens: ||W_i||_F
        mu, sigma = make_stats(N, seed=seed, typical=float(np.median(np.linalg.norm(W, axis=(1, 2)))))
    bank = AdapterBank(A, B, mu=mu, sigma=sigma, names=names)
    return bank, W, mu, sigma


def _norm_tol(W, x, sigma, dtype):
    tol = SCORE_RTOL[dtype] * ref_scale(W, x)
    return tol if sigma is None else tol / sigma.numpy()[None, :]


def ref_scale(W, x):
    xf = _np(x).reshape(-1, W.shape[-1])
    return np.linalg.norm(xf, axis=-1)[:, None] * np.linalg.norm(W, axis=(1, 2))[None, :]


def _arrow_tol(x, gap, dtype):
    xn = np.linalg.norm(_np(x).reshape(-1, x.shape[-1]), axis=-1)[:, None]
    return ARROW_RTOL[dtype] * xn / np.maximum(gap, 1e-300)[None, :]


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


# ---------------------------------------------------------------------------------------------------
# 6. allowed
# ---------------------------------------------------------------------------------------------------
ROUTES = [("seqr", None), ("spectr", None), ("arrow", None), ("naive", None), ("lag", 1), ("lag", 3), ("lag", 8)]


def _adversarial_bank(dtype, forbidden, N=8, r=4, calibrated=False, make_lora=None, make_stats=None, ref=None):
    """A bank whose adapter `forbidden` is scaled up 10x, and tokens aligned with its top right singular
    vector: every router picks it when unconstrained."""
    A, B = make_lora(N, M, NIN, r, torch.float64, seed=23)
    B[forbidden] *= 10
    W = ref.dense(A, B)
    _, _, Vh = ref.svd(W)
    v = Vh[forbidden, 0]  # (n,)
    T = 40
    x = 100 * v[None, :] * torch.linspace(0.5, 2, T, dtype=torch.float64)[:, None]
    x = x + 0.1 * torch.randn(T, NIN, dtype=torch.float64)
    mu = sigma = None
    if calibrated:
        mu, sigma = make_stats(N, seed=1, typical=float(np.median(np.linalg.norm(W, axis=(1, 2)))))
    return AdapterBank(A.to(dtype), B.to(dtype), mu=mu, sigma=sigma, names=[f"a{i}" for i in range(N)]), \
        x.to(dtype), W, mu, sigma


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("calibrated", [False, True])
@pytest.mark.parametrize("method,k", ROUTES)
def test_allowed_never_picks_forbidden_adversarial(method, k, calibrated, dtype, make_lora, make_stats, ref):
    f = 5
    bank, x, W, mu, sigma = _adversarial_bank(dtype, f, calibrated=calibrated, make_lora=make_lora,
                                              make_stats=make_stats, ref=ref)
    N = bank.num_adapters
    assert (bank.route(x, method, k=k) == f).all()  # precondition: x is adversarial for every router
    T = x.shape[0]
    per_token = torch.rand(T, N) < 0.5
    per_token[:, f] = False
    per_token[~per_token.any(-1), 0] = True  # at least one allowed adapter per token
    others = [i for i in range(N) if i != f]
    for allowed in ([f"a{i}" for i in others], others, torch.tensor(others), "a2", 3,
                    torch.tensor([i != f for i in range(N)]), per_token):
        got = bank.route(x, method, k=k, allowed=allowed)
        assert got.shape == (T,)
        assert (got != f).all(), (method, allowed)
        mask = bank.allowed_mask(allowed, T).numpy()
        assert mask[np.arange(T) if mask.shape[0] == T else 0, got.numpy()].all(), (method, allowed)
        if method in NORM_METHODS:
            want = ref.zscore(ref.norms(W, x), mu, sigma)
            _assert_choice(got, want, _norm_tol(W, x, sigma, dtype), mask=mask, what=f"{method} allowed")


@pytest.mark.parametrize("method,k", ROUTES)
def test_allowed_with_leading_dims_and_random_masks(method, k, make_lora, make_stats, make_tokens, ref):
    N = 12
    bank, W, mu, sigma = _bank(make_lora, make_stats, ref, N, 4, torch.float32, calibrated=True, seed=29)
    x = make_tokens(3, 16, n=NIN)
    mask = torch.rand(3, 16, N) < 0.3
    mask[..., 0] |= ~mask.any(-1)
    got = bank.route(x, method, k=k, allowed=mask)
    assert got.shape == (3, 16)
    assert mask.reshape(-1, N)[torch.arange(48), got.reshape(-1)].all()
    flat = bank.route(x.reshape(48, NIN), method, k=k, allowed=mask.reshape(48, N))
    assert torch.equal(flat, got.reshape(-1))
    if method in NORM_METHODS:
        want = ref.zscore(ref.norms(W, x), mu, sigma)
        _assert_choice(got, want, _norm_tol(W, x, sigma, torch.float32), mask=mask.reshape(48, N).numpy())


def test_allowed_errors(make_lora, make_stats, make_tokens, ref):
    bank, _, _, _ = _bank(make_lora, make_stats, ref, 4, 2, torch.float32, names=["a", "b", "c", "d"])
    x = make_tokens(5, n=NIN)
    empty_row = torch.ones(5, 4, dtype=torch.bool)
    empty_row[3] = False
    for method, k in ROUTES[:5]:
        with pytest.raises(ValueError, match="empty"):
            bank.route(x, method, k=k, allowed=empty_row)
        with pytest.raises(ValueError, match="empty"):
            bank.route(x, method, k=k, allowed=[])
        with pytest.raises(ValueError, match="empty"):
            bank.route(x, method, k=k, allowed=torch.zeros(4, dtype=torch.bool))
        with pytest.raises(KeyError, match="'nope'"):
            bank.route(x, method, k=k, allowed=["a", "nope"])
        with pytest.raises(KeyError, match="4"):
            bank.route(x, method, k=k, allowed=[0, 4])
        with pytest.raises(KeyError, match="-1"):
            bank.route(x, method, k=k, allowed=[-1])
        with pytest.raises(ValueError, match="mask"):
            bank.route(x, method, k=k, allowed=torch.ones(5, 3, dtype=torch.bool))
        with pytest.raises(ValueError, match="mask"):
            bank.route(x, method, k=k, allowed=torch.ones(4, 4, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------
# 7. Bad input errors name the offending item
# ---------------------------------------------------------------------------------------------------
def _ab(N=3, m=6, n=5, r=2, dtype=torch.float32, shared=True):
    A = torch.randn((r, n) if shared else (N, r, n), dtype=dtype)
    B = torch.randn(N, m, r, dtype=dtype)
    return A, B


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_B_or_A_names_adapter(bad):
    A, B = _ab()
    B[1, 2, 0] = bad
    with pytest.raises(ValueError, match=r"B.*'foo'"):
        AdapterBank(A, B, names=["x", "foo", "y"])
    A, B = _ab(shared=False)
    A[2, 1, 3] = bad
    with pytest.raises(ValueError, match=r"A.*'bar'"):
        AdapterBank(A, B, names=["x", "y", "bar"])
    A, B = _ab()
    A[0, 0] = bad
    with pytest.raises(ValueError, match="A"):
        AdapterBank(A, B)


@pytest.mark.parametrize("A_shape,B_shape,what", [
    ((2, 5), (6, 2), "B"),            # B not 3-D
    ((2, 5), (1, 3, 6, 2), "B"),      # B 4-D
    ((5,), (3, 6, 2), "A"),           # A 1-D
    ((1, 1, 2, 5), (3, 6, 2), "A"),   # A 4-D
    ((3, 5), (3, 6, 2), "A"),         # shared A with r=3 for B's r=2
    ((3, 3, 5), (3, 6, 2), "A"),      # per-adapter A with mismatched r
    ((4, 2, 5), (3, 6, 2), "A"),      # per-adapter A for 4 adapters, B has 3
    ((2, 5), (3, 6, 0), "B"),         # r = 0
    ((2, 5), (3, 0, 2), "B"),         # m = 0
])
def test_bad_shapes(A_shape, B_shape, what):
    with pytest.raises(ValueError, match=what):
        AdapterBank(torch.randn(A_shape), torch.randn(B_shape))


def test_bad_types_and_dtypes():
    A, B = _ab()
    with pytest.raises(ValueError, match="B"):
        AdapterBank(A, B.numpy())
    with pytest.raises(ValueError, match="A"):
        AdapterBank(A.numpy(), B)
    with pytest.raises(ValueError, match=r"B.*int64"):
        AdapterBank(A, B.long())
    with pytest.raises(ValueError, match=r"A.*int32"):
        AdapterBank(A.int(), B)
    with pytest.raises(ValueError, match="bool"):
        AdapterBank(A, B > 0)
    with pytest.raises(ValueError, match="complex"):
        AdapterBank(A, B.to(torch.complex64))
    with pytest.raises(ValueError, match="dtype"):
        AdapterBank(A.double(), B)


def test_bad_x_shapes():
    A, B = _ab()
    bank = AdapterBank(A, B)
    for x in (torch.randn(4, 6), torch.randn(5, 4), torch.tensor(1.0), [0.0] * 5, torch.randn(2, 3, 4)):
        for call in (lambda: bank.route(x), lambda: bank.scores(x, "naive"), lambda: bank.delta(x, 0),
                     lambda: bank.mean_delta(x), lambda: bank.route(x, "lag", k=2)):
            with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 5\)"):
                call()


def test_bad_stats():
    A, B = _ab()
    names = ["x", "foo", "y"]
    ok = torch.ones(3)
    for bad in (0.0, -1.0, float("nan")):
        sigma = torch.ones(3)
        sigma[1] = bad
        with pytest.raises(ValueError, match=r"sigma.*'foo'"):
            AdapterBank(A, B, mu=ok, sigma=sigma, names=names)
    mu = torch.ones(3)
    mu[1] = float("inf")
    with pytest.raises(ValueError, match=r"mu.*'foo'"):
        AdapterBank(A, B, mu=mu, sigma=ok, names=names)
    with pytest.raises(ValueError, match="together"):
        AdapterBank(A, B, mu=ok)
    with pytest.raises(ValueError, match="together"):
        AdapterBank(A, B, sigma=ok)
    with pytest.raises(ValueError, match=r"mu must have shape \(3,\)"):
        AdapterBank(A, B, mu=torch.ones(4), sigma=ok)
    with pytest.raises(ValueError, match=r"sigma must have shape \(3,\)"):
        AdapterBank(A, B, mu=ok, sigma=torch.ones(3, 1))
    # lists are accepted and stored in the compute dtype
    bank = AdapterBank(A, B, mu=[0.0, 1.0, 2.0], sigma=[1.0, 2.0, 3.0])
    assert bank.mu.dtype == torch.float32 and bank.sigma.tolist() == [1.0, 2.0, 3.0]


def test_bad_names_and_count():
    A, B = _ab()
    with pytest.raises(ValueError, match="'dup'"):
        AdapterBank(A, B, names=["dup", "ok", "dup"])
    with pytest.raises(ValueError, match="names"):
        AdapterBank(A, B, names=["a", "b"])
    with pytest.raises(ValueError, match="N=0"):
        AdapterBank(torch.randn(2, 5), torch.randn(0, 6, 2))
    with pytest.raises(ValueError, match="N=0"):
        AdapterBank(torch.randn(0, 2, 5), torch.randn(0, 6, 2))


def test_bad_method_and_k():
    A, B = _ab()
    bank = AdapterBank(A, B)
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match="'magic'"):
        bank.route(x, "magic")
    with pytest.raises(ValueError, match="'magic'"):
        bank.scores(x, "magic")
    with pytest.raises(ValueError, match="'lag'"):
        bank.scores(x, "lag")  # lag is a route, it has no score of its own
    for k in (None, 0, -1, 4):
        with pytest.raises(ValueError, match=r"k in \[1, 3\]"):
            bank.route(x, "lag", k=k)
    for method in METHODS:
        with pytest.raises(ValueError, match=f"k.*{method}"):
            bank.route(x, method, k=2)


# ---------------------------------------------------------------------------------------------------
# 8. Storage
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,m,n,r", [(1, 4, 6, 1), (10, 24, 40, 4), (37, 16, 16, 8), (5, 32, 20, 16)])
def test_storage_and_packed_gram(N, m, n, r, dtype, make_lora):
    A, B = make_lora(N, m, n, r, dtype, seed=31)
    bank = AdapterBank(A, B)
    assert bank.numel == n * r + N * (m * r + r * (r + 1) // 2)
    assert bank.shape == (N, m, n, r) and bank.num_adapters == N
    assert bank.G_packed.shape == (N, r * (r + 1) // 2) and bank.G_packed.dtype == dtype
    # independent: numpy QR with R_ii >= 0, then R^T R packed (row-major upper triangle, off-diagonals x2)
    Bn = _np(B)
    _, R = np.linalg.qr(Bn, mode="reduced")
    R = R * np.where(np.diagonal(R, axis1=-2, axis2=-1) < 0, -1.0, 1.0)[:, :, None]
    assert (np.diagonal(R, axis1=-2, axis2=-1) >= 0).all()
    G = np.transpose(R, (0, 2, 1)) @ R
    j, k = np.triu_indices(r)
    want = G[:, j, k] * np.where(j == k, 1.0, 2.0)
    _assert_scores(bank.G_packed, want, SCORE_RTOL[dtype] * np.abs(want).max(axis=1, keepdims=True), "G")
    # per-adapter A: no Gram is kept
    A2, B2 = make_lora(N, m, n, r, dtype, shared=False, seed=31)
    assert AdapterBank(A2, B2).numel == N * r * n + N * m * r


# ---------------------------------------------------------------------------------------------------
# 9. Chunking
# ---------------------------------------------------------------------------------------------------
def _all_outputs(bank, x, mask):
    out = {f"scores/{m}": bank.scores(x, m).clone() for m in METHODS}
    for method, k in ROUTES[:4] + [("lag", 3)]:
        out[f"route/{method}/{k}"] = bank.route(x, method, k=k)
        out[f"route/{method}/{k}/mask"] = bank.route(x, method, k=k, allowed=mask)
    out["naive_norms"] = rt.naive_norms(x.reshape(-1, x.shape[-1]), bank.A, bank.B)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("calibrated", [False, True])
def test_chunked_equals_unchunked(calibrated, dtype, make_lora, make_stats, make_tokens, ref, monkeypatch):
    """Force tiny chunks through `token_chunks` itself (independent of how BLOCK_ELEMENTS is read)."""
    N = 10
    bank, _, _, _ = _bank(make_lora, make_stats, ref, N, 4, dtype, calibrated=calibrated, seed=37)
    x = make_tokens(2, 5, n=NIN, dtype=dtype)
    mask = torch.rand(2, 5, N) < 0.4
    mask[..., 2] |= ~mask.any(-1)
    full = _all_outputs(bank, x, mask)
    real = rt.token_chunks
    n_chunks = []

    def tiny(T, per_token, block=None):
        chunks = list(real(T, per_token, 160))
        n_chunks.append(len(chunks))
        return iter(chunks)

    monkeypatch.setattr(rt, "token_chunks", tiny)
    monkeypatch.setattr(rt, "BLOCK_ELEMENTS", 64)
    chunked = _all_outputs(bank, x, mask)
    assert max(n_chunks) > 1 and len(n_chunks) >= len(METHODS)
    for key, want in full.items():
        if key.startswith("route"):
            assert torch.equal(chunked[key], want), key
        else:  # another matmul shape may round differently: compare on each score column's scale
            _assert_scores(chunked[key], _np(want), SCORE_RTOL[dtype] * np.abs(_np(want)).max(), key)


@pytest.mark.parametrize("method,k", ROUTES)
def test_block_elements_monkeypatch_takes_effect(method, k, make_lora, make_stats, make_tokens, ref, monkeypatch):
    """Patching seqr.core.routers.BLOCK_ELEMENTS (GATHER_ELEMENTS for lag's per-token gathers) must really chunk
    the token axis, and change no result."""
    N = 10
    bank, _, _, _ = _bank(make_lora, make_stats, ref, N, 4, torch.float64, seed=41)
    x = make_tokens(20, n=NIN, dtype=torch.float64)
    want_route = bank.route(x, method, k=k)
    want_scores = bank.scores(x, "naive" if method == "lag" else method)
    calls = []
    real_flat, real_lag = bank._scores_flat, rt.lag_route
    monkeypatch.setattr(bank, "_scores_flat", lambda xc, *a: calls.append(xc.shape[0]) or real_flat(xc, *a))
    monkeypatch.setattr(rt, "lag_route", lambda xc, *a: calls.append(xc.shape[0]) or real_lag(xc, *a))
    monkeypatch.setattr(rt, "BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(rt, "GATHER_ELEMENTS", 64)
    got_route = bank.route(x, method, k=k)
    assert torch.equal(got_route, want_route)
    assert sum(calls) == 20
    assert len(calls) > 1, f"BLOCK_ELEMENTS=64 did not chunk 20 tokens for {method}: chunks {calls}"
    want_scores = _np(want_scores)
    _assert_scores(bank.scores(x, "naive" if method == "lag" else method), want_scores,
                   SCORE_RTOL[torch.float64] * np.abs(want_scores).max(), method)


# ---------------------------------------------------------------------------------------------------
# 10. Laziness
# ---------------------------------------------------------------------------------------------------
def test_svd_is_lazy(make_lora, make_tokens):
    A, B = make_lora(1000, 256, 256, 8, torch.float32, seed=43)
    bank = AdapterBank(A, B)
    assert bank._svd_rows is None
    x = make_tokens(4, n=256)
    bank.route(x, "seqr")
    bank.scores(x, "naive")
    bank.delta(x, 3)
    bank.mean_delta(x)
    assert bank._svd_rows is None  # SEQR, naive and the updates never need an SVD
    bank.route(x, "arrow")
    assert bank._svd_rows is not None
    S, Vt = bank.svd
    assert S.shape == (1000, 8) and Vt.shape == (1000, 8, 256) and bank.prototypes.shape == (1000, 256)


# ---------------------------------------------------------------------------------------------------
# 11. dtypes
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,k", ROUTES)
def test_bf16_input_routes_like_its_float_upcast(method, k, make_lora, make_stats, make_tokens, ref):
    bank, _, _, _ = _bank(make_lora, make_stats, ref, 16, 4, torch.float32, calibrated=True, seed=47)
    x = make_tokens(4, 24, n=NIN, dtype=torch.bfloat16)
    assert torch.equal(bank.route(x, method, k=k), bank.route(x.float(), method, k=k))
    if method != "lag":
        s = bank.scores(x, method)
        assert s.dtype == torch.float32
        assert torch.equal(s, bank.scores(x.float(), method))


@pytest.mark.parametrize("method", METHODS)
def test_fp64_bank_scores_in_fp64(method, make_lora, make_stats, make_tokens, ref):
    bank, W, _, _ = _bank(make_lora, make_stats, ref, 12, 4, torch.float64, seed=53)
    x32 = make_tokens(40, n=NIN, dtype=torch.float32)
    for x in (x32.double(), x32):  # an fp32 x is promoted, not the bank demoted
        s = bank.scores(x, method)
        assert s.dtype == torch.float64
        if method == "arrow":
            want, gap = ref.arrow(W, x)
            assert gap.min() >= MIN_GAP
            tol = _arrow_tol(x, gap, torch.float64)
        else:
            want, tol = ref.norms(W, x), _norm_tol(W, x, None, torch.float64)
        # fp64 accuracy (fp32 arithmetic would be off by ~1e-7 relative)
        _assert_scores(s, want, tol, method)
    assert bank.G_packed.dtype == torch.float64


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_bank_scores_in_fp32(low, make_lora):
    A, B = make_lora(6, 16, 20, 4, low, seed=59)
    bank = AdapterBank(A, B)
    x = torch.randn(8, 20, dtype=low)
    for method in METHODS:
        assert bank.scores(x, method).dtype == torch.float32
    assert bank.G_packed.dtype == torch.float32
    assert bank.route(x, "lag", k=2).shape == (8,)


def test_prepare_builds_baseline_factors_up_front(make_lora):
    A, B = make_lora(20, 16, 24, 4, torch.float32, seed=44)
    bank = AdapterBank(A, B)
    assert bank.prepare("seqr") is bank and bank._svd_rows is None
    bank.prepare("lag")
    assert bank._svd_rows is not None
    with pytest.raises(ValueError, match="unknown routing method 'fast'"):
        bank.prepare("fast")


@pytest.mark.parametrize("shared", [True, False])
def test_mean_delta_averages_only_the_allowed_adapters(shared, make_lora, make_tokens):
    N, m, n, r, T = 6, 16, 24, 4, 10
    A, B = make_lora(N, m, n, r, torch.float64, shared=shared, seed=45)
    bank = AdapterBank(A, B, names=[f"a{i}" for i in range(N)])
    x = make_tokens(T, n=n, dtype=torch.float64)
    mask = torch.zeros(T, N, dtype=torch.bool)
    for t in range(T):
        mask[t, torch.randperm(N)[: 1 + t % N]] = True
    Ad = A.expand(N, r, n) if shared else A
    per = torch.einsum("imr,irn,tn->tim", B, Ad, x)  # (T, N, m) every update, dense reference
    want = (per * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(bank.mean_delta(x, allowed=mask), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(bank.mean_delta(x, allowed=["a1", "a4"]), per[:, [1, 4]].mean(1), rtol=1e-10, atol=1e-10)
