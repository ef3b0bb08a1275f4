"""Shared seeded factories and brute-force references for the seqr test suite.

The references work on dense float64 numpy/torch tensors and never call into `seqr`, so they are
independent of the code under test: B_i A_i is formed explicitly and applied to every token.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch


def _lora(N, m, n, r, dtype=torch.float32, *, shared=True, seed=0, spread=0.5):
    """Random LoRA factors A (r, n) or (N, r, n) and B (N, m, r).

    Each adapter's B is scaled by a log-normal factor (std `spread`) so update norms differ across
    adapters; A is scaled like a LoRA init (1/sqrt(n)).
    """
    g = torch.Generator().manual_seed(seed)
    a_shape = (r, n) if shared else (N, r, n)
    A = torch.randn(*a_shape, generator=g, dtype=torch.float64) / n ** 0.5
    scale = torch.exp(spread * torch.randn(N, 1, 1, generator=g, dtype=torch.float64))
    B = torch.randn(N, m, r, generator=g, dtype=torch.float64) * scale
    return A.to(dtype), B.to(dtype)


def _stats(N, *, seed=0, typical=1.0):
    """Random calibration stats: mu in [0, 2*typical), sigma in [0.2, 3.2)*typical, float64 (N,)."""
    g = torch.Generator().manual_seed(seed + 10_000)
    mu = torch.rand(N, generator=g, dtype=torch.float64) * 2 * typical
    sigma = (0.2 + 3 * torch.rand(N, generator=g, dtype=torch.float64)) * typical
    return mu, sigma


def _tokens(*shape, n, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, n, generator=g, dtype=torch.float64).to(dtype)


class Ref:
    """Brute-force float64 references (numpy / dense torch), independent of seqr."""

    @staticmethod
    def dense(A, B) -> np.ndarray:
        """W_i = B_i A_i as a dense (N, m, n) float64 array."""
        A = A.detach().double().numpy()
        B = B.detach().double().numpy()
        if A.ndim == 2:
            return np.einsum("imr,rn->imn", B, A)
        return np.einsum("imr,irn->imn", B, A)

    @staticmethod
    def flat(x) -> np.ndarray:
        x = x.detach().double().numpy()
        return x.reshape(-1, x.shape[-1])

    @staticmethod
    def updates(W, x) -> np.ndarray:
        """B_i A_i x for every token and adapter: (T, N, m)."""
        return np.einsum("imn,tn->tim", W, Ref.flat(x))

    @staticmethod
    def norms(W, x) -> np.ndarray:
        """||B_i A_i x||: (T, N)."""
        return np.linalg.norm(Ref.updates(W, x), axis=-1)

    @staticmethod
    def zscore(norms, mu, sigma) -> np.ndarray:
        if mu is None:
            return norms
        return (norms - np.asarray(mu, dtype=np.float64)) / np.asarray(sigma, dtype=np.float64)

    @staticmethod
    def svd(W):
        """Dense SVD of every W_i with torch.linalg.svd in float64: U (N, m, k), S (N, k), Vh (N, k, n)."""
        return torch.linalg.svd(torch.from_numpy(W), full_matrices=False)

    @staticmethod
    def arrow(W, x):
        """|v_i . x| with v_i the top right singular vector of the dense W_i, plus the relative gap
        (s1 - s2) / s1 of each W_i (v_i is ill-defined when it is ~0): (T, N), (N,)."""
        _, S, Vh = Ref.svd(W)
        v = Vh[:, 0, :].numpy()  # (N, n)
        S = S.numpy()
        gap = (S[:, 0] - S[:, 1]) / S[:, 0] if S.shape[1] > 1 else np.ones(S.shape[0])
        return np.abs(Ref.flat(x) @ v.T), gap

    @staticmethod
    def scale(W, x) -> np.ndarray:
        """Natural rounding scale of ||W_i x||: ||W_i||_F * ||x_t||, (T, N)."""
        return np.linalg.norm(Ref.flat(x), axis=-1)[:, None] * np.linalg.norm(W, axis=(1, 2))[None, :]


@pytest.fixture
def make_lora():
    return _lora


@pytest.fixture
def make_stats():
    return _stats


@pytest.fixture
def make_tokens():
    return _tokens


@pytest.fixture
def ref():
    return Ref


@pytest.fixture(scope="module")
def tok():
    """The offline byte-level ChatML tokenizer of tests/tiny_chat.py."""
    from tiny_chat import chat_tokenizer

    return chat_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    """A tiny random chat Llama sized for `tok` (eval mode, seed 0)."""
    from tiny_chat import tiny_chat_llama

    return tiny_chat_llama(len(tok))
