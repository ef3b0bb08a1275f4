"""The dtype choice and its plumbing: auto picks bf16 only on native hardware; a bf16 base model keeps fp32 adapters,
routing math and stats, and routes like the fp32 model wherever the fp32 margins are clear."""
from __future__ import annotations

import copy

import pytest
import torch

import seqr
from seqr.hf import dtypes
from seqr.silo.calibrate import norm_stats
from seqr.silo.tasks import Example
from peft_factory import make_adapter
from tiny_chat import tiny_chat_llama

NAMES = ("a0", "a1", "a2")
# z-score margin (fp32) above which a bf16 model must pick the same adapter: on this tiny random model bf16's
# rounding, compounded over its layers, flipped decisions with fp32 margins up to 0.86 (7 inputs tried)
CLEAR = 1.0
STATS_RTOL = 0.03  # calibrated mu / sigma of a bf16 base vs fp32: bf16 activations carry ~3 significant digits


@pytest.mark.parametrize("native,want", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_picks_bf16_only_where_it_is_native(monkeypatch, native, want):
    monkeypatch.setattr(dtypes, "native_bf16", lambda: (native, "faked"))
    dtype, why = dtypes.choose("auto")
    assert dtype == want and why == "auto: faked"
    assert dtypes.choose("float32")[0] == torch.float32 and dtypes.choose("bfloat16")[0] == torch.bfloat16
    assert dtypes.choose(None)[0] == torch.float32


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    dtypes.native_bf16.cache_clear()
    try:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(dtypes, "_cpu_flags", lambda: {"avx2", "avx512_bf16"})
        assert dtypes.native_bf16()[0] is True
        dtypes.native_bf16.cache_clear()
        monkeypatch.setattr(dtypes, "_cpu_flags", lambda: {"avx2", "fma"})
        ok, why = dtypes.native_bf16()
        assert ok is False and "avx512_bf16" in why
    finally:
        dtypes.native_bf16.cache_clear()


@pytest.mark.parametrize("bad", ["fp16", "float", "", 3])
def test_bad_dtype_is_named(bad):
    with pytest.raises(ValueError, match=repr(bad)):
        dtypes.choose(bad)


def test_load_model_auto_follows_the_choice(monkeypatch, tmp_path):
    from test_models import save_tiny_model

    save_tiny_model(tmp_path / "m")
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(dtypes, "native_bf16", lambda n=native: (n, "faked"))
        model, _ = seqr.load_model(tmp_path / "m", dtype="auto")
        assert model.dtype == want


@pytest.mark.parametrize("verb", ["train", "calibrate", "eval", "demo", "serve"])
def test_every_verb_rejects_a_bad_dtype_before_loading_a_model(verb, capsys):
    from seqr.cli import main

    args = {"train": ["--model", "m", "--task", "sst2", "--out", "o"],
            "calibrate": ["--model", "m", "--adapter", "a", "--task", "sst2"],
            "eval": ["--library", "lib"], "demo": [], "serve": ["lib", "--model", "m", "--auth", "auth.json"]}[verb]
    with pytest.raises(SystemExit) as e:
        main([verb, *args, "--dtype", "float8"])
    assert e.value.code == 2 and "float8" in capsys.readouterr().err


def _examples(n: int = 6) -> list[Example]:
    return [Example(task="t", id=f"t-{i}", text=f"some words number {i} " * (1 + i % 3), text_pair=None,
                    choices=("yes", "no"), label=i % 2) for i in range(n)]


@pytest.fixture(scope="module")
def chat_lib(tok, tmp_path_factory):
    """Three adapters over the tiny chat model, each calibrated (fp32) on a few examples: z-scores of order 1."""
    root = tmp_path_factory.mktemp("dtype-lib")
    for i, n in enumerate(NAMES):
        make_adapter(root / n, seed=i, base=tiny_chat_llama(len(tok)))
    lib = seqr.LoraLibrary.from_peft({n: root / n for n in NAMES})
    for n in NAMES:
        lib.set_stats(n, norm_stats(tiny_chat_llama(len(tok)), tok, root / n, _examples(), progress=False)[0])
    return lib, root


def _ids(tok, B=3, T=12):
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, len(tok) - 3, (B, T), generator=g)  # (B, T), no special tokens


@torch.no_grad()
def test_bf16_model_routes_like_fp32_where_margins_are_clear(tok, chat_lib):
    lib, _ = chat_lib
    ids = _ids(tok)
    traces, logits = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        model = seqr.attach(tiny_chat_llama(len(tok), dtype=dtype), lib)
        bank = next(m for m in model.modules() if isinstance(m, seqr.hf.layers.RoutedLinear)).bank
        assert bank.B.dtype == torch.float32 and bank._R_stacked.dtype == torch.float32  # the routing math stays fp32
        with seqr.routing(model, "seqr", trace=True) as tr:
            logits[dtype] = model(ids).logits
        traces[dtype] = tr.decisions()
        assert logits[dtype].dtype == dtype and traces[dtype]["norm"].dtype == torch.float32
    d32, d16 = traces[torch.float32], traces[torch.bfloat16]
    clear = d32["margin"] > CLEAR  # (D,)
    assert clear.float().mean() > 0.05  # not vacuous: there are clear decisions to compare
    assert torch.equal(d32["chosen"][clear], d16["chosen"][clear])
    agree = (d32["chosen"] == d16["chosen"]).float().mean().item()
    assert agree > 0.9, agree
    l32, l16 = logits[torch.float32], logits[torch.bfloat16].float()
    assert (l16 - l32).abs().mean() < 0.1 * l32.abs().mean()


@torch.no_grad()
def test_calibration_on_a_bf16_base_gives_fp32_stats_close_to_fp32(tok, chat_lib):
    _, root = chat_lib
    exs = _examples()
    stats = {}
    for dtype in (torch.float32, torch.bfloat16):
        stats[dtype], count = norm_stats(tiny_chat_llama(len(tok), dtype=dtype), tok, root / "a0", exs, progress=False)
        assert count > 0
    for layer, s32 in stats[torch.float32].items():
        s16 = stats[torch.bfloat16][layer]
        assert isinstance(s16.mean, float) and s16.count == s32.count
        assert s16.mean == pytest.approx(s32.mean, rel=STATS_RTOL)
        assert s16.std == pytest.approx(s32.std, rel=10 * STATS_RTOL, abs=STATS_RTOL * s32.mean)


@torch.no_grad()
def test_routed_layer_adds_the_fp32_update_with_one_rounding(tok, chat_lib):
    """Under a bf16 base, y = bf16(W x + B_i A x computed in fp32): equal to the fp32 sum rounded once."""
    lib, _ = chat_lib
    model = seqr.attach(tiny_chat_llama(len(tok), dtype=torch.bfloat16), lib, adapter="a1")
    layer = lib.layers[0]
    routed = model.get_submodule(layer)
    x = torch.randn(2, 5, routed.base.in_features).to(torch.bfloat16)  # (B, T, n)
    base = copy.deepcopy(routed.base)
    A, B = lib.adapter_weights("a1")
    want = (base(x).float() + x.float() @ A[layer].T @ B[layer].T).to(torch.bfloat16)  # (B, T, m)
    torch.testing.assert_close(routed(x), want, rtol=0, atol=0)
