"""The `emulate` program: the top-level parser (each command module adds its subparser), the exit
statuses, and the signal handling around a command.

Every bad input is one line on stderr and exit 2 (the API's EmulateError); a verified run whose
error exceeds its tolerance exits 1; SIGINT, SIGTERM and SIGHUP clean up (temporary files, Ray
workers, a private Ray instance) and exit 128 + the signal's number with one line, wherever they
arrive: `entry` sets the handlers before anything else is imported (this module imports nothing
but the standard library's signal basics and emulate/errors.py; the commands' modules are imported
when the parser is built), and an interrupt while the parser is built or the options are read is
reported as one inside the command; one during the imports themselves is noted and answered
by `entry` (emulate/cli/interrupts.py).
"""
from __future__ import annotations

import os
import signal
import sys
import threading

from emulate.cli import interrupts
from emulate.errors import EmulateError, Interrupted

DESCRIPTION = """\
Run a long-context transformer forward as a task graph of small calls that each see at most
M tokens, in-process or on a Ray cluster, and measure it against the monolithic forward."""

# The commands in the order `emulate --help` lists them; each adds its subparser. `submit` and
# `cluster` are the cluster package's (cluster/commands.py): they are named by "module:function" and
# resolved with importlib when the parser is built, because emulate never imports cluster, not even
# inside a function (graphs <- emulate <- cluster, docs/design.md; tests/test_layout.py checks it).
# emulate/runtime/registry.py finds the Ray executor (cluster/options.py) by the same device.
# All are named by string so that importing this module is quick (entry's handlers come first).
COMMANDS = ("emulate.cli.run:add_run_command", "emulate.cli.generate:add_generate_command",
            "emulate.cli.graph:add_graph_command", "emulate.cli.graph:add_trace_command",
            "emulate.cli.plan:add_plan_command", "emulate.cli.theorems:add_theorems_command",
            "cluster.commands:add_submit_command", "cluster.commands:add_cluster_command")

def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status. Signal handlers are set for the call and restored."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        return _main(argv)
    before = interrupts.catch()
    try:
        return _main(argv)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _main(argv: list[str] | None) -> int:
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as stop:  # --help or --version (0), or a usage error already reported on one line (2)
            return stop.code if isinstance(stop.code, int) else 2
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        return args.handler(args)
    except EmulateError as err:
        print(f"emulate: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        return _interrupted(err)


def _interrupted(err: KeyboardInterrupt) -> int:
    """Clean up after an interrupt, say which signal it was, and return 128 + its number."""
    if threading.current_thread() is threading.main_thread():
        for sig in interrupts.INTERRUPTS:  # the clean-up below is not to be cut short by a second signal
            signal.signal(sig, signal.SIG_IGN)
    if "graphs.files" in sys.modules:  # nothing can be pending before that module is imported
        from graphs.files import remove_pending

        remove_pending()  # a temporary output the interrupt reached before its owner could remove it
    received = interrupts.received
    signum = getattr(err, "signum", None) or (received[0] if received else signal.SIGINT)
    print(f"emulate: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
    return 128 + signum


def build_parser():
    """The top-level argparse parser with every command's subparser."""
    import importlib

    from emulate.cli.options import preset_names
    from emulate.cli.parser import Help, Parser
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
    for name in COMMANDS:
        module, _, function = name.partition(":")
        getattr(importlib.import_module(module), function)(sub)
    return parser


def entry() -> None:
    """The `emulate` executable. The interrupt handlers are set first, so a signal during the
    imports and the parser's construction is one line and 128 + signum like any other. After an
    interrupt the clean-up has run inside main(); the process then ends at once, skipping
    interpreter teardown, where Ray's native threads, cut short, can still crash (a segfault after
    the one line would turn 143 into 139)."""
    held = list(interrupts.received)  # noted while the modules loaded (emulate/cli/interrupts.py)
    try:
        interrupts.catch()
        if held:
            raise Interrupted(held[0])
        code = main()
    except KeyboardInterrupt as err:  # between the handlers' setting and main's own guard
        code = _interrupted(err)
    if code >= 128:
        for sig in interrupts.INTERRUPTS:  # main() restored the handlers; a second signal now would print a traceback
            signal.signal(sig, signal.SIG_IGN)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
