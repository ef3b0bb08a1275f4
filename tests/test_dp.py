"""Differentially private calibration (issue 33), against independent references: the analytic Gaussian mechanism
(Balle & Wang 2018, written out here) and dp-accounting's own accountants for the noise; brute-force neighbouring
datasets for the sensitivity; many seeded draws for the released statistics; one example at a time through the
non-DP path for the per-example summaries."""
from __future__ import annotations

import json
import math

import dp_accounting as dpa
import pytest
import torch

from seqr import LoraLibrary
from seqr.core.argfmt import BadValue
from seqr.core.privacy import (DPConfig, Guarantee, clipped_sum, noise_multiplier, release_moments, unguaranteed)
from seqr.silo.calibrate import calibrate, norm_stats
from seqr.silo.private import dp_release, dp_sums
from seqr.silo.tasks import Example
from seqr.store import files
from test_cli_errors import assert_one_line, no_model, run  # noqa: F401  (no_model: a fixture)
from tiny_chat import tiny_chat_llama

E, D = 1.0, 1e-5


def _delta_of_gaussian(mu: float, eps: float) -> float:
    """The exact delta(eps) of a Gaussian mechanism with sensitivity / std = mu (Balle & Wang 2018, Theorem 8);
    the second term in log space, so a large epsilon does not overflow exp(eps)."""
    from scipy.special import log_ndtr

    return math.exp(log_ndtr(mu / 2 - eps / mu)) - math.exp(eps + log_ndtr(-mu / 2 - eps / mu))


def _assert_exact_delta_is_met(nm: float, eps: float, releases: int, tight: bool = True) -> None:
    """Independent of dp-accounting: k Gaussian releases with multiplier nm compose to one with nm / sqrt(k)."""
    assert _delta_of_gaussian(math.sqrt(releases) / nm, eps) <= D * (1 + 1e-6)  # enough noise: conservative
    if tight:  # and tight: 1% less noise breaks delta
        assert _delta_of_gaussian(math.sqrt(releases) / (0.99 * nm), eps) > D


# ------------------------------------------------------------------------------------------ (a) the noise scale
@pytest.mark.parametrize("accountant", ["pld", "rdp"])
@pytest.mark.parametrize("releases", [1, 2])
def test_the_noise_multiplier_is_what_the_accountant_needs_for_epsilon_delta(accountant, releases):
    nm = noise_multiplier(E, D, releases, accountant)
    make = {"pld": dpa.pld.PLDAccountant, "rdp": dpa.rdp.RdpAccountant}[accountant]
    eps = lambda m: make().compose(dpa.ComposedDpEvent([dpa.GaussianDpEvent(m)] * releases)).get_epsilon(D)  # noqa
    assert eps(nm) <= E * (1 + 1e-9) and eps(0.99 * nm) > E  # enough noise, and not much more than enough
    _assert_exact_delta_is_met(nm, E, releases, tight=accountant == "pld")  # RDP is conservative, not tight


@pytest.mark.parametrize("epsilon", [8.0, 100.0, 1000.0])
@pytest.mark.parametrize("releases", [1, 2])
def test_a_large_epsilon_gets_the_noise_the_exact_gaussian_delta_needs(epsilon, releases):
    nm = noise_multiplier(epsilon, D, releases)  # the PLD grid grows with epsilon: its precision stays relative
    _assert_exact_delta_is_met(nm, epsilon, releases)


def test_the_noise_std_used_is_the_multiplier_times_the_sensitivity():
    cfg = DPConfig(E, D, clip=3.0, centroid_clip=0.5)
    g, alone = cfg.guarantee(40, centroids=True), cfg.guarantee(40, centroids=False)
    assert g.noise_multiplier == pytest.approx(noise_multiplier(E, D, 2), rel=1e-9)
    assert alone.noise_multiplier == pytest.approx(noise_multiplier(E, D, 1), rel=1e-9)
    assert alone.noise_multiplier < g.noise_multiplier
    assert g.stats_noise_std == pytest.approx(g.noise_multiplier * math.sqrt(2) * 3.0)  # replace-one, rows >= 0
    assert g.centroid_noise_std == pytest.approx(g.noise_multiplier * 2 * 0.5)  # replace-one, rows of any sign
    assert alone.centroid_noise_std is None and alone.to_dict()["releases"] == 1
    total = torch.rand(5, 2, dtype=torch.float64) * 40  # (L, 2) clipped sums
    mu, _ = release_moments(total, g, torch.Generator().manual_seed(7))
    noise = torch.randn((5, 2), generator=torch.Generator().manual_seed(7), dtype=torch.float64)  # the same draw
    torch.testing.assert_close(mu, (total[:, 0] + g.stats_noise_std * noise[:, 0]) / 40, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------ (b) what one example can change
def _nonneg_rows(n, d, seed):
    return torch.rand(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3


def test_one_example_moves_the_clipped_sum_by_at_most_c_removed_or_sqrt2_c_replaced():
    C = 2.0
    rows = _nonneg_rows(30, 8, 0)  # norms ~ 5: every row clipped
    huge = torch.full((1, 8), 1e6, dtype=torch.float64)  # an adversarial example with huge activations
    S = clipped_sum(rows, C)
    assert torch.linalg.vector_norm(S - clipped_sum(rows[1:], C)) <= C * (1 + 1e-12)  # removed
    assert torch.linalg.vector_norm(clipped_sum(torch.cat([rows, huge]), C) - S) <= C * (1 + 1e-12)  # added
    worst = 0.0
    for i in range(200):  # replace-one, brute force over random and adversarial replacements
        other = huge if i == 0 else _nonneg_rows(1, 8, 100 + i) ** (1 + i % 5)
        changed = torch.cat([other, rows[1:]])
        worst = max(worst, float(torch.linalg.vector_norm(clipped_sum(changed, C) - S)))
    assert worst <= math.sqrt(2) * C * (1 + 1e-12)
    orth = torch.tensor([[5.0, 0.0], [0.0, 5.0]], dtype=torch.float64)  # the bound is reached: orthogonal rows
    assert float(torch.linalg.vector_norm(clipped_sum(orth[:1], C) - clipped_sum(orth[1:], C))) == pytest.approx(
        math.sqrt(2) * C)


def _examples(n, long=False):
    body = "word " * 200 if long else ""
    return [Example(task="pos", id=f"p{i}", text=f"sample {i} {body}", text_pair=None, choices=("yes", "no"),
                    label=i % 2) for i in range(n)]


@pytest.fixture(scope="module")
def adapters(tok, tmp_path_factory):
    from peft_factory import make_adapter

    root = tmp_path_factory.mktemp("dp")
    for i, name in enumerate(("alpha", "beta")):
        make_adapter(root / name, seed=i, base=tiny_chat_llama(len(tok)))
    return root


def test_on_a_tiny_model_neighbouring_datasets_move_the_pre_noise_sums_by_at_most_the_bound(tok, adapters):
    model, exs = tiny_chat_llama(len(tok)), _examples(6)
    free = dp_sums(model, tok, adapters / "alpha", exs, 1e9, 1e9, progress=False)
    norms = [float(torch.linalg.vector_norm(v)) for v in free.stats.values()]
    C, Cc = 0.3 * math.sqrt(sum(x * x for x in norms)) / 6, 1.0  # below a typical row norm: clipping binds
    base = dp_sums(model, tok, adapters / "alpha", exs, C, Cc, batch_size=4, progress=False)
    removed = dp_sums(model, tok, adapters / "alpha", exs[:-1], C, Cc, batch_size=4, progress=False)
    replaced = dp_sums(model, tok, adapters / "alpha", exs[:-1] + _examples(1, long=True), C, Cc, progress=False)
    flat = lambda s: torch.cat(list(s.stats.values()))  # noqa: E731  (2L,)
    cents = lambda s: torch.cat(list(s.centroids.values()))  # noqa: E731  (sum n,)
    assert float(torch.linalg.vector_norm(flat(base) - flat(removed))) <= C * (1 + 1e-9)
    assert float(torch.linalg.vector_norm(flat(base) - flat(replaced))) <= math.sqrt(2) * C * (1 + 1e-9)
    assert float(torch.linalg.vector_norm(cents(base) - cents(removed))) <= Cc * (1 + 1e-9)
    assert float(torch.linalg.vector_norm(cents(base) - cents(replaced))) <= 2 * Cc * (1 + 1e-9)
    assert float(torch.linalg.vector_norm(flat(base))) <= 6 * C * (1 + 1e-9)  # every row was clipped to C


def test_the_per_example_summaries_match_the_non_dp_path_one_example_at_a_time(tok, adapters):
    model, exs = tiny_chat_llama(len(tok)), _examples(5)
    sums = dp_sums(model, tok, adapters / "alpha", exs, 1e9, 1e9, batch_size=2, progress=False)  # nothing clipped
    per = []
    for ex in exs:  # reference: the non-DP calibration of each example alone
        cent = {}
        stats, _ = norm_stats(model, tok, adapters / "alpha", [ex], progress=False, centroids=cent)
        per.append((stats, cent))
    for layer, s in sums.stats.items():
        a = torch.tensor([st[layer].mean for st, _ in per], dtype=torch.float64)  # (n,) mean norm
        b = torch.tensor([st[layer].var + st[layer].mean ** 2 for st, _ in per], dtype=torch.float64)  # mean square
        torch.testing.assert_close(s, torch.stack([a.sum(), b.sum()]), rtol=1e-6, atol=1e-9)
        want = torch.stack([c[layer].double() for _, c in per]).sum(0)  # (n,) sum of per-example mean inputs
        torch.testing.assert_close(sums.centroids[layer], want, rtol=1e-5, atol=1e-6)


def test_centred_centroid_rows_sum_clip_c_minus_p_and_release_p_plus_their_noisy_mean(tok, adapters):
    model, exs = tiny_chat_llama(len(tok)), _examples(5)
    free = dp_sums(model, tok, adapters / "alpha", exs, 1e9, 1e9, batch_size=2, progress=False)
    p = {k: v / 5 + 0.1 for k, v in free.centroids.items()}  # a fixed public point near the rows (n,) each
    rows = dp_sums(model, tok, adapters / "alpha", exs, 1e9, 1e9, centroid_center=p, batch_size=2, progress=False)
    for layer, v in rows.centroids.items():  # nothing clipped: the sum of c_e - p
        torch.testing.assert_close(v, free.centroids[layer] - 5 * p[layer], rtol=1e-9, atol=1e-9)
    Cc = 0.5  # below the centred rows' norms: clipping binds, and one example still moves the sum by <= 2 C_c
    cents = lambda s: torch.cat(list(s.centroids.values()))  # noqa: E731  (sum n,)
    base, replaced = (dp_sums(model, tok, adapters / "alpha", e, 1e9, Cc, centroid_center=p, progress=False)
                      for e in (exs, exs[:-1] + _examples(1, long=True)))
    assert float(torch.linalg.vector_norm(cents(base) - cents(replaced))) <= 2 * Cc * (1 + 1e-9)
    assert float(torch.linalg.vector_norm(cents(base))) <= 5 * Cc * (1 + 1e-9)
    g = DPConfig(1000.0, D, clip=1.0, centroid_clip=0.1, centroid_center=p).guarantee(5, centroids=True)
    draws = torch.stack([torch.cat(list(dp_release(rows, g, torch.Generator().manual_seed(i))[1].values()))
                         for i in range(50)])  # (50, sum n) released centroids (the noise is small at eps 1000)
    assert g.centroid_center == "given" and rows.center is p and g.centroid_noise_std / 5 < 0.01
    want = torch.cat([v / 5 for v in free.centroids.values()])  # the plain mean of the rows: p is added back
    assert ((draws.double().mean(0) - want).abs() < 5 * g.centroid_noise_std / 5 / math.sqrt(50) + 1e-6).all()


def test_a_public_centre_needs_two_public_examples(tok, adapters):
    from seqr.silo.private import public_clip

    model = tiny_chat_llama(len(tok))
    with pytest.raises(BadValue, match="at least 2 public examples, got 1"):
        public_clip(model, tok, adapters / "alpha", _examples(1), centroids=True, progress=False)
    assert public_clip(model, tok, adapters / "alpha", _examples(1), progress=False).centroid_clip is None


def test_a_dir_that_already_holds_stats_is_calibrated_on_raw_norms_again(tok, adapters, tmp_path):
    from peft_factory import make_adapter

    make_adapter(tmp_path / "gamma", seed=3, base=tiny_chat_llama(len(tok)))
    model, exs = tiny_chat_llama(len(tok)), _examples(4)
    first = calibrate(model, tok, tmp_path / "gamma", exs, progress=False)
    assert calibrate(model, tok, tmp_path / "gamma", exs, progress=False) == first  # not the z-scores of the first
    sums = dp_sums(model, tok, tmp_path / "gamma", exs, 1e9, progress=False)
    for layer, s in first.items():  # with equal weights per token, the same mean (examples differ in length)
        assert float(s.mean) == pytest.approx(float(sums.stats[layer][0]) / 4, rel=0.2)


# ------------------------------------------------------------------------------ (c) the released statistics
def test_released_means_and_stds_over_many_seeded_runs_match_the_mechanism():
    n, L, C = 1000, 3, 6.0
    g = torch.Generator().manual_seed(0)
    tokens = [torch.rand(int(torch.randint(3, 30, (), generator=g)), L, generator=g, dtype=torch.float64) + 0.5
              for _ in range(n)]  # per example: (T_e, L) token norms
    rows = torch.stack([torch.stack([t.mean(0), (t * t).mean(0)], -1).reshape(-1) for t in tokens])  # (n, 2L)
    assert torch.linalg.vector_norm(rows, dim=1).max() < C  # nothing clipped: the released stats are unbiased
    guarantee = DPConfig(4.0, D, clip=C).guarantee(n)
    s = guarantee.stats_noise_std / n  # noise std of each released mean
    # the reference: every example weighs the same, its tokens share that weight
    w = torch.cat([torch.full((len(t),), 1 / (n * len(t)), dtype=torch.float64) for t in tokens])  # (T,)
    x = torch.cat(tokens)  # (T, L)
    mu_ref = (w[:, None] * x).sum(0)  # (L,)
    var_ref = (w[:, None] * (x - mu_ref) ** 2).sum(0)  # (L,)
    total = clipped_sum(rows, C).reshape(L, 2)
    draws = [release_moments(total, guarantee, torch.Generator().manual_seed(i)) for i in range(2000)]
    mus = torch.stack([m for m, _ in draws])  # (2000, L)
    var = torch.stack([sd ** 2 for _, sd in draws])  # (2000, L)
    assert torch.all((mus.mean(0) - mu_ref).abs() < 4 * s / math.sqrt(2000))
    torch.testing.assert_close(mus.std(0), torch.full((L,), s, dtype=torch.float64), rtol=0.06, atol=0)
    assert torch.all((var.mean(0) - var_ref).abs() < 4 * var.std(0) / math.sqrt(2000))  # bias-corrected variance
    assert torch.all(var >= s * s)  # floored at the mean's own noise: z-scores stay finite


def test_a_std_below_the_noise_is_floored_at_the_noise_of_the_mean():
    g = DPConfig(E, D, clip=1.0).guarantee(10)
    total = torch.tensor([[5.0, 2.5]], dtype=torch.float64)  # mean 0.5, mean square 0.25: variance 0
    _, sd = release_moments(total, g, torch.Generator().manual_seed(0))
    assert float(sd.min()) >= g.std_floor > 0


# ------------------------------------------------------------------------------------------- (d) bad values
@pytest.mark.parametrize("kw,needle", [
    ({"epsilon": 0.0}, "epsilon must be a positive finite number, got 0.0"),
    ({"epsilon": -1.0}, "got -1.0"), ({"epsilon": float("nan")}, "got nan"), ({"epsilon": float("inf")}, "got inf"),
    ({"delta": 0.0}, "delta must be in (0, 1), got 0.0"), ({"delta": 1.0}, "got 1.0"), ({"delta": -0.5}, "got -0.5"),
    ({"clip": 0.0}, "clip C must be a positive finite number, got 0.0"), ({"clip": -2.0}, "got -2.0"),
    ({"centroid_clip": -1.0}, "centroid clip must be a positive finite number, got -1.0"),
    ({"accountant": "gdp"}, "unknown accountant 'gdp'")])
def test_bad_values_are_one_line_naming_the_value(kw, needle):
    with pytest.raises(BadValue) as e:
        DPConfig(**{"epsilon": E, "delta": D, "clip": 1.0, **kw})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_too_few_examples_or_no_clip_are_refused_naming_them():
    with pytest.raises(BadValue, match="at least 2 examples, got 1"):
        DPConfig(E, D, clip=1.0).guarantee(1)
    with pytest.raises(BadValue, match="needs a clip bound"):
        DPConfig(E, D).guarantee(10)
    with pytest.raises(BadValue, match="centroid clip bound C_c, got none"):
        DPConfig(E, D, clip=1.0).guarantee(10, centroids=True)


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    from tiny_chat import saved_model_and_library

    root = tmp_path_factory.mktemp("dpcli")
    model, _ = saved_model_and_library(root, ["alpha"])
    rows = [{"id": f"r{i}", "text": f"row {i}", "choices": ["no", "yes"], "label": i % 2} for i in range(4)]
    (root / "silo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["calibrate", "--model", str(model), "--adapter", str(root / "a" / "alpha"), "--task",
            str(root / "silo.jsonl")]


@pytest.mark.parametrize("extra,needle", [
    (["--dp-epsilon", "-1", "--dp-delta", "1e-5", "--dp-clip", "1", "--withhold-centroids"], "got -1.0"),
    (["--dp-epsilon", "0", "--dp-delta", "1e-5", "--dp-clip", "1", "--withhold-centroids"], "got 0.0"),
    (["--dp-epsilon", "1", "--dp-delta", "1.5", "--dp-clip", "1", "--withhold-centroids"], "got 1.5"),
    (["--dp-epsilon", "1", "--dp-delta", "0", "--dp-clip", "1", "--withhold-centroids"], "got 0.0"),
    (["--dp-epsilon", "1", "--dp-delta", "1e-5", "--dp-clip", "0", "--withhold-centroids"], "C must be a positive"),
    (["--dp-epsilon", "1", "--dp-delta", "1e-5", "--dp-clip", "-3", "--withhold-centroids"], "got -3.0"),
    (["--dp-epsilon", "1", "--dp-delta", "1e-5", "--dp-clip", "1", "--withhold-centroids", "--max-examples", "1"],
     "at least 2 examples, got 1"),
    (["--dp-epsilon", "1", "--dp-clip", "1"], "--dp-delta"),
    (["--dp-epsilon", "1", "--dp-delta", "1e-5"], "--dp-clip C and --dp-centroid-clip C_c"),
    (["--dp-clip", "1"], "--dp-clip needs --dp-epsilon"),
    (["--dp-epsilon", "1", "--dp-delta", "1e-5", "--dp-public", "SILO"], "is the silo's own task"),
    (["--dp-epsilon", "1", "--dp-delta", "1e-5", "--dp-public", "sst2", "--dp-public-examples", "1"],
     "--dp-public-examples must be at least 2 (centroids are clipped around the sample's mean row), got 1"),
    (["--dp-epsilon", "1", "--dp-delta", "1e-5", "--dp-public", "sst2", "--dp-public-examples", "0",
      "--withhold-centroids"], "--dp-public-examples must be a positive integer, got 0")])
def test_bad_values_at_the_cli_are_one_line_exit_2_before_the_model_loads(extra, needle, cli_files, no_model,
                                                                          capsys):
    argv = [cli_files[-1] if a == "SILO" else a for a in cli_files + extra]
    code, lines = run(argv, capsys)
    assert_one_line(code, lines, "calibrate", needle)


def test_the_public_rule_sets_c_to_the_largest_row_norm_of_the_public_sample(cli_files, capsys):
    from seqr.cli import main
    from seqr.silo.tasks import load_task
    from tiny_chat import chat_tokenizer

    public = cli_files[-1].replace("silo.jsonl", "public.jsonl")
    rows = [{"id": f"q{i}", "text": "public text " * (i + 1), "choices": ["no", "yes"], "label": i % 2}
            for i in range(3)]
    open(public, "w").write("".join(json.dumps(r) + "\n" for r in rows))
    argv = cli_files + ["--dp-epsilon", "2", "--dp-delta", "1e-5", "--dp-public", public, "--dtype", "float32"]
    assert main(argv) == 0
    g = Guarantee.from_dict(json.loads(capsys.readouterr().out)["privacy"])
    tok, adapter = chat_tokenizer(), cli_files[4]
    model = tiny_chat_llama(len(tok))  # the saved model's weights
    norms, crows = [], []
    for ex in load_task(public, "train"):  # reference: each public example alone through the non-DP path
        cent = {}
        st, _ = norm_stats(model, tok, adapter, [ex], progress=False, centroids=cent)
        norms.append(math.sqrt(sum(s.mean ** 2 + (s.var + s.mean ** 2) ** 2 for s in st.values())))
        crows.append(torch.cat([c.double() for c in cent.values()]))
    rows = torch.stack(crows)  # (3, sum n): C_c is the largest distance from their mean, the centre
    cc = float(torch.linalg.vector_norm(rows - rows.mean(0), dim=1).max())
    assert g.clip == pytest.approx(max(norms), rel=1e-5) and g.centroid_clip == pytest.approx(cc, rel=1e-4)
    assert cc < float(torch.linalg.vector_norm(rows, dim=1).max())  # centred: a smaller bound, less noise
    assert "3 public examples" in g.clip_rule and g.examples == 4 and g.epsilon == 2.0
    assert g.centroid_center == f"the mean of 3 public examples of {public}" and "around the mean" in g.describe()


def test_a_malformed_privacy_record_is_refused_naming_the_field():
    from seqr import NormStats

    good = DPConfig(E, D, clip=1.0).guarantee(10).to_dict()
    rec = {"count": 10, "mean": 1.0, "m2": 2.0}
    assert NormStats.from_dict({**rec, "privacy": good}).privacy == Guarantee.from_dict(good)
    with pytest.raises(ValueError, match="privacy record: epsilon must be a positive finite number, got -1"):
        NormStats.from_dict({**rec, "privacy": {**good, "epsilon": -1}})
    with pytest.raises(ValueError, match="privacy record has no field 'clip'"):
        NormStats.from_dict({**rec, "privacy": {k: v for k, v in good.items() if k != "clip"}})


# --------------------------------------------------------------------------------- (e) recorded and shown
def test_the_guarantee_survives_calibrate_library_save_load_info_and_the_service(tok, adapters, tmp_path, capsys):
    from seqr.silo.info import main as info_main

    model, exs = tiny_chat_llama(len(tok)), _examples(6)
    cfg = DPConfig(E, D, clip=5.0, centroid_clip=2.0, clip_rule="given (test)")
    stats = calibrate(model, tok, adapters / "alpha", exs, batch_size=4, progress=False, dp=cfg)
    calibrate(model, tok, adapters / "beta", exs, batch_size=4, progress=False)  # no DP
    g = next(iter(stats.values())).privacy
    assert g == cfg.guarantee(6, centroids=True) and all(s.privacy == g for s in stats.values())
    assert all(s.count == 6 and s.quantiles is None and s.std >= g.std_floor for s in stats.values())
    written = json.loads((adapters / "alpha" / files.STATS_FILE).read_text())
    assert written["privacy"] == g.to_dict() and written["tokens"] is None
    assert all(rec["privacy"] == g.to_dict() for rec in written["layers"].values())
    lib = LoraLibrary.from_peft({n: adapters / n for n in ("alpha", "beta")})
    assert lib.has_centroids and unguaranteed(lib) == ["beta"]
    lib.save(tmp_path / "lib")
    back = LoraLibrary.load(tmp_path / "lib")
    assert next(iter(back.stats("alpha").values())).privacy == g and unguaranteed(back) == ["beta"]
    assert back.bank(back.layers[0]).route(torch.randn(2, 3, back.meta.layers[back.layers[0]][1]), "seqr").shape \
        == (2, 3)  # a DP adapter routes like any other
    assert info_main([str(tmp_path / "lib"), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["adapter_stats"]}
    assert rows["alpha"]["privacy"] == g.to_dict() and rows["beta"]["privacy"] is None
    assert rows["alpha"]["examples"] == 6 and rows["alpha"]["tokens"] is None
    assert info_main([str(tmp_path / "lib")]) == 0
    text = capsys.readouterr().out
    assert "| alpha | yes |" in text and g.describe() in text and "dp-accounting 0.6" in text
    assert "| beta | yes |" in text and "without a privacy guarantee: beta" in text
    assert _served_listing(tok, back, tmp_path) == {
        "adapters": [{"name": "alpha", "calibrated": True, "privacy": g.to_dict()},
                     {"name": "beta", "calibrated": True, "privacy": None}], "without_privacy_guarantee": ["beta"]}


def _served_listing(tok, lib, tmp) -> dict:
    """GET /admin/adapters of a service over `lib` (admin key), and that a user key is refused."""
    from fastapi.testclient import TestClient

    from seqr.serve.auth import AuthStore
    from seqr.serve.engine import Engine
    from seqr.serve.server import ServeSettings, create_app

    path = tmp / "auth.json"
    path.write_text(json.dumps({"users": {"u": {"keys": ["sk-user-000001"], "adapters": ["alpha"]}},
                                "admin_keys": ["sk-admin-0001"]}))
    auth = AuthStore.load(path)
    engine = Engine(tiny_chat_llama(len(tok)), tok, lib)
    try:
        with TestClient(create_app(engine, auth, ServeSettings())) as c:
            assert c.get("/admin/adapters", headers={"Authorization": "Bearer sk-user-000001"}).status_code == 403
            r = c.get("/admin/adapters", headers={"Authorization": "Bearer sk-admin-0001"})
            assert r.status_code == 200
            return r.json()
    finally:
        engine.close()
