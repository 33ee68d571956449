"""The CLI reference (docs/cli.md), generated from the parser so it cannot go stale.

An MkDocs hook (mkdocs.yml `hooks:`): at build time it adds cli.md to the site's files, the help of
`emulate` and of every command and subcommand as `emulate ... --help` prints it. Run as a script it
prints the page: `python docs/gen_cli.py > cli.md`.

Commands add their options the first time their parser formats its help (emulate/cli/parser.py,
`Parser`), so the page asks each parser for its help before walking its subcommands.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDTH = "100"  # argparse wraps help at $COLUMNS: fixed, so the page does not depend on the terminal


def _commands(parser: argparse.ArgumentParser, path: list[str]):
    """(the command's words, its help text) for this parser and every subcommand under it, depth first."""
    text = parser.format_help()  # adds a lazily built command's options (and its subcommands) first
    yield path, text
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, [*path, name])


def render() -> str:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        from emulate.cli.program import build_parser

        pages = list(_commands(build_parser(), ["emulate"]))
    finally:
        if before is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = before
    lines = ["# CLI reference", "",
             "Generated from the parser when the site is built (`docs/gen_cli.py`): each section is what",
             "`emulate ... --help` prints. [The command line](usage.md) explains the options at length.", ""]
    for path, text in pages:
        if len(path) > 1:
            lines += [f"## `{' '.join(path)}`", ""]
        lines += ["```text", text.rstrip(), "```", ""]
    return "\n".join(lines)


def on_files(files, config):
    """MkDocs hook: add the generated cli.md to the site's files."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, "cli.md", content=render()))
    return files


if __name__ == "__main__":
    sys.stdout.write(render())
