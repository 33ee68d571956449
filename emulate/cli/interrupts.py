"""The `emulate` program's interrupt handlers (SIGINT, SIGTERM, SIGHUP), set before its modules load.

This module imports the standard library's signal basics alone: emulate/cli/__init__.py imports
it first, and, in the program's own process (the `emulate` script or `python -m emulate.cli`),
`hold_until_entry` sets handlers that only note a signal while the modules load; a handler that
raised there would end the process with a traceback from inside an import, before any code could
catch it. `entry` (emulate/cli/program.py) then answers a noted signal with its one line and exit
status, and sets `catch`'s handlers, which raise Interrupted where the program is, so every
`finally` cleans up.
"""
from __future__ import annotations

import itertools
import os
import signal
import sys

INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

received: list[int] = []  # the signals that arrived; Ray re-raises ours as a bare KeyboardInterrupt


def _note(signum, frame):
    received.append(signum)


def _raise(signum, frame):
    from emulate.errors import Interrupted

    for sig in INTERRUPTS:  # one interrupt is enough: let the clean-up it starts finish
        signal.signal(sig, signal.SIG_IGN)
    received.append(signum)
    raise Interrupted(signum)


def is_the_program() -> bool:
    """True in the `emulate` program's own process: the script (argv[0] is it) or `python -m
    emulate.cli`; not where emulate.cli is imported as a library (a test, a notebook)."""
    orig = getattr(sys, "orig_argv", [])
    as_module = any(a == "-m" and b == "emulate.cli" for a, b in itertools.pairwise(orig))
    return as_module or os.path.basename(sys.argv[0] if sys.argv else "").removesuffix(".exe") == "emulate"


def hold_until_entry() -> None:
    """In the program's process, note the interrupts that arrive while its modules load."""
    if is_the_program():
        for sig in INTERRUPTS:
            signal.signal(sig, _note)


def catch() -> dict:
    """Route the interrupts to a handler that raises Interrupted; the handlers they had before."""
    received.clear()
    return {sig: signal.signal(sig, _raise) for sig in INTERRUPTS}
