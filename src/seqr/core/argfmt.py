"""What every `seqr` verb's command line shares: the help format (each option's default is shown, unless its help
already says it or there is none to show), one-line parser errors, and the user-error types the dispatcher
(`seqr.cli`) reports as one line naming the value, exit 2, never a traceback."""
from __future__ import annotations

import argparse
import difflib
import os


class UserError(Exception):
    """A mistake in what the user gave (a name, a path, a value), not a bug. Raise a subclass below (also the
    builtin type library callers catch) or one that adds UserError to its bases (seqr.hf.models.ModelLoadError);
    `seqr VERB` then says the message as one line, exit 2. Anything else escaping a verb keeps its traceback."""


class BadValue(UserError, ValueError):
    """A name or value that is not one of those allowed (an unknown task, a target module the model lacks)."""


class PathNotFound(UserError, FileNotFoundError):
    """A file or directory the user named that does not exist (a library, a data dir, an adapter dir)."""


def one_line(message: object) -> str:
    """A message on one line: every run of whitespace (newlines included) becomes one space."""
    return " ".join(str(message).split())


def unknown(what: str, got: str, known) -> str:
    """"unknown WHAT 'GOT'; did you mean 'X'?" with X the closest known name (difflib), else the known names."""
    known = list(known)
    close = difflib.get_close_matches(got, known, n=1)
    return f"unknown {what} {got!r}; " + (f"did you mean {close[0]!r}?" if close else f"choose from {', '.join(known)}")


def existing_dir(value: str) -> str:
    """An argparse `type`: the value unchanged when it names an existing directory, else one line naming it."""
    if not os.path.isdir(os.path.expanduser(value)):
        why = "is not a directory" if os.path.exists(os.path.expanduser(value)) else "does not exist"
        raise argparse.ArgumentTypeError(f"directory {value!r} {why}")
    return value


class Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Every `seqr` verb's parser: `Help`'s format, and any error, argparse's own or a verb's `p.error`, is one
    line naming the value (no usage block), exit 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")
