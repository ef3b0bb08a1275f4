"""What a newcomer meets at the command line: every option explained with its default, data mistakes answered with
one line and exit 2 before any model loads, output piped into `head` ending quietly."""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys

import pytest

from seqr.cli import VERBS


def _parsers(monkeypatch) -> dict[str, argparse.ArgumentParser]:
    """Every verb's parser (and `seqr bench`'s subcommands'), captured at parse time."""
    seen = {}

    def capture(self, args=None, namespace=None):
        seen[self.prog] = self
        for a in self._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sp in a.choices.values():
                    seen[sp.prog] = sp
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    for module, _ in VERBS.values():
        with pytest.raises(SystemExit):
            importlib.import_module(module).main(["--help"])
    return seen


def test_every_option_of_every_verb_has_help_and_shows_its_default(monkeypatch):
    parsers = _parsers(monkeypatch)
    assert {"seqr train", "seqr eval", "seqr serve", "seqr bench routing"} <= set(parsers)
    bare = {prog: [a.option_strings[-1] for a in p._actions if a.option_strings and a.dest != "help"
                   and not (a.help and a.help.strip())] for prog, p in parsers.items()}
    assert not {k: v for k, v in bare.items() if v}
    text = parsers["seqr train"].format_help()
    for shown in ("LoRA rank r (default: 32)", "LoRA alpha (scaling alpha / r) (default: 64)"):
        assert shown in " ".join(text.split())


@pytest.mark.parametrize("argv, needle", [
    (["train", "--model", "no-such-model", "--task", "nosuch", "--out", "x"], "unknown task 'nosuch'"),
    (["calibrate", "--model", "no-such-model", "--adapter", "ADAPTER", "--task", "nosuch"], "unknown task 'nosuch'"),
])
def test_a_wrong_task_is_one_line_and_exit_2_before_the_model_loads(argv, needle, tmp_path, monkeypatch, capsys):
    import seqr.hf.models

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the task was checked")

    monkeypatch.setattr(seqr.hf.models, "load_model", no_model)
    if argv[0] == "calibrate":
        (tmp_path / "adapter_model.safetensors").write_bytes(b"")
        argv = [str(tmp_path) if a == "ADAPTER" else a for a in argv]
    from seqr.cli import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and err[0].startswith(f"seqr {argv[0]}: error:")


def test_output_piped_into_head_ends_quietly(tmp_path):
    # a verb that prints 2 MB (far past a pipe's buffer) into `head -n 1`, through the real dispatcher
    (tmp_path / "chatty.py").write_text("def main(argv):\n    for _ in range(20000):\n        print('x' * 100)\n")
    code = "import sys; from seqr import cli; cli.VERBS['chatty'] = ('chatty', ''); sys.exit(cli.main(['chatty']))"
    p = subprocess.run(f"{sys.executable} -c \"{code}\" | head -n 1", shell=True, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert p.stdout == "x" * 100 + "\n" and p.stderr == ""


def _corrupt_library(tmp_path):
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "manifest.json").write_text("{ not json")
    return tmp_path / "corrupt"


@pytest.mark.parametrize("argv, needle", [
    (["info", "NOWHERE"], "NOWHERE"),
    (["info", "CORRUPT"], "CORRUPT"),
    (["build", "NOWHERE", "-o", "OUT"], "NOWHERE"),
    (["calibrate", "--model", "m", "--adapter", "NOWHERE", "--task", "sst2"], "NOWHERE"),
    (["eval", "--library", "NOWHERE", "--model", "m"], "NOWHERE"),
    (["eval", "--library", "CORRUPT", "--model", "m"], "CORRUPT"),
    (["serve", "NOWHERE", "--model", "m", "--auth", "OUT", "--port", "0"], "NOWHERE"),
    (["eval", "--replot", "--out", "NOWHERE"], "NOWHERE"),
    (["costs", "--N", "0"], "N must be positive, got 0"),
    (["train", "--task", "sst2", "--out", "OUT"], "the following arguments are required: --model"),
    (["bench", "routing", "--N", "x"], "invalid int value: 'x'"),
])
def test_a_bad_path_or_value_is_one_line_naming_it_and_exit_2(argv, needle, tmp_path, monkeypatch, capsys):
    import seqr.hf.models

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(seqr.hf.models, "load_model", no_model)
    subs = {"NOWHERE": str(tmp_path / "nowhere"), "CORRUPT": str(_corrupt_library(tmp_path)),
            "OUT": str(tmp_path / "out")}
    argv = [subs.get(a, a) for a in argv]
    from seqr.cli import main
    try:
        code = main(argv)  # a verb that says its own one line and returns 2
    except SystemExit as e:  # or its parser's error
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and subs.get(needle, needle) in err[0] and err[0].startswith(f"seqr {argv[0]}"), err
    assert not (tmp_path / "out").exists()
