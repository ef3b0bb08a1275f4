"""`AdapterBank`'s contract beyond the scores: allowed sets never broken, bad input named in one line,
storage, chunked scoring, lazy SVD, dtypes (against the dense float64 references of conftest.Ref)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import seqr.core.routers as rt
from seqr import AdapterBank
from bank_checks import seeded  # noqa: F401 (an autouse fixture: every test from seed 0)
from bank_checks import (M, NIN, DTYPES, METHODS, MIN_GAP, NORM_METHODS, SCORE_RTOL, _arrow_tol, _assert_choice,
                         _assert_scores, _bank, _norm_tol, _np)


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
