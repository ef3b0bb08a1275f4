"""Tests of the pure routing math in `seqr.core.routers` against independent float64 references."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import seqr.core.routers as rt

DTYPES = (torch.float32, torch.float64)
# Relative tolerances (w.r.t. the natural scale of each quantity) per compute dtype.
RTOL = {torch.float32: 2e-5, torch.float64: 1e-11}
# Orthonormality / reconstruction tolerance (absolute, on O(1) quantities).
ATOL_ORTHO = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def _np(t):
    return t.detach().double().numpy()


def _numpy_qr_positive(B: np.ndarray):
    """Independent reference: numpy reduced QR of each B_i, normalised so diag(R_i) >= 0."""
    Q, R = np.linalg.qr(B, mode="reduced")  # stacked: (N, m, r), (N, r, r)
    s = np.where(np.diagonal(R, axis1=-2, axis2=-1) < 0, -1.0, 1.0)  # (N, r)
    return Q * s[:, None, :], R * s[:, :, None]


def _numpy_pack(G: np.ndarray) -> np.ndarray:
    """Pack symmetric (N, r, r) to its upper triangle, row-major, off-diagonals doubled."""
    r = G.shape[-1]
    j, k = np.triu_indices(r)
    return G[:, j, k] * np.where(j == k, 1.0, 2.0)


# ---------------------------------------------------------------------------------------------------
def test_compute_dtype():
    assert rt.compute_dtype(torch.float64) == torch.float64
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert rt.compute_dtype(dt) == torch.float32


@pytest.mark.parametrize("T,per_token,block", [(0, 5, 64), (1, 5, 64), (100, 7, 64), (100, 1000, 64),
                                               (64, 1, 64), (65, 1, 64), (10, 0, 64)])
def test_token_chunks_cover_in_order_within_budget(T, per_token, block):
    chunks = list(rt.token_chunks(T, per_token, block))
    covered = [i for c in chunks for i in range(T)[c]]
    assert covered == list(range(T))  # every token once, in order
    step = max(1, block // max(1, per_token))
    assert all(c.stop - c.start <= step for c in chunks)
    assert all(c.stop > c.start for c in chunks)  # no empty chunk


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,m,r", [(1, 8, 1), (5, 16, 4), (7, 24, 8), (3, 16, 16)])
def test_qr_positive(dtype, N, m, r):
    B = torch.randn(N, m, r, dtype=torch.float64).to(dtype)
    Q, R = rt.qr_positive(B)
    assert Q.shape == (N, m, r) and R.shape == (N, r, r)
    assert Q.dtype == dtype and R.dtype == dtype
    tol = ATOL_ORTHO[dtype]
    # Q R == B
    np.testing.assert_allclose(_np(Q @ R), _np(B), rtol=0, atol=tol * 10 * _np(B).std())
    # non-negative diagonal, upper triangular R
    assert (torch.diagonal(R, dim1=-2, dim2=-1) >= 0).all()
    assert torch.equal(torch.tril(R, diagonal=-1), torch.zeros_like(R))
    # orthonormal columns of Q
    np.testing.assert_allclose(_np(Q.transpose(-2, -1) @ Q), np.broadcast_to(np.eye(r), (N, r, r)),
                               rtol=0, atol=tol)
    # equals the unique positive-diagonal QR computed independently by numpy
    Qn, Rn = _numpy_qr_positive(_np(B))
    np.testing.assert_allclose(_np(R), Rn, rtol=0, atol=tol * 10 * np.abs(Rn).max())
    np.testing.assert_allclose(_np(Q), Qn, rtol=0, atol=tol * 10)


def test_qr_positive_flips_negative_diagonal():
    # torch/LAPACK Householder QR gives R_00 < 0 for a positive first column; qr_positive must fix it.
    B = torch.tensor([[[3.0, 1.0], [4.0, 2.0]]], dtype=torch.float64)
    Q, R = rt.qr_positive(B)
    np.testing.assert_allclose(_np(R), [[[5.0, 2.2], [0.0, 0.4]]], atol=1e-12)
    np.testing.assert_allclose(_np(Q), [[[0.6, -0.8], [0.8, 0.6]]], atol=1e-12)


@pytest.mark.parametrize("r", [1, 2, 4, 8])
def test_triu_pairs_order(r):
    j, k = rt.triu_pairs(r)
    nj, nk = np.triu_indices(r)
    assert j.tolist() == nj.tolist() and k.tolist() == nk.tolist()
    assert len(j) == r * (r + 1) // 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,m,r", [(1, 8, 1), (6, 16, 4), (4, 20, 8)])
def test_pack_gram_equals_numpy_RtR(dtype, N, m, r):
    B = torch.randn(N, m, r, dtype=torch.float64).to(dtype)
    _, R = rt.qr_positive(B)
    G = rt.pack_gram(R)
    assert G.shape == (N, r * (r + 1) // 2) and G.dtype == dtype
    _, Rn = _numpy_qr_positive(_np(B))
    want = _numpy_pack(np.transpose(Rn, (0, 2, 1)) @ Rn)
    np.testing.assert_allclose(_np(G), want, rtol=0, atol=RTOL[dtype] * 10 * np.abs(want).max())
    # R^T R == B^T B (independent of the QR entirely)
    Bn = _np(B)
    np.testing.assert_allclose(want, _numpy_pack(np.transpose(Bn, (0, 2, 1)) @ Bn), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_outer(dtype):
    z = torch.randn(9, 5, dtype=dtype)
    P = rt.pack_outer(z)
    j, k = np.triu_indices(5)
    zn = _np(z)
    np.testing.assert_allclose(_np(P), zn[:, j] * zn[:, k], rtol=RTOL[dtype], atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,N,r", [(1, 1, 1), (17, 3, 4), (33, 50, 8), (8, 10, 16)])
def test_seqr_norms_equal_rz_norms_and_numpy(dtype, T, N, r):
    B = torch.randn(N, 3 * r, r, dtype=torch.float64).to(dtype)
    _, R = rt.qr_positive(B)
    z = torch.randn(T, r, dtype=torch.float64).to(dtype)
    got_packed = rt.seqr_norms(z, rt.pack_gram(R))
    got_rz = rt.rz_norms(z, R)
    assert got_packed.shape == got_rz.shape == (T, N)
    # independent: ||B_i z|| == ||R_i z|| since Q_i has orthonormal columns
    want = np.linalg.norm(np.einsum("imr,tr->tim", _np(B), _np(z)), axis=-1)
    scale = np.linalg.norm(_np(z), axis=-1)[:, None] * np.linalg.norm(_np(B), axis=(1, 2))[None, :]
    for got in (got_packed, got_rz):
        assert np.all(np.abs(_np(got) - want) <= RTOL[dtype] * 10 * scale)
    np.testing.assert_array_less(np.abs(_np(got_packed) - _np(got_rz)), RTOL[dtype] * 10 * scale + 1e-300)


def test_seqr_norms_never_nan_on_cancellation():
    # z orthogonal to the only direction of R: the packed quadratic form can round slightly below 0.
    R = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]], dtype=torch.float32)
    z = torch.tensor([[1.0, -1.0], [7.3, -7.3 * 0.9999999], [0.3, -0.3 * 1.0000001]], dtype=torch.float32)
    raw = rt.pack_outer(z) @ rt.pack_gram(R).T
    assert raw.min() < 0  # precondition: this input does round below zero
    out = rt.seqr_norms(z, rt.pack_gram(R))
    assert torch.isfinite(out).all() and (out >= 0).all()
    assert out.max() < 1e-3


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("N,m,n,r", [(1, 12, 20, 1), (5, 16, 24, 4), (8, 24, 16, 8)])
def test_svd_factors_match_dense(dtype, shared, N, m, n, r, make_lora, ref):
    A, B = make_lora(N, m, n, r, dtype, shared=shared, seed=3)
    S, Vt = rt.svd_factors(B, A)
    assert S.shape == (N, r) and Vt.shape == (N, r, n)  # row j of Vt_i: the j-th right singular vector
    V = Vt.transpose(1, 2)  # (N, n, r)
    W = ref.dense(A, B)  # (N, m, n)
    S_ref = torch.linalg.svdvals(torch.from_numpy(W)).numpy()[:, :r]
    np.testing.assert_allclose(_np(S), S_ref, rtol=0, atol=RTOL[dtype] * 10 * S_ref.max())
    assert (S[:, :-1] >= S[:, 1:]).all()  # descending
    Vn = _np(V)
    np.testing.assert_allclose(np.transpose(Vn, (0, 2, 1)) @ Vn, np.broadcast_to(np.eye(r), (N, r, r)),
                               rtol=0, atol=ATOL_ORTHO[dtype] * 10)
    # V S^2 V^T == W^T W: pins V's span and the pairing of singular values with vectors, sign-free
    WtW = np.transpose(W, (0, 2, 1)) @ W
    got = np.einsum("inr,ir,ikr->ink", Vn, _np(S) ** 2, Vn)
    np.testing.assert_allclose(got, WtW, rtol=0, atol=RTOL[dtype] * 10 * np.abs(WtW).max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [True, False])
def test_spectr_and_naive_norms_equal_dense(dtype, shared, make_lora, make_tokens, ref):
    N, m, n, r, T = 12, 20, 28, 4, 40
    A, B = make_lora(N, m, n, r, dtype, shared=shared, seed=5)
    x = make_tokens(T, n=n, dtype=dtype)
    W = ref.dense(A, B)
    want, scale = ref.norms(W, x), ref.scale(W, x)
    S, V = rt.svd_factors(B, A)
    for got in (rt.spectr_norms(x, S, V), rt.naive_norms(x, A, B)):
        assert got.shape == (T, N) and got.dtype == dtype
        assert np.all(np.abs(_np(got) - want) <= RTOL[dtype] * 10 * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [True, False])
def test_naive_norms_adapter_blocks(dtype, shared, make_lora, make_tokens, ref, monkeypatch):
    N, m, n, r, T = 9, 16, 20, 4, 6
    A, B = make_lora(N, m, n, r, dtype, shared=shared, seed=6)
    x = make_tokens(T, n=n, dtype=dtype)
    full = rt.naive_norms(x, A, B)
    for block in (1, 64, T * (m + r) * 2, T * (m + r) * 4 + 1):  # 1, 1, 2 and 4 adapters per block
        monkeypatch.setattr(rt, "BLOCK_ELEMENTS", block)
        got = rt.naive_norms(x, A, B)
        np.testing.assert_allclose(_np(got), _np(full), rtol=RTOL[dtype] * 10, atol=0)
    W = ref.dense(A, B)
    assert np.all(np.abs(_np(got) - ref.norms(W, x)) <= RTOL[dtype] * 10 * ref.scale(W, x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_spectr_norms_at_is_a_gather(dtype, make_lora, make_tokens, ref):
    N, m, n, r, T, k = 10, 16, 20, 4, 25, 3
    A, B = make_lora(N, m, n, r, dtype, seed=7)
    x = make_tokens(T, n=n, dtype=dtype)
    S, V = rt.svd_factors(B, A)
    idx = torch.stack([torch.randperm(N)[:k] for _ in range(T)])  # (T, k) distinct per token
    got = rt.spectr_norms_at(x, S, V, idx)
    assert got.shape == (T, k)
    W = ref.dense(A, B)
    want = np.take_along_axis(ref.norms(W, x), idx.numpy(), axis=1)
    scale = np.take_along_axis(ref.scale(W, x), idx.numpy(), axis=1)
    assert np.all(np.abs(_np(got) - want) <= RTOL[dtype] * 10 * scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_arrow_scores(dtype):
    x = torch.randn(11, 7, dtype=dtype)
    v = torch.randn(4, 7, dtype=dtype)
    got = rt.arrow_scores(x, v)
    np.testing.assert_allclose(_np(got), np.abs(_np(x) @ _np(v).T), rtol=RTOL[dtype] * 10, atol=1e-6)
    assert (got >= 0).all()


def test_zscore():
    norms = torch.tensor([[1.0, 2.0, 3.0], [0.0, 4.0, 9.0]], dtype=torch.float64)
    assert rt.zscore_(norms, None, None) is norms
    mu = torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64)
    sigma = torch.tensor([2.0, 4.0, 0.5], dtype=torch.float64)
    got = rt.zscore_(norms, mu, sigma)
    assert got is norms  # in place: the hot path allocates no second (T, N) tensor
    np.testing.assert_allclose(_np(got), [[0.0, 0.5, 0.0], [-0.5, 1.0, 12.0]])


# ---------------------------------------------------------------------------------------------------
def test_masked_argmax_never_picks_disallowed():
    T, N = 50, 7
    scores = torch.randn(T, N)
    scores[:, 3] = 1e30  # a forbidden adapter with an overwhelming score
    scores[0, 5] = float("inf")  # and one with +inf on token 0
    mask = torch.rand(T, N) < 0.5
    mask[:, 3] = False
    mask[0, 5] = False
    mask[torch.arange(T), torch.randint(0, N, (T,))] = True
    mask[:, 3] = False
    mask[~mask.any(-1), 0] = True
    want = np.where(mask.numpy(), scores.numpy(), -np.inf).argmax(axis=-1)
    got = rt.masked_argmax_(scores.clone(), mask)
    assert got.tolist() == want.tolist()
    assert mask[torch.arange(T), got].all()
    # unmasked: plain argmax; (1, N) mask broadcasts over tokens
    assert rt.masked_argmax_(scores.clone(), None).tolist() == scores.numpy().argmax(-1).tolist()
    row = torch.ones(1, N, dtype=torch.bool)
    row[0, 3] = False
    assert (rt.masked_argmax_(scores.clone(), row) != 3).all()


@pytest.mark.parametrize("per_k", [0, 64], ids=["gather", "dense"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lag_route_brute_force_with_mask(dtype, per_k, make_lora, make_tokens, ref, monkeypatch):
    """Both of LAG's paths (k candidates gathered per token; all N scored by one GEMM) against brute force."""
    monkeypatch.setattr(rt, "LAG_DENSE_PER_K", per_k)
    N, m, n, r, T, k = 12, 16, 20, 4, 60, 4
    assert rt.lag_dense(N, k) == bool(per_k)
    A, B = make_lora(N, m, n, r, dtype, seed=8)
    x = make_tokens(T, n=n, dtype=dtype)
    S, V = rt.svd_factors(B, A)
    v = V[:, 0, :].contiguous()  # V here is Vt (N, r, n): row 0 is the top right singular vector
    mask = torch.rand(T, N) < 0.6
    mask[torch.arange(T), torch.randint(0, N, (T,))] = True
    got = rt.lag_route(x, v, S, V, k, mask, None, None)
    W = ref.dense(A, B)
    arrow, _ = ref.arrow(W, x)
    norms = ref.norms(W, x)
    m_np = mask.numpy()
    arrow = np.where(m_np, arrow, -np.inf)
    for t in range(T):
        cand = np.argsort(-arrow[t], kind="stable")[:k]
        cand = cand[m_np[t, cand]]
        want = cand[np.argmax(norms[t, cand])]
        c = int(got[t])
        assert m_np[t, c], f"token {t}: disallowed adapter {c}"
        if c != want:  # only a near-tie in the arrow cut or in the spectr choice may differ
            kth = np.sort(arrow[t])[::-1]
            near_cut = abs(kth[k - 1] - kth[min(k, N - 1)]) < 1e-4 * np.abs(kth[0])
            assert near_cut or abs(norms[t, c] - norms[t, want]) < 1e-4 * norms[t].max(), (t, c, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("calibrated", [True, False])
def test_few_token_scores_equal_the_gram_form_and_the_reference(dtype, calibrated, make_lora, make_tokens):
    """The decode-step form ||(R_i / sigma_i) z|| - mu_i / sigma_i (one stacked product) equals (||R_i z|| - mu_i)
    / sigma_i with R_i z materialised, and the Gram form, for 1 token and a few."""
    N, m, n, r = 30, 16, 20, 4
    A, B = make_lora(N, m, n, r, dtype, seed=14)
    _, R = rt.qr_positive(B)
    mu, sigma = (torch.rand(N, dtype=dtype) + 1, torch.rand(N, dtype=dtype) + 0.1) if calibrated else (None, None)
    for T in (1, 7):
        z = make_tokens(T, n=n, dtype=dtype, seed=T) @ A.T  # (T, r)
        want = rt.rz_norms(z, R) if mu is None else (rt.rz_norms(z, R) - mu) / sigma  # (T, N)
        offset = None if mu is None else mu / sigma
        got = rt.seqr_scores_few(z, rt.stack_r(R, sigma), offset)
        tol = RTOL[dtype] * 10 * want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=RTOL[dtype] * 10, atol=tol)
        gram = rt.seqr_scores(z, *rt.fold_zscore(rt.pack_gram(R), mu, sigma))
        torch.testing.assert_close(got, gram, rtol=RTOL[dtype] * 10, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_folded_zscore_equals_zscored_norms(dtype, make_lora, make_tokens):
    """sqrt(z^T (G_i / sigma_i^2) z) - mu_i / sigma_i is exactly (||R_i z|| - mu_i) / sigma_i."""
    N, m, n, r, T = 30, 16, 20, 4, 50
    A, B = make_lora(N, m, n, r, dtype, seed=12)
    z = make_tokens(T, n=n, dtype=dtype) @ A.T  # (T, r)
    _, R = rt.qr_positive(B)
    G = rt.pack_gram(R)
    mu, sigma = torch.rand(N, dtype=dtype) + 1, torch.rand(N, dtype=dtype) + 0.1
    want = (rt.rz_norms(z, R) - mu) / sigma
    got = rt.seqr_scores(z, *rt.fold_zscore(G, mu, sigma))
    torch.testing.assert_close(got, want, rtol=RTOL[dtype] * 10, atol=RTOL[dtype] * 10 * want.abs().max().item())
    raw = rt.seqr_scores(z, *rt.fold_zscore(G, None, None))
    torch.testing.assert_close(raw, rt.rz_norms(z, R), rtol=RTOL[dtype] * 10, atol=RTOL[dtype] * 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("a,b", [(8, 16), (3, 5)])  # aligned (grouped GEMM) and unaligned (fallback) sizes
@pytest.mark.parametrize("T", [1, 5, rt.GATHER_TOKENS, rt.GATHER_TOKENS + 1, 90])  # gather+bmm and grouped paths
def test_grouped_matmul_equals_per_token_product(dtype, a, b, T):
    torch.manual_seed(13)
    G = 7
    z, Wt = torch.randn(T, a, dtype=dtype), torch.randn(G, a, b, dtype=dtype)
    idx = torch.tensor([0, 2, 3, 6])[torch.randint(0, 4, (T,))]  # matrices 1, 4, 5 unused (middle and end)
    want = torch.einsum("ta,tab->tb", z.double(), Wt.double()[idx])  # brute force: each token's own matrix
    got = rt.grouped_matmul(z, idx, Wt)
    assert got.dtype == dtype and got.shape == (T, b)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())
    assert rt._grouped_mm_ok(z) == (dtype != torch.float64 and a * z.element_size() % 16 == 0)
