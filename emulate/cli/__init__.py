"""The `emulate` command line: a thin shell that parses options, calls the library (emulate/api.py)
and prints. pyproject.toml's script is `emulate.cli:entry`; `python -m emulate.cli` is the same
(emulate/cli/__main__.py).

    program.py   the top-level parser, exit statuses, signals (main, entry)
    parser.py    Parser (one-line errors, a command's options added when it is chosen) and Help
    options.py   options several commands share
    progress.py  ProgressReport: long stages' progress on stderr
    run.py       emulate run
    graph.py     emulate graph, emulate trace
    plan.py      emulate plan
    theorems.py  emulate theorems
    interrupts.py the program's signal handlers, set before anything else loads
    cluster/commands.py (the cluster package's): emulate submit, emulate cluster
"""
from __future__ import annotations

from emulate.cli.interrupts import hold_until_entry

hold_until_entry()  # first: a Ctrl-C while the modules below load is answered by entry(), in one line
from emulate.cli.program import entry, main
from emulate.cli.progress import ProgressReport

__all__ = ["ProgressReport", "entry", "main"]
