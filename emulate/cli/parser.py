"""The argparse classes every `emulate` command is built with: `Parser` (the one-line error
contract, and a command's options added only once that command is chosen) and `Help` (the help
formatter). emulate/cli/program.py builds the top-level parser; each command module
(emulate/cli/run.py, graph.py, plan.py, theorems.py, cluster/commands.py) adds its subparser.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line error contract: `emulate: error: ...`, exit code 2, no usage dump.

    A command's subparser may be given `options`, a function that adds its arguments, description
    and epilog; it runs the first time the subparser parses or formats its help. Those options name
    constants of heavy modules (emulate/problem.py imports torch, graphs/ networkx), so building the
    whole parser stays cheap: `emulate --version` and `emulate --help` import none of them.
    """

    def __init__(self, *args, options: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._options = options

    def _add_options(self) -> None:
        if self._options is not None:
            options, self._options = self._options, None
            options(self)

    def parse_known_args(self, args=None, namespace=None):
        self._add_options()  # argparse hands a chosen command's arguments to its subparser through this call
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._add_options()
        return super().format_usage()

    def format_help(self) -> str:
        self._add_options()
        return super().format_help()

    def error(self, message: str):
        print(f"emulate: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


class Help(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks and adds each option's default to its help, unless it says one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: {action.default})"
