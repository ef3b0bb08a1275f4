"""Batched generation with per-row allowed sets, against transformers' own generate on each row alone."""
from __future__ import annotations

import pytest
import torch

import seqr
from seqr.hf.generation import Request, generate
from peft_factory import make_adapter, tiny_llama
from seqr import LoraLibrary, NormStats

NAMES = ["alpha", "beta", "gamma"]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    for i, name in enumerate(NAMES):
        make_adapter(root / name, seed=i, a_seed=0, b_scale=1.0)
    lib = LoraLibrary.from_peft({n: root / n for n in NAMES})
    g = torch.Generator().manual_seed(0)
    for name in lib.names:
        lib.set_stats(name, {layer: NormStats().update(torch.rand(40, generator=g) * 2 + 1) for layer in lib.layers})
    return lib


def prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 97, (n,), generator=g).tolist() for n in (6, 3, 9)]


@torch.no_grad()
def reference(model, prompt, allowed, n):
    """transformers' generate on one row alone, routed among `allowed` only (greedy, no eos)."""
    with seqr.routing(model, "seqr", allowed=allowed):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
    return out[0, len(prompt):].tolist()


def test_batched_rows_with_different_users_equal_each_row_alone(lib):
    model = seqr.attach(tiny_llama(), lib)
    allowed = [{"alpha"}, {"beta", "gamma"}, set(NAMES)]
    lens = [5, 3, 4]
    streamed = {0: [], 1: [], 2: []}
    reqs = [Request(p, a, max_tokens=n, on_token=streamed[i].append)
            for i, (p, a, n) in enumerate(zip(prompts(), allowed, lens))]
    got = generate(model, reqs, eos_id=None, pad_id=0)
    for i, (p, a, n) in enumerate(zip(prompts(), allowed, lens)):
        assert got[i].tokens == reference(model, p, a, n)
        assert streamed[i] == got[i].tokens and got[i].finish_reason == "length"
        assert set(got[i].routing) <= a and got[i].routing and abs(sum(got[i].routing.values()) - 1) < 1e-9
    assert got[0].routing == {"alpha": 1.0}


def test_eos_stops_a_row_and_sampling_is_seeded(lib):
    model = seqr.attach(tiny_llama(), lib)
    p = prompts()[0]
    first = generate(model, [Request(p, {"alpha"}, max_tokens=4)], eos_id=None, pad_id=0)[0].tokens
    stop = generate(model, [Request(p, {"alpha"}, max_tokens=4)], eos_id=first[1], pad_id=0)[0]
    fixed = generate(model, [Request(p, {"alpha"}, max_tokens=4, ignore_eos=True)], eos_id=first[1], pad_id=0)[0]
    assert fixed.tokens == first and fixed.finish_reason == "length"  # ignore_eos: eos is just another token
    assert stop.tokens == first[:1] and stop.finish_reason == "stop"
    s1, s2 = (generate(model, [Request(p, {"beta"}, max_tokens=6, temperature=1.0, seed=7)], eos_id=None,
                       pad_id=0)[0].tokens for _ in range(2))
    assert s1 == s2


@pytest.mark.parametrize("kw, match", [({"prompt": []}, "prompt"), ({"allowed": set()}, "allowed"),
                                       ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature")])
def test_bad_requests_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        Request(**{"prompt": [1, 2], "allowed": {"alpha"}, **kw})


@torch.no_grad()
def test_light_trace_counts_equal_the_full_trace(lib):
    model = seqr.attach(tiny_llama(), lib)
    ids = torch.randint(3, 97, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    allowed = [{"alpha"}, {"beta", "gamma"}, set(NAMES)]
    with seqr.routing(model, "seqr", allowed=allowed, trace=True) as full:
        model(input_ids=ids, attention_mask=mask)
    with seqr.routing(model, "seqr", allowed=allowed, trace="choices") as light:
        model(input_ids=ids, attention_mask=mask)
    assert len(light) == len(full) == (7 + 4 + 7) * len(lib.layers)
    for row in range(3):
        assert light.counts(row) == full.counts(row)
    assert light.outside(allowed) == full.outside(allowed) == [0, 0, 0]
    with pytest.raises(ValueError, match="trace=True"):
        light.summary()
    with pytest.raises(ValueError, match="trace must be"):
        with seqr.routing(model, trace="all"):
            pass
