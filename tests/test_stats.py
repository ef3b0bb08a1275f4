"""Tests of `NormStats` (streaming, mergeable mean/std) against numpy on the concatenated data."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from seqr import NormStats

# Relative tolerance of streamed / merged statistics vs numpy's two-pass float64 mean and std (ddof=0).
STATS_RTOL = 1e-10


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def _data(n, *, loc=0.0, scale=1.0, seed=0):
    return np.random.default_rng(seed).normal(loc, scale, n)


def _random_batches(data, rng, max_batch=40):
    """Split data into consecutive batches of random sizes, including empty ones."""
    out, i = [], 0
    while i < len(data):
        b = int(rng.integers(0, max_batch))
        out.append(data[i:i + b])
        i += b
    return out


def _assert_matches(s: NormStats, data: np.ndarray):
    assert s.count == len(data)
    np.testing.assert_allclose(s.mean, data.mean(), rtol=STATS_RTOL, atol=0)
    np.testing.assert_allclose(s.std, data.std(ddof=0), rtol=STATS_RTOL, atol=0)
    np.testing.assert_allclose(s.var, data.var(ddof=0), rtol=STATS_RTOL, atol=0)


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loc,scale", [(0.0, 1.0), (1e3, 1.0), (5.0, 1e-3), (-2.0, 50.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_matches_numpy(loc, scale, seed):
    data = _data(3000, loc=loc, scale=scale, seed=seed)
    rng = np.random.default_rng(seed + 100)
    s = NormStats()
    for batch in _random_batches(data, rng):
        kind = int(rng.integers(0, 3))  # feed numpy, torch (2-D when possible) and list batches
        if kind == 0:
            s.update(batch)
        elif kind == 1:
            t = torch.from_numpy(batch)
            s.update(t.view(2, -1) if len(batch) % 2 == 0 and len(batch) else t)
        else:
            s.update(batch.tolist())
    _assert_matches(s, data)


def test_update_float32_input_and_chaining():
    data = _data(257, loc=3.0, seed=4).astype(np.float32)
    s = NormStats().update(torch.from_numpy(data[:100])).update(data[100:])
    assert isinstance(s, NormStats)
    _assert_matches(s, data.astype(np.float64))  # float32 values are accumulated in float64


def test_single_values_and_constant_stream():
    s = NormStats()
    for v in (2.5, 2.5, 2.5):
        s.update(v)
    assert s.count == 3 and s.mean == 2.5 and s.std == 0.0
    s = NormStats().update([7.0])
    assert s.count == 1 and s.mean == 7.0 and s.var == 0.0


def test_empty_update_is_a_no_op():
    s = NormStats().update([1.0, 2.0, 4.0])
    before = (s.count, s.mean, s.m2)
    s.update([])
    s.update(torch.empty(0, 3))
    assert (s.count, s.mean, s.m2) == before


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_update_raises_and_keeps_state(bad):
    s = NormStats().update([1.0, 2.0])
    before = (s.count, s.mean, s.m2)
    with pytest.raises(ValueError, match="NaN or inf"):
        s.update([3.0, bad, 4.0])
    assert (s.count, s.mean, s.m2) == before
    with pytest.raises(ValueError):
        NormStats().update(torch.tensor([[bad]]))


def test_empty_stats_have_no_std():
    s = NormStats()
    with pytest.raises(ValueError, match="empty"):
        s.std
    with pytest.raises(ValueError, match="empty"):
        s.var
    assert s.to_dict()["std"] is None


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merge_shards_equals_all_data(seed):
    rng = np.random.default_rng(seed)
    data = _data(2000, loc=10.0, scale=2.0, seed=seed)
    cuts = np.sort(rng.integers(0, len(data), 4))
    shards = np.split(data, cuts)  # 5 shards, some possibly empty
    shards.insert(int(rng.integers(0, len(shards))), data[:0])  # and surely one empty shard
    stats = [NormStats().update(sh) for sh in shards]
    merged = NormStats()
    for st in stats:
        assert merged.merge(st) is merged
    _assert_matches(merged, data)
    # a pairwise tree of merges over fresh shard stats, in reverse order, gives the same result
    level = [NormStats().update(sh) for sh in reversed(shards)]
    while len(level) > 1:
        level = [level[i].merge(level[i + 1]) if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)]
    _assert_matches(level[0], data)


def test_merge_with_empty_on_either_side():
    data = _data(50, seed=5)
    full = NormStats().update(data)
    a = NormStats().merge(NormStats().update(data))  # empty <- full
    b = NormStats().update(data).merge(NormStats())  # full <- empty
    for s in (a, b):
        assert (s.count, s.mean, s.m2) == (full.count, full.mean, full.m2)
    e = NormStats().merge(NormStats())
    assert e.count == 0


def test_merge_with_itself_doubles_the_data():
    data = _data(40, seed=6)
    s = NormStats().update(data)
    s.merge(NormStats().update(data))
    _assert_matches(s, np.concatenate([data, data]))


# ---------------------------------------------------------------------------------------------------
def test_to_dict_from_dict_round_trip():
    data = _data(123, loc=-4.0, scale=0.3, seed=7)
    s = NormStats().update(data)
    d = s.to_dict()
    assert set(d) == {"count", "mean", "m2", "std"}
    assert d["count"] == 123 and d["std"] == s.std
    for back in (NormStats.from_dict(d), NormStats.from_dict(json.loads(json.dumps(d)))):
        assert (back.count, back.mean, back.m2) == (s.count, s.mean, s.m2)  # exact
        _assert_matches(back, data)
    empty = NormStats.from_dict(json.loads(json.dumps(NormStats().to_dict())))
    assert empty.count == 0
    # a restored shard keeps merging exactly
    more = _data(77, loc=-4.0, scale=0.3, seed=8)
    _assert_matches(NormStats.from_dict(d).update(more), np.concatenate([data, more]))


@pytest.mark.parametrize("bad", [
    {},
    {"count": 3, "mean": 1.0},
    {"mean": 1.0, "m2": 0.0},
    {"count": "three", "mean": 1.0, "m2": 0.0},
    {"count": None, "mean": 1.0, "m2": 0.0},
    {"count": 3, "mean": "abc", "m2": 0.0},
    {"count": 3, "mean": [1.0], "m2": 0.0},
    {"count": -1, "mean": 1.0, "m2": 0.0},
    {"count": 3, "mean": 1.0, "m2": -0.5},
    {"count": 3, "mean": float("nan"), "m2": 0.0},
    {"count": 3, "mean": 1.0, "m2": float("inf")},
    None,
    [],
    "count=3",
])
def test_from_dict_malformed_raises(bad):
    with pytest.raises(ValueError, match="malformed"):
        NormStats.from_dict(bad)


@pytest.mark.parametrize("bad", [
    {"count": 2.5, "mean": 1.0, "m2": 0.0},  # a fractional count is not a count (silently truncated to 2)
    {"count": 0, "mean": 0.0, "m2": 5.0},    # m2 is a sum over zero values: must be 0 when count == 0
])
def test_from_dict_inconsistent_record_raises(bad):
    # Accepting these silently corrupts later results, e.g. {"count": 0, "m2": 5} merged with [1, 2]
    # reports std sqrt(5.5 / 2) ~ 1.66 instead of 0.5.
    with pytest.raises(ValueError):
        NormStats.from_dict(bad)


def test_constructor_validates():
    with pytest.raises(ValueError):
        NormStats(count=-1)
    with pytest.raises(ValueError):
        NormStats(count=2, mean=0.0, m2=-1.0)
    with pytest.raises(ValueError):
        NormStats(count=2, mean=float("nan"), m2=0.0)
    s = NormStats(count=4, mean=2.0, m2=8.0)
    assert s.var == 2.0 and s.std == math.sqrt(2.0)
