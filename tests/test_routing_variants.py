"""Routing variants of issue 7 against brute-force references: calibrated scores (z / raw / ratio, per-layer or
pooled stats), per-prompt granularity (incl. choice scoring through a reused KV cache), top-k mixtures,
calibration token sets, and `seqr eval`'s variant passes."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import seqr
from seqr.eval import evaluate as ev
from seqr.silo.calibrate import _shared_ends, norm_stats_sets
from seqr.hf.choices import encode, choice_logprobs
from seqr.core.stats import NormStats, as_normalised, pooled
from peft_factory import adapter_library, make_adapter, tiny_llama
from test_evaluate import TASKS, cfg, task_examples
from tiny_chat import tiny_chat_llama
from seqr.hf.compat import cache_arg, returned_cache

ATOL = 2e-5
NAMES = ["alpha", "beta", "gamma"]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    lib = adapter_library(tmp_path_factory.mktemp("variants"), NAMES)
    g = torch.Generator().manual_seed(0)
    for n in lib.names:
        lib.set_stats(n, {layer: NormStats().update(torch.rand(20 + 5 * j, generator=g) * 2 + 1)
                          for j, layer in enumerate(lib.layers)})
    return lib


def _dense_z(bank, x, mu, sigma):
    """Float64 brute force: every adapter's dense update (T, N, m) and its calibrated score (T, N)."""
    dense = torch.einsum("imr,rn->imn", bank.B.double(), bank.A.double())  # (N, m, n)
    upd = torch.einsum("imn,tn->tim", dense, x.reshape(-1, x.shape[-1]).double())  # (T, N, m)
    return upd, (upd.norm(dim=-1) - mu) / sigma  # (T, N, m), (T, N)


def _reference(lib, rule, stats=None):
    """A plain tiny Llama whose adapted layers add rule(updates (B, T, N, m), scores (B, T, N)) -> (B, T, m)."""
    model = tiny_llama()
    for layer in lib.layers:
        bank = lib.bank(layer)
        mu = torch.tensor([s[layer].mean for s in stats], dtype=torch.float64) if stats else bank.mu
        sigma = torch.tensor([s[layer].std for s in stats], dtype=torch.float64) if stats else bank.sigma

        def hook(mod, inp, out, bank=bank, mu=mu, sigma=sigma):
            x = inp[0]
            upd, z = _dense_z(bank, x, mu, sigma)
            B, T = x.shape[0], x.shape[1]
            return out + rule(upd.view(B, T, *upd.shape[1:]), z.view(B, T, -1)).to(out.dtype)

        model.get_submodule(layer).register_forward_hook(hook)
    return model


def _argmax_rule(upd, z):
    i = z.argmax(-1)  # (B, T)
    return upd.gather(2, i[..., None, None].expand(*i.shape, 1, upd.shape[-1]))[:, :, 0]


def _ids(B=3, T=6, seed=0):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- scores
def _pooled_ref(stats: dict) -> tuple[float, float]:
    """Pooled mean / std over layers from each layer's (count, mean, std), by the law of total variance."""
    n = np.array([s.count for s in stats.values()], float)
    m = np.array([s.mean for s in stats.values()])
    v = np.array([s.std ** 2 for s in stats.values()])
    mean = (n * m).sum() / n.sum()
    return mean, float(np.sqrt((n * (v + (m - mean) ** 2)).sum() / n.sum()))


def test_as_score_and_pooled_against_numpy():
    vals = [np.random.default_rng(i).uniform(1, 3, 10 + i) for i in range(3)]
    stats = {f"l{i}": NormStats().update(torch.tensor(v)) for i, v in enumerate(vals)}
    allv = np.concatenate(vals)
    p = pooled(stats)
    assert all(abs(s.mean - allv.mean()) < 1e-12 and abs(s.std - allv.std()) < 1e-12 for s in p.values())
    s = stats["l0"]
    for score, want in (("z", (vals[0][0] - s.mean) / s.std), ("raw", vals[0][0]), ("ratio", vals[0][0] / s.mean)):
        t = as_normalised(s, score)
        assert (vals[0][0] - t.mean) / t.std == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="normalisation must be one of"):
        as_normalised(s, "median")


@pytest.mark.parametrize("score", ["z", "raw", "ratio"])
@pytest.mark.parametrize("pool", [False, True])
@torch.no_grad()
def test_scored_library_routes_by_the_argmax_of_that_score(lib, score, pool):
    ids = _ids()
    view = lib.normalised(score, pooled=pool)
    assert view.path is None and (view is lib) == (score == "z" and not pool)
    stats = []
    for n in lib.names:
        orig = lib.stats(n)
        mean, std = _pooled_ref(orig) if pool else (None, None)
        per = {}
        for layer, s in orig.items():
            mu, sd = (mean, std) if pool else (s.mean, s.std)
            mu, sd = {"z": (mu, sd), "raw": (0.0, 1.0), "ratio": (0.0, mu)}[score]
            per[layer] = NormStats(count=1, mean=mu, m2=sd * sd)
        stats.append(per)
    model = seqr.attach(tiny_llama(), view, granularity="token")
    want = _reference(lib, _argmax_rule, stats)(ids).logits
    torch.testing.assert_close(model(ids).logits, want, atol=ATOL, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- granularity
def _prompt_rule(mask):
    def rule(upd, z):  # mean score over each row's real tokens, one adapter per row for every token
        m = mask[:, :, None].double()  # (B, T, 1)
        i = ((z * m).sum(1) / m.sum(1)).argmax(-1)  # (B,)
        return torch.stack([upd[b, :, int(i[b])] for b in range(upd.shape[0])])  # (B, T, m)
    return rule


@torch.no_grad()
def test_prompt_granularity_one_adapter_per_row_by_mean_score_over_real_tokens(lib):
    ids = _ids(B=3, T=6, seed=3)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, :2] = 0  # a left-padded row: its padding must not vote
    model = seqr.attach(tiny_llama(), lib)
    with seqr.routing(model, "seqr", granularity="prompt", trace=True) as tr:
        got = model(ids, attention_mask=mask).logits
    want = _reference(lib, _prompt_rule(mask))(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=1e-4)
    for layer in lib.layers:  # every real token of a row went to the row's one adapter
        rec = tr.layer(layer)
        for b in range(3):
            assert len(set(rec["chosen"][rec["rows"] == b].tolist())) == 1


@torch.no_grad()
def test_prompt_granularity_keeps_the_prefill_choice_for_generated_tokens(lib):
    ids = _ids(B=2, T=5, seed=4)
    model = seqr.attach(tiny_llama(), lib)
    with seqr.routing(model, "seqr", granularity="prompt"):
        out = model(ids, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        step = model(nxt, **cache_arg(model, returned_cache(out)), use_cache=True).logits[:, -1]
    full = torch.cat([ids, nxt], 1)
    prompt_mask = torch.cat([torch.ones_like(ids), torch.zeros_like(nxt)], 1)

    def rule(upd, z):  # decided on the first 5 tokens only, applied to all 6
        return _prompt_rule(prompt_mask)(upd, z)
    want = _reference(lib, rule)(full).logits[:, -1]
    torch.testing.assert_close(step, want, atol=ATOL, rtol=1e-4)


def chat_library(tok, root, seed: int) -> seqr.LoraLibrary:
    """Three adapters over the tiny chat model, with seeded random stats."""
    for i, n in enumerate(NAMES):
        make_adapter(root / n, seed=i, base=tiny_chat_llama(len(tok)), b_scale=1.0)
    lib = seqr.LoraLibrary.from_peft({n: root / n for n in NAMES})
    g = torch.Generator().manual_seed(seed)
    for n in lib.names:
        lib.set_stats(n, {layer: NormStats().update(torch.rand(9, generator=g) + 1) for layer in lib.layers})
    return lib


CHOICE_EXAMPLES = task_examples("rte", "dev", 3) + task_examples("sst2", "dev", 2)


@torch.no_grad()
def test_prompt_granularity_choice_scores_equal_full_sequence_reference(tok, model, tmp_path):
    """choice_logprobs reuses the prompt's KV cache across choices (rows regrouped); the answer tokens must still
    use their own prompt's choice. Reference: every prompt + answer forwarded whole, decided on the prompt."""
    clib, exs = chat_library(tok, tmp_path, seed=1), CHOICE_EXAMPLES
    seqr.attach(model, clib)
    try:
        with seqr.routing(model, "seqr", granularity="prompt"):
            got = choice_logprobs(model, tok, exs, batch_size=5, progress=False)
    finally:
        seqr.detach(model)
    prompts, answers = encode(exs, tok)
    for e, (p, ans) in enumerate(zip(prompts, answers)):
        for c, a in enumerate(ans):
            seq = torch.tensor([p + a])
            pm = torch.tensor([[1] * len(p) + [0] * len(a)])
            ref = tiny_chat_llama(len(tok))
            for layer in clib.layers:
                bank = clib.bank(layer)

                def hook(mod, inp, out, bank=bank):
                    upd, z = _dense_z(bank, inp[0], bank.mu, bank.sigma)
                    return out + _prompt_rule(pm)(upd.view(1, seq.shape[1], *upd.shape[1:]),
                                                  z.view(1, seq.shape[1], -1)).to(out.dtype)

                ref.get_submodule(layer).register_forward_hook(hook)
            logp = ref(seq).logits[0].double().log_softmax(-1)  # (L, V)
            want = sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(a))
            assert got[e][c] == pytest.approx(want, abs=1e-3)


@pytest.mark.parametrize("k,temperature", [(2, 0.7), (3, 5.0)])
@torch.no_grad()
def test_topk_mixture_weights_updates_by_softmax_of_scores(lib, k, temperature):
    ids = _ids(seed=5)

    def rule(upd, z):
        top, idx = z.topk(k, dim=-1)  # (B, T, k)
        w = (top / temperature).softmax(-1)  # (B, T, k)
        sel = upd.gather(2, idx[..., None].expand(*idx.shape, upd.shape[-1]))  # (B, T, k, m)
        return (w[..., None] * sel).sum(2)

    model = seqr.attach(tiny_llama(), lib)
    with seqr.routing(model, "seqr", mix=k, temperature=temperature):
        got = model(ids).logits
    torch.testing.assert_close(got, _reference(lib, rule)(ids).logits, atol=ATOL, rtol=1e-4)
    with seqr.routing(model, "seqr", mix=1):  # a one-adapter "mixture" is the paper's argmax
        torch.testing.assert_close(model(ids).logits, _reference(lib, _argmax_rule)(ids).logits, atol=ATOL, rtol=1e-4)
    with seqr.routing(model, adapter="beta"):
        only_beta = model(ids).logits
    with seqr.routing(model, "seqr", mix=3, allowed={"beta"}):  # the mixture never reaches outside the set
        torch.testing.assert_close(model(ids).logits, only_beta, atol=ATOL, rtol=1e-4)


def test_bad_variant_requests_name_the_value(lib):
    model = seqr.attach(tiny_llama(), lib)
    for kw, msg in (({"granularity": "sentence"}, "granularity must be one of"), ({"mix": 0}, "mix must be"),
                    ({"mix": 2, "granularity": "prompt"}, "cannot be combined"), ({"temperature": 0}, "temperature"),
                    ({"mix": 2, "method": "lag", "k": 2}, "score routers")):
        method = kw.pop("method", "seqr")
        with pytest.raises(ValueError, match=msg):
            with seqr.routing(model, method, **kw):
                pass
    with pytest.raises(ValueError, match="granularity must be one of"):
        ev.EvalConfig(tasks=["a"], granularity="word")


# ---------------------------------------------------------------------------------------------- calibration
def test_calibration_token_sets_partition_the_tokens(tok, model, tmp_path):
    make_adapter(tmp_path / "sst2", seed=3, base=tiny_chat_llama(len(tok)), b_scale=0.5)
    exs = task_examples("sst2", "train", 7)
    sets = {"all": ("all", None), "prompt": ("prompt", None), "answer": ("answer", None),
            "content": ("content", None), "first4": ("all", 4)}
    stats, counts = norm_stats_sets(model, tok, tmp_path / "sst2", exs, sets, batch_size=3, progress=False)
    assert counts["prompt"] + counts["answer"] == counts["all"]
    from seqr.silo.train import encode as train_encode
    enc = [train_encode(ex, tok) for ex in exs]
    pre, suf = _shared_ends([ids[:sum(y == -100 for y in lab)] for ids, lab in enc])
    assert pre > 0 and suf > 0  # the chat template's system header and assistant turn marker
    assert counts["content"] == counts["all"] - (pre + suf) * len(exs)
    assert counts["first4"] == sum(len(ids) for ids, _ in enc[:4])
    alone, n4 = norm_stats_sets(model, tok, tmp_path / "sst2", exs[:4], {"x": ("all", None)}, progress=False)
    for layer, s in stats["all"].items():
        merged = dataclasses.replace(stats["prompt"][layer]).merge(stats["answer"][layer])
        assert merged.mean == pytest.approx(s.mean, rel=1e-9) and merged.std == pytest.approx(s.std, rel=1e-9)
        assert stats["first4"][layer].mean == pytest.approx(alone["x"][layer].mean, rel=1e-6)
    with pytest.raises(ValueError, match="token sets must be some of"):
        norm_stats_sets(model, tok, tmp_path / "sst2", exs, {"x": ("template", None)}, progress=False)


# ---------------------------------------------------------------------------------------------- seqr eval
def test_eval_variant_passes_match_direct_scoring_and_are_labelled(model, tok, tmp_path):
    from seqr.silo.calibrate import calibrate

    root = tmp_path / "a"
    for i, task in enumerate(TASKS):
        make_adapter(root / task, seed=i + 1, base=tiny_chat_llama(len(tok)), b_scale=0.5 + 0.3 * i)
        calibrate(model, tok, root / task, task_examples(task, "train", 6), progress=False)
    library = seqr.LoraLibrary.from_peft({t: root / t for t in TASKS})
    data = {t: task_examples(t, "dev", 5) for t in TASKS}
    c = cfg(methods=("seqr",), noise=(), max_eval=5, normalise="ratio", granularity="prompt")
    doc = ev.evaluate(model, tok, {"shared-0": library}, data, c, out_dir=tmp_path / "out", progress=False)
    entry = doc["libraries"]["shared-0 [normalise=ratio granularity=prompt]"]
    assert entry["routing"]["granularity"] == "prompt" and entry["variant"] == "normalise=ratio granularity=prompt"
    view = library.normalised("ratio")
    for t in TASKS:
        seqr.attach(model, view, method="base")
        try:
            with seqr.routing(model, "seqr", granularity="prompt"):
                scores = choice_logprobs(model, tok, data[t], batch_size=len(data[t]), progress=False)
        finally:
            seqr.detach(model)
        acc = sum(max(range(len(s)), key=s.__getitem__) == ex.label for s, ex in zip(scores, data[t])) / len(data[t])
        assert entry["methods"]["seqr"]["tasks"][t]["acc"] == pytest.approx(acc)
