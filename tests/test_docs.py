"""The documentation: every relative link of README.md and docs/ resolves (file and anchor), the README stays a front
page, and the site builds with `mkdocs build --strict` where MkDocs is installed (`pip install -e '.[docs]'`; CI
builds it in its own step, after the default suite, so the default test venv needs no MkDocs)."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
# Pages that scripts and `seqr eval` write (their own folders under docs/results/, and the ten-task library's
# summary): checked for links like every page, but their wording belongs to the code that writes them.
GENERATED = {*DOCS.glob("results/*/**/*.md"), DOCS / "results/ten_task_library.md"}


def pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans, where a `](` is not a link."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def links(text: str) -> list[str]:
    """Targets of inline Markdown links and images: [text](target) and ![alt](target)."""
    return re.findall(r"\]\(([^)\s]+)\)", prose(text))


def slug(heading: str) -> str:
    """The anchor Python-Markdown's toc gives a heading (GitHub's agrees for headings without runs of `-` or
    punctuation); an explicit `{#id}` wins."""
    if m := re.search(r"\{#([\w-]+)\}\s*$", heading):
        return m.group(1)
    text = re.sub(r"[`*]", "", re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading))
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text).strip().lower())


def cli_hook():
    """docs/hooks/cli_reference.py, the build hook that writes the CLI reference into docs/cli.md."""
    spec = importlib.util.spec_from_file_location("cli_reference", DOCS / "hooks" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    found = {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}
    if path == DOCS / "cli.md":  # its sections are generated at build time, one per command
        hook = cli_hook()
        found |= {hook.anchor(argv) for argv in hook.commands()}
    return found


def test_every_relative_link_resolves_to_a_file_and_anchor():
    bad = []
    for page in pages():
        for target in links(page.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL, or an anchor on the same page (mkdocs --strict checks those)
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve()
            where = f"{page.relative_to(ROOT)}: {target}"
            if not dest.exists():
                bad.append(f"{where} (no such file)")
            elif page != README and not dest.is_relative_to(DOCS):
                bad.append(f"{where} (leaves docs/: the site cannot link it; name the path in code instead)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{where} (no heading with that anchor)")
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_the_readme_is_a_front_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 150, "README.md is the front page: detail goes to docs/"
    for page in [README, *(p for p in DOCS.rglob("*.md") if p not in GENERATED)]:
        found = re.findall(r"\bissues? \d+", page.read_text(), flags=re.I)
        assert not found, f"{page.relative_to(ROOT)} cites issue numbers {found}: say what, not which ticket"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None,
                    reason="MkDocs is not installed here (`.venv/bin/pip install -e '.[docs]'`); CI builds the site")
def test_the_site_builds_strict_with_the_cli_reference_from_the_parsers(tmp_path):
    from seqr.bench.cli import SUBCOMMANDS
    from seqr.cli import VERBS

    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    cli = (site / "cli" / "index.html").read_text()
    for argv in cli_hook().commands()[1:]:
        assert f"usage: seqr {' '.join(argv)} " in cli, f"the CLI reference lacks `seqr {' '.join(argv)} --help`"
    assert {a[0] for a in cli_hook().commands()[1:]} == set(VERBS) and all(
        ["bench", s] in cli_hook().commands() for s in SUBCOMMANDS)
    api = (site / "api" / "index.html").read_text()
    import seqr

    for name in seqr.__all__:
        assert f'id="seqr.{name}"' in api, f"the Python API page lacks seqr.{name}"
