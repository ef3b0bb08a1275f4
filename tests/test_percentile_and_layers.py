"""Issue 7's last routing variants against brute-force references: the percentile score (each adapter's empirical
CDF of its own norms, read as a normal quantile), the majority-vote prompt granularity, and the decision shared
across layers (argmax of the scores summed over every routed layer, measured by a first forward)."""
from __future__ import annotations

import copy
import dataclasses
from statistics import NormalDist

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import seqr
from seqr.hf.choices import choice_logprobs
from seqr.core.stats import QUANTILE_LEVELS, NormStats, with_quantiles
from peft_factory import adapter_library, tiny_llama
from test_evaluate import task_examples
from test_routing_variants import ATOL, CHOICE_EXAMPLES, NAMES, _argmax_rule, _dense_z, _ids, _reference, chat_library
from tiny_chat import tiny_chat_llama
from seqr.hf.compat import cache_arg, returned_cache


@pytest.fixture(scope="module")
def qlib(tmp_path_factory):
    """Three adapters whose norm distributions are skewed differently (so percentile and z-score disagree)."""
    lib = adapter_library(tmp_path_factory.mktemp("percentile"), NAMES)
    g = torch.Generator().manual_seed(0)
    for i, n in enumerate(lib.names):
        stats = {}
        for layer in lib.layers:
            v = 0.3 + torch.empty(200, dtype=torch.float64).exponential_(1.0 + i, generator=g) ** (1 + i)  # skewed
            stats[layer] = with_quantiles(NormStats().update(v), v)
        lib.set_stats(n, stats)
    return lib


# ---------------------------------------------------------------------------------------------- stats
def test_quantiles_match_numpy_round_trip_and_are_dropped_by_streaming():
    v = np.random.default_rng(0).gamma(2.0, size=333)
    s = with_quantiles(NormStats().update(torch.tensor(v)), v)
    np.testing.assert_allclose(s.quantiles, np.quantile(v, QUANTILE_LEVELS), rtol=1e-12)
    assert NormStats.from_dict(s.to_dict()) == s
    assert "quantiles" not in NormStats().update(torch.tensor(v)).to_dict()
    assert dataclasses.replace(s).update([1.0]).quantiles is None  # not streamable: a later update drops them
    assert dataclasses.replace(s).merge(s).quantiles is None  # not mergeable
    with pytest.raises(ValueError, match="quantiles must be 32 finite non-decreasing"):
        NormStats(s.count, s.mean, s.m2, quantiles=s.quantiles[::-1])
    with pytest.raises(ValueError, match="quantiles must be 32"):
        NormStats(s.count, s.mean, s.m2, quantiles=(1.0, 2.0))
    with pytest.raises(ValueError, match="need the 333 values"):
        with_quantiles(s, v[:10])


# ---------------------------------------------------------------------------------------------- percentile
def _percentile_ref(norm: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Phi^-1 of the empirical CDF through the quantile points, piecewise linear in the norm, continued linearly
    past the end points; written independently of seqr's searchsorted version."""
    p = np.array([NormalDist().inv_cdf(level) for level in QUANTILE_LEVELS])
    out = np.interp(norm, q, p)
    lo, hi = norm < q[0], norm > q[-1]
    out[lo] = p[0] + (norm[lo] - q[0]) * (p[1] - p[0]) / (q[1] - q[0])
    out[hi] = p[-1] + (norm[hi] - q[-1]) * (p[-1] - p[-2]) / (q[-1] - q[-2])
    return out


@torch.no_grad()
def test_percentile_score_routes_by_each_adapters_empirical_cdf(qlib):
    ids = _ids(B=3, T=8, seed=7)
    model = seqr.attach(tiny_llama(), qlib.normalised("percentile"), granularity="token")
    ref = tiny_llama()
    for layer in qlib.layers:
        bank = qlib.bank(layer)
        qs = [np.array(qlib.stats(n)[layer].quantiles) for n in qlib.names]

        def hook(mod, inp, out, bank=bank, qs=qs):
            x = inp[0]
            upd, _ = _dense_z(bank, x, 0.0, 1.0)  # (T, N, m), raw norms (T, N)
            nrm = upd.norm(dim=-1).numpy()
            s = torch.tensor(np.stack([_percentile_ref(nrm[:, i], qs[i]) for i in range(len(qs))], -1))  # (T, N)
            B, T = x.shape[:2]
            return out + _argmax_rule(upd.view(B, T, *upd.shape[1:]), s.view(B, T, -1)).to(out.dtype)

        ref.get_submodule(layer).register_forward_hook(hook)
    got = model(ids).logits
    torch.testing.assert_close(got, ref(ids).logits, atol=ATOL, rtol=1e-4)
    z_routed = _reference(qlib, _argmax_rule)(ids).logits
    assert not torch.allclose(got, z_routed, atol=1e-3)  # the percentile really ranks differently from z


def test_percentile_refuses_what_it_cannot_score(qlib, tmp_path):
    with pytest.raises(ValueError, match="cannot use pooled stats"):
        qlib.normalised("percentile", pooled=True)
    plain = qlib.with_stats({n: {layer: NormStats(s.count, s.mean, s.m2) for layer, s in qlib.stats(n).items()}
                             for n in ["beta"]})
    with pytest.raises(ValueError, match=r"\['beta'\] have no norm quantiles"):
        plain.normalised("percentile")
    bank = qlib.normalised("percentile").bank(qlib.layers[0])
    with pytest.raises(ValueError, match="lag ranks its candidates by z-score"):
        bank.route(torch.randn(4, bank.shape[2]), "lag", k=2)
    with pytest.raises(ValueError, match="quantiles need mu and sigma"):
        seqr.AdapterBank(bank.A, bank.B, quantiles=torch.zeros(3, 32))


# ---------------------------------------------------------------------------------------------- prompt-vote
def _vote_rule(mask):
    def rule(upd, z):  # each real token's pick votes; the row's adapter is the majority (ties: better mean)
        out = []
        for b in range(upd.shape[0]):
            real = mask[b].bool()
            picks = z[b][real].argmax(-1)  # (t,)
            votes = torch.bincount(picks, minlength=z.shape[-1]).double()  # (N,)
            mean = z[b][real].mean(0)  # (N,)
            best = max(range(z.shape[-1]), key=lambda i: (votes[i], mean[i]))
            out.append(upd[b, :, best])  # (T, m)
        return torch.stack(out)
    return rule


@torch.no_grad()
def test_prompt_vote_picks_the_majority_adapter_per_row(qlib):
    ids = _ids(B=4, T=7, seed=11)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[2, :3] = 0  # left padding never votes
    model = seqr.attach(tiny_llama(), qlib)
    with seqr.routing(model, "seqr", granularity="prompt-vote"):
        got = model(ids, attention_mask=mask).logits
    want = _reference(qlib, _vote_rule(mask))(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- layers
def _two_pass_reference(lib, allowed_idx=None):
    """A plain tiny Llama run twice: pass 1 routes each token per layer by argmax z and sums every layer's z;
    pass 2 routes every layer of a token to the argmax of that sum (within the allowed adapters)."""
    model, st = tiny_llama(), {"sum": None, "choice": None}
    for layer in lib.layers:
        bank = lib.bank(layer)

        def hook(mod, inp, out, bank=bank):
            x = inp[0]
            upd, z = _dense_z(bank, x, bank.mu, bank.sigma)  # (T, N, m), (T, N)
            if allowed_idx is not None:
                z = z.clone()
                z[:, [i for i in range(z.shape[1]) if i not in allowed_idx]] = float("-inf")
            if st["choice"] is None:
                st["sum"] = z if st["sum"] is None else st["sum"] + z
                i = z.argmax(-1)  # (T,)
            else:
                i = st["choice"]
            return out + upd[torch.arange(upd.shape[0]), i].view(*out.shape).to(out.dtype)

        model.get_submodule(layer).register_forward_hook(hook)

    def run(ids, **kw):
        st["sum"] = st["choice"] = None
        model(ids, **kw)
        st["choice"] = st["sum"].argmax(-1)
        return model(ids, **kw).logits, st["choice"]
    return run


@pytest.mark.parametrize("allowed", [None, {"alpha", "gamma"}])
@torch.no_grad()
def test_layers_granularity_shares_the_argmax_of_summed_scores_across_layers(qlib, allowed):
    ids = _ids(B=3, T=6, seed=13)
    model = seqr.attach(tiny_llama(), qlib, granularity="token")
    with seqr.routing(model, "seqr", granularity="layers", allowed=allowed, trace=True) as tr:
        got = model(ids).logits
    idx = None if allowed is None else [qlib.names.index(a) for a in allowed]
    want, choice = _two_pass_reference(qlib, idx)(ids)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)
    for layer in qlib.layers:  # every layer of a token used the same adapter, the reference's
        assert torch.equal(tr.layer(layer)["chosen"], choice)
    per_token = model(ids).logits  # outside the block: the attached per-token routing, which differs
    assert not torch.allclose(per_token, got, atol=1e-3)


@torch.no_grad()
def test_layers_granularity_leaves_the_kv_cache_as_one_forward_would(qlib):
    """With a cache, the probe's keys are cropped off again, and a decode step routes its token by the sum of the
    scores a per-token forward of that token would see (checked through the public API on cache copies)."""
    ids = _ids(B=2, T=5, seed=17)
    model = seqr.attach(tiny_llama(), qlib, granularity="token")
    with seqr.routing(model, "seqr", granularity="layers"):
        out = model(ids, use_cache=True)
        assert returned_cache(out).get_seq_length() == 5
        given = DynamicCache(config=model.config)  # as generate() passes it: empty, filled by the prefill
        torch.testing.assert_close(model(ids, **cache_arg(model, given), use_cache=True).logits, out.logits)
        assert given.get_seq_length() == 5
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        cache = copy.deepcopy(returned_cache(out))
        step = model(nxt, **cache_arg(model, returned_cache(out)), use_cache=True).logits[:, -1]
        assert returned_cache(out).get_seq_length() == 6
    with seqr.routing(model, "seqr", trace=True) as tr:  # the probe, by hand: per-token routing, scores summed
        model(nxt, **cache_arg(model, copy.deepcopy(cache)), use_cache=True)
    total = sum(tr.layer(layer)["norm"] for layer in qlib.layers)  # (B, N)
    want = torch.stack([_fixed_step(model, nxt, cache, qlib.names[int(total[b].argmax())], b) for b in range(2)])
    torch.testing.assert_close(step, want, atol=ATOL, rtol=1e-4)


def _row(cache, b):
    c = copy.deepcopy(cache)
    c.batch_select_indices(torch.tensor([b]))
    return c


def _fixed_step(model, nxt, cache, name, b):
    with seqr.routing(model, adapter=name):
        return model(nxt[b:b + 1], **cache_arg(model, _row(cache, b)), use_cache=True).logits[0, -1]


@pytest.mark.parametrize("granularity", ["layers", "request"])
@torch.no_grad()
def test_probing_granularities_through_score_choices_equal_one_example_at_a_time(tok, model, tmp_path, granularity):
    """choice_logprobs batches examples and regroups the prompt's cache per choice (a request-level choice follows
    its rows); each example alone (batch 1) must give the same log-likelihoods."""
    clib, exs = chat_library(tok, tmp_path, seed=2), CHOICE_EXAMPLES
    seqr.attach(model, clib, granularity="token")
    try:
        with seqr.routing(model, "seqr", granularity=granularity):
            batched = choice_logprobs(model, tok, exs, batch_size=5, progress=False)
            alone = [choice_logprobs(model, tok, [e], batch_size=1, progress=False)[0] for e in exs]
        token = choice_logprobs(model, tok, exs, batch_size=5, progress=False)
    finally:
        seqr.detach(model)
    for b, a in zip(batched, alone):
        np.testing.assert_allclose(b, a, atol=1e-3)
    assert not np.allclose(np.concatenate(batched), np.concatenate(token), atol=1e-4)  # it did route differently


@pytest.mark.parametrize("method", ["seqr", "spectr", "naive", "arrow"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_percentile_bank_scores_every_norm_router_by_the_cdf(qlib, method, dtype):
    layer = qlib.layers[1]
    pbank, zbank = qlib.normalised("percentile").bank(layer), qlib.bank(layer)
    x = torch.randn(50, pbank.shape[2], generator=torch.Generator().manual_seed(3), dtype=dtype)
    got = pbank.scores(x, method)  # (T, N)
    if method == "arrow":  # ARROW has no norm to calibrate: unchanged
        torch.testing.assert_close(got, zbank.scores(x, method))
        return
    upd, _ = _dense_z(pbank, x, 0.0, 1.0)
    nrm = upd.norm(dim=-1).numpy()  # (T, N) float64 brute force
    want = np.stack([_percentile_ref(nrm[:, i], np.array(qlib.stats(n)[layer].quantiles))
                     for i, n in enumerate(qlib.names)], -1)
    np.testing.assert_allclose(got.double().numpy(), want, atol=2e-5 if dtype == torch.float64 else 2e-3)  # the 1e-9 knot nudge
    assert torch.equal(pbank.route(x, method), got.argmax(-1))


@torch.no_grad()
def test_layers_granularity_through_generate_equals_a_cached_greedy_loop(qlib):
    ids = _ids(B=2, T=4, seed=19)
    model = seqr.attach(tiny_llama(), qlib)
    with seqr.routing(model, "seqr", granularity="layers"):
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             pad_token_id=0)
        seq, cache = ids, DynamicCache(config=model.config)
        step = ids
        for _ in range(4):  # the same decoding by hand: one forward per token on a growing cache
            logits = model(step, **cache_arg(model, cache), use_cache=True).logits[:, -1]
            step = logits.argmax(-1, keepdim=True)  # (B, 1)
            seq = torch.cat([seq, step], 1)
        assert cache.get_seq_length() == 4 + 3  # the probes' keys never stay
    assert torch.equal(gen, seq)


@pytest.mark.parametrize("allowed", [None, {"beta", "gamma"}])
@torch.no_grad()
def test_depth_granularity_routes_by_the_running_sum_of_scores_over_layers(qlib, allowed):
    ids = _ids(B=2, T=7, seed=23)
    idx = None if allowed is None else [qlib.names.index(a) for a in allowed]
    ref, st = tiny_llama(), {"sum": None}
    for layer in qlib.layers:
        bank = qlib.bank(layer)

        def hook(mod, inp, out, bank=bank):  # layers fire in forward order: the sum covers this and earlier ones
            upd, z = _dense_z(bank, inp[0], bank.mu, bank.sigma)  # (T, N, m), (T, N)
            st["sum"] = z if st["sum"] is None else st["sum"] + z
            s = st["sum"].clone()
            if idx is not None:
                s[:, [i for i in range(s.shape[1]) if i not in idx]] = float("-inf")
            return out + upd[torch.arange(upd.shape[0]), s.argmax(-1)].view(*out.shape).to(out.dtype)

        ref.get_submodule(layer).register_forward_hook(hook)
    model = seqr.attach(tiny_llama(), qlib)
    with seqr.routing(model, "seqr", granularity="depth", allowed=allowed):
        got = model(ids).logits
        again = model(ids).logits  # the running sum starts afresh with every forward
    torch.testing.assert_close(got, ref(ids).logits, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(again, got)
    assert not torch.allclose(got, model(ids).logits, atol=1e-3)  # differs from per-token routing
