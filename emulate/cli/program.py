"""The `emulate` program: the top-level parser (each command module adds its subparser), the exit
statuses, and the signal handling around a command.

Every bad input is one line on stderr and exit 2 (the API's EmulateError); a verified run whose
error exceeds its tolerance exits 1; SIGINT, SIGTERM and SIGHUP clean up (temporary files, Ray
workers, a private Ray instance) and exit 128 + the signal's number with one line.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

from emulate.cli.generate import add_generate_command
from emulate.cli.graph import add_graph_command, add_trace_command
from emulate.cli.options import preset_names
from emulate.cli.parser import Help, Parser
from emulate.cli.plan import add_plan_command
from emulate.cli.run import add_run_command
from emulate.cli.theorems import add_theorems_command
from emulate.errors import EmulateError, Interrupted

DESCRIPTION = """\
Run a long-context transformer forward as a task graph of small calls that each see at most
M tokens, in-process or on a Ray cluster, and measure it against the monolithic forward."""

# The commands in the order `emulate --help` lists them; each adds its subparser. `submit` and
# `cluster` are the cluster package's (cluster/commands.py): they are named by "module:function" and
# resolved with importlib when the parser is built, because emulate never imports cluster, not even
# inside a function (graphs <- emulate <- cluster, docs/design.md; tests/test_layout.py checks it).
# emulate/runtime/registry.py finds the Ray executor (cluster/options.py) by the same device.
COMMANDS = (add_run_command, add_generate_command, add_graph_command, add_trace_command, add_plan_command, add_theorems_command,
            "cluster.commands:add_submit_command", "cluster.commands:add_cluster_command")

INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


_received: list[int] = []  # the signal behind an interrupt; Ray re-raises ours as a bare KeyboardInterrupt


def _interrupt(signum, frame):
    for sig in INTERRUPTS:  # one interrupt is enough: let the clean-up it starts finish
        signal.signal(sig, signal.SIG_IGN)
    _received.append(signum)
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status. Signal handlers are set for the call and restored."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        return _main(argv)
    _received.clear()
    before = {sig: signal.signal(sig, _interrupt) for sig in INTERRUPTS}
    try:
        return _main(argv)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help or --version (0), or a usage error already reported on one line (2)
        return stop.code if isinstance(stop.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.handler(args)
    except EmulateError as err:
        print(f"emulate: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        from graphs.files import remove_pending

        remove_pending()  # a temporary output the interrupt reached before its owner could remove it
        signum = getattr(err, "signum", None) or (_received[0] if _received else signal.SIGINT)
        print(f"emulate: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum


def build_parser() -> argparse.ArgumentParser:
    from emulate.version import version

    parser = Parser(prog="emulate", description=DESCRIPTION, formatter_class=Help, epilog=(
        "examples:\n"
        "  emulate run                                   the embedded default: SmolLM2-135M on real text, verified\n"
        "  emulate run --random-tokens 65536 -M 1024 --attention sliding --window 512 --json\n"
        "  emulate graph --random-tokens 2048 -M 256 -o graph.json\n"
        "  emulate theorems --max-tokens 256\n"
        f"\npresets: {preset_names()}; any Hugging Face checkpoint directory of llama, mistral, qwen2, gpt2 or bert\n"
        "`emulate COMMAND --help` lists a command's options."))
    parser.add_argument("--version", action="version", version=f"emulate {version()}")
    sub = parser.add_subparsers(dest="command", title="commands")
    for add_command in COMMANDS:
        if isinstance(add_command, str):
            module, _, function = add_command.partition(":")
            add_command = getattr(importlib.import_module(module), function)
        add_command(sub)
    return parser


def entry() -> None:
    """The `emulate` executable. After an interrupt the clean-up has run inside main(); the
    process then ends at once, skipping interpreter teardown, where Ray's native threads, cut
    short, can still crash (a segfault after the one line would turn 143 into 139)."""
    code = main()
    if code >= 128:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
