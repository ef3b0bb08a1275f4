"""MkDocs hook: the CLI reference page is rendered from the parsers themselves at build time.

`docs/cli.md` holds the marker below; every `seqr VERB --help` (each verb of `seqr.cli.VERBS`) and every
`seqr bench SUBCOMMAND --help` (`seqr.bench.cli.SUBCOMMANDS`) replaces it, as the installed package prints them, so
the page cannot drift from the code. A verb whose `--help` fails, or a missing marker, fails the build.
"""
from __future__ import annotations

import contextlib
import io
import os

MARKER = "<!-- cli-reference: generated from the parsers at build time -->"
WIDTH = "100"  # argparse wraps help to $COLUMNS: a fixed width keeps the page the same on every machine


def fail(message: str):
    from mkdocs.exceptions import PluginError  # here, so tests can import this file without MkDocs

    raise PluginError(message)


def commands() -> list[list[str]]:
    """Every command the page documents, as argv before `--help`: `seqr`, each verb, each bench subcommand."""
    from seqr.bench.cli import SUBCOMMANDS
    from seqr.cli import VERBS

    out = [[]]
    for verb in VERBS:
        out.append([verb])
        if verb == "bench":
            out += [["bench", sub] for sub in SUBCOMMANDS]
    return out


def anchor(argv: list[str]) -> str:
    """The heading id of a command's section: `seqr-bench-routing` (docs link to these)."""
    return "-".join(["seqr", *argv])


def help_text(argv: list[str]) -> str:
    """What `seqr ARGV` prints on stdout, which must exit 0 (`--help` exits through SystemExit(0))."""
    from seqr import cli

    out, old = io.StringIO(), os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        with contextlib.redirect_stdout(out):
            code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    if code not in (0, None):
        fail(f"`seqr {' '.join(argv)}` exited {code}: the CLI reference cannot be generated")
    return out.getvalue().rstrip() + "\n"


def summary(argv: list[str]) -> str:
    from seqr.bench.cli import SUBCOMMANDS
    from seqr.cli import VERBS

    if not argv:
        return "The dispatcher: `seqr VERB --help` shows a verb's options."
    text = VERBS[argv[0]][1] if len(argv) == 1 else SUBCOMMANDS[argv[1]][0]
    return text[0].upper() + text[1:].rstrip(".") + "."


def reference() -> str:
    parts = []
    for argv in commands():
        level = "###" if len(argv) > 1 else "##"
        title = " ".join(["seqr", *argv])
        parts.append(f"{level} `{title}` {{#{anchor(argv)}}}\n\n{summary(argv)}\n\n"
                     f"```text\n{help_text([*argv, '--help'])}```\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != "cli.md":
        return markdown
    if MARKER not in markdown:
        fail(f"docs/cli.md lost its marker {MARKER!r}: the generated CLI reference has nowhere to go")
    return markdown.replace(MARKER, reference())
