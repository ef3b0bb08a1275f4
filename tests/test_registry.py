"""The router registry: every registered router passes one contract (allowed-set isolation, trace consistency, a
cost entry, a report row); a router defined only here works end to end; the centroid routers equal brute force;
adapters named like methods are fixed adapters, never methods."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel

import seqr
from peft_factory import adapter_library, random_stats, tiny_llama
from seqr.core import registry
from seqr.core import routers as rt
from seqr.core.bank import AdapterBank
from seqr.core.costs import costs, costs_table, methods as cost_methods
from seqr.eval import report as er

NAMES = ["alpha", "beta", "gamma", "delta"]
ROUTERS = [r.name for r in registry.routers(("score", "shortlist"))]
K = 2  # the shortlist routers' k


def _centroids(lib, seed=0):
    """Seeded stand-in centroids for every adapter and layer of `lib` (a silo's mean inputs)."""
    g = torch.Generator().manual_seed(seed)
    for name in lib.names:
        ad = lib._adapters[name]
        ad.centroids = {layer: torch.randn(lib.meta.layers[layer][1], generator=g) for layer in lib.layers}
    lib.drop_banks()
    return lib


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return _centroids(random_stats(adapter_library(tmp_path_factory.mktemp("reg"), NAMES)))


def _k(router):
    return K if router.takes_k else None


def _ids(B=3, T=6, seed=0):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ contract
@pytest.mark.parametrize("method", ROUTERS)
def test_every_router_stays_inside_each_tokens_allowed_set(lib, method):
    bank = lib.bank(lib.layers[0])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, bank.A.shape[-1], generator=g)  # (T, n)
    mask = torch.rand(64, len(NAMES), generator=g) < 0.5  # (T, N)
    mask[torch.arange(64), torch.randint(0, len(NAMES), (64,), generator=g)] = True  # never empty
    idx = bank.route(x, method, k=_k(registry.get(method)), allowed=mask)  # (T,)
    assert mask[torch.arange(64), idx].all()


@pytest.mark.parametrize("method", ROUTERS)
def test_every_router_traces_what_it_applied(lib, method):
    router = registry.get(method)
    model = seqr.attach(tiny_llama(), lib, granularity="token")
    rows = [{"alpha", "beta"}, {"gamma"}, {"alpha", "delta", "gamma"}]
    with torch.no_grad(), seqr.routing(model, method, k=_k(router), allowed=rows, trace=True) as tr:
        model(_ids())
    d = tr.decisions()
    assert tr.outside(rows) == [0, 0, 0]
    assert torch.equal(tr.choices(method, _k(router)), d["chosen"])  # its trace rule reproduces its choice
    margin = d["margin"][torch.isfinite(d["margin"])]
    assert (margin >= 0).all()  # the choice maximises the scores its rule names
    assert tr.summary()["routing_accuracy"]["used"] == tr.routing_accuracy(None)


@pytest.mark.parametrize("method", ROUTERS)
def test_every_router_has_a_cost_and_a_report_row(method):
    router = registry.get(method)
    c = costs(method, 10, 64, 48, 4, _k(router))
    assert c.macs > 0 and c.params > 0 and method in cost_methods()
    assert method in [row.method for row in costs_table(10, 64, 48, 4, K)]
    key = router.key(_k(router))
    assert registry.label(key).startswith(router.label)
    doc = {"base": {"tasks": {}}, "config": {"tasks": []}, "libraries": {
        "shared-0": {"shared_a": True, "methods": {key: {"tasks": {}}, "seqr": {"tasks": {}}, "oracle": {"tasks": {}}}}}}
    keys = er.method_keys(doc, "shared")
    assert keys[0] == "base" and keys[-1] == "oracle" and key in keys


def test_registry_refuses_bad_entries_and_names_unknown_methods():
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.get("seqr"))
    with pytest.raises(ValueError, match="needs a score function"):
        registry.Router("x", "x", 50)
    with pytest.raises(ValueError, match="unknown needs"):
        registry.Router("x", "x", 50, score=lambda b, x, z: x, needs={"gpu"})
    with pytest.raises(ValueError, match="unknown routing method 'nope'"):
        registry.get("nope")


# ------------------------------------------------------------------------------------------------ a router of our own
def _farthest(bank, x, z):
    return -rt.arrow_scores(x, bank.prototypes)  # (T, N): the adapter least aligned with x


@pytest.fixture()
def farthest():
    router = registry.register(registry.Router(
        "farthest", "FARTHEST", 60, score=_farthest, needs={"svd"}, evaluated=False,
        cost=lambda N, n, m, r, k, sa: (N * n, 0, N * n), help="a test-only router"))
    yield router
    registry.unregister("farthest")


def test_a_router_defined_in_a_test_works_end_to_end(lib, farthest):
    bank = lib.bank(lib.layers[0])
    x = torch.randn(20, bank.A.shape[-1], generator=torch.Generator().manual_seed(3))
    ref = (x @ bank.prototypes.T).abs().argmin(-1)  # brute force: least |v_i . x|
    assert torch.equal(bank.route(x, "farthest"), ref)
    model = seqr.attach(tiny_llama(), lib, method="farthest")
    with torch.no_grad(), seqr.routing(model, allowed={"beta", "gamma"}, trace=True) as tr:
        model(_ids())
    assert set(tr.counts()) <= {"beta", "gamma"} and torch.equal(tr.choices("farthest"), tr.choices(None))
    assert tr.routing_accuracy("farthest") < 1.0  # it does not pick the norm-max: the trace knows its own scores
    assert costs("farthest", 10, 64, 48, 4).macs == 640
    assert registry.report_order(["seqr", "farthest", "base"]) == ["base", "seqr", "farthest"]
    from seqr.eval.evaluate import EvalConfig
    assert EvalConfig(tasks=["t"], methods=("farthest", "seqr")).methods == ("farthest", "seqr")


# ------------------------------------------------------------------------------------------------ centroids
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_centroid_scores_equal_brute_force_cosine(lib, dtype):
    bank = lib.bank(lib.layers[1])
    C = torch.stack([lib.centroids(n)[lib.layers[1]] for n in NAMES]).to(dtype)  # (N, n) as shipped
    x = torch.randn(16, C.shape[1], generator=torch.Generator().manual_seed(4), dtype=dtype)
    want = F.cosine_similarity(x[:, None, :], C[None, :, :], dim=-1)  # (T, N)
    tol = {torch.float32: 1e-5, torch.float64: 1e-6}[dtype]  # the bank keeps its centroids in fp32
    torch.testing.assert_close(bank.scores(x, "centroid").to(dtype), want, atol=tol, rtol=tol)
    real = torch.tensor([[True] * 5 + [False] * 3, [True] * 8])  # (B, T) prompts with padding
    xb = x.view(2, 8, -1)
    pooled = registry.get("centroid").prompt_score(bank, xb.float(), real)  # (B, N)
    for b in range(2):
        mean = xb[b][real[b]].mean(0)  # the prompt's mean input
        torch.testing.assert_close(pooled[b].double(), F.cosine_similarity(mean[None], C, dim=-1).double(),
                                   atol=1e-5, rtol=1e-5)


def test_centroid_then_seqr_equals_brute_force(lib):
    bank = lib.bank(lib.layers[2])
    x = torch.randn(40, bank.A.shape[-1], generator=torch.Generator().manual_seed(5))
    C = torch.stack([lib.centroids(n)[lib.layers[2]] for n in NAMES])
    cos = F.cosine_similarity(x[:, None, :], C[None], dim=-1)  # (T, N)
    norms = torch.stack([(x @ bank.A.T @ bank.B[i].T).norm(dim=-1) for i in range(len(NAMES))], -1)  # (T, N)
    z = (norms - bank.mu) / bank.sigma  # the calibrated exact norms
    top = cos.topk(K, -1).indices  # (T, K)
    want = top.gather(1, z.gather(1, top).argmax(-1, keepdim=True))[:, 0]
    assert torch.equal(bank.route(x, "centroid-seqr", k=K), want)


def test_centroid_routing_needs_centroids_and_they_survive_save_and_load(lib, tmp_path):
    bare = random_stats(adapter_library(tmp_path / "bare", NAMES[:2]))
    model = seqr.attach(tiny_llama(), bare)
    with pytest.raises(ValueError, match="needs every adapter's centroids"):
        with seqr.routing(model, "centroid"):
            pass
    lib.save(tmp_path / "lib")
    back = seqr.LoraLibrary.load(tmp_path / "lib")
    assert back.has_centroids
    for name in NAMES:
        for layer in lib.layers:
            assert torch.equal(back.centroids(name)[layer], lib.centroids(name)[layer])
    with pytest.raises(ValueError, match="zero vector"):
        AdapterBank(torch.randn(4, 8), torch.randn(2, 6, 4), centroids=torch.zeros(2, 8))


# ------------------------------------------------------------------------------------------------ fixed adapters
def test_adapters_named_like_methods_are_fixed_adapters(tmp_path):
    names = ["seqr", "arrow", "mu", "base"]
    lib = random_stats(adapter_library(tmp_path, names))
    model = seqr.attach(tiny_llama(), lib)
    ids = _ids(seed=2)
    with torch.no_grad():
        for name in names:
            want = PeftModel.from_pretrained(tiny_llama(), tmp_path / name).eval()(ids).logits
            with seqr.routing(model, adapter=name):
                torch.testing.assert_close(model(ids).logits, want, atol=2e-5, rtol=1e-4)
        with seqr.routing(model, "arrow", trace=True) as tr:  # the method, not the adapter named "arrow"
            model(ids)
        assert torch.equal(tr.choices("arrow"), tr.choices(None)) and len(tr.counts()) > 1
    with pytest.raises(ValueError, match="not both"):
        with seqr.routing(model, "seqr", adapter="mu"):
            pass


def test_attach_defaults_to_the_librarys_router(tmp_path):
    shared = random_stats(adapter_library(tmp_path / "s", NAMES[:2]))
    unique = random_stats(adapter_library(tmp_path / "u", NAMES[:2], a_seed=None))
    assert (shared.default_method, unique.default_method) == ("seqr", "spectr")
    model = seqr.attach(tiny_llama(), unique)  # seqr would need a shared A
    with torch.no_grad(), seqr.routing(model, trace=True) as tr:
        model(_ids())
    assert tr.method == "spectr" and tr.routing_accuracy("spectr") == 1.0


def test_trace_rules_are_code_that_picks_each_routers_choice():
    """Router.used_scores: the recorded vectors' scores whose argmax is the router's choice, against brute force."""
    g = torch.Generator().manual_seed(0)
    v = {key: torch.randn(50, 6, generator=g) for key in ("norm", "arrow", "own")}  # (D, N)
    assert torch.equal(registry.get("seqr").used_scores(v).argmax(-1), v["norm"].argmax(-1))
    assert torch.equal(registry.get("arrow").used_scores(v).argmax(-1), v["arrow"].argmax(-1))
    for k in (1, 3, 6):  # LAG: ARROW's top k, then the largest norm among them, one decision at a time
        want = [max(v["arrow"][d].topk(k).indices.tolist(), key=lambda i: v["norm"][d, i]) for d in range(50)]
        assert registry.get("lag").used_scores(v, k).argmax(-1).tolist() == want
    with pytest.raises(ValueError, match="k in"):
        registry.get("lag").used_scores(v, 7)
    assert registry.get("centroid").used_scores({"norm": v["norm"], "arrow": v["arrow"]}) is None  # not recorded
