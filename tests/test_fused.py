"""The fused SEQR step (core/fused.py, one compiled call per layer) against brute force and against the eager step
it replaces: the same choices and updates for single banks and packed parts, under every mask form, NaN scores,
tokens without a set, half-precision B's; the same refusals; and the eager step wherever it does not apply."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import _lora, _stats, _tokens
from seqr.core import fused
from seqr.core import routers as rt
from seqr.core.bank import AdapterBank
from seqr.core.packed import PackedBank
from seqr.core.step import fused_step, token_step
from seqr.core.stats import QUANTILE_LEVELS

NAMES = ["a", "b", "c", "d", "e", "f"]
N, n = len(NAMES), 24

pytestmark = pytest.mark.skipif(not fused.available(), reason=f"fused step not built: {fused.build_error()}")


def _bank(m=20, r=8, seed=0, calibrated=True, dtype=torch.float32):
    A, B = _lora(N, m, n, r, seed=seed)
    mu, sigma = _stats(N, seed=seed) if calibrated else (None, None)
    return AdapterBank(A.to(dtype), B.to(dtype), mu=mu, sigma=sigma, names=NAMES)  # half: resident half


def _mask(T, seed=3):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(T, N, generator=g) > 0.6  # (T, N)
    mask[torch.arange(T), torch.randint(0, N, (T,), generator=g)] = True  # every token allows one at least
    return mask


def _eager(monkeypatch, *args):
    with monkeypatch.context() as m:
        m.setenv("SEQR_FUSED", "0")
        return token_step(*args)


def _brute(bank: AdapterBank, A, B, mu, sigma, x, mask):
    """float64 numpy: s_i = (||B_i A x|| - mu_i) / sigma_i over the allowed adapters, the margin to the runner-up,
    and the chosen adapter's update B_i* A x. Independent of seqr (dense per-adapter products)."""
    A, B, x = A.double().numpy(), B.double().numpy(), x.double().numpy()  # (r, n), (N, m, r), (T, n)
    s = np.linalg.norm(np.einsum("imr,rn,tn->tim", B, A, x), axis=-1)  # (T, N)
    s = (s - mu.numpy()) / sigma.numpy()
    s = np.where(mask.numpy(), s, -np.inf)
    idx = s.argmax(1)
    top2 = np.sort(s, axis=1)[:, -2:]
    upd = np.einsum("tmr,rn,tn->tm", B[idx], A, x)  # (T, m)
    return idx, top2[:, 1] - top2[:, 0], upd


@pytest.mark.parametrize("T", [1, 5, rt.GATHER_TOKENS])
@pytest.mark.parametrize("r", [4, 8])
def test_fused_choice_and_update_equal_brute_force(T, r):
    A, B = _lora(N, 20, n, r, seed=T)
    mu, sigma = _stats(N, seed=T)
    bank = AdapterBank(A, B, mu=mu, sigma=sigma, names=NAMES)
    x, mask = _tokens(T, n=n, seed=T), _mask(T, seed=T)
    out = fused_step(bank, x, "seqr", mask)
    assert out is not None  # the fused step ran
    idx, upd, z = out
    want_idx, margin, want_upd = _brute(bank, A, B, mu, sigma, x, mask)
    clear = margin > 1e-4
    assert clear.sum() >= T // 2
    assert np.array_equal(idx.numpy()[clear], want_idx[clear])
    np.testing.assert_allclose(upd.numpy()[clear], want_upd[clear], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z, x @ A.T)


@pytest.mark.parametrize("mask_kind", ["none", "row", "per_token"])
@pytest.mark.parametrize("calibrated", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_equals_the_eager_step_on_one_bank(monkeypatch, mask_kind, calibrated, dtype):
    bank, T = _bank(calibrated=calibrated, dtype=dtype), 7
    x = _tokens(T, n=n, seed=2)
    mask = {"none": None, "row": _mask(1)[0:1], "per_token": _mask(T)}[mask_kind]  # None, (1, N), (T, N)
    assert fused_step(bank, x, "seqr", mask) is not None  # the fused step serves this bank
    idx, upd, z = token_step(bank, x, "seqr", mask)
    e_idx, e_upd, e_z = _eager(monkeypatch, bank, x, "seqr", mask)
    assert torch.equal(idx, e_idx)
    torch.testing.assert_close(upd, e_upd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z, e_z, rtol=1e-5, atol=1e-6)
    if mask is not None:
        assert mask.expand(T, N).gather(1, idx[:, None]).all()  # never outside the set


def test_fused_packed_parts_and_tokens_without_a_set(monkeypatch):
    """q | k | v of different widths, each part its own choice; a token without a set may take any adapter and gets
    no update (vLLM's warm-up, a request that carries none)."""
    pb, T = PackedBank([_bank(20, seed=0), _bank(8, seed=1), _bank(8, seed=2)]), 9
    x, mask = _tokens(T, n=n, seed=5), _mask(T, seed=5)
    has = torch.ones(T, dtype=torch.bool)
    has[[2, 6]] = False
    choose = mask | ~has[:, None]
    idx, upd, _ = fused_step(pb, x, "seqr", choose, has, joined=True)  # (T, 3), (T, 36)
    e_idx, e_upds, _ = _eager(monkeypatch, pb, x, "seqr", choose)
    assert torch.equal(idx, e_idx)
    want = torch.cat(e_upds, dim=1) * has[:, None]  # (T, 36)
    torch.testing.assert_close(upd, want, rtol=1e-5, atol=1e-6)
    assert upd[~has].abs().sum() == 0
    parts = token_step(pb, x, "seqr", mask)[1]  # [(T, m_p)], as the eager step gives them
    assert [u.shape[1] for u in parts] == [20, 8, 8]


@pytest.mark.parametrize("xdt,ydt", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                     (torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
def test_into_adds_the_update_to_the_output_rounded_once(xdt, ydt):
    """seqr_step_into (vLLM's layers: x in the model's dtype, the update added into the layer's output in place) is
    seqr_step on x in float32 followed by (y + update).to(y.dtype), bit for bit; a token without a set keeps y."""
    pb, T = PackedBank([_bank(20, seed=0), _bank(8, seed=1), _bank(8, seed=2)]), 9
    x = _tokens(T, n=2 * n, seed=4).to(xdt)[:, :n]  # (T, n) rows of a wider tensor: strided, as a view comes
    mask, has = _mask(T, seed=4), torch.ones(T, dtype=torch.bool)
    has[3] = False
    args = fused.args_of(pb)
    want_idx, upd, _ = fused.seqr_step(x.float().contiguous(), args, mask | ~has[:, None], has)  # (T, 3), (T, 36)
    y0 = _tokens(T, n=36, seed=5).to(ydt)  # (T, 36): the base layer's output
    y = y0.clone()
    idx = fused.seqr_step_into(x, y, args, mask | ~has[:, None], has)
    assert torch.equal(idx, want_idx)
    assert torch.equal(y, (y0 + upd).to(ydt))
    assert torch.equal(y[3], y0[3]) and not torch.equal(y, y0)
    assert fused.seqr_step_into(x, y.t(), args, mask) is None  # a transposed output: not served, untouched
    assert fused.seqr_step_into(x.double(), y, args, mask) is None  # float64: the eager step's


def test_tokens_split_over_threads_route_as_on_one(monkeypatch):
    """Enough tokens to split over two threads: every token's choice and update as on one thread, bit for bit."""
    pb, T = PackedBank([_bank(20, seed=0), _bank(8, seed=1)]), 300
    x, mask = _tokens(T, n=n, seed=6), _mask(T, seed=6)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(fused, "PARALLEL_WORK", 1)  # every token may go to either thread
        got = fused.seqr_step(x, fused.args_of(pb), mask)
        monkeypatch.setattr(fused, "PARALLEL_WORK", 0)
        one = fused.seqr_step(x, fused.args_of(pb), mask)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(got, one):
        assert torch.equal(a, b)
    assert mask.gather(1, got[0]).all()


def test_fused_ranks_nan_scores_like_the_eager_step(monkeypatch):
    """A silo whose statistics make its score NaN or -inf ranks below every finite allowed score and above every
    adapter outside the set; a token whose allowed scores are all NaN gets its first allowed adapter."""
    bank, T = _bank(), 4
    bank._offset[[1, 3]] = float("nan")
    bank._offset[4] = float("inf")  # score -inf
    x = _tokens(T, n=n, seed=8)
    mask = torch.zeros(T, N, dtype=torch.bool)
    mask[0, [1, 3]] = True  # only NaN scores: the first allowed
    mask[1, [1, 4, 5]] = True  # NaN, -inf and a finite score: the finite one
    mask[2, [3, 4]] = True  # NaN and -inf: the first allowed
    mask[3] = True
    idx = fused_step(bank, x, "seqr", mask)[0]
    assert torch.equal(idx, _eager(monkeypatch, bank, x, "seqr", mask)[0])
    assert idx[:3].tolist() == [1, 5, 3]


def test_fused_refuses_an_empty_allowed_set():
    bank, T = _bank(), 3
    mask = _mask(T)
    mask[1] = False
    with pytest.raises(ValueError, match="allowed set is empty"):
        fused_step(bank, _tokens(T, n=n), "seqr", mask)


def _no_kernel(monkeypatch):
    monkeypatch.setattr(fused, "_load", lambda: pytest.fail("the fused step ran where it does not apply"))
    monkeypatch.setattr(fused, "available", lambda: True)


def test_the_eager_step_serves_where_the_fused_one_does_not_apply(monkeypatch):
    """Other routers, the percentile score, float64, many tokens of many adapters, SEQR_FUSED=0: all eager."""
    T = 5
    x = _tokens(T, n=n)
    q = torch.sort(torch.rand(N, len(QUANTILE_LEVELS), dtype=torch.float64), dim=1).values
    A, B = _lora(N, 20, n, 8)
    pct = AdapterBank(A, B, mu=torch.ones(N), sigma=torch.ones(N), quantiles=q, names=NAMES)
    big_T = fused.FUSED_WORK // N + 1
    cases = {"arrow": (_bank(), x, "arrow", None), "percentile": (pct, x, "seqr", None),
             "float64": (_bank(dtype=torch.float64), x.double(), "seqr", None),
             "many": (_bank(), _tokens(big_T, n=n), "seqr", None)}
    want = {case: _eager(monkeypatch, *args)[0] for case, args in cases.items()}
    _no_kernel(monkeypatch)
    for case, args in cases.items():
        assert torch.equal(token_step(*args)[0], want[case]), case
    monkeypatch.setenv("SEQR_FUSED", "0")
    token_step(_bank(), x, "seqr", None)


def test_a_failed_build_warns_once_and_routes_eagerly(monkeypatch):
    from torch.utils import cpp_extension

    def broken(*a, **k):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(fused, "_module", None)
    monkeypatch.setattr(fused, "_error", None)
    monkeypatch.setattr(cpp_extension, "load_inline", broken)
    bank, x = _bank(), _tokens(4, n=n)
    with pytest.warns(RuntimeWarning, match="fused SEQR step could not be built.*Ninja"):
        idx = token_step(bank, x, "seqr", None)[0]
    assert not fused.available() and "Ninja" in fused.build_error()
    assert torch.equal(idx, _eager(monkeypatch, bank, x, "seqr", None)[0])


def test_a_set_of_one_is_its_adapter_whatever_the_scores(monkeypatch):
    """Request-level serving narrows each request's set to its chosen adapter: the fused step applies it as is
    (no scores read: a NaN or the lowest score changes nothing), like the eager step."""
    bank, T = _bank(), 6
    bank._offset[2] = float("nan")
    x = _tokens(T, n=n, seed=11)
    mask = torch.zeros(T, N, dtype=torch.bool)
    mask[torch.arange(T), torch.tensor([2, 0, 5, 2, 1, 4])] = True
    idx, upd, _ = fused_step(bank, x, "seqr", mask)
    assert idx.tolist() == [2, 0, 5, 2, 1, 4]
    e_idx, e_upd, _ = _eager(monkeypatch, bank, x, "seqr", mask)
    assert torch.equal(idx, e_idx)
    torch.testing.assert_close(upd, e_upd, rtol=1e-5, atol=1e-6)


def test_no_token_leaves_its_set_whatever_a_silo_does_to_its_scores(monkeypatch):
    """Hostile statistics: offsets that make an adapter's score NaN, +-inf or fp32's extremes. The fused step's
    choice stays inside each token's set and equals the eager step's (tests/test_isolation.py poisons the eager
    step's own score functions)."""
    g = torch.Generator().manual_seed(0)
    values = torch.tensor([float("nan"), float("inf"), float("-inf"), 3.4e38, -3.4e38, 0.0, 1.0])
    bank = _bank()
    for trial in range(200):
        T = 1 + trial % 7
        bank._offset.copy_(values[torch.randint(0, len(values), (N,), generator=g)])  # score = norm - offset
        mask = torch.rand(T, N, generator=g) < 0.4
        mask[torch.arange(T), torch.randint(0, N, (T,), generator=g)] = True  # never empty
        x = _tokens(T, n=n, seed=trial)
        idx = fused_step(bank, x, "seqr", mask)[0]
        assert mask.gather(1, idx[:, None]).all(), trial
        assert torch.equal(idx, _eager(monkeypatch, bank, x, "seqr", mask)[0]), trial
