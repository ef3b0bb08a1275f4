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
