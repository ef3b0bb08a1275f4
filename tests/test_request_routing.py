"""Request-level routing (granularity "request") and the shortened probe (`probe_depth`): one adapter per row for
every layer and every later token, chosen by the prompt's calibrated scores summed over its real tokens and the
routed layers; checked against a float64 two-pass brute force on a plain tiny Llama, against the fixed-adapter
path it must reduce to, and for what it costs (routed-layer calls counted)."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import seqr
from seqr.hf.compat import cache_arg, returned_cache
from seqr.hf.granularity import probed_layers
from peft_factory import random_stats, adapter_library, tiny_llama
from test_routing_variants import ATOL, NAMES, _dense_z, _ids


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return random_stats(adapter_library(tmp_path_factory.mktemp("request"), NAMES), seed=5)


def _probe_reference(lib, mode: str, depth: float = 1.0, allowed_idx=None):
    """A plain tiny Llama run twice. Pass 1 routes each token per layer by its float64 argmax z (within the allowed
    adapters) and sums z over the first `depth` share of the routed layers in call order: per token ("layers") or
    per row over its real tokens ("request"). Pass 2 gives every layer the argmax of that sum."""
    model, st = tiny_llama(), {"sum": None, "choice": None, "calls": 0}
    limit = probed_layers(len(lib.layers), depth)
    for layer in lib.layers:
        bank = lib.bank(layer)

        def hook(mod, inp, out, bank=bank):
            x = inp[0]  # (B, T, n)
            B, T = x.shape[0], x.shape[1]
            upd, z = _dense_z(bank, x, bank.mu, bank.sigma)  # (B*T, N, m), (B*T, N)
            if allowed_idx is not None:
                z = z.clone()
                z[:, [i for i in range(z.shape[1]) if i not in allowed_idx]] = float("-inf")
            if st["choice"] is None:
                st["calls"] += 1
                if st["calls"] <= limit:
                    real = st["mask"].reshape(-1, 1).bool()  # (B*T, 1)
                    add = (z if mode in ("layers", "request-vote")  # (B*T, N) per token
                           else torch.where(real, z, 0.0).view(B, T, -1).sum(1))  # (B, N) per row
                    st["sum"] = add if st["sum"] is None else st["sum"] + add
                i = z.argmax(-1)  # (B*T,)
            else:
                i = st["choice"] if mode == "layers" else st["choice"].repeat_interleave(T)  # (B*T,)
            return out + upd[torch.arange(upd.shape[0]), i].view(*out.shape).to(out.dtype)

        model.get_submodule(layer).register_forward_hook(hook)

    def run(ids, mask=None):
        mask = torch.ones_like(ids) if mask is None else mask
        st.update(sum=None, choice=None, calls=0, mask=mask)
        model(ids, attention_mask=mask)
        st["choice"] = (_vote(st["sum"], mask) if mode == "request-vote"
                        else st["sum"].argmax(-1))  # (B*T,) or (B,)
        return model(ids, attention_mask=mask).logits, st["choice"]
    return run


def _vote(token_sums: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Granularity "request-vote" by counting: each real token votes for the argmax of its summed scores; a row
    takes the adapter with the most votes, ties broken by the row's summed score (B,)."""
    B, T = mask.shape
    sums = token_sums.view(B, T, -1)  # (B, T, N)
    out = []
    for b in range(B):
        real = [t for t in range(T) if mask[b, t]]
        votes = {}
        for t in real:
            i = int(sums[b, t].argmax())
            votes[i] = votes.get(i, 0) + 1
        total = sums[b, real].sum(0)  # (N,)
        out.append(max(votes, key=lambda i: (votes[i], float(total[i]))))
    return torch.tensor(out)


def _count_calls(model) -> dict:
    """Forward hooks on every routed layer's base module: how many layer calls a forward made."""
    n = {"calls": 0}
    for m in model.modules():
        if isinstance(m, seqr.hf.layers.RoutedLinear):
            m.base.register_forward_hook(lambda *_: n.__setitem__("calls", n["calls"] + 1))
    return n


@pytest.mark.parametrize("mode", ["request", "request-vote"])
@pytest.mark.parametrize("depth", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("allowed", [None, [{"alpha", "gamma"}, {"beta"}, {"beta", "gamma"}]])
@torch.no_grad()
def test_request_granularity_equals_the_two_pass_brute_force(lib, mode, depth, allowed):
    ids = _ids(B=3, T=6, seed=31)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, :2] = 0  # a left-padded row: its padding never counts
    model = seqr.attach(tiny_llama(), lib)
    calls = _count_calls(model)
    with seqr.routing(model, "seqr", granularity=mode, probe_depth=depth, allowed=allowed, trace=True) as tr:
        got = model(ids, attention_mask=mask).logits
    n_layers = len(lib.layers)
    assert calls["calls"] == n_layers + probed_layers(n_layers, depth)  # the probe stopped after its layers
    if allowed is None:
        want, choice = _probe_reference(lib, mode, depth)(ids, mask)
    else:  # each row alone under its own set: the reference takes one allowed set at a time
        rows = [_probe_reference(lib, mode, depth, [lib.names.index(a) for a in allowed[b]])(ids[b:b + 1],
                                                                                                  mask[b:b + 1])
                for b in range(3)]
        want, choice = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=1e-4)
    for layer in lib.layers:  # every real token of a row, in every layer, used the row's one adapter
        chosen = tr.layer(layer)["chosen"]
        assert torch.equal(chosen, choice.repeat_interleave(real.sum(1)))
    if allowed is not None:
        assert all(lib.names[int(c)] in allowed[b] for b, c in enumerate(choice))


@torch.no_grad()
def test_request_granularity_is_the_fixed_adapter_path_after_the_probe(lib):
    """Prefill and decode equal `routing(adapter=<each row's choice>)`; decode steps run no probe."""
    ids = _ids(B=2, T=5, seed=37)
    model = seqr.attach(tiny_llama(), lib)
    calls = _count_calls(model)
    with seqr.routing(model, "seqr", granularity="request", trace=True) as tr:
        out = model(ids, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        calls["calls"] = 0
        step = model(nxt, **cache_arg(model, returned_cache(out)), use_cache=True).logits[:, -1]
        assert calls["calls"] == len(lib.layers)  # a decode step costs what the fixed-adapter path costs
        assert returned_cache(out).get_seq_length() == 6  # the probe's keys never stay
    chosen = [lib.names[int(i)] for i in tr.layer(lib.layers[0])["chosen"].view(2, -1)[:, 0]]
    with seqr.routing(model, adapter=chosen):
        fixed = model(ids, use_cache=True)
        fstep = model(nxt, **cache_arg(model, returned_cache(fixed)), use_cache=True).logits[:, -1]
    torch.testing.assert_close(out.logits, fixed.logits, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(step, fstep, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_request_granularity_through_generate_equals_a_cached_greedy_loop(lib):
    ids = _ids(B=2, T=4, seed=41)
    model = seqr.attach(tiny_llama(), lib)
    with seqr.routing(model, "seqr", granularity="request", probe_depth=0.5):
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             pad_token_id=0)
        seq, cache, step = ids, DynamicCache(config=model.config), ids
        for _ in range(4):
            logits = model(step, **cache_arg(model, cache), use_cache=True).logits[:, -1]
            step = logits.argmax(-1, keepdim=True)  # (B, 1)
            seq = torch.cat([seq, step], 1)
        assert cache.get_seq_length() == 4 + 3
    assert torch.equal(gen, seq)


@pytest.mark.parametrize("allowed", [None, [{"alpha", "gamma"}, {"beta", "gamma"}]])
@torch.no_grad()
def test_request_reuse_prefills_per_token_once_then_decodes_with_the_brute_force_choice(lib, allowed):
    """granularity "request-reuse": one prefill forward (no probe) whose logits and KV cache are the per-token
    path's, a row choice equal to the float64 brute force's, and decode steps on the fixed-adapter path with it."""
    ids = _ids(B=2, T=6, seed=59)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding: never summed
    model = seqr.attach(tiny_llama(), lib)
    calls = _count_calls(model)
    with seqr.routing(model, "seqr", granularity="request-reuse", allowed=allowed, trace=True) as tr:
        out = model(ids, attention_mask=mask, use_cache=True)
        assert calls["calls"] == len(lib.layers)  # the prefill is its own probe: one forward
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        calls["calls"] = 0
        step = model(nxt, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
                     **cache_arg(model, returned_cache(out)), use_cache=True).logits[:, -1]
        assert calls["calls"] == len(lib.layers)
    if allowed is None:
        _, want = _probe_reference(lib, "request")(ids, mask)
    else:
        want = torch.cat([_probe_reference(lib, "request", 1.0, [lib.names.index(a) for a in allowed[b]])(
            ids[b:b + 1], mask[b:b + 1])[1] for b in range(2)])
    chosen = [lib.names[int(i)] for i in want]  # (B,) the brute force's row choices
    assert [set(tr.counts(row=b)) for b in range(2)][0]  # the prompt's tokens were routed and traced
    with seqr.routing(model, "seqr", granularity="token", allowed=allowed):
        token = model(ids, attention_mask=mask, use_cache=True)
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], token.logits[real], atol=1e-6, rtol=1e-5)
    with seqr.routing(model, adapter=chosen):  # on the per-token prompt cache, the brute force's adapters
        fstep = model(nxt, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
                      **cache_arg(model, returned_cache(token)), use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, fstep, atol=ATOL, rtol=1e-4)
    if allowed is not None:
        assert all(c in a for c, a in zip(chosen, allowed))


@torch.no_grad()
def test_request_reuse_through_generate_equals_a_cached_greedy_loop(lib):
    ids = _ids(B=2, T=4, seed=61)
    model = seqr.attach(tiny_llama(), lib, granularity="request-reuse")
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    with seqr.routing(model, "seqr", granularity="token"):
        cache = DynamicCache(config=model.config)
        step = model(ids, **cache_arg(model, cache), use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    _, want = _probe_reference(lib, "request")(ids)
    seq = torch.cat([ids, step], 1)
    with seqr.routing(model, adapter=[lib.names[int(i)] for i in want]):
        for _ in range(3):
            step = model(step, **cache_arg(model, cache), use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, step], 1)
    assert torch.equal(gen, seq)


@pytest.mark.parametrize("depth", [0.5, 0.25])
@torch.no_grad()
def test_layers_granularity_with_a_shortened_probe_equals_its_brute_force(lib, depth):
    ids = _ids(B=2, T=6, seed=43)
    model = seqr.attach(tiny_llama(), lib)
    calls = _count_calls(model)
    with seqr.routing(model, "seqr", granularity="layers", probe_depth=depth):
        got = model(ids).logits
    assert calls["calls"] == len(lib.layers) + probed_layers(len(lib.layers), depth)
    want, _ = _probe_reference(lib, "layers", depth)(ids)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("kw,match", [({"granularity": "request", "probe_depth": 0}, "probe_depth must be"),
                                      ({"granularity": "request", "probe_depth": 1.5}, "probe_depth must be"),
                                      ({"granularity": "layers", "probe_depth": True}, "probe_depth must be"),
                                      ({"granularity": "prompt", "probe_depth": 0.5}, "probe_depth applies to"),
                                      ({"granularity": "request", "mix": 2}, "cannot be combined")])
def test_bad_request_settings_are_refused_naming_the_value(lib, kw, match):
    model = seqr.attach(tiny_llama(), lib)
    with pytest.raises(ValueError, match=match):
        with seqr.routing(model, "seqr", **kw):
            pass


def test_probed_layers_rounds_up_and_keeps_at_least_one():
    assert [probed_layers(8, d) for d in (1.0, 0.5, 0.3, 0.01)] == [8, 4, 3, 1]
    assert probed_layers(120, 0.25) == 30


# ---------------------------------------------------------------------------------------------- every path
@torch.no_grad()
def test_attached_granularity_is_the_models_default_and_routing_blocks_inherit_or_override(lib):
    ids = _ids(B=2, T=5, seed=47)
    model = seqr.attach(tiny_llama(), lib, granularity="request", probe_depth=0.5)
    plain = model(ids).logits
    with seqr.routing(model, "seqr", granularity="request", probe_depth=0.5):
        explicit = model(ids).logits
    with seqr.routing(model):  # inherits the attached mode
        inherited = model(ids).logits
    with seqr.routing(model, "seqr", granularity="token"):
        token = model(ids).logits
    with seqr.routing(model, "seqr", mix=2):  # a mixture is per token: the attached mode does not apply
        mixed = model(ids).logits
    with seqr.routing(model, adapter="beta"):  # fixed adapters: no granularity
        fixed = model(ids).logits
    torch.testing.assert_close(plain, explicit)
    torch.testing.assert_close(inherited, explicit)
    assert not torch.allclose(token, explicit, atol=1e-4) and not torch.allclose(mixed, explicit, atol=1e-4)
    assert not torch.allclose(fixed, token, atol=1e-4)
    seqr.detach(model)
    with pytest.raises(ValueError, match="probe_depth applies to"):
        seqr.attach(model, lib, granularity="prompt", probe_depth=0.5)


@torch.no_grad()
def test_the_default_is_request_level_seqr_and_the_papers_per_token_routing_one_flag_away(lib):
    """attach() without a granularity routes SEQR once per request by the prompt tokens' votes (it beat the
    summed request-level choice and per-token SEQR on the paper-budget library); every other router keeps the
    paper's per-token routing, and granularity="token" brings it back."""
    from seqr.serve.engine import Engine

    ids = _ids(B=2, T=5, seed=53)
    default, request, token = (seqr.attach(tiny_llama(), lib, **kw) for kw in
                               ({}, {"granularity": "request-vote"}, {"granularity": "token"}))
    torch.testing.assert_close(default(ids).logits, request(ids).logits)
    assert not torch.allclose(default(ids).logits, token(ids).logits, atol=1e-4)
    for method in ("arrow", "spectr"):  # another router named in a block: per token, as the paper routes it
        with seqr.routing(default, method):
            got = default(ids).logits
        with seqr.routing(token, method):
            torch.testing.assert_close(got, token(ids).logits)
    with seqr.routing(default, "seqr", granularity="token"):
        torch.testing.assert_close(default(ids).logits, token(ids).logits)
    with seqr.routing(token, "seqr"):  # a granularity given to attach is inherited
        inherited = token(ids).logits
    torch.testing.assert_close(inherited, token(ids).logits)
    arrow = seqr.attach(tiny_llama(), lib, method="arrow")
    with seqr.routing(token, "arrow"):
        torch.testing.assert_close(arrow(ids).logits, token(ids).logits)

    class Tok:  # the engine reads only these two ids
        pad_token_id, eos_token_id = 0, None

    for method, want in ((None, "request-vote"), ("arrow", "token")):
        engine = Engine(tiny_llama(), Tok(), lib, method=method)
        engine.close()
        assert engine.mode["granularity"] == want, method


def _request_rows(lib, allowed, prompts):
    """Each row alone through routing(granularity='request'): (its adapter, its greedy continuation)."""
    from seqr.hf.generation import Request, generate

    model = seqr.attach(tiny_llama(), lib)
    out = []
    for p, a in zip(prompts, allowed):
        with seqr.routing(model, "seqr", granularity="request", allowed=a, trace="choices") as tr:
            model(torch.tensor([p]))
        (name,) = tr.counts()
        with seqr.routing(model, adapter=name):
            toks = generate(model, [Request(p, {name}, max_tokens=4)], eos_id=None, pad_id=0)[0].tokens
        out.append((name, toks))
    return out


def test_generate_and_the_embedded_engine_serve_one_adapter_per_request(lib):
    """Batched rows of different users (left padding) each get the adapter their prompt alone chooses, within their
    set, and then the tokens of the fixed-adapter path with it; generate() and the serving Engine alike."""
    from seqr.hf.generation import Request, generate
    from seqr.serve.engine import Engine

    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (6, 3, 9)]
    allowed = [{"alpha", "gamma"}, {"beta"}, set(NAMES)]
    want = _request_rows(lib, allowed, prompts)
    model = seqr.attach(tiny_llama(), lib, granularity="request")
    got = generate(model, [Request(p, a, max_tokens=4) for p, a in zip(prompts, allowed)], eos_id=None, pad_id=0)
    for (name, toks), r, a in zip(want, got, allowed):
        assert r.routing == {name: 1.0} and name in a and r.tokens == toks and r.outside == 0

    class Tok:  # the engine reads only these two ids
        pad_token_id, eos_token_id = 0, None

    engine = Engine(tiny_llama(), Tok(), lib, granularity="request")
    try:
        futures = [engine.submit(Request(p, a, max_tokens=4, seed=1)) for p, a in zip(prompts, allowed)]
        served = [f.result(timeout=120) for f in futures]
    finally:
        engine.close()
    for (name, toks), r in zip(want, served):
        assert r.routing == {name: 1.0} and r.tokens == toks


@torch.no_grad()
@pytest.mark.parametrize("granularity", ["request", "request-vote"])
def test_request_choices_runs_only_the_probe_and_picks_what_generation_uses(lib, granularity):
    from seqr.hf.layers import request_choices

    ids = _ids(B=3, T=6, seed=53)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, :2] = 0
    allowed = [{"alpha", "gamma"}, {"beta"}, set(NAMES)]
    model = seqr.attach(tiny_llama(), lib)
    before = model(ids, attention_mask=mask).logits
    calls = _count_calls(model)
    for depth in (1.0, 0.5):
        calls["calls"] = 0
        names = request_choices(model, ids, mask, allowed=allowed, probe_depth=depth, granularity=granularity)
        assert calls["calls"] == probed_layers(len(lib.layers), depth)  # the probe only, no real forward
        with seqr.routing(model, "seqr", granularity=granularity, probe_depth=depth, allowed=allowed,
                          trace="choices") as tr:
            model(ids, attention_mask=mask)
        assert names == [next(iter(tr.counts(row=b))) for b in range(3)]
        assert all(n in a for n, a in zip(names, allowed))
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, before)  # the attached routing unchanged
    with pytest.raises(ValueError, match="granularity must be one of .*got 'layers'"):
        request_choices(model, ids, mask, granularity="layers")


def test_request_vote_counts_tokens_where_request_sums_score_mass():
    """Row 0: three tokens lean to adapter 1 a little, one token to adapter 0 by far: "request" would take 0, the
    vote takes 1. Row 1: adapters 0 and 2 get two real votes each (the padded position's vote for 1 does not
    count): the better summed score, 2's, breaks the tie. Row 2 may use only adapter 2."""
    from types import SimpleNamespace

    from seqr.hf import granularity as gr

    sums = torch.tensor([[[0., 1, 0], [0, 1, 0], [0, 1, 0], [50, 0, 0], [0, 0, 0]],
                         [[9., 99, 0], [3, 0, 0], [0, 0, 2], [3, 0, 0], [0, 0, 5]],
                         [[0., 9, 1], [0, 9, 1], [9, 0, 1], [0, 9, 1], [0, 9, 1]]])  # (B=3, T=5, N=3)
    real = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]).bool()  # (B, T)
    allowed = torch.tensor([[True, True, True], [True, True, True], [False, False, True]])  # (B, N)
    st = SimpleNamespace(probe_rows=(3, 5), layer_sum=sums.reshape(15, 3).clone(), sticky={},
                         cfg=SimpleNamespace(allowed=allowed), real_tokens=lambda B, T: real.reshape(-1),
                         token_mask=lambda B, T: allowed.repeat_interleave(T, dim=0))
    gr._vote_rows(st)
    assert st.sticky[gr.REQUEST].tolist() == [1, 2, 2]
    assert _vote(sums.reshape(15, 3), real).tolist()[:2] == [1, 2]  # the counting reference agrees
    row_sums = torch.where(real.unsqueeze(-1), sums, 0.0).sum(1)  # (B, N) what "request" compares
    assert row_sums[0].argmax() == 0  # the sum would have taken the one loud token's adapter
