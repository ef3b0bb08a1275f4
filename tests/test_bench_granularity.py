"""`seqr bench granularity`: a --quick run's numbers are complete and consistent (never the speed), its checks pass
(a request-level mode routes each row to one adapter and then decodes exactly as the fixed-adapter path), and bad
input is a one-line error."""
from __future__ import annotations

import json
import statistics

import pytest

from seqr.bench.cli import main
from seqr.bench.granularity import MODES
from peft_factory import adapter_library


def test_granularity_quick_numbers_checks_and_files(tmp_path, capsys):
    out = tmp_path / "costs"
    assert main(["granularity", "--quick", "--threads", "1", "--repeats", "2", "--out", str(out)]) == 0
    data = json.loads((out / "granularity_costs.json").read_text())
    cfg = data["config"]
    assert (cfg["batch"], cfg["prompt"], cfg["new_tokens"], cfg["adapters"]) == ([1, 2], 8, 4, 4)
    assert [p["batch"] for p in data["points"]] == [1, 2]
    for p in data["points"]:
        res = p["results"]
        assert list(res) == list(MODES)
        for r in res.values():
            t = r["times_s"]
            assert r["runs"] == 2 == len(t["prefill_s"]) == len(t["decode_s"])
            assert r["prefill_ms_per_position"] == pytest.approx(1e3 * statistics.median(t["prefill_s"]) / 8)
            assert r["decode_ms_per_token"] == pytest.approx(1e3 * statistics.median(t["decode_s"]) / 4)
            for what, key in (("prefill", "prefill_ms_per_position"), ("decode", "decode_ms_per_token")):
                assert r[f"{what}_over_untouched"] == pytest.approx(r[key] / res["untouched"][key])
                assert r[f"{what}_over_token"] == pytest.approx(r[key] / res["token"][key])
        checks = p["checks"]
        assert set(checks) == {"request", "request@0.5", "request-vote", "untouched_unchanged"}
        assert all(c["ok"] for c in checks.values())
        for mode in ("request", "request@0.5", "request-vote"):  # one adapter per row, a real one
            assert len(checks[mode]["adapters"]) == p["batch"] and checks[mode]["one_adapter_per_row"]
    text = capsys.readouterr().out
    assert (out / "granularity_costs.md").read_text().strip() in text
    assert "| 2 | request@0.5 |" in text and "checks (untimed): batch 1 request ok" in text
    assert (out / "granularity_costs.png").stat().st_size > 1000


def test_granularity_some_modes_only(tmp_path, capsys):
    assert main(["granularity", "--quick", "--modes", "request,untouched,token", "--batch", "1", "--repeats", "1",
                 "--warmup", "0"]) == 0
    assert "| 1 | request |" in capsys.readouterr().out


@pytest.mark.parametrize("args,needle", [
    (["--modes", "token,sentence"], "unknown mode(s) ['sentence']"),
    (["--prompt", "0"], "'prompt': 0"),
    (["--repeats", "0"], "'repeats': 0"),
    (["--library", "/nonexistent/lib"], "--library /nonexistent/lib"),
])
def test_granularity_bad_args(args, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(["granularity", "--quick", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_granularity_library_of_another_model_is_one_line(tmp_path, capsys):
    lib = adapter_library(tmp_path / "adapters", ["a", "b"])  # made for the tests' tiny Llama, not --quick's
    lib.save(tmp_path / "lib")
    with pytest.raises(SystemExit) as e:
        main(["granularity", "--quick", "--library", str(tmp_path / "lib")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "does not match this model" in err and len(err.strip().splitlines()) <= 2
