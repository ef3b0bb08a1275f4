"""PackedBank (q | k | v routed together) against each part's own AdapterBank routed alone: the same choice per
token and part, the same update, under masks, for every router, both score forms and the percentile score."""
from __future__ import annotations

import pytest
import torch

from conftest import _lora, _stats, _tokens
from seqr.core import registry
from seqr.core import routers as rt
from seqr.core.bank import AdapterBank
from seqr.core.packed import PackedBank
from seqr.core.stats import QUANTILE_LEVELS

NAMES = ["a", "b", "c", "d", "e"]
N, n = len(NAMES), 16


def _bank(m, r=4, seed=0, quantiles=False, shared=True):
    A, B = _lora(N, m, n, r, seed=seed, shared=shared)
    mu, sigma = _stats(N, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    q = None
    if quantiles:  # each adapter's norm quantiles around its mean, non-decreasing
        steps = torch.rand(N, len(QUANTILE_LEVELS), generator=g, dtype=torch.float64)
        q = mu[:, None] + sigma[:, None] * (steps.cumsum(1) - steps.sum(1, keepdim=True) / 2) / 4
    cent = torch.randn(N, n, generator=g)
    return AdapterBank(A, B, mu=mu, sigma=sigma, quantiles=q, centroids=cent, names=NAMES)


def _parts(**kw):
    return [_bank(12, seed=0, **kw), _bank(6, seed=1, **kw), _bank(6, seed=2, **kw)]  # q, k, v


def _mask(T, seed=4):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(T, N, generator=g) > 0.5  # (T, N)
    mask[torch.arange(T), torch.randint(0, N, (T,), generator=g)] = True  # every token allows one at least
    return mask


ROUTED = [r.name for r in registry.routers(("score", "shortlist"))]


@pytest.mark.parametrize("method", ROUTED)
@pytest.mark.parametrize("T", [5, rt.GATHER_TOKENS + 9])  # the packed few-token form, and part by part
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_choice_and_update_equal_each_part_alone(method, T, dtype):
    banks = _parts()
    pb = PackedBank(banks)
    x = rt.in_compute_dtype(_tokens(T, n=n, seed=3).to(dtype))  # (T, n)
    mask = _mask(T)
    k = 2 if registry.get(method).takes_k else None
    z = pb.z(x)  # (T, 3 r)
    idx = pb.choose(x, method, mask, k=k, z=z)  # (T, 3)
    upds = pb.apply(x, idx, z)
    for p, bank in enumerate(banks):
        want = bank.route(x, method, k=k, allowed=mask)  # (T,) brute force: this part alone
        assert mask.gather(1, idx[:, p:p + 1]).all()
        assert torch.equal(idx[:, p], want), (method, p)
        torch.testing.assert_close(upds[p], bank.delta(x, want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [1, 6])
def test_packed_seqr_form_is_the_parts_scores(T):
    """The one-product form's (T, P, N) scores equal each part's own SEQR scores, with and without quantiles."""
    for quantiles in (False, True):
        banks = _parts(quantiles=quantiles)
        pb = PackedBank(banks)
        x = _tokens(T, n=n, seed=8)
        s = pb.seqr_scores(pb.z(x))  # (T, 3, N)
        assert s is not None and s.shape == (T, 3, N)
        for p, bank in enumerate(banks):
            torch.testing.assert_close(s[:, p], bank.scores(x, "seqr"), rtol=1e-5, atol=1e-5)


def test_packed_scores_part_by_part_when_the_parts_differ():
    """Different ranks, or only some parts calibrated: no one-product form, same choices part by part."""
    A, B = _lora(N, 6, n, 2, seed=5)
    odd = [_bank(12), AdapterBank(A, B, names=NAMES)]  # uncalibrated rank-2 part
    pb = PackedBank(odd)
    x = _tokens(4, n=n, seed=9)
    assert pb.seqr_scores(pb.z(x)) is None
    idx = pb.choose(x, "seqr", None, z=pb.z(x))  # (T, 2)
    for p, bank in enumerate(odd):
        assert torch.equal(idx[:, p], bank.route(x, "seqr"))


def test_packed_never_chooses_outside_the_mask_whatever_the_scores():
    banks = _parts()
    pb = PackedBank(banks)
    x = _tokens(6, n=n, seed=2)
    x[0] = float("nan")  # NaN scores
    x[1] = 1e30  # overflowing scores
    mask = _mask(6, seed=11)
    idx = pb.choose(x, "seqr", mask, z=pb.z(x))  # (T, 3)
    assert mask.gather(1, idx).all()


def test_packed_errors_name_the_mismatch():
    with pytest.raises(ValueError, match="AdapterBank"):
        PackedBank([])
    A, B = _lora(N, 6, n, 4, seed=1)
    with pytest.raises(ValueError, match=r"part 1 holds adapters \['v', 'w', 'x', 'y', 'z'\]"):
        PackedBank([_bank(12), AdapterBank(A, B, names=["v", "w", "x", "y", "z"])])
    A2, B2 = _lora(N, 6, n + 1, 4, seed=1)
    with pytest.raises(ValueError, match="width 17"):
        PackedBank([_bank(12), AdapterBank(A2, B2, names=NAMES)])
