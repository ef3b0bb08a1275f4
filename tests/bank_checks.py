"""Shared by the AdapterBank tests: tolerances, the brute-force comparisons and the bank builder (the dense
float64 references themselves are conftest.Ref). `seeded` is an autouse fixture: a test module that imports
it runs every test from seed 0."""
from __future__ import annotations

import numpy as np
import pytest
import torch

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
def seeded():
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
