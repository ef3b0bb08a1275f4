"""The analytic cost model: Table 1, storage equal to what AdapterBank holds, MACs equal to counted torch ops."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import seqr
import seqr.cli
import seqr.core.routers as rt
from seqr import AdapterBank, Cost
from seqr.core.costs import (GRANULARITY_RULES, METHODS, costs, costs_table, format_table, granularity_costs, human,
                             human_bytes, main)

TABLE1 = dict(N=1000, n=4096, m=4096, r=8, k=20)


def test_table1_exact_and_rounded():
    rows = {c.method: c for c in costs_table(**TABLE1)}
    assert list(rows) == list(METHODS)
    exact = {"naive": 65_536_000, "spectr": 32_776_000, "lag": 4_751_520, "arrow": 4_096_000, "seqr": 64_000}
    paper = {"naive": "65.5M", "spectr": "32.8M", "lag": "4.75M", "arrow": "4.1M", "seqr": "64K"}
    assert list(rows)[:5] == list(exact)  # Table 1's rows first, in its order; other routers after
    assert {mt: rows[mt].macs for mt in exact} == exact
    assert {mt: human(rows[mt].macs) for mt in paper} == paper
    assert rows["seqr"].shared_macs == 8 * 4096  # z = A x, reused by the update
    assert all(rows[mt].shared_macs == 0 for mt in exact if mt != "seqr")
    assert rows["centroid-seqr"].shared_macs == 8 * 4096 and rows["centroid"].shared_macs == 0
    table = format_table(list(rows.values()))
    for mt, text in paper.items():
        assert f"| {mt} | {text} |" in table


def test_exported_from_package():
    assert seqr.costs("arrow", 2, 3, 4, 1) == Cost("arrow", 2, 3, 4, 1)
    assert "costs" in seqr.__all__ and "Cost" in seqr.__all__


@pytest.mark.parametrize("N,n,m,r", [(3, 16, 12, 2), (7, 10, 24, 5), (1, 8, 8, 8)])
def test_storage_equals_bank_numel(N, n, m, r, make_lora):
    A, B = make_lora(N, m, n, r, shared=True)
    assert costs("seqr", N, n, m, r).params == AdapterBank(A, B).numel == n * r + N * (m * r + r * (r + 1) // 2)
    A, B = make_lora(N, m, n, r, shared=False)
    assert costs("naive", N, n, m, r, shared_a=False).params == AdapterBank(A, B).numel  # updates only


def test_storage_formulas_and_bytes():
    N, n, m, r, k = 5, 32, 24, 4, 2
    updates = n * r + N * m * r
    got = {c.method: c.params for c in costs_table(N, n, m, r, k)}
    assert got == {"naive": updates, "spectr": updates + N * (n * r + r), "arrow": updates + N * n,
                   "lag": updates + N * n + N * (n * r + r), "seqr": updates + N * r * (r + 1) // 2,
                   "centroid": updates + N * n, "centroid-seqr": updates + N * n + N * r * (r + 1) // 2}
    unique = costs("seqr", N, n, m, r, shared_a=False)
    assert unique.macs == N * (r * n + r * r) and unique.shared_macs == 0
    assert unique.params == N * (r * n + m * r) + N * r * (r + 1) // 2
    assert costs("arrow", N, n, m, r, bytes_per_param=2).bytes == 2 * got["arrow"]
    assert costs("arrow", N, n, m, r, bytes_per_param=0.5).bytes == 0.5 * got["arrow"]


def test_k_only_kept_for_lag():
    assert costs("seqr", 4, 8, 8, 2, k=3).k is None
    assert costs("lag", 4, 8, 8, 2, k=3).k == 3


@pytest.mark.parametrize("kwargs,needle", [
    (dict(method="nope"), "'nope'"),
    (dict(r=0), "r must be positive, got 0"),
    (dict(N=-3), "N must be positive, got -3"),
    (dict(n=2.5), "n must be an integer, got 2.5"),
    (dict(m=True), "m must be an integer, got True"),
    (dict(method="lag", k=None), "got k=None"),
    (dict(method="lag", k=0), "got k=0"),
    (dict(method="lag", k=11), "k in [1, N=10], got k=11"),
    (dict(bytes_per_param=0), "got 0"),
    (dict(bytes_per_param=float("nan")), "got nan"),
])
def test_bad_inputs_name_the_value(kwargs, needle):
    args = dict(method="seqr", N=10, n=8, m=8, r=2, k=None) | kwargs
    with pytest.raises(ValueError) as e:
        costs(args.pop("method"), **args)
    assert needle in str(e.value)
    if "nope" in needle:
        assert all(mt in str(e.value) for mt in METHODS)  # lists the valid methods


def test_frozen():
    with pytest.raises(AttributeError):
        costs("seqr", 2, 4, 4, 2).macs = 1


def _counted_matmul_macs(fn) -> int:
    """Multiply-accumulates of every mm/bmm torch actually dispatched (FlopCounterMode counts 2 per MAC)."""
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops() // 2


@pytest.mark.parametrize("shared", [True, False])
def test_macs_match_counted_torch_ops(shared, make_lora, make_tokens, monkeypatch):
    """Independent check: count the matmul MACs the bank's routers really run on a tiny bank. The elementwise
    parts (SPECTR's S_i scaling: r per adapter) are not matmuls and are added from the tensor shapes. LAG runs
    its gathered path here, the one the formula costs (its dense few-adapter path is checked below)."""
    monkeypatch.setattr(rt, "LAG_DENSE_PER_K", 0)
    N, n, m, r, k, T = 6, 20, 12, 3, 2, 5
    A, B = make_lora(N, m, n, r, shared=shared)
    bank = AdapterBank(A, B)
    x = make_tokens(T, n=n)
    bank.prepare("arrow", "spectr", "lag")  # build the baselines' factors outside the count (a one-off preparation)
    count = {mt: _counted_matmul_macs(lambda: bank.route(x, mt, k=k if mt == "lag" else None)) / T
             for mt in ("arrow", "spectr", "lag") + (("seqr",) if shared else ())}
    cost = {mt: costs(mt, N, n, m, r, k, shared_a=shared) for mt in METHODS}
    assert count["arrow"] == cost["arrow"].macs
    assert count["spectr"] + N * r == cost["spectr"].macs
    assert count["lag"] + k * r == cost["lag"].macs
    # naive forms B_i (A_i x) for every adapter; with a shared A the code projects once per block of adapters
    naive = _counted_matmul_macs(lambda: bank.route(x, "naive")) / T
    assert naive == (cost["naive"].macs if not shared else r * n + N * m * r)
    if shared:
        # SEQR on a few tokens (a decode step, T <= GATHER_TOKENS): z = A x (the shared r n), then every R_i z from
        # one stacked product: exactly the paper's N r^2
        assert count["seqr"] == cost["seqr"].shared_macs + N * r * r == cost["seqr"].shared_macs + cost["seqr"].macs
        # on more tokens: one product with the packed Grams, N r(r+1)/2 <= the paper's N r^2
        T2 = rt.GATHER_TOKENS + 1
        x2 = make_tokens(T2, n=n)
        many = _counted_matmul_macs(lambda: bank.route(x2, "seqr")) / T2
        assert many == cost["seqr"].shared_macs + N * r * (r + 1) // 2
        assert many - cost["seqr"].shared_macs <= cost["seqr"].macs


def test_human_units():
    assert [human(v) for v in (0, 999, 1000, 64_000, 999_960, 4_096_000)] == ["0", "999", "1K", "64K", "1M", "4.1M"]
    assert human_bytes(131_347_072) == "125 MiB"
    assert human_bytes(3 * 2 ** 30) == "3 GiB"
    assert human_bytes(100) == "100 B"


def test_cli_table_and_json(capsys):
    assert seqr.cli.main(["costs"]) == 0
    out = capsys.readouterr().out
    assert "| lag | 4.75M |" in out and "| seqr | 64K | 32.8K |" in out
    assert main(["--N", "10", "--k", "3", "--unique-a", "--bytes-per-param", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["method"] for row in rows] == list(METHODS)
    seqr_row = next(row for row in rows if row["method"] == "seqr")
    assert seqr_row["shared_a"] is False and seqr_row["macs"] == 10 * (8 * 4096 + 64)
    assert seqr_row["bytes"] == 2 * seqr_row["params"]


def test_cli_bad_input_exits_with_message(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--N", "10", "--k", "20"])  # an explicit k larger than the library
    assert e.value.code == 2
    assert "got k=20" in capsys.readouterr().err
    assert main(["--N", "10"]) == 0  # the default k=20 shrinks to N
    assert "k=10 (lag)" in capsys.readouterr().out


def test_lag_dense_path_runs_spectr_macs(make_lora, make_tokens, monkeypatch):
    """With few adapters LAG scores all of them: exactly ARROW's plus SPECTR's matmul MACs, and the same choice
    as its gathered path."""
    N, n, m, r, k, T = 6, 20, 12, 3, 2, 5
    A, B = make_lora(N, m, n, r, shared=True)
    bank = AdapterBank(A, B)
    x = make_tokens(T, n=n)
    bank.prepare("arrow", "spectr", "lag")
    assert rt.lag_dense(N, k)
    dense = _counted_matmul_macs(lambda: bank.route(x, "lag", k=k)) / T
    assert dense + N * r == costs("arrow", N, n, m, r).macs + costs("spectr", N, n, m, r).macs
    chosen = bank.route(x, "lag", k=k)
    monkeypatch.setattr(rt, "LAG_DENSE_PER_K", 0)
    assert bank.route(x, "lag", k=k).tolist() == chosen.tolist()


@pytest.mark.parametrize("depth", [1.0, 0.5])
@torch.no_grad()
def test_granularity_costs_equal_the_positions_a_routed_model_runs(depth, tmp_path):
    """The extra model positions of each granularity, counted in a real routed forward: decoder-layer calls (a
    stopped probe runs only the first layers) times their positions, over the layers, beyond the request's own."""
    from peft_factory import adapter_library, random_stats, tiny_llama
    from seqr.hf.compat import cache_arg, returned_cache
    from seqr.hf.granularity import GRANULARITIES, PROBED

    assert set(GRANULARITY_RULES) == set(GRANULARITIES)
    lib = random_stats(adapter_library(tmp_path, ["a", "b", "c"]))
    P, G = 7, 3
    rows = {r["granularity"]: r for r in granularity_costs(P, G, depth)}
    ids = torch.randint(0, 97, (1, P), generator=torch.Generator().manual_seed(0))
    for g in GRANULARITIES:
        model = seqr.attach(tiny_llama(), lib, granularity=g, probe_depth=depth if g in PROBED else 1.0)
        seen = []
        blocks = model.model.layers
        for blk in blocks:
            blk.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw.get("hidden_states", args[0] if args
                                                                                      else None).shape[1]),
                                          with_kwargs=True)
        out = model(ids, use_cache=True)
        prefill = sum(seen) / len(blocks)
        seen.clear()
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(G):
            out = model(tok, **cache_arg(model, returned_cache(out)), use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
        decode = sum(seen) / len(blocks)
        r = rows[g]
        assert (prefill - P, decode - G) == (r["extra_positions_prefill"], r["extra_positions_decode"]), g
        assert r["extra_compute"] == pytest.approx((prefill + decode - P - G) / (P + G))


def test_cli_granularities_table_and_json(capsys):
    assert main(["--granularities", "--prompt", "10", "--new-tokens", "5", "--probe-depth", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "| request | 5 | 0 | 33% | 5 | 0 |" in out and "| token | 0 | 0 | 0% | 10 | 5 |" in out
    assert main(["--granularities", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["granularity"] for r in rows] == list(GRANULARITY_RULES)
    with pytest.raises(SystemExit) as e:
        main(["--granularities", "--probe-depth", "1.5"])
    assert e.value.code == 2 and "probe_depth must be in (0, 1], got 1.5" in capsys.readouterr().err
