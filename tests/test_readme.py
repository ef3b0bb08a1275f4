"""README.md's and the docs pages' examples run as written after the README's first command, against the tiny chat model.

The first command's `seqr demo` runs with the tiny model and a tiny budget added; the later blocks are taken
from the README and docs/ under their headings and run unchanged except for the stated substitutions (the real
model's name -> the tiny model's dir, the shared task data -> tiny JSONL files, `.venv/bin/` -> this interpreter's
bin dir, port 8000 -> a free port). Each substitution must apply, so an edit that breaks a block, or moves it, fails
here. Every code block of README.md and docs/ is either run here (a block elsewhere with the very same code is the
same example: docs/getting-started.md repeats the README's) or says on the line above it why not
(`<!-- not run: REASON -->`: an experiment of hours, vLLM's own venv); `text` blocks are pictures, not code.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from seqr.silo.tasks import TASKS
from tiny_chat import save_chat_model, write_task_dir

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
DEMO_TASKS = ("sst2", "agnews", "mrpc")  # the quick profile's

# The blocks the tests below run: (file, nearest heading above it, language, index among that heading's blocks
# of that language).
RUN = {
    "demo": ("README.md", "seqr", "bash", 0),
    "python": ("README.md", "Use it from Python", "python", 0),
    "transformers": ("docs/getting-started.md", "Routed inference in a transformers model", "python", 0),
    "silo": ("README.md", "Use it from the command line", "bash", 0),
    "serve": ("README.md", "Use it as a service", "bash", 0),
    "curl": ("README.md", "Use it as a service", "bash", 1),
    "openai": ("README.md", "Use it as a service", "python", 0),
}


@dataclass(frozen=True)
class Block:
    file: str  # relative to the repository root
    heading: str
    lang: str
    code: str
    not_run: str | None  # the reason given in `<!-- not run: REASON -->` on the nearest non-blank line above


def doc_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def blocks_of(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, with the nearest `#` heading above it."""
    lines, out, heading, i = path.read_text().splitlines(keepends=True), [], "", 0
    rel = path.relative_to(ROOT).as_posix()
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            assert end is not None, f"{rel}:{i + 1}: a code fence that never closes"
            above = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
            m = re.fullmatch(r"<!-- not run: (.+?) -->", above)
            out.append(Block(rel, heading, line[3:].strip(), "".join(lines[i + 1:end]), m and m.group(1)))
            i = end + 1
            continue
        if m := re.match(r"#{1,6} (.*)", line):
            heading = m.group(1).strip()
        i += 1
    return out


def all_blocks() -> list[Block]:
    return [b for path in doc_files() for b in blocks_of(path)]


def block(name: str) -> str:
    file, heading, lang, index = RUN[name]
    found = [b for b in blocks_of(ROOT / file) if b.heading == heading and b.lang == lang]
    assert len(found) > index, f"{file} has no {lang} block #{index} under '{heading}'"
    assert found[index].not_run is None, f"{file}: the block '{heading}' #{index} is run here but marked not run"
    return found[index].code


def test_every_code_block_is_run_or_says_why():
    run = {block(name) for name in RUN}
    for b in all_blocks():
        assert b.lang, f"{b.file} under '{b.heading}': a code block without a language (`text` for a picture)"
        if b.lang != "text":
            assert b.code in run or b.not_run, (
                f"{b.file} under '{b.heading}': a {b.lang} block that no test runs; run it in tests/test_readme.py, "
                f"or say why not on the line above it: <!-- not run: REASON -->\n{b.code}")


def rows(task: str, split: str, n: int) -> list[dict]:
    """`n` random JSONL rows of the task's schema and labels."""
    rnd, words = random.Random(f"{task}-{split}"), "market team film rate plot vote goal price".split()
    labels = TASKS[task].labels
    return [{"id": f"{task}-{split}-{i}", "task": task, "text": " ".join(rnd.choices(words, k=rnd.randint(2, 8))),
             "text_pair": "the same claim" if TASKS[task].pair_label else None, "choices": list(labels),
             "label": rnd.randrange(len(labels))} for i in range(n)]


def substitute(code: str, subs: dict[str, str]) -> str:
    for old, new in subs.items():
        assert old in code, f"block no longer contains {old!r}:\n{code}"
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
    line = next(ln for ln in block("demo").splitlines() if "seqr demo" in ln)
    demo = substitute(line.split("&& ")[-1], {".venv/bin/": f"{BIN}/", "../shared/data/tasks": str(root / "data")})
    tiny = f" --model {root / 'tiny-model'} --max-train 6 --calib 4 --max-eval 4 --rank 2 --epochs 1"
    run(["bash", "-c", demo + tiny], root)
    assert all((root / "seqr-demo" / "adapters" / t).is_dir() for t in DEMO_TASKS)
    return root


@pytest.fixture(scope="module")
def silos(newcomer):
    """The silo commands run in the newcomer's dir: adapters/ and library/; returns their stdout."""
    code = substitute(block("silo"), {".venv/bin/": f"{BIN}/", "../shared/data/tasks": str(newcomer / "data"),
                                      "smollm2-135m-instruct": str(newcomer / "tiny-model")})
    return run(["bash", "-euo", "pipefail", "-c", code], newcomer).stdout


def exec_python(code: str, cwd: Path, monkeypatch, capsys, name: str = "README.md") -> str:
    monkeypatch.chdir(cwd)
    exec(compile(code, name, "exec"), {"__name__": "readme"})
    return capsys.readouterr().out


def test_python_examples_run_as_written(newcomer, monkeypatch, capsys):
    out = exec_python(block("python"), newcomer, monkeypatch, capsys)
    assert "Cost(method='seqr', N=1000" in out and "macs=64000" in out, out  # N r² MACs per token: seqr.costs
    import seqr

    lib = seqr.LoraLibrary.load(newcomer / "my-library")
    assert sorted(lib.names) == ["agnews", "sst2"]
    assert (newcomer / "exported" / "sst2" / "adapter_config.json").exists()
    code = substitute(block("transformers"),
                      {'seqr.load_model("smollm2-135m-instruct")': f'seqr.load_model("{newcomer / "tiny-model"}")'})
    out = exec_python(code, newcomer, monkeypatch, capsys, RUN["transformers"][0])
    assert "[0, 0]" in out, out  # tr.outside(...): no token of either row routed outside its set


def test_silo_commands_run_as_written(newcomer, silos):
    assert "sst2" in silos and "agnews" in silos, silos  # seqr info lists both adapters
    import seqr

    assert sorted(seqr.LoraLibrary.load(newcomer / "library").names) == ["agnews", "sst2"]


def test_service_examples_run_as_written(newcomer, silos, monkeypatch, capsys):
    """The serve block starts the service on the silo commands' library; the curl and openai blocks talk to it."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from seqr.bench.serve import free_port

    port, model = free_port(), str(newcomer / "tiny-model")
    serve = substitute(block("serve"), {".venv/bin/pip install -e '.[serve]'\n": "", ".venv/bin/": f"{BIN}/",
                                        "--port 8000": f"--port {port}", "smollm2-135m-instruct": model})
    client = {"localhost:8000": f"127.0.0.1:{port}", "smollm2-135m-instruct": model}
    with open(newcomer / "serve.log", "w+") as log:
        proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", serve], cwd=newcomer, stdout=log, stderr=log,
                                start_new_session=True)  # its own process group: bash and the server stop together
        try:
            end = time.monotonic() + 180
            while True:
                assert proc.poll() is None and time.monotonic() < end, f"seqr serve did not come up:\n{log_of(log)}"
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.3)
            r = json.loads(run(["bash", "-euo", "pipefail", "-c", substitute(block("curl"), client)], newcomer).stdout)
            assert r["object"] == "chat.completion" and r["choices"][0]["message"]["role"] == "assistant", r
            assert r["seqr"]["adapters"] == ["sst2"] and set(r["seqr"]["routing"]) <= {"sst2"}, r
            exec_python(substitute(block("openai"), client), newcomer, monkeypatch, capsys)  # streamed to the end
            auth = json.loads((newcomer / "auth.json").read_text())
            assert "sk-alice-1" not in json.dumps(auth), auth  # the server stored only the keys' hashes
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def log_of(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-3000:]
