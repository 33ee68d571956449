"""The errors every layer raises: one line for the user (EmulateError), and the interrupt that ends a run."""
from __future__ import annotations


class EmulateError(Exception):
    """Bad input or an impossible request: the CLI prints it as one line and exits non-zero."""


class Interrupted(KeyboardInterrupt):
    """A signal that ends the run (SIGINT, SIGTERM, SIGHUP): raised where the program is, so every
    `finally` cleans up; the CLI exits 128 + signum with one line."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def error_line(err: BaseException, last: bool = False) -> str:
    """One line of another library's error for our own message: its first non-empty line, or its
    last (Ray puts the cause of a task's failure at the end of a long traceback)."""
    lines = [s.strip() for s in str(err).strip().splitlines() if s.strip()]
    if not lines:
        return type(err).__name__
    return lines[-1] if last else lines[0]


class OptionError(EmulateError, TypeError):
    """A keyword the function does not take (a misspelling, say): a TypeError as Python's own, and
    one line for the CLI as every EmulateError."""
