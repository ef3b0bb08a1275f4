"""README.md's examples run as written after its first command, against the tiny chat model.

The first command's `seqr demo` runs with the tiny model and a tiny budget added; the later blocks are taken
from the README under their headings and run unchanged except for the stated substitutions (the real model's
name -> the tiny model's dir, the shared task data -> tiny JSONL files, `.venv/bin/` -> this interpreter's
bin dir). Each substitution must apply, so a README edit that breaks a block, or moves it, fails here.
"""
from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from seqr.silo.tasks import TASKS
from tiny_chat import save_chat_model, write_task_dir

README = Path(__file__).resolve().parents[1] / "README.md"
BIN = Path(sys.executable).parent
DEMO_TASKS = ("sst2", "agnews", "mrpc")  # the quick profile's


def rows(task: str, split: str, n: int) -> list[dict]:
    """`n` random JSONL rows of the task's schema and labels."""
    rnd, words = random.Random(f"{task}-{split}"), "market team film rate plot vote goal price".split()
    labels = TASKS[task].labels
    return [{"id": f"{task}-{split}-{i}", "task": task, "text": " ".join(rnd.choices(words, k=rnd.randint(2, 8))),
             "text_pair": "the same claim" if TASKS[task].pair_label else None, "choices": list(labels),
             "label": rnd.randrange(len(labels))} for i in range(n)]


def readme_blocks() -> list[tuple[str, str, str]]:
    """(heading, language, code) of every fenced block, the heading being the nearest `#` line above it."""
    out, heading = [], ""
    for m in re.finditer(r"^(#{1,4} [^\n]*)$|^```(\w*)\n(.*?)^```$", README.read_text(), re.M | re.S):
        if m.group(1):
            heading = m.group(1).lstrip("# ").strip()
        else:
            out.append((heading, m.group(2), m.group(3)))
    return out


def block(heading: str, lang: str, index: int = 0) -> str:
    found = [code for h, lg, code in readme_blocks() if h == heading and lg == lang]
    assert len(found) > index, f"README has no {lang} block #{index} under '## {heading}'"
    return found[index]


def substitute(code: str, subs: dict[str, str]) -> str:
    for old, new in subs.items():
        assert old in code, f"README block no longer contains {old!r}:\n{code}"
        code = code.replace(old, new)
    return code


def run(cmd: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{cmd[:3]} exited {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory):
    """A working dir after README's first command: the demo run on the tiny model and tiny task files."""
    root = tmp_path_factory.mktemp("readme")
    save_chat_model(root / "tiny-model")
    write_task_dir(root / "data", rows, DEMO_TASKS)
    first = block("seqr", "bash")
    line = next(ln for ln in first.splitlines() if "seqr demo" in ln)
    demo = substitute(line.split("&& ")[-1], {".venv/bin/": f"{BIN}/", "../shared/data/tasks": str(root / "data")})
    tiny = f" --model {root / 'tiny-model'} --max-train 6 --calib 4 --max-eval 4 --rank 2 --epochs 1"
    run(["bash", "-c", demo + tiny], root)
    assert all((root / "seqr-demo" / "adapters" / t).is_dir() for t in DEMO_TASKS)
    return root


def exec_python(code: str, cwd: Path, monkeypatch, capsys) -> str:
    monkeypatch.chdir(cwd)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    return capsys.readouterr().out


def test_python_examples_run_as_written(newcomer, monkeypatch, capsys):
    out = exec_python(block("Use it from Python", "python"), newcomer, monkeypatch, capsys)
    assert "Cost(method='seqr', N=1000" in out and "macs=64000" in out, out  # N r² MACs per token: seqr.costs
    import seqr

    lib = seqr.LoraLibrary.load(newcomer / "my-library")
    assert sorted(lib.names) == ["agnews", "sst2"]
    assert (newcomer / "exported" / "sst2" / "adapter_config.json").exists()
    code = substitute(block("Routed inference in a transformers model", "python"),
                      {'seqr.load_model("smollm2-135m-instruct")': f'seqr.load_model("{newcomer / "tiny-model"}")'})
    out = exec_python(code, newcomer, monkeypatch, capsys)
    assert "[0, 0]" in out, out  # tr.outside(...): no token of either row routed outside its set


def test_silo_commands_run_as_written(newcomer):
    code = substitute(block("From silo data to a calibrated library", "bash"),
                      {".venv/bin/": f"{BIN}/", "../shared/data/tasks": str(newcomer / "data"),
                       "smollm2-135m-instruct": str(newcomer / "tiny-model")})
    r = run(["bash", "-euo", "pipefail", "-c", code], newcomer)
    assert "sst2" in r.stdout and "agnews" in r.stdout, r.stdout  # seqr info lists both adapters
    import seqr

    assert sorted(seqr.LoraLibrary.load(newcomer / "library").names) == ["agnews", "sst2"]
