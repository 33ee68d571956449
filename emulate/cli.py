"""The `emulate` command: argparse, a call into the Python API (emulate/api.py), and print.

Every bad input is one line on stderr and exit 2 (the API's EmulateError); a verified run whose
error exceeds its tolerance exits 1; SIGINT, SIGTERM and SIGHUP clean up (temporary files, Ray
workers, a private Ray instance) and exit 128 + the signal's number with one line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading

from emulate.config import EmulateError, Interrupted

DESCRIPTION = """\
Run a long-context transformer forward as a task graph of small calls that each see at most
M tokens, in-process or on a Ray cluster, and measure it against the monolithic forward."""



def preset_names() -> str:
    from emulate.presets import FILE_PRESETS, PRESETS

    return ", ".join([*PRESETS, *FILE_PRESETS])


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line error contract: `emulate: error: ...`, exit code 2, no usage dump."""

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
    from emulate import __version__

    parser = Parser(prog="emulate", description=DESCRIPTION, formatter_class=Help, epilog=(
        "examples:\n"
        "  emulate run                                   the embedded default: SmolLM2-135M on real text, verified\n"
        "  emulate run --random-tokens 65536 -M 1024 --attention sliding --window 512 --json\n"
        "  emulate graph --random-tokens 2048 -M 256 -o graph.json\n"
        "  emulate theorems --max-tokens 256\n"
        f"\npresets: {preset_names()}; any Hugging Face checkpoint directory of llama, mistral, qwen2, gpt2 or bert\n"
        "`emulate COMMAND --help` lists a command's options."))
    parser.add_argument("--version", action="version", version=f"emulate {__version__}")
    sub = parser.add_subparsers(dest="command", title="commands")
    add_run_command(sub)
    add_graph_command(sub)
    add_trace_command(sub)
    add_plan_command(sub)
    add_theorems_command(sub)
    add_submit_command(sub)
    add_cluster_command(sub)
    return parser


# -- run --------------------------------------------------------------------------------------

def add_run_command(sub) -> None:
    from emulate.api import DEFAULT_BLOCK, DEFAULT_MODEL
    from emulate.io import DEFAULT_TEXT_NAME

    run = sub.add_parser(
        "run", formatter_class=Help, help="run the emulated forward (the embedded default with no options)",
        description="Run one forward as a task graph of small calls and print a summary. With no options: "
                    f"{DEFAULT_MODEL} on {DEFAULT_TEXT_NAME}, M = {DEFAULT_BLOCK}, verified.",
        epilog="examples:\n"
               "  emulate run\n"
               "  emulate run --model ./my-checkpoint --backend transformers --text 'Once upon a time' -M 64 --verify\n"
               "  emulate run --model tiny-mistral --random-tokens 16384 -M 1024 --dtype float64 --verify\n"
               "  emulate run --text 'Hello there' --output out.arrow --hidden\n"
               "  emulate run --executor ray --workers 2 --random-tokens 16384 -M 1024 --json\n"
               "  emulate run --oracle paper-stable --pack-heads --dtype float64 --random-tokens 512 -M 64 --verify\n"
               "exit status: 0 ok; 1 --verify found an error above the tolerance; 2 bad input; 130 interrupted")
    add_problem_options(run)
    run.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="the run's float type")
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the small calls run")
    run.add_argument("--backend", choices=("graph", "transformers"), default="graph",
                     help="graph: the task graph over emulate's own blocks (presets, checkpoints of llama, mistral, "
                          "qwen2, gpt2, bert, llama .gguf files); transformers: the checkpoint's own transformers model "
                          "(any family), each attention call cut into pair calls; --verify compares with sdpa")
    run.add_argument("--executor", choices=("local", "ray"), default="local",
                     help="local: in-process; ray: worker actors on a Ray cluster")
    run.add_argument("--threads", type=threads_option, default=None, metavar="N|auto",
                     help="threads of a local run: on CPU, calls run side by side on N workers of one torch thread "
                          "each, or auto for every core this process may use (default: torch's own, OMP_NUM_THREADS "
                          "or the cores)")
    run.add_argument("--output", "-o", default=None, help="write the outputs to this Arrow IPC file")
    run.add_argument("--hidden", action="store_true", help="add the final-norm hidden states to the output")
    run.add_argument("--trace", default=None, metavar="FILE",
                     help="write the executed schedule as Chrome trace-event JSON (draw it with `emulate trace`)")
    run.add_argument("--verify", action="store_true",
                     help="also run the monolithic forward and check the error (on by default for the embedded default)")
    run.add_argument("--tolerance", type=float, default=None,
                     help="the largest per-row relative error --verify accepts (default: 2e-5 for float32, 1e-10 "
                          "for float64; sampled attention and the raw paper oracle state their own)")
    run.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else there")
    add_quiet_option(run)
    oracle = run.add_argument_group("oracle: what runs each pair call")
    oracle.add_argument("--oracle", choices=("kernel", "paper", "paper-stable"), default="kernel",
                        help="kernel: block attention returning (output, lse); paper: the paper's literal constructions "
                             "on a small transformer of capacity M+1 (Lemma 3.1, Claim B.6, Thm 3.5, Thm 5.1, Sec. 5, "
                             "Thm 4.1); paper-stable: the same calls with the A call's scores shifted by a norm bound")
    oracle.add_argument("--pack-heads", type=pack_width, nargs="?", const="all", default=None, metavar="H'",
                        help="Lemma 3.3: run H' single-head instances side by side in one call (no value: all heads; "
                             "default 1)")
    ray = run.add_argument_group("Ray executor (with --executor ray)")
    ray.add_argument("--address", default=None, help="join a running cluster: auto or HOST:PORT (default "
                     "$RAY_ADDRESS, else a private local instance, stopped at the end)")
    ray.add_argument("--workers", type=int, default=None, help="worker actors (default: as many as the cluster fits)")
    ray.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs per worker; its torch threads (default 1)")
    ray.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per worker, with --device cuda (default 0)")
    ray.add_argument("--stall-timeout", type=float, default=None, metavar="S",
                     help="stop with an error when no task finishes for S seconds (default 600)")
    run.set_defaults(handler=cmd_run)


def add_problem_options(p: argparse.ArgumentParser) -> None:
    from emulate.api import DEFAULT_BLOCK, DEFAULT_MODEL, DEFAULT_TOKENS, IDS_MODEL

    p.add_argument("--model", default=None,
                   help=f"a preset ({preset_names()}), a Hugging Face checkpoint directory or a llama-family .gguf file "
                        f"(default {DEFAULT_MODEL} for text or no input, {IDS_MODEL} for token ids)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", default=None, help="token ids (.npy, .arrow, .parquet with column `token`) or text (.txt, .md)")
    src.add_argument("--text", default=None, help="text to tokenize (the checkpoint's tokenizer, or bytes for presets)")
    src.add_argument("--random-tokens", type=int, metavar="N", default=None,
                     help=f"N seeded random tokens (the default input of a model without a tokenizer: "
                          f"{DEFAULT_TOKENS}; with one, the default text)")
    p.add_argument("--seed", type=int, default=0, help="seeds random tokens and the sampled permutation")
    p.add_argument("--block-size", "-M", type=int, default=DEFAULT_BLOCK, help="M: the most tokens a small call sees")
    p.add_argument("--attention", default="auto",
                   help="auto (the model's own mask), full, causal, sliding, sink or sampled")
    p.add_argument("--window", type=int, default=None, help="sliding window r: query i sees keys i-r+1..i")
    p.add_argument("--sinks", type=int, default=None, help="attention sinks s: the first s tokens stay visible")


def add_quiet_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "-q", action="store_true",
                   help="no progress on stderr (shown by default: a bar on a terminal, a line every 10%% or 10 s "
                        "in logs for stages longer than 5 s)")


def threads_option(text: str) -> int | str:
    """--threads N (an integer) or auto."""
    return text if text == "auto" else int(text)


def pack_width(text: str) -> int | str:
    """--pack-heads H' (an integer), or "all" (what the option means with no value)."""
    return text if text == "all" else int(text)


def problem_keywords(args) -> dict:
    """The API keywords of the options shared by `run` and `graph`."""
    return dict(text=args.text, input=args.input, random_tokens=args.random_tokens, seed=args.seed,
                block_size=args.block_size, attention=args.attention, window=args.window, sinks=args.sinks)


def cmd_run(args) -> int:
    import emulate

    default_run = args.model is None and args.input is None and args.text is None and args.random_tokens is None
    progress = None if args.quiet else ProgressReport()
    stdout = JsonStdout() if args.json else None  # stdout carries the one JSON object, whatever Ray prints
    try:
        result = emulate.run(
            args.model, **problem_keywords(args), dtype=args.dtype, device=args.device, executor=args.executor,
            oracle=args.oracle, pack_heads=args.pack_heads, address=args.address, workers=args.workers,
            cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker, trace=args.trace,
            stall_timeout=args.stall_timeout, threads=args.threads, output=args.output, hidden=args.hidden,
            verify=args.verify or default_run, tolerance=args.tolerance, collect=False, backend=args.backend,
            progress=progress)
    except BaseException:
        if stdout is not None:
            stdout.restore()
        raise
    finally:
        if progress is not None:
            progress.close()
    s = result.stats
    if args.json:
        # NaN is not JSON: a non-finite error (a broken run) is printed as null, never as a bare NaN
        stdout.emit(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in s.items()},
                               allow_nan=False))
    else:
        print(human_summary(s))
    if s.get("verified") is False:
        print(f"emulate: verify failed: max_rel_err {s['max_rel_err']:.3e} is above the tolerance {s['tolerance']:.1e}"
              + ("" if math.isfinite(s["max_rel_err"]) else " (not a finite number)"), file=sys.stderr)
        return 1
    return 0


class JsonStdout:
    """Keeps file descriptor 1 for the one JSON object while the run lasts.

    Libraries write to fd 1 behind Python's back (Ray's log lines and C++ warnings), so during the
    run fd 1 points at stderr; the JSON line is written to the original stdout, which is then put
    back. Where stdout is not a file descriptor (a test's captured stream) nothing is redirected.
    """

    def __init__(self):
        self.saved = None
        try:
            fd = sys.stdout.fileno()
        except (AttributeError, OSError, ValueError):
            return
        if fd != 1:
            return
        sys.stdout.flush()
        self.saved = os.dup(1)
        os.dup2(2, 1)

    def restore(self) -> None:
        if self.saved is not None:
            sys.stdout.flush()
            os.dup2(self.saved, 1)
            os.close(self.saved)
            self.saved = None

    def emit(self, line: str) -> None:
        self.restore()
        print(line, flush=True)


class ProgressReport:
    """Progress of the long stages on stderr: a bar per stage where stderr is a terminal; in logs a
    plain line every 10% or 10 s once a stage has run for 5 s (quick runs stay quiet). --json
    governs stdout only; --quiet turns this off."""

    LABELS = {"graph": "building the graph (layers)", "forward": "forward (calls)", "reference": "monolithic reference (layers)"}
    QUIET_FOR_S, EVERY_S, EVERY_PERCENT = 5.0, 10.0, 10

    def __init__(self, terminal: bool | None = None):
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.stage, self.bar = None, None

    def __call__(self, stage: str, done: int, total: int) -> None:
        import time

        now = time.monotonic()
        if stage != self.stage:
            self.close()
            self.stage, self.start, self.last_line, self.last_percent = stage, now, now, 0
        label = self.LABELS.get(stage, stage)
        if self.terminal:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=label, file=sys.stderr, leave=False)
            self.bar.update(done - self.bar.n)
            return
        percent = 100 * done // max(total, 1)
        due = percent >= self.last_percent + self.EVERY_PERCENT or now - self.last_line >= self.EVERY_S or done == total
        if due and now - self.start >= self.QUIET_FOR_S:
            print(f"emulate: {label} {done}/{total} ({percent}%) after {now - self.start:.0f} s", file=sys.stderr,
                  flush=True)
            self.last_line, self.last_percent = now, percent

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def human_summary(s: dict) -> str:
    lines = [
        f"model      {s['model']} ({s['family']}): {s['layers']} layers, {s['heads']} heads ({s['kv_heads']} KV), {s['dtype']} on {s['device']}",
        f"input      {s['input']}: N = {s['tokens']} tokens in B = {s['blocks']} blocks of M = {s['block_size']}; attention {s['attention']}"
        + (f", window {s['window']}" if s["window"] else "") + (f", sinks {s['sinks']}" if s["sinks"] else ""),
        (f"graph      {s['graph_nodes']} nodes, {s['graph_edges']} edges, depth {s['graph_depth']}; "
         f"{s['attention_calls']} attention calls ({s['attention_calls_bound']} the bound allows), "
         f"{s['small_calls']} small calls, none longer than {s['max_call_tokens']} tokens")
        if s["graph_nodes"] is not None else
        (f"calls      {s['attention_calls']} attention calls ({s['attention_calls_bound']} the bound allows), none longer "
         f"than {s['max_call_tokens']} tokens; the rest of the model ran as transformers' own, over all N tokens"),
        f"forward    {s['forward_s']:.3f} s " + (f"with the {s['executor']} executor" if s["backend"] == "graph" else
                                                 "with the transformers backend")
        + (f" on {'/'.join(map(str, s['threads']))} thread{'s' if s['threads'] != [1] else ''}" if s.get("threads") else "")
        + f", {s['tokens_per_s']} tokens/s, peak RSS {s['peak_rss_mb']} MB",
    ]
    if s.get("perplexity") is not None:
        lines.append(f"next token perplexity {s['perplexity']:.3f} over the {s['tokens'] - 1} next-token predictions")
    if "reference_s" in s:
        verdict = "verified" if s["verified"] else "NOT verified"
        reference = "monolithic reference" if s["backend"] == "graph" else f"the same model under {s['reference']}"
        lines.append(f"verify     {reference} {s['reference_s']:.3f} s; max_rel_err {s['max_rel_err']:.3e}, "
                     f"max_abs_err {s['max_abs_err']:.3e}: {verdict} (tolerance {s['tolerance']:.0e})")
    if "output" in s:
        lines.append(f"output     {s['output']}")
    return "\n".join(lines)


# -- graph ------------------------------------------------------------------------------------

def add_graph_command(sub) -> None:
    from graphs.draw import MAX_NODES

    graph = sub.add_parser(
        "graph", formatter_class=Help, help="export or draw the logical task graph, and the pairs it computes",
        description="Compile the logical task graph of a forward (nothing runs) and write it: as data (json, dot) "
                    "or as a picture (svg, png, html), rendered in-process with no system binary. Beyond "
                    f"{MAX_NODES} nodes a picture collapses to one box per layer and kind; --layers and --blocks "
                    "draw part of the graph call by call. --coverage draws the B x B grid of (query block, key block) "
                    "pairs a layer computes, --compare several patterns side by side.",
        epilog="examples:\n  emulate graph --random-tokens 2048 -M 256 -o graph.svg\n"
               "  emulate graph --random-tokens 65536 -M 1024 --layers 0:1 --blocks 0:8 -o part.png\n"
               "  emulate graph --random-tokens 2048 -M 256 --attention sliding --window 300 -o g.html\n"
               "  emulate graph --random-tokens 4096 -M 256 --coverage pairs.png --compare full,causal,sliding,sink,sampled\n"
               "  emulate graph --shape llama3-8b --random-tokens 1048576 -M 4096 --attention causal   (counts only)\n"
               "  emulate graph --shape llama3-8b --random-tokens 1048576 -M 4096 --attention causal -o g.json\n"
               "With neither -o nor --coverage it prints the graph's counts (--json: as one object); JSON output is "
               "streamed node by node, so graphs of any size can be written.")
    add_problem_options(graph)
    add_graph_scale_options(graph)
    graph.add_argument("-o", "--output", default=None, help="file to write; its suffix gives the format")
    graph.add_argument("--format", choices=("svg", "png", "html", "dot", "json"), default=None,
                       help="what --output holds (default: from its suffix)")
    graph.add_argument("--layers", default=None, metavar="A:B", help="draw layers A to B-1 only (embed with layer 0, "
                       "head with the last)")
    graph.add_argument("--blocks", default=None, metavar="A:B", help="draw query blocks A to B-1 only")
    graph.add_argument("--coverage", default=None, metavar="FILE.png",
                       help="draw the (query block, key block) pairs layer 0 computes, shaded by mask, with the count "
                            "and the theorem's bound (.png or .svg)")
    graph.add_argument("--compare", default=None, metavar="P1,P2,...",
                       help="with --coverage: these patterns side by side for the same N and M (of full, causal, "
                            "sliding, sink, sampled; --window defaults to M and --sinks to 4 for them)")
    add_quiet_option(graph)
    graph.set_defaults(handler=cmd_graph)


def cmd_graph(args) -> int:
    import emulate
    from emulate.io import output_target

    if args.shape is not None:
        if args.model is not None:
            raise EmulateError("give --model or --shape, not both")
        args.model = args.shape
    if args.output is None and args.coverage is None:
        if args.format is not None:
            raise EmulateError("give -o FILE (the graph) or --coverage FILE (its pairs), or both")
        return print_graph_counts(args)
    if args.compare is not None and args.coverage is None:
        raise EmulateError("--compare draws with --coverage FILE")
    for path in (args.output, args.coverage):  # refused before the graph is built
        if path is not None:
            output_target(path)
    if args.output is not None and args.coverage is None and args.layers is None and args.blocks is None \
            and graph_format(args) == "json":
        return write_graph_json(args)
    progress = None if args.quiet else ProgressReport()
    try:
        if args.compare is not None:
            summary = emulate.draw_comparison(args.model, [p.strip() for p in args.compare.split(",") if p.strip()],
                                              args.coverage, **problem_keywords(args))
            print(f"wrote {args.coverage}: " + "; ".join(f"{name} {s['calls']} pair calls (bound {s['bound']})"
                                                         for name, s in summary.items()), file=sys.stderr)
            if args.output is None:
                return 0
        g = emulate.compile(args.model, **problem_keywords(args), progress=progress)
    finally:
        if progress is not None:
            progress.close()
    if args.coverage is not None and args.compare is None:
        s = emulate.draw_coverage(g, args.coverage)
        print(f"wrote {args.coverage}: {s['calls']} pair calls in layer 0 (bound {s['bound']})", file=sys.stderr)
    if args.output is not None:
        from graphs.draw import MAX_NODES

        d = emulate.draw(g, args.output, format=args.format, layers=args.layers, blocks=args.blocks)
        view = f", collapsed to one box per layer and kind past {MAX_NODES} nodes" if d.view == "collapsed" else ""
        print(f"wrote {args.output}: {d.nodes} nodes, {d.edges} edges as {d.format}{view}", file=sys.stderr)
    return 0


def add_graph_scale_options(graph: argparse.ArgumentParser) -> None:
    from emulate.shapes import SHAPES

    graph.add_argument("--shape", default=None, choices=tuple(SHAPES),
                       help="a published model shape instead of --model: its widths and layers, no weights")
    graph.add_argument("--json", action="store_true", help="without -o: print the counts as one JSON object")


def graph_format(args) -> str | None:
    from graphs.draw import DrawError, drawing_format

    try:
        return drawing_format(args.output, args.format)
    except DrawError as err:
        raise EmulateError(str(err)) from None


def print_graph_counts(args) -> int:
    """`emulate graph` with no output: the compact graph's counts, any N, in seconds."""
    import time

    import emulate
    from emulate.api import default_model

    t0 = time.perf_counter()
    g = emulate.compile(args.model, **problem_keywords(args), compact=True)
    c = {**g.counts(), "work_bytes": g.work_bytes()}
    spec = g.spec
    model = args.model or default_model(text=args.text, input=args.input, random_tokens=args.random_tokens)
    s = {"model": model, "tokens": spec.tokens, "block_size": spec.block_size,
         "blocks": g.blocks, "layers": spec.layers, "attention": sorted({p.describe() for p in spec.patterns}), **c,
         "compile_s": round(time.perf_counter() - t0, 3)}
    if args.json:
        print(json.dumps(s))
        return 0
    print(f"graph      {s['model']}: N = {s['tokens']} tokens in B = {s['blocks']} blocks of M = {s['block_size']}, "
          f"{s['layers']} layers, attention {', '.join(s['attention'])}\n"
          f"nodes      {s['graph_nodes']} ({', '.join(f'{v} {k}' for k, v in s['calls_by_kind'].items())}), "
          f"{s['graph_edges']} edges, depth {s['graph_depth']}\n"
          f"attention  {s['attention_calls']} pair calls ({s['attention_calls_bound']} the bound allows), none "
          f"longer than {s['max_call_tokens']} tokens\n"
          f"work       {s['work_flops']:.3e} FLOPs, span {s['span_flops']:.3e} FLOPs, {s['work_bytes']:.3e} bytes "
          f"touched; compiled and counted in {s['compile_s']} s")
    return 0


def write_graph_json(args) -> int:
    """-o FILE.json: the compact graph's nodes streamed to the file (graphs.export.write_json)."""
    import emulate
    from emulate.io import output_target
    from graphs.export import write_json
    from graphs.files import OutputError

    output_target(args.output)
    progress = None if args.quiet else ProgressReport()
    try:
        g = emulate.compile(args.model, **problem_keywords(args), compact=True)
        on_layer = None if progress is None else (lambda done, total: progress("graph", done, total))
        nodes, edges = write_json(g, args.output, on_layer)
    except OutputError as err:
        raise EmulateError(str(err)) from None
    finally:
        if progress is not None:
            progress.close()
    print(f"wrote {args.output}: {nodes} nodes, {edges} edges as json", file=sys.stderr)
    return 0


# -- trace --------------------------------------------------------------------------------------

def add_trace_command(sub) -> None:
    t = sub.add_parser("trace", formatter_class=Help, help="draw an executed schedule (a --trace file) as a Gantt chart",
                       description="Draw the schedule `emulate run --trace FILE` recorded (local or Ray executor): one "
                                   "row per worker, bars coloured by task kind, each worker's utilisation and the "
                                   "critical path marked.",
                       epilog="example:\n  emulate run --executor ray --workers 2 --random-tokens 16384 -M 1024 "
                              "--trace t.json\n  emulate trace t.json -o gantt.png")
    t.add_argument("trace", help="a Chrome trace-event JSON file written by `emulate run --trace`")
    t.add_argument("-o", "--output", required=True, help="the chart: .png, .svg or .html")
    t.set_defaults(handler=cmd_trace)


def cmd_trace(args) -> int:
    import emulate
    from emulate.io import output_target

    output_target(args.output)
    s = emulate.draw_trace(args.trace, args.output)
    busy = ", ".join(f"{u:.0%}" for u in s["utilisation"])
    print(f"wrote {args.output}: {s['bars']} tasks on {s['workers']} worker(s) (busy {busy}), makespan "
          f"{s['makespan_s']:.3f} s, critical path {s['critical_path_s']:.3f} s", file=sys.stderr)
    return 0


# -- plan ---------------------------------------------------------------------------------------

def add_plan_command(sub) -> None:
    from emulate.planner import DEVICES
    from emulate.shapes import SHAPES

    p = sub.add_parser(
        "plan", formatter_class=Help, help="predict a forward's time on P workers (nothing runs)",
        description="Compile the graph in compact form, group and place its tasks as the Ray executor would, and "
                    "schedule them on P simulated workers with a cost model (device FLOP/s and memory bandwidth, "
                    "link bandwidth and latency, per-task and per-call overheads, memory per worker). Prints the "
                    "predicted time, each worker's peak memory, the bytes moved, utilisation and the critical path. "
                    "The cpu device is measured on this machine once (a few seconds) and cached; docs/planner.md "
                    "explains the model.",
        epilog="examples:\n"
               "  emulate plan --random-tokens 16384 -M 1024 --workers 2\n"
               "  emulate plan --shape llama3-8b --tokens 1048576 -M 4096 --attention causal --workers 8 --device h100\n"
               "  emulate plan --shape llama3-405b --tokens 1048576 -M 4096 --attention causal --workers 16 "
               "--gpus-per-worker 8 --device h100 --json\n"
               "  emulate plan --shape llama3-8b --tokens 131072 -M 4096 --attention causal --device h200 --plot p.png")
    p.add_argument("--model", default=None, help=f"a preset ({preset_names()}) or a checkpoint directory "
                   "(default tiny-llama)")
    p.add_argument("--shape", default=None, choices=tuple(SHAPES), help="a published model shape instead of --model")
    p.add_argument("--tokens", "--random-tokens", dest="tokens", type=int, default=4096, metavar="N",
                   help="N, the tokens of the forward")
    p.add_argument("--block-size", "-M", type=int, default=256, help="M: the most tokens a small call sees")
    p.add_argument("--attention", default="auto", help="auto, full, causal, sliding, sink or sampled")
    p.add_argument("--window", type=int, default=None, help="sliding window r")
    p.add_argument("--sinks", type=int, default=None, help="attention sinks s")
    p.add_argument("--workers", type=int, default=1, help="P, the workers the tasks are placed on")
    p.add_argument("--device", choices=("cpu", *DEVICES), default="cpu",
                   help="cpu (this machine, measured) or a GPU from the datasheet table")
    p.add_argument("--gpus-per-worker", type=int, default=1, help="GPUs per worker, tensor parallel inside it")
    p.add_argument("--link-gbps", type=float, default=None,
                   help="each worker's network link in Gb/s (default 400 per GPU; 40 for cpu, Ray's object store)")
    p.add_argument("--executor", choices=("ray", "local"), default="ray",
                   help="ray: the physical plan with Ray's per-task cost; local: the in-process executor (1 worker)")
    p.add_argument("--calibrate", action="store_true", help="measure this machine's CPU again (about 10 s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw predicted time against workers and against N, exact causal beside an O(N/M) pattern")
    p.set_defaults(handler=cmd_plan)


def cmd_plan(args) -> int:
    from emulate.planner import predict

    if args.shape is not None and args.model is not None:
        raise EmulateError("give --model or --shape, not both")
    model = args.shape or args.model
    if args.plot:
        from graphs.coverage import DrawError, figure_format

        try:
            figure_format(args.plot)  # refused before any work
        except DrawError as err:
            raise EmulateError(str(err)) from None
    p = predict(model, args.tokens, block_size=args.block_size, attention=args.attention, window=args.window,
                sinks=args.sinks, workers=args.workers, device=args.device, gpus_per_worker=args.gpus_per_worker,
                link_gbps=args.link_gbps, calibrate=args.calibrate, executor=args.executor)
    if args.plot:
        from emulate.planner import plot_scaling

        plot_scaling(args.plot, model, args.tokens, block_size=args.block_size, workers=args.workers,
                     device=args.device, gpus_per_worker=args.gpus_per_worker, link_gbps=args.link_gbps,
                     window=args.window)
        print(f"wrote {args.plot}", file=sys.stderr)
    d = p.to_dict()
    if args.json:
        print(json.dumps(d))
        return 0
    path = d["critical_path"]
    shown = path if len(path) <= 6 else path[:3] + ["..."] + path[-2:]
    print(f"forward    {d['model']}, N = {d['tokens']} in {d['blocks']} blocks of M = {d['block_size']}, "
          f"{d['layers']} layers, attention {', '.join(d['attention'])}; {d['attention_calls']} attention calls in "
          f"{d['physical_tasks']} physical tasks\n"
          f"hardware   {d['workers']} worker(s) x {d['gpus_per_worker']} {d['device']} ({d['dtype']}), link "
          f"{d['link_gbps']:g} Gb/s, {d['executor']} executor\n"
          f"predicted  {d['predicted_s']:.4g} s; utilisation {d['utilisation']:.0%}; critical path "
          f"{d['critical_path_s']:.4g} s over {len(path)} tasks ({' > '.join(shown)})\n"
          f"memory     peak {d['peak_worker_memory_gb']:.3g} GB per worker (weights {d['weights_gb_per_worker']:.3g} GB)"
          + ("" if d["fits"] else ", MORE than the worker's devices hold") + f"; {d['bytes_moved'] / 1e9:.3g} GB moved "
          "between workers")
    return 0


# -- theorems ---------------------------------------------------------------------------------

def add_theorems_command(sub) -> None:
    t = sub.add_parser("theorems", formatter_class=Help,
                       help="measure each theorem's oracle calls and error against N/M (paper oracle)",
                       description="Run each result of the paper with the paper oracle (float64) at N = M, 2M, 4M, "
                                   "..., count the small transformer's invocations and set them beside the paper's count.",
                       epilog="examples:\n  emulate theorems\n  emulate theorems --max-tokens 1024 --results causal,sliding "
                              "--plot calls.png")
    t.add_argument("--max-tokens", type=int, default=512, metavar="N", help="largest N")
    t.add_argument("--block-size", "-M", type=int, default=32, help="M")
    t.add_argument("--window", type=int, default=None, help="sliding window r (default M/2)")
    t.add_argument("--sinks", type=int, default=4, help="sink tokens s")
    t.add_argument("--oracle", choices=("paper", "paper-stable"), default="paper", help="which paper oracle")
    t.add_argument("--pack-heads", type=pack_width, nargs="?", const="all", default=1, metavar="H'",
                   help="Lemma 3.3: H' single-head instances per call (no value: all heads)")
    t.add_argument("--results", default="full,causal,sampled,sliding,sink",
                   help="comma-separated subset of full,causal,sampled,sliding,sink")
    t.add_argument("--plot", metavar="FILE.png", default=None, help="log-log plot of invocations against N/M")
    t.add_argument("--json", action="store_true", help="print the rows as one JSON object")
    add_quiet_option(t)
    t.set_defaults(handler=cmd_theorems)


def cmd_theorems(args) -> int:
    from emulate.io import output_target
    from emulate.paper.theorems import plot, slopes, sweep, table

    if args.plot:
        output_target(args.plot)  # refused before the runs

    def report(row):  # progress on stderr, whatever stdout carries
        if not args.quiet:
            print(f"  {row['label']:<16} N = {row['tokens']:>6}: {row['invocations']:>7} invocations, "
                  f"max_rel_err {row['max_rel_err']:.1e} ({row['seconds']:.1f} s)", file=sys.stderr, flush=True)

    results = tuple(r.strip() for r in args.results.split(",") if r.strip())
    rows = sweep(args.block_size, args.max_tokens, args.window, args.sinks, args.oracle == "paper-stable",
                 args.pack_heads, results, on_row=report)
    window = args.block_size // 2 if args.window is None else args.window
    fitted = slopes(rows)
    if args.plot:
        plot(rows, args.plot, args.block_size)
    if args.json:
        print(json.dumps({"block_size": args.block_size, "window": window, "sinks": args.sinks, "oracle": args.oracle,
                          "rows": rows, "slopes": fitted}))
    else:
        print(f"paper oracle ({args.oracle}), float64, M = {args.block_size}, window r = {window}, sinks s = "
              f"{args.sinks}; capacity M+1 = {args.block_size + 1}")
        print(table(rows, fitted))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0


# -- Ray jobs and the local cluster -------------------------------------------------------------

def add_submit_command(sub) -> None:
    submit = sub.add_parser("submit", formatter_class=Help,
                            help="submit `emulate run ...` to a Ray cluster as a job (Ray Jobs API)",
                            description="Submit `emulate run ...` as a Ray job, follow its logs and exit with its "
                                        "status. A job server that is still starting its agent (\"No available "
                                        "agent\") is retried for up to 60 s.",
                            epilog="example:\n  emulate submit -- run --random-tokens 16384 -M 1024 --json")
    submit.add_argument("--address", default=None, help="the job server (default $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS "
                        "or http://127.0.0.1:8265)")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return without following the logs")
    submit.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- run <run options>")
    submit.set_defaults(handler=cmd_submit)


def cmd_submit(args) -> int:
    from cluster.jobs import submit  # lazy: Ray is imported only for Ray commands

    return submit(args.entrypoint, args.address, wait=not args.no_wait)


def add_cluster_command(sub) -> None:
    cluster = sub.add_parser("cluster", formatter_class=Help,
                             help="start or stop a local multi-node Ray cluster on this machine",
                             description="up: a head and K worker nodes on 127.0.0.1 with token authentication; "
                                         "returns once the Jobs API runs a job (at most 120 s), and stops "
                                         "everything it started when it fails. down: stops exactly that cluster. "
                                         "status: prints its state.",
                             epilog="example:\n  emulate cluster up --worker-nodes 2 && emulate submit -- run --json; "
                                    "emulate cluster down")
    cluster.add_argument("action", choices=("up", "down", "status"))
    cluster.add_argument("--worker-nodes", type=int, default=2, help="nodes besides the head")
    cluster.add_argument("--cpus-per-node", type=float, default=None, help="CPUs each node offers (default: this machine's)")
    cluster.add_argument("--port", type=int, default=6380, help="the head's GCS port")
    cluster.add_argument("--dashboard-port", type=int, default=8265, help="dashboard and job server port on 127.0.0.1")
    cluster.set_defaults(handler=cmd_cluster)


def cmd_cluster(args) -> int:
    from cluster import local

    if args.action == "down":
        return local.down()
    if args.action == "status":
        state = local.status()
        if state is None:
            print("no local cluster is up", file=sys.stderr)
            return 1
        print(json.dumps(state))
        return 0
    state = local.up(args.worker_nodes, args.cpus_per_node, args.port, args.dashboard_port)
    print(f"local Ray cluster up: head + {state['worker_nodes']} worker node(s), {state['cpus_per_node']:g} CPU each\n"
          f"  run on it:    emulate run --executor ray --address {state['address']} ...\n"
          f"  submit a job: emulate submit --address {state['dashboard']} -- run ...\n"
          f"  stop it:      emulate cluster down", file=sys.stderr)
    print(json.dumps(state))
    return 0


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


if __name__ == "__main__":
    entry()
