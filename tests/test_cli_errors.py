"""Every bad input at the command line is one stderr line naming the value, exit 2, never a traceback (issue 34):
unknown names, models that cannot be loaded, paths that do not exist, a taken port, mistyped verbs. Only the
user-error types (seqr.core.argfmt.UserError) are caught at the top; a bug keeps its traceback."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from tiny_chat import saved_model_and_library

# what a verb may say on stderr before it fails: progress notes, not errors
PROGRESS = re.compile(r"seqr( \w+)?: (base model in |hashed \d+ plaintext)")
AUTH = {"users": {"alice": {"keys": ["sk-alice-0001"], "adapters": ["alpha"]}}, "admin_keys": ["sk-admin-0001"]}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model dir, a library, a (hashed) auth file and a JSONL task file: (dict of paths as str)."""
    from seqr.serve.auth import AuthStore

    root = tmp_path_factory.mktemp("cli")
    model, lib = saved_model_and_library(root, ["alpha", "beta"])
    (root / "auth.json").write_text(json.dumps(AUTH))
    AuthStore.load(root / "auth.json")  # hashes the keys now: no note about it in the tests' stderr
    rows = [{"id": f"r{i}", "text": f"row {i}", "choices": ["no", "yes"], "label": i % 2} for i in range(4)]
    (root / "silo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": str(model), "lib": str(lib), "auth": str(root / "auth.json"), "task": str(root / "silo.jsonl"),
            "nowhere": str(root / "nowhere")}


@pytest.fixture
def no_model(monkeypatch):
    import seqr.hf.models

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(seqr.hf.models, "load_model", refuse)


def run(argv: list[str], capsys) -> tuple[int, list[str]]:
    """`seqr ARGV` in this process: (exit status, the stderr lines that are not progress notes)."""
    from seqr.cli import main

    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # a parser's one-line error
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [ln for ln in err.splitlines() if not PROGRESS.match(ln)]


def assert_one_line(code: int, lines: list[str], verb: str, *needles: str) -> None:
    assert code == 2 and len(lines) == 1, (code, lines)
    assert lines[0].startswith(f"seqr {verb}"), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines)


def test_an_unknown_task_is_named_with_the_known_ones(files, no_model, capsys):
    code, lines = run(["eval", "--library", files["lib"], "--model", files["model"], "--tasks", "sst3"], capsys)
    assert_one_line(code, lines, "eval", "'sst3'", "known tasks:", "sst2", "agnews")


@pytest.mark.parametrize("verb", ["train", "serve", "serve --ray"])
def test_a_model_that_cannot_be_loaded_is_its_message_in_one_line(verb, files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub probe: the hub's answer is not what is tested
    argv = {"train": ["train", "--task", files["task"], "--out", str(tmp_path / "out")],
            "serve": ["serve", files["lib"], "--auth", files["auth"], "--port", "0"],
            "serve --ray": ["serve", files["lib"], "--auth", files["auth"], "--port", "0", "--ray"]}[verb]  # before Ray
    verb = verb.split()[0]
    code, lines = run(argv + ["--model", "no-such-model"], capsys)
    assert_one_line(code, lines, verb, "could not load a causal LM and tokenizer from 'no-such-model'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, needle", [
    (["eval", "--library", "LIB", "--model", "MODEL", "--data", "NOWHERE"], "argument --data: directory 'NOWHERE'"),
    (["eval", "--library", "LIB", "--model", "MODEL", "--tasks", "NOWHERE/t.jsonl"], "task file 'NOWHERE/t.jsonl'"),
    (["train", "--model", "MODEL", "--task", "sst2", "--out", "OUT", "--data", "NOWHERE"], "--data: directory"),
    (["calibrate", "--model", "MODEL", "--adapter", "LIB", "--task", "sst2", "--data", "NOWHERE"], "'NOWHERE'"),
    (["demo", "--out", "OUT", "--data", "NOWHERE"], "argument --data: directory 'NOWHERE' does not exist"),
    (["bench", "train", "--model", "MODEL", "--data", "NOWHERE"], "argument --data: directory 'NOWHERE'"),
    (["bench", "serve", "NOWHERE", "--model", "MODEL"], "NOWHERE holds no seqr library"),
    (["serve", "LIB", "--model", "MODEL", "--auth", "AUTH", "--adapters-root", "NOWHERE"],
     "argument --adapters-root: directory 'NOWHERE' does not exist"),
    (["serve", "LIB", "--model", "MODEL", "--auth", "AUTH", "--adapters-root", "AUTH"], "is not a directory"),
])
def test_a_path_that_does_not_exist_is_refused_naming_it(argv, needle, files, tmp_path, no_model, capsys):
    subs = {"LIB": files["lib"], "MODEL": files["model"], "AUTH": files["auth"], "NOWHERE": files["nowhere"],
            "OUT": str(tmp_path / "out")}

    def sub(text: str) -> str:  # the placeholders in upper case, by the paths they stand for
        return re.sub("|".join(subs), lambda m: subs[m.group()], text)

    code, lines = run([sub(a) for a in argv], capsys)
    assert_one_line(code, lines, argv[0], sub(needle))
    assert not (tmp_path / "out").exists()


def test_a_taken_port_is_one_line_before_the_model_loads_and_nothing_says_listening(files, no_model, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        code, lines = run(["serve", files["lib"], "--model", files["model"], "--auth", files["auth"],
                           "--port", port], capsys)
    assert_one_line(code, lines, "serve", f"cannot listen on 127.0.0.1:{port}", "--port " + port)
    assert "listening" not in lines[0]


def test_listening_is_said_once_the_socket_listens_on_the_port_it_names(files, monkeypatch, capsys):
    import seqr.serve.cli as serve_cli

    seen = {}

    def run_server(app, engine, sock):  # instead of uvicorn: what a client meets at that moment
        said = capsys.readouterr().err
        port = sock.getsockname()[1]
        seen["said"] = f"listening on http://127.0.0.1:{port}" in said
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # accepted into the backlog
        seen["connected"] = True

    monkeypatch.setattr(serve_cli, "_run", run_server)
    assert serve_cli.main([files["lib"], "--model", files["model"], "--auth", files["auth"], "--port", "0"]) == 0
    assert seen == {"said": True, "connected": True}


def test_a_mistyped_verb_suggests_the_closest_through_python_dash_m_seqr():
    r = subprocess.run([sys.executable, "-m", "seqr", "evl"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == ["seqr: unknown verb 'evl'; did you mean 'eval'?"]
    r = subprocess.run([sys.executable, "-m", "seqr", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "verbs:" in r.stdout


@pytest.mark.parametrize("argv, line", [
    (["xyzzy"], "seqr: unknown verb 'xyzzy'; choose from demo, train, calibrate, build, info, eval, serve, costs, "
                "bench"),
    (["bench", "rout"], "seqr bench: error: unknown subcommand 'rout'; did you mean 'routing'?"),
    (["bench", "genrate", "--quick"], "seqr bench: error: unknown subcommand 'genrate'; did you mean 'generate'?"),
])
def test_a_mistyped_verb_or_bench_subcommand_is_one_line(argv, line, capsys):
    code, lines = run(argv, capsys)
    assert code == 2 and lines == [line]


def test_the_model_error_of_seqr_train_end_to_end_is_one_line_without_chained_tracebacks(files, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "seqr", "train", "--model", "no-such-model", "--task", files["task"],
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300, env=env)
    lines = [ln for ln in r.stderr.splitlines() if not PROGRESS.match(ln)]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert_one_line(r.returncode, lines, "train", "'no-such-model'")


@pytest.mark.parametrize("error", ["BadValue", "PathNotFound", "ModelLoadError", "ValueError", "KeyError",
                                   "FileNotFoundError", "RuntimeError"])
def test_only_user_errors_are_one_line_and_a_bug_keeps_its_traceback(error, monkeypatch, capsys):
    import builtins

    from seqr import cli
    from seqr.core import argfmt
    from seqr.hf import models

    kind = next(getattr(m, error) for m in (argfmt, models, builtins) if hasattr(m, error))

    class Faulty:
        @staticmethod
        def main(argv):
            raise kind("value 'zz' is wrong,\n  said on two lines")

    monkeypatch.setitem(cli.VERBS, "faulty", ("faulty", ""))
    monkeypatch.setitem(sys.modules, "faulty", Faulty)
    if not issubclass(kind, argfmt.UserError):  # a bug: its traceback, not a tidy line that hides it
        with pytest.raises(kind):
            cli.main(["faulty"])
        return
    code, lines = run(["faulty"], capsys)
    assert lines == ["seqr faulty: value 'zz' is wrong, said on two lines"] and code == 2


def test_help_lists_every_bench_subcommand_and_the_demo_time_of_the_readme():
    from seqr.bench.cli import SUBCOMMANDS
    from seqr.cli import VERBS, usage

    assert all(name in VERBS["bench"][1] for name in SUBCOMMANDS)
    assert "8-14 min on 2 cores" in usage()


@pytest.mark.parametrize("extra, needle", [
    (["--granularity", "token", "--probe-depth", "0.5"], "--probe-depth must be in (0, 1] and needs --granularity "
                                                         "layers, request or request-vote; got 0.5 with "
                                                         "--granularity token"),
    (["--granularity", "request", "--probe-depth", "0"], "got 0.0 with --granularity request"),
    (["--granularity", "sentence"], "invalid choice: 'sentence'"),
    (["--enforce-eager"], "--enforce-eager applies to --engine vllm (the embedded engine never compiles)"),
])
def test_a_bad_routing_mode_of_seqr_serve_is_one_line_before_the_model_loads(extra, needle, files, no_model, capsys):
    code, lines = run(["serve", files["lib"], "--model", files["model"], "--auth", files["auth"], "--port", "0",
                       *extra], capsys)
    assert_one_line(code, lines, "serve", needle)


def test_a_probe_depth_for_a_router_whose_default_is_per_token_is_refused_before_the_model_loads(files, no_model):
    """Without --granularity the engine takes the router's default: request-level for seqr, per token for the
    others, where a probe depth means nothing."""
    from seqr.serve.server import make_engine
    from seqr.store.library import LoraLibrary

    lib = LoraLibrary.load(files["lib"])
    with pytest.raises(ValueError, match="probe_depth applies to the probing granularities .* not 'token'"):
        make_engine("embedded", files["model"], lib, method="arrow", max_batch=1, dtype="float32", max_model_len=64,
                    probe_depth=0.5)
