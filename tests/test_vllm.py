"""seqr inside vLLM (CPU build), against seqr's transformers path on a tiny random Llama (and a Qwen2).

Needs vLLM (its own venv, see README "Serving on vLLM"): skipped where `import vllm` fails, marked `vllm`.
Run: `.venv-vllm/bin/python -m pytest -m vllm tests/test_vllm.py` (about 5 minutes on 2 cores).
"""
from __future__ import annotations

import os
import time

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (README: Serving on vLLM)")
pytestmark = pytest.mark.vllm
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache per engine: plenty for these tests

from vllm import SamplingParams  # noqa: E402

from seqr import LoraLibrary  # noqa: E402
from seqr.hf.generation import Request  # noqa: E402
from seqr.hf.granularity import DEFAULT  # noqa: E402
from seqr.hf.layers import attach, routing  # noqa: E402
from seqr.hf.layers import detach as seqr_detach  # noqa: E402
from seqr.serve.vllm_engine import VllmEngine  # noqa: E402
from seqr.vllm.sets import SET_KEY  # noqa: E402
from vllm_tiny import model_and_library  # noqa: E402

NAMES = ["alpha", "beta", "evil", "gamma"]
SETS = [{"alpha"}, {"beta", "gamma"}, {"alpha", "beta", "gamma"}, {"alpha", "evil"}]  # two users disjoint: 0, 1
PROMPTS = [[5, 17, 33, 2, 90, 41], [7, 7, 120, 64], [200, 3, 3, 19, 77, 150, 11, 8], [12, 250, 99]]
FP32_LOGPROB_TOL = 2e-3  # |vLLM - transformers| per generated token, float32
BF16_LOGPROB_TOL = 0.15  # bfloat16 base model (routing math in fp32 in both paths)
BF16_MIN_TOKEN_AGREEMENT = 0.75  # greedy tokens equal to the fp32 transformers path (bf16 drifts after a flip)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    model_dir, lib_dir = model_and_library(root, NAMES, boost={"evil": 8.0})  # evil wins wherever it is allowed
    return root, model_dir, lib_dir


def _engine(files, dtype, compile=True):
    root, model_dir, lib_dir = files
    return VllmEngine(model_dir, LoraLibrary.load(lib_dir), method="seqr", dtype=dtype, max_batch=8,
                      max_model_len=256, work_dir=root / f"work-{dtype}-{compile}", set_capacity=16,
                      granularity="token", compile=compile)


@pytest.fixture(scope="module")
def engine(files):
    eng = _engine(files, "float32")
    yield eng
    eng.close()


def _generate(engine, prompts, sets, n=8):
    """One batch through vLLM (greedy, eos ignored): per row (tokens, logprobs), and the trace of its decisions."""
    def run(e):
        e.trace(on=True)
        params = [SamplingParams(max_tokens=n, temperature=0, logprobs=0, ignore_eos=True,
                                 extra_args={SET_KEY: e.columns.of(s)}) for s in sets]  # each request carries its set
        outs = e.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        rows = []
        for o in outs:
            c = o.outputs[0]
            rows.append((list(c.token_ids), [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]))
        return rows, e.trace(on=False)
    return engine.call(run).result(timeout=300)


@pytest.fixture(scope="module")
def reference(files):
    """seqr's transformers path on the same files (float32)."""
    from transformers import AutoModelForCausalLM

    _, model_dir, lib_dir = files
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    return attach(model, LoraLibrary.load(lib_dir), method="seqr", granularity="token")


@torch.no_grad()
def _reference_row(model, prompt, allowed, tokens):
    """Per generated token its log-probability and greedy choice, and the routing counts, of prompt + tokens."""
    ids = torch.tensor([prompt + tokens[:-1]])  # (1, L): every token vLLM fed through the model
    with routing(model, "seqr", allowed=[allowed], trace="choices") as tr:
        logits = model(input_ids=ids).logits[0].float()  # (L, V)
    logp = logits.log_softmax(-1)[len(prompt) - 1:]  # (n, V): the positions that predict the generated tokens
    chosen = [float(logp[i, t]) for i, t in enumerate(tokens)]
    return chosen, logp.argmax(-1).tolist(), tr.counts(0)


def _by_set(trace, allowed) -> dict[str, int]:
    return {n: c for s, n, c in trace.by_set() if set(s) == set(allowed)}


@pytest.mark.parametrize("compiled", [True, False])
def test_tokens_logprobs_and_decisions_equal_transformers_path(engine, files, reference, compiled):
    """Compiled (vLLM's default: the model traced once, each routed layer's update one op in the graph) and eager."""
    if not compiled:
        engine = _engine(files, "float32", compile=False)
    try:
        rows, trace = _generate(engine, PROMPTS, SETS)
    finally:
        if not compiled:
            engine.close()
    assert bool(engine.llm.llm_engine.vllm_config.compilation_config.mode) == compiled
    assert sum(trace.outside()) == 0
    assert trace.notes["masks"]["batch"] >= 8 and "none" not in trace.notes["masks"]  # every forward's masks from the batch
    assert not engine.llm.llm_engine.vllm_config.lora_config  # vLLM's LoRA path is off: sets travel with requests
    for prompt, allowed, (tokens, logprobs) in zip(PROMPTS, SETS, rows):
        ref_lp, ref_greedy, ref_counts = _reference_row(reference, prompt, allowed, tokens)
        assert tokens == ref_greedy, (allowed, tokens, ref_greedy)
        assert max(abs(a - b) for a, b in zip(logprobs, ref_lp)) < FP32_LOGPROB_TOL, (logprobs, ref_lp)
        assert _by_set(trace, allowed) == ref_counts, (allowed, _by_set(trace, allowed), ref_counts)


def test_a_second_family_qwen2_routes_like_its_transformers_path(tmp_path):
    """The routed class comes from one factory for every family: a tiny Qwen2 (biased q/k/v) in vLLM gives the
    greedy tokens, log-probabilities and per-set decisions of seqr's transformers path, as the Llama does."""
    from transformers import AutoModelForCausalLM

    model_dir, lib_dir = model_and_library(tmp_path, NAMES, boost={"evil": 8.0}, family="qwen2")
    ref = attach(AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval(),
                 LoraLibrary.load(lib_dir), method="seqr", granularity="token")
    eng = _engine((tmp_path, model_dir, lib_dir), "float32")
    try:
        assert type(eng.llm.llm_engine.model_config.hf_config).__name__ == "Qwen2Config"
        rows, trace = _generate(eng, PROMPTS, SETS)
    finally:
        eng.close()
    assert sum(trace.outside()) == 0 and trace.notes["masks"]["batch"] >= 8
    for prompt, allowed, (tokens, logprobs) in zip(PROMPTS, SETS, rows):
        ref_lp, ref_greedy, ref_counts = _reference_row(ref, prompt, allowed, tokens)
        assert tokens == ref_greedy, (allowed, tokens, ref_greedy)
        assert max(abs(a - b) for a, b in zip(logprobs, ref_lp)) < FP32_LOGPROB_TOL, (logprobs, ref_lp)
        assert _by_set(trace, allowed) == ref_counts, (allowed, _by_set(trace, allowed), ref_counts)


def test_adversarial_adapter_gets_no_token_outside_each_set(engine):
    rows, trace = _generate(engine, PROMPTS, SETS)
    assert sum(trace.outside()) == 0
    for s, n, c in trace.by_set():
        assert n in s, (s, n, c)
    evil = {tuple(s): c for s, n, c in trace.by_set() if n == "evil"}
    assert set(evil) == {("alpha", "evil")}  # only the set that allows it ...
    own = sum(c for s, n, c in trace.by_set() if set(s) == {"alpha", "evil"})
    assert evil[("alpha", "evil")] > 0.9 * own  # ... and there it wins: the test would see a leak


def test_routing_is_the_same_alone_and_batched(engine):
    """A row's tokens do not depend on its batch-mates (other users' sets)."""
    batched, _ = _generate(engine, PROMPTS, SETS)
    for i in (0, 3):
        alone, _ = _generate(engine, [PROMPTS[i]], [SETS[i]])
        assert alone[0][0] == batched[i][0]
        assert max(abs(a - b) for a, b in zip(alone[0][1], batched[i][1])) < FP32_LOGPROB_TOL


def test_serving_requests_through_the_engine_loop(engine, reference):
    futs = [engine.submit(Request(p, s, max_tokens=6)) for p, s in zip(PROMPTS, SETS)]
    results = [f.result(timeout=120) for f in futs]
    rows, _ = _generate(engine, PROMPTS, SETS, n=6)
    for r, (tokens, _), prompt, allowed in zip(results, rows, PROMPTS, SETS):
        eos = engine.tokenizer.eos_token_id
        want = tokens[:tokens.index(eos)] if eos in tokens else tokens
        assert r.tokens == want and r.finish_reason in ("stop", "length")
        # its routing shares: the transformers path's decisions over every token vLLM fed (not the last sampled)
        fed = r.tokens + [0] if r.finish_reason == "stop" else r.tokens
        counts = _reference_row(reference, prompt, allowed, fed)[2]
        total = sum(counts.values())
        assert r.routing == pytest.approx({n: c / total for n, c in counts.items()}) and r.outside == 0, (
            allowed, r.routing, counts)
    streamed = []
    r = engine.submit(Request(PROMPTS[0], SETS[0], max_tokens=5, on_token=streamed.append)).result(timeout=60)
    assert streamed == r.tokens


def test_adapters_added_and_removed_while_serving(engine, files):
    root = files[0]
    long = engine.submit(Request(PROMPTS[2], {"alpha", "beta", "gamma"}, max_tokens=40))
    time.sleep(0.5)  # in flight while the library changes

    def remove(e):
        e.change(lambda lib: lib.remove("beta"))
        return e.trace(on=True)
    engine.call(remove).result(timeout=120)
    assert "beta" not in engine.adapters
    assert long.result(timeout=120).tokens  # the request in flight finished, with the changed library
    trace = engine.call(lambda e: e.trace(on=False)).result(timeout=60)
    assert sum(trace.outside()) == 0 and "beta" not in trace.counts()
    with pytest.raises(PermissionError):
        engine.submit(Request(PROMPTS[0], {"beta"}, max_tokens=2)).result(timeout=60)

    engine.call(lambda e: e.change(lambda lib: lib.add_peft("delta", root / "a" / "evil"))).result(timeout=120)
    assert "delta" in engine.adapters
    rows, trace = _generate(engine, [PROMPTS[0]], [{"alpha", "delta"}])
    assert sum(trace.outside()) == 0 and trace.counts().get("delta", 0) > 0  # the new adapter routes at once
    engine.call(lambda e: e.change(lambda lib: lib.remove("delta"))).result(timeout=120)
    engine.call(lambda e: e.change(lambda lib: lib.add_peft("beta", root / "a" / "beta"))).result(timeout=120)
    assert engine.adapters == frozenset(NAMES)


@pytest.mark.parametrize("path,granularity", [("seqr", None), ("vllm-lora", None), ("seqr", "request")])
def test_request_granularity_serves_each_request_with_its_probes_adapter(files, reference, tmp_path, path,
                                                                          granularity):
    """Request-level routing (the default, request-vote, and request): each request's adapter is the one the
    transformers path's probe picks among its set (the boosted 'evil' only where allowed; the prompts arriving
    together probed in one forward); seqr's routed
    model with the set narrowed to it (the default) or vLLM's own LoRA then gives the fixed-adapter path's greedy
    tokens, the response names the adapter, and library changes apply to the next request."""
    import shutil

    from seqr.hf.layers import request_choices

    root, model_dir, lib_dir = files
    shutil.copytree(lib_dir, tmp_path / "lib")
    eng = VllmEngine(model_dir, LoraLibrary.load(tmp_path / "lib"), method="seqr", dtype="float32", max_batch=8,
                     max_model_len=256, work_dir=tmp_path / "work", request_path=path,
                     granularity=granularity)  # None: the default, request-vote
    assert bool(eng.llm.llm_engine.vllm_config.lora_config) == (path == "vllm-lora")
    try:
        futs = [eng.submit(Request(p, s, max_tokens=6, ignore_eos=True)) for p, s in zip(PROMPTS, SETS)]
        results = [f.result(timeout=300) for f in futs]
        for r, p, s in zip(results, PROMPTS, SETS):
            (name,) = request_choices(reference, torch.tensor([p]), allowed=[s], granularity=granularity or DEFAULT)
            assert r.routing == {name: 1.0} and name in s
            assert (r.manifest["router"], r.manifest["granularity"], r.manifest["allowed"]) == (
                "seqr", granularity or DEFAULT, len(s))
            with routing(reference, adapter=name):
                logits = reference(input_ids=torch.tensor([p + r.tokens[:-1]])).logits[0].float()  # (L, V)
            assert r.tokens == logits[len(p) - 1:].argmax(-1).tolist(), (name, r.tokens)
        assert results[3].routing == {"evil": 1.0} and all("evil" not in r.routing for r in results[:3])
        p, toks = PROMPTS[3], results[3].tokens
        with routing(reference, "base"):  # the LoRA did apply: without it the greedy tokens differ
            base = reference(input_ids=torch.tensor([p + toks[:-1]])).logits[0, len(p) - 1:].argmax(-1).tolist()
        assert base != toks
        with pytest.raises(ValueError, match="routes before vLLM"):
            eng.trace()
        eng.call(lambda e: e.change(lambda lib: lib.remove("evil"))).result(timeout=120)
        assert eng.submit(Request(PROMPTS[3], {"alpha"}, max_tokens=3)).result(timeout=120).routing == {"alpha": 1.0}
        with pytest.raises(PermissionError):
            eng.submit(Request(PROMPTS[3], {"evil"}, max_tokens=2)).result(timeout=60)
        eng.call(lambda e: e.change(lambda lib: lib.add_peft("evil", root / "a" / "evil"))).result(timeout=120)
        assert eng.submit(Request(PROMPTS[3], SETS[3], max_tokens=3)).result(timeout=120).routing == {"evil": 1.0}
    finally:
        eng.close()


def test_prefix_cache_and_requests_in_flight_see_one_library_whole(files, tmp_path):
    """vLLM's prefix caching is on. A long request in flight when a recalibration arrives finishes with the old
    library all the way (the change waits for it); the same long prompt asked after the change gives the tokens of
    the new library (the transformers path with the new stats), not the keys cached under the old one; and another
    user's set gets its own routing of the same prompt."""
    import shutil

    from transformers import AutoModelForCausalLM

    from seqr import NormStats

    root, model_dir, lib_dir = files
    shutil.copytree(lib_dir, tmp_path / "lib")
    eng = VllmEngine(model_dir, LoraLibrary.load(tmp_path / "lib"), method="seqr", dtype="float32", max_batch=4,
                     max_model_len=512, work_dir=tmp_path / "work", set_capacity=16, granularity="token")
    assert eng.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching  # vLLM's default
    block = eng.llm.llm_engine.vllm_config.cache_config.block_size  # 128 on CPU
    prompt = [(7 * i + 3) % 250 for i in range(block + 40)]  # a full KV block: cacheable
    allowed = {"alpha", "beta", "gamma"}
    ask = lambda s, n=6: eng.submit(Request(prompt, s, max_tokens=n, ignore_eos=True))  # noqa: E731
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    try:
        first = ask(allowed).result(timeout=120)
        old = attach(model, LoraLibrary.load(tmp_path / "lib"), method="seqr", granularity="token")
        assert first.tokens == _reference_row(old, prompt, allowed, first.tokens)[1]
        long = ask(allowed, 40)
        time.sleep(0.5)  # in flight when the change arrives

        def recalibrate(lib):  # beta's mu far below its norms: its z-scores win wherever it is allowed
            lib.set_stats("beta", {layer: NormStats(count=30, mean=-1e4, m2=30.0) for layer in lib.layers})
        eng.call(lambda e: e.change(recalibrate)).result(timeout=300)
        in_flight = long.result(timeout=10)
        assert in_flight.tokens == _reference_row(old, prompt, allowed, in_flight.tokens)[1]  # the old library, whole
        second, other = ask(allowed).result(timeout=120), ask({"alpha", "gamma"}).result(timeout=120)
    finally:
        eng.close()
    new = attach(seqr_detach(model), LoraLibrary.load(tmp_path / "lib"), method="seqr", granularity="token")
    _, greedy, counts = _reference_row(new, prompt, allowed, second.tokens)
    assert second.tokens == greedy and set(counts) == {"beta"}  # the new routing, all the way through
    assert second.tokens != first.tokens
    assert other.tokens == _reference_row(new, prompt, {"alpha", "gamma"}, other.tokens)[1]


def test_bfloat16_within_stated_tolerance(files, reference):
    eng = _engine(files, "bfloat16")
    try:
        rows, trace = _generate(eng, PROMPTS, SETS)
    finally:
        eng.close()
    assert sum(trace.outside()) == 0
    agree = total = 0
    for prompt, allowed, (tokens, logprobs) in zip(PROMPTS, SETS, rows):
        ref_lp, ref_greedy, _ = _reference_row(reference, prompt, allowed, tokens)
        assert abs(logprobs[0] - ref_lp[0]) < BF16_LOGPROB_TOL, (logprobs[0], ref_lp[0])
        agree += sum(a == b for a, b in zip(tokens, ref_greedy))
        total += len(tokens)
    assert agree / total >= BF16_MIN_TOKEN_AGREEMENT, (agree, total)


def test_seqr_serve_engine_vllm_over_http(files, tmp_path):
    """The real CLI: `seqr serve --engine vllm`, the same auth store, OpenAI API, admin changes and metrics."""
    import json
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from seqr.bench.serve import launch, stop

    root, model_dir, lib_dir = files
    shutil.copytree(lib_dir, tmp_path / "lib")
    (tmp_path / "silos").mkdir()
    shutil.copytree(root / "a" / "evil", tmp_path / "silos" / "delta")
    auth = {"users": {"alice": {"keys": ["sk-alice-0001"], "adapters": ["alpha"]},
                      "bob": {"keys": ["sk-bob-000001"], "adapters": ["beta", "gamma"]}},
            "admin_keys": ["sk-admin-0001"]}
    (tmp_path / "auth.json").write_text(json.dumps(auth))
    proc, url = launch([str(tmp_path / "lib"), "--model", str(model_dir), "--auth", str(tmp_path / "auth.json"),
                        "--engine", "vllm", "--dtype", "float32", "--served-model-name", "tiny",
                        "--max-prompt-tokens", "100", "--max-tokens-limit", "32", "--adapters-root",
                        str(tmp_path / "silos")], timeout_s=300)
    try:
        def ask(key, **extra):
            return httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "po ne pos", "max_tokens": 6,
                                                              **extra},
                              headers={"Authorization": f"Bearer {key}"}, timeout=120)
        with ThreadPoolExecutor(4) as pool:  # two users with disjoint sets, batched together
            rs = list(pool.map(lambda k: ask(k), ["sk-alice-0001", "sk-bob-000001"] * 2))
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
        assert all(r.json()["usage"]["completion_tokens"] >= 1 for r in rs)
        assert ask("sk-alice-0001", adapters=["beta"]).status_code == 403
        assert ask("sk-nobody-0001").status_code == 401
        adm = {"Authorization": "Bearer sk-admin-0001"}
        assert httpx.post(url + "/admin/adapters", json={"name": "delta", "path": "delta"}, headers=adm,
                          timeout=120).status_code == 201
        assert httpx.put(url + "/admin/users/carol", json={"keys": ["sk-carol-0001"], "adapters": ["delta"]},
                         headers=adm, timeout=60).status_code == 200
        assert ask("sk-carol-0001").status_code == 200  # routed to the adapter added while serving
        assert httpx.delete(url + "/admin/adapters/delta", headers=adm, timeout=120).status_code == 200
        assert ask("sk-carol-0001").status_code in (401, 403)  # its only adapter is gone
        metrics = httpx.get(url + "/metrics", headers=adm, timeout=30).text
        assert "seqr_requests" in metrics
    finally:
        import psutil

        children = psutil.Process(proc.pid).children(recursive=True)  # vLLM's engine core and worker
        # multiprocessing's resource tracker exits by itself once its parent has gone; read the command lines now,
        # while every process is whole (one that is exiting reads an empty command line)
        trackers = {c.pid for c in children if "resource_tracker" in " ".join(c.cmdline())}
        stop(proc)
    def alive(c):
        try:
            return c.is_running() and c.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    engine = [c for c in children if c.pid not in trackers]
    assert len(engine) >= 2 and not [c.pid for c in engine if alive(c)]  # none left orphaned
