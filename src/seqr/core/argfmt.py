"""The help format every `seqr` verb uses: each option's default is shown, unless its help already says it or
there is none to show."""
from __future__ import annotations

import argparse


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
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")
