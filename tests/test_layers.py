"""Routed inference inside transformers models, against peft itself and brute-force references."""
from __future__ import annotations

import pytest
import torch
from peft import PeftModel

import seqr
from peft_factory import make_adapter, tiny_gpt2, tiny_llama
from seqr import LoraLibrary, NormStats

ATOL = 2e-5  # fp32 logits of a 2-layer, 32-wide model
NAMES = ["alpha", "beta", "gamma"]
VOCAB = 97


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("routed")
    for i, name in enumerate(NAMES):
        make_adapter(root / name, seed=i, a_seed=0, dominant=4.0)
    return {name: root / name for name in NAMES}


def _calibrate(lib: LoraLibrary, seed=0) -> LoraLibrary:
    g = torch.Generator().manual_seed(seed)
    for name in lib.names:
        lib.set_stats(name, {layer: NormStats().update(torch.rand(40, generator=g) * 2 + 1) for layer in lib.layers})
    return lib


@pytest.fixture()
def lib(dirs):
    return _calibrate(LoraLibrary.from_peft(dirs))


def _no_eos(model):
    model.generation_config.eos_token_id = None  # random tiny models emit token 2 (EOS) often: keep generating
    return model


def _ids(B=3, T=7, seed=0):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids, **kw):
    return model(ids, **kw).logits


# ------------------------------------------------------------------------------------------------ exactness
@torch.no_grad()
def test_fixed_adapter_equals_peft_model(dirs, lib):
    ids = _ids()
    model = seqr.attach(tiny_llama(), lib, adapter="alpha")
    for name in NAMES:
        want = _logits(PeftModel.from_pretrained(tiny_llama(), dirs[name]).eval(), ids)
        with seqr.routing(model, adapter=name):
            torch.testing.assert_close(_logits(model, ids), want, atol=ATOL, rtol=1e-4)
    # the oracle of an evaluation: each batch row with its own task's adapter
    rows = ["gamma", "alpha", "beta"]
    with seqr.routing(model, adapter=rows):
        got = _logits(model, ids)
    for r, name in enumerate(rows):
        want = _logits(PeftModel.from_pretrained(tiny_llama(), dirs[name]).eval(), ids[r:r + 1])
        torch.testing.assert_close(got[r:r + 1], want, atol=ATOL, rtol=1e-4)


@torch.no_grad()
def test_base_equals_untouched_and_detach_restores_bit_identical(lib):
    ids = _ids()
    model = tiny_llama()
    originals = {n: m for n, m in model.named_modules() if n in lib.layers}
    want = _logits(model, ids)
    seqr.attach(model, lib)
    with seqr.routing(model, "base"):
        assert torch.equal(_logits(model, ids), want)
    assert not torch.allclose(_logits(model, ids), want, atol=1e-3)  # routing really changes the output
    seqr.detach(model)
    assert torch.equal(_logits(model, ids), want)
    assert all(dict(model.named_modules())[n] is m for n, m in originals.items())
    assert not hasattr(model, "_seqr_state") and not model._forward_pre_hooks


@pytest.mark.parametrize("fused_step", [False, True])
@torch.no_grad()
def test_seqr_and_naive_make_identical_choices_and_logits(lib, fused_step, monkeypatch):
    """Identical decisions; identical logits up to float32 summation order. Eager, both paths apply B_i z the same
    way (atol 1e-6). The fused step (built -march=native; per layer within rtol 1e-5, atol 1e-6 of the eager step,
    tests/test_fused.py) sums in its own order, and 8 routed layers carry that on: on an AVX512 CPU without AMX
    the logits differed by 1.7e-6 (max |logit| 0.38), so the bound is 1e-5, still 100x below what the routed
    adapters do to them (over 1e-3: test_base_equals_untouched_and_detach_restores_bit_identical)."""
    monkeypatch.setenv("SEQR_FUSED", "1" if fused_step else "0")
    ids = _ids(B=4, T=9, seed=1)
    model = seqr.attach(tiny_llama(), lib, granularity="token")
    with seqr.routing(model, "seqr", trace=True) as t_seqr:
        a = _logits(model, ids)
    with seqr.routing(model, "naive", trace=True) as t_naive:
        b = _logits(model, ids)
    assert torch.equal(t_seqr.choices(), t_naive.choices())
    assert len(set(t_seqr.choices().tolist())) > 1  # several adapters are really used
    torch.testing.assert_close(a, b, atol=1e-5 if fused_step else 1e-6, rtol=0)
    assert t_seqr.routing_accuracy("spectr") == 1.0 and t_seqr.routing_accuracy() == 1.0


@torch.no_grad()
def test_routed_logits_equal_manual_per_token_reference(lib):
    """Re-run the model layer by layer by hand: each token gets W x + B_i A x with i = brute-force argmax."""
    ids = _ids(B=2, T=5, seed=2)
    model = seqr.attach(tiny_llama(), lib, granularity="token")
    with seqr.routing(model, "seqr"):
        got = _logits(model, ids)
    ref_model = tiny_llama()
    hooks = []
    for layer in lib.layers:
        bank = lib.bank(layer)

        def hook(mod, inp, out, bank=bank):
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            dense = torch.einsum("imr,rn->imn", bank.B.double(), bank.A.double())  # (N, m, n)
            norms = torch.einsum("imn,tn->tim", dense, x).norm(dim=-1)  # (T, N)
            i = ((norms - bank.mu) / bank.sigma).argmax(-1)
            upd = torch.einsum("tmn,tn->tm", dense[i], x)
            return out + upd.view_as(out).to(out.dtype)

        hooks.append(ref_model.get_submodule(layer).register_forward_hook(hook))
    torch.testing.assert_close(got, _logits(ref_model, ids), atol=ATOL, rtol=1e-4)


@torch.no_grad()
def test_arrow_top1_matches_peft_arrow(dirs, lib):
    from peft import ArrowConfig, create_arrow_model
    ids = _ids(B=3, T=8, seed=3)
    peft_arrow = create_arrow_model(tiny_llama(), [str(dirs[n]) for n in NAMES], ArrowConfig(top_k=1, rng_seed=0)).eval()
    want = _logits(peft_arrow, ids)
    model = seqr.attach(tiny_llama(), lib, method="arrow")
    torch.testing.assert_close(_logits(model, ids), want, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ security
def _adversarial(dirs, tmp_path):
    """A library where 'secret' dominates every token (its B scaled up), and inputs that favour it most."""
    make_adapter(tmp_path / "secret", seed=9, a_seed=0, b_scale=15.0)
    lib = LoraLibrary.from_peft({**dirs, "secret": tmp_path / "secret"})
    model = seqr.attach(tiny_llama(), lib)
    emb = model.get_input_embeddings().weight  # (V, n): pick the tokens that score 'secret' highest at layer 0
    bank = lib.bank("model.layers.0.self_attn.q_proj")
    s = bank.scores(emb.detach(), "seqr")
    margin = s[:, 3] - s[:, :3].max(-1).values
    ids = margin.topk(24).indices.view(3, 8)
    return lib, model, ids


@pytest.mark.parametrize("method,k", [("seqr", None), ("spectr", None), ("arrow", None), ("lag", 2), ("naive", None)])
@torch.no_grad()
def test_no_token_is_routed_outside_its_rows_allowed_set(dirs, tmp_path, method, k):
    lib, model, ids = _adversarial(dirs, tmp_path)
    with seqr.routing(model, method, k=k, trace=True) as free:
        model(ids)
    assert free.counts().get("secret", 0) > 0.5 * len(free)  # the attack works when nothing is forbidden
    with seqr.routing(model, method, k=k, allowed={"alpha", "gamma"}, trace=True) as whole:  # one set, all rows
        model(ids)
    assert whole.outside([{"alpha", "gamma"}] * 3) == [0, 0, 0] and whole.counts()
    rows = [{"alpha", "beta"}, {"gamma"}, {"alpha", "secret"}]
    with seqr.routing(model, method, k=k, allowed=rows, trace=True) as t:
        model(ids)
    assert t.outside(rows) == [0, 0, 0]
    assert set(t.counts(row=1)) == {"gamma"}
    with seqr.routing(model, "mu", allowed=[{"alpha"}] * 3):  # MU averages only what the row may see
        mu_alpha = model(ids).logits
    with seqr.routing(model, adapter="alpha"):
        torch.testing.assert_close(mu_alpha, model(ids).logits, atol=1e-6, rtol=0)


@torch.no_grad()
def test_the_token_mask_is_built_once_per_forward_and_never_carried_over(dirs, tmp_path, monkeypatch):
    """Per-row allowed sets expand to a per-token mask once per forward (not once per routed layer), and the next
    forward, with other rows or another shape, builds its own: no token ever uses a mask made for another."""
    from seqr.hf.layers import RoutingState

    lib, model, ids = _adversarial(dirs, tmp_path)
    built = []
    per_row = RoutingState._per_row
    monkeypatch.setattr(RoutingState, "_per_row",
                        lambda self, t, B, T, what: built.append(what) or per_row(self, t, B, T, what))
    rows = [{"alpha", "beta"}, {"gamma"}, {"alpha", "secret"}]
    with seqr.routing(model, "seqr", allowed=rows, trace=True) as t:
        model(ids)
    assert built == ["allowed"] and t.outside(rows) == [0, 0, 0] and len(t) == ids.numel() * len(lib.layers)
    swapped = [rows[2], rows[0], rows[1]]
    with seqr.routing(model, "seqr", allowed=swapped, trace=True) as t:  # same shape, other sets
        model(ids)
        model(ids[:, :5])  # another shape within the same routing
    assert built == ["allowed"] * 3 and t.outside(swapped) == [0, 0, 0] and set(t.counts(row=1)) <= rows[0]


def test_bad_routing_requests(lib):
    model = seqr.attach(tiny_llama(), lib)
    with pytest.raises(ValueError, match="unknown routing method 'nope'"):
        with seqr.routing(model, "nope"):
            pass
    with pytest.raises(KeyError, match="unknown adapter"):
        with seqr.routing(model, allowed={"alpha", "delta"}):
            pass
    with pytest.raises(PermissionError, match="row 1: 'beta'"):
        with seqr.routing(model, adapter=["alpha", "beta"], allowed=[{"alpha"}, {"alpha", "gamma"}]):
            pass
    with pytest.raises(ValueError, match="lag"):
        with seqr.routing(model, "lag"):
            pass
    with pytest.raises(ValueError, match="2 rows but the batch has 3"), torch.no_grad():
        with seqr.routing(model, allowed=[{"alpha"}, {"beta"}]):
            model(_ids(B=3))
    with pytest.raises(ValueError, match="already attached"):
        seqr.attach(model, lib)
    assert model._seqr_state.cfg.method == "seqr"  # a failed request leaves the state as it was


def test_attach_refuses_a_model_that_does_not_match(lib):
    from transformers import LlamaConfig, LlamaForCausalLM
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"(?s)model.layers.0.self_attn.q_proj: the model's layer is.*\(48, 48\)"):
        seqr.attach(wide, lib)
    with pytest.raises(ValueError, match="no such module"):
        seqr.attach(tiny_llama().model, lib)  # the inner model's names lack the 'model.' prefix
    with pytest.raises(ValueError, match="no seqr library is attached"):
        seqr.detach(tiny_llama())


# ------------------------------------------------------------------------------------------------ generation
@torch.no_grad()
def test_generate_equals_step_by_step_forward_without_cache(lib):
    model = _no_eos(seqr.attach(tiny_llama(), lib))
    ids = _ids(B=2, T=5, seed=4)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    seq = ids
    for _ in range(6):
        nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_padding_changes_nothing_for_real_tokens_and_traces_skip_it(lib, side):
    model = seqr.attach(tiny_llama(), lib)
    a, b = _ids(1, 7, seed=5), _ids(1, 4, seed=6)
    pad = torch.zeros(1, 3, dtype=torch.long)
    b_padded = torch.cat([pad, b], 1) if side == "left" else torch.cat([b, pad], 1)
    mask_b = (torch.arange(7) >= 3) if side == "left" else (torch.arange(7) < 4)
    ids = torch.cat([a, b_padded])
    attn = torch.stack([torch.ones(7, dtype=torch.long), mask_b.long()])
    with seqr.routing(model, trace=True) as t:
        batched = model(ids, attention_mask=attn).logits
    assert len(t) == (7 + 4) * len(lib.layers)  # one decision per real token per layer, none for padding
    torch.testing.assert_close(batched[0], model(a).logits[0], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(batched[1][mask_b], model(b).logits[0], atol=ATOL, rtol=1e-4)


@torch.no_grad()
def test_left_padded_batched_generation_matches_single_rows(lib):
    model = _no_eos(seqr.attach(tiny_llama(), lib))
    a, b = _ids(1, 6, seed=7), _ids(1, 3, seed=8)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    attn = torch.tensor([[1] * 6, [0] * 3 + [1] * 3])
    out = model.generate(ids, attention_mask=attn, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0, 6:], model.generate(a, max_new_tokens=5, do_sample=False, pad_token_id=0)[0, 6:])
    assert torch.equal(out[1, 6:], model.generate(b, max_new_tokens=5, do_sample=False, pad_token_id=0)[0, 3:])


@torch.no_grad()
def test_bf16_model_routes_like_fp32(dirs, lib):
    ids = _ids(B=3, T=8, seed=9)
    m32 = seqr.attach(tiny_llama(), lib)
    m16 = seqr.attach(tiny_llama().to(torch.bfloat16), lib)
    with seqr.routing(m32, trace=True) as t32:
        m32(ids)
    with seqr.routing(m16, trace=True) as t16:
        assert m16(ids).logits.dtype == torch.bfloat16
    assert (t16.choices() == t32.choices()).double().mean() >= 0.9  # bf16 activations: near-ties may flip
    # a fixed adapter under bf16 is as accurate as peft's own bf16 LoRA (independent reference)
    p32 = _logits(PeftModel.from_pretrained(tiny_llama(), dirs["beta"]).eval(), ids)
    p16 = _logits(PeftModel.from_pretrained(tiny_llama().to(torch.bfloat16), dirs["beta"]).eval(), ids)
    with seqr.routing(m16, adapter="beta"):
        ours = _logits(m16, ids)
    assert (ours.float() - p32).abs().max() <= 1.1 * (p16.float() - p32).abs().max()


@torch.no_grad()
def test_gpt2_conv1d_layers(tmp_path):
    for i in range(2):
        make_adapter(tmp_path / f"g{i}", seed=i, targets=["c_attn", "c_proj"], base=tiny_gpt2(), base_name="tiny-gpt2")
    lib = LoraLibrary.from_peft([tmp_path / "g0", tmp_path / "g1"])
    ids = _ids(B=2, T=6, seed=10)
    model = seqr.attach(tiny_gpt2(), lib, adapter="g1")
    want = _logits(PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "g1").eval(), ids)
    torch.testing.assert_close(_logits(model, ids), want, atol=ATOL, rtol=1e-4)
    with seqr.routing(model, "seqr", trace=True) as t:
        model(ids)
    assert len(t) == 12 * len(lib.layers)
