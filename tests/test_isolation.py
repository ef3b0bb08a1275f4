"""Routing isolation as an invariant of the masked choice itself (issue 15, root cause 1): whatever the scores hold
(NaN, +-inf, overflow), a token is only ever given an adapter of its row's allowed set, for every router,
granularity and mixture; statistics that would overflow the fp32 z-score are refused at add, at load and in a bank."""
from __future__ import annotations

import json

import pytest
import torch

import seqr
from seqr.store import files
from seqr.core import routers as rt
from seqr.core.bank import AdapterBank
from seqr.core.stats import NormStats, z_scorable
from peft_factory import adapter_library, random_stats, tiny_llama
from seqr.hf.compat import cache_arg, returned_cache

NAMES = ["a0", "a1", "a2", "a3"]
ROWS = [{"a2"}, {"a0", "a3"}, {"a1"}]  # one allowed set per batch row: three users in one batch
PATTERNS = ("mixed", "extreme")  # the allowed adapters' scores: NaN and -inf mixed, or fp32's lowest
CASES = ([(m, "token", None) for m in ("seqr", "spectr", "arrow", "naive", "lag")]
         + [(m, g, None) for m in ("seqr", "spectr", "naive", "arrow") for g in ("prompt", "prompt-vote", "layers",
                                                                                   "depth", "request", "request-reuse",
                                                                                   "request-vote")]
         + [(m, "token", 2) for m in ("seqr", "spectr", "naive", "arrow")])


def _poison(s: torch.Tensor, allowed: torch.Tensor, pattern: str, gen: torch.Generator) -> torch.Tensor:
    """Scores a hostile silo could provoke: every disallowed adapter wins outright (+inf or fp32's max), every
    allowed one is NaN / -inf / a mix / fp32's lowest."""
    big = torch.finfo(s.dtype).max
    bad = {"nan": float("nan"), "-inf": float("-inf"), "extreme": -big}
    if pattern == "mixed":
        fill = torch.where(torch.rand(s.shape, generator=gen) < 0.5, float("nan"), float("-inf")).to(s.dtype)
    else:
        fill = torch.full_like(s, bad[pattern])
    top = big if pattern == "extreme" else float("inf")
    return torch.where(allowed, fill, torch.full_like(s, top))


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return random_stats(adapter_library(tmp_path_factory.mktemp("iso"), NAMES))


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("method,granularity,mix", CASES)
def test_no_token_leaves_its_rows_allowed_set_whatever_the_scores(lib, monkeypatch, method, granularity, mix,
                                                                 pattern):
    monkeypatch.setenv("SEQR_FUSED", "0")  # the eager step's score functions are poisoned here; the fused step's
    # hostile-statistics test is in tests/test_fused.py
    B, T = len(ROWS), 5
    row_mask = torch.tensor([[n in row for n in NAMES] for row in ROWS])  # (B, N)
    tok_mask = row_mask.repeat_interleave(T, dim=0)  # (B*T, N) prefill; decode steps have one token per row
    gen = torch.Generator().manual_seed(1)

    def mask_for(n_tokens):
        return tok_mask if n_tokens == B * T else row_mask.repeat_interleave(n_tokens // B, dim=0)

    norm_scores, arrow, spectr_at, apply = (AdapterBank._router_scores, rt.arrow_scores, rt.spectr_norms_at,
                                            AdapterBank.apply)
    monkeypatch.setattr(AdapterBank, "_router_scores", lambda self, x, m, z: _poison(
        norm_scores(self, x, m, z), mask_for(x.shape[0] if z is None else z.shape[0]), pattern, gen))
    monkeypatch.setattr(rt, "arrow_scores", lambda x, v: _poison(arrow(x, v), mask_for(x.shape[0]), pattern, gen))
    monkeypatch.setattr(rt, "spectr_norms_at", lambda x, S, Vt, top: _poison(
        spectr_at(x, S, Vt, top), mask_for(x.shape[0]).gather(1, top), pattern, gen))
    used = []

    def spy(self, xf, idx, z=None):
        used.append(mask_for(idx.shape[0]).gather(1, idx[:, None]).all())
        return apply(self, xf, idx, z=z)
    monkeypatch.setattr(AdapterBank, "apply", spy)
    model = seqr.attach(tiny_llama(), lib)
    ids = torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(0))
    with seqr.routing(model, method, allowed=[sorted(r) for r in ROWS], k=2 if method == "lag" else None,
                      granularity=granularity, mix=mix, trace="choices") as trace:
        out = model(input_ids=ids, use_cache=True)
        step = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1): one decode step too
        model(input_ids=step, **cache_arg(model, returned_cache(out)), use_cache=True)
    assert used and all(bool(u) for u in used), "an update was applied from an adapter outside its row's set"
    assert sum(trace.outside([set(r) for r in ROWS])) == 0


def test_masked_argmax_and_topk_never_leave_the_mask_under_random_poison():
    g = torch.Generator().manual_seed(0)
    values = torch.tensor([float("nan"), float("inf"), float("-inf"), 3.4e38, -3.4e38, 0.0, 1.0])
    for trial in range(300):
        T, N = 1 + trial % 7, 2 + trial % 9
        s = values[torch.randint(0, len(values), (T, N), generator=g)]  # (T, N)
        mask = torch.rand(T, N, generator=g) < 0.4
        mask[torch.arange(T), torch.randint(0, N, (T,), generator=g)] = True  # never empty
        idx = rt.masked_argmax_(s.clone(), mask)  # (T,)
        assert mask.gather(1, idx[:, None]).all()
        k = int(mask.sum(-1).min())
        _, top = rt.masked_topk_(s.clone(), mask, k)
        assert mask.gather(1, top).all()
        finite_best = torch.where(mask & ~s.isnan(), s, float("-inf")).max(-1).values  # the allowed maximum
        got = s.gather(1, idx[:, None])[:, 0]
        ok = (got == finite_best) | (finite_best == float("-inf"))
        assert ok.all(), "the argmax must still be the best allowed score where one is not -inf"


def test_an_empty_allowed_row_is_an_error_not_index_zero():
    with pytest.raises(ValueError, match="empty"):
        rt.masked_argmax_(torch.zeros(2, 3), torch.tensor([[True, False, False], [False, False, False]]))


@pytest.mark.parametrize("mu,sigma", [(1e30, 1e-10), (1.0, 1e-30), (3e38, 0.5), (1.0, 1e-45)])
def test_stats_that_overflow_the_fp32_zscore_are_refused_everywhere(lib, tmp_path, mu, sigma):
    assert not z_scorable(mu, sigma)
    layer, name = lib.layers[0], "a1"
    bank = lib.bank(layer)
    mus, sigmas = bank.mu.clone().double(), bank.sigma.clone().double()
    mus[1], sigmas[1] = mu, sigma
    with pytest.raises(ValueError, match=r"'a1'"):
        AdapterBank(bank.A, bank.B, mu=mus, sigma=sigmas, names=NAMES)
    bad = NormStats(count=10, mean=mu, m2=sigma * sigma * 10)
    stats = {ly: (bad if ly == layer else s) for ly, s in lib.stats(name).items()}
    copy = seqr.LoraLibrary.load(lib.save(tmp_path / "lib"))
    with pytest.raises(ValueError, match=rf"adapter 'a1'.*{layer}.*overflow"):
        copy.set_stats(name, stats)
    man = json.loads((tmp_path / "lib" / files.MANIFEST).read_text())
    entry = next(e for e in man["adapters"] if e["name"] == name)
    entry["stats"][layer] = bad.to_dict()
    (tmp_path / "lib" / files.MANIFEST).write_text(json.dumps(man))
    with pytest.raises(ValueError, match=rf"'a1'.*{layer}.*overflow"):
        seqr.LoraLibrary.load(tmp_path / "lib")


def test_ordinary_stats_still_pass_the_joint_check():
    assert z_scorable(12.5, 0.3) and z_scorable(0.0, 1e-3) and z_scorable(-5.0, 1e6)


def test_a_trace_knows_each_rows_set_and_groups_decisions_by_set_as_vllms_does(lib):
    """The transformers path's trace records each row's allowed set: `outside()` needs no sets passed, and
    `by_set()` (the format the vLLM engine reports) equals each row's counts; it survives pickling and its plain
    `to_state()` data (how vLLM's workers send theirs to the engine)."""
    import pickle

    model = seqr.attach(tiny_llama(), lib)
    rows = ROWS + [{"a2"}]  # rows 0 and 3 share a set: their decisions are one group
    ids = torch.randint(0, 97, (len(rows), 6), generator=torch.Generator().manual_seed(2))
    with seqr.routing(model, "seqr", allowed=[sorted(r) for r in rows], granularity="token", trace="choices") as tr:
        model(input_ids=ids)
    assert tr.outside() == tr.outside([set(r) for r in rows]) == [0] * len(rows)
    want: dict = {}
    for r, allowed in enumerate(rows):
        for name, c in tr.counts(r).items():
            want[(tuple(sorted(allowed)), name)] = want.get((tuple(sorted(allowed)), name), 0) + c
    assert {(tuple(s), n): c for s, n, c in tr.by_set()} == want and sum(want.values()) == len(tr)
    for back in (pickle.loads(pickle.dumps(tr)), type(tr).from_state(json.loads(json.dumps(tr.to_state())))):
        assert back.by_set() == tr.by_set() and back.counts() == tr.counts() and back.outside() == tr.outside()
        assert all(torch.equal(back.layer(ly)[k], v) for ly in tr.layers for k, v in tr.layer(ly).items())
