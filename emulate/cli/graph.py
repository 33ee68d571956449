"""`emulate graph` (the logical task graph: its counts, its data streamed as JSON, or a picture, and
the pairs a layer computes) and `emulate trace` (an executed schedule as a Gantt chart): the
commands that compile or draw but run nothing. The drawing is emulate/pictures.py over graphs/pictures/."""
from __future__ import annotations

import argparse
import json
import sys

from emulate.cli.options import add_problem_options, add_quiet_option, problem_keywords
from emulate.cli.parser import Help
from emulate.cli.progress import ProgressReport
from emulate.errors import EmulateError

# -- graph ------------------------------------------------------------------------------------


def add_graph_command(sub) -> None:
    sub.add_parser(
        "graph", formatter_class=Help, help="export or draw the logical task graph, and the pairs it computes",
        options=graph_options,
        epilog="examples:\n  emulate graph --random-tokens 2048 -M 256 -o graph.svg\n"
               "  emulate graph --random-tokens 65536 -M 1024 --layers 0:1 --blocks 0:8 -o part.png\n"
               "  emulate graph --random-tokens 2048 -M 256 --attention sliding --window 300 -o g.html\n"
               "  emulate graph --random-tokens 4096 -M 256 --coverage pairs.png --compare full,causal,sliding,sink,sampled\n"
               "  emulate graph --shape llama3-8b --random-tokens 1048576 -M 4096 --attention causal   (counts only)\n"
               "  emulate graph --shape llama3-8b --random-tokens 1048576 -M 4096 --attention causal -o g.json\n"
               "  emulate graph --decode --random-tokens 4096 -M 512 -o step.svg      (one generation step's calls)\n"
               "With neither -o nor --coverage it prints the graph's counts (--json: as one object); JSON output is "
               "streamed node by node, so graphs of any size can be written.")


def graph_options(graph: argparse.ArgumentParser) -> None:
    """The description and options of `emulate graph`, added once the command is chosen (cli/parser.py, Parser)."""
    from graphs.pictures.draw import MAX_NODES

    graph.description = (
        "Compile the logical task graph of a forward (nothing runs) and write it: as data (json, dot) "
        "or as a picture (svg, png, html), rendered in-process with no system binary. Beyond "
        f"{MAX_NODES} nodes a picture collapses to one box per layer and kind; --layers and --blocks "
        "draw part of the graph call by call. --coverage draws the B x B grid of (query block, key block) "
        "pairs a layer computes, --compare several patterns side by side.")
    add_problem_options(graph)
    add_graph_scale_options(graph)
    graph.add_argument("-o", "--output", default=None, help="file to write; its suffix gives the format")
    graph.add_argument("--format", choices=("svg", "png", "html", "dot", "json"), default=None,
                       help="what --output holds (default: from its suffix)")
    graph.add_argument("--decode", action="store_true",
                       help="the calls of one generation step after the input instead (the token at position N, "
                            "emulate generate's decode): causal layers read every key block, a window O(1) of them")
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


def add_graph_scale_options(graph: argparse.ArgumentParser) -> None:
    from emulate.models.shapes import SHAPES

    graph.add_argument("--shape", default=None, choices=tuple(SHAPES),
                       help="a published model shape instead of --model: its widths and layers, no weights")
    graph.add_argument("--json", action="store_true", help="without -o: print the counts as one JSON object")


def cmd_graph(args) -> int:
    from emulate.api import compile as compile_graph
    from emulate.outputs import check_distinct, output_target
    from emulate.pictures import draw, draw_comparison, draw_coverage

    if args.shape is not None:
        if args.model is not None:
            raise EmulateError("give --model or --shape, not both")
        args.model = args.shape
    if args.decode:
        return decode_step_graph(args)
    if args.output is None and args.coverage is None:
        if args.format is not None:
            raise EmulateError("give -o FILE (the graph) or --coverage FILE (its pairs), or both")
        return print_graph_counts(args)
    if args.compare is not None and args.coverage is None:
        raise EmulateError("--compare draws with --coverage FILE")
    check_distinct(**{"-o": args.output, "--coverage": args.coverage})
    for path in (args.output, args.coverage):  # refused before the graph is built
        if path is not None:
            output_target(path)
    if args.output is not None and args.coverage is None and args.layers is None and args.blocks is None \
            and graph_format(args) == "json":
        return write_graph_json(args)
    progress = None if args.quiet else ProgressReport()
    try:
        if args.compare is not None:
            summary = draw_comparison(args.model, [p.strip() for p in args.compare.split(",") if p.strip()],
                                      args.coverage, **problem_keywords(args))
            print(f"wrote {args.coverage}: " + "; ".join(f"{name} {s['calls']} pair calls (bound {s['bound']})"
                                                         for name, s in summary.items()), file=sys.stderr)
            if args.output is None:
                return 0
        g = compile_graph(args.model, **problem_keywords(args), progress=progress)
    finally:
        if progress is not None:
            progress.close()
    if args.coverage is not None and args.compare is None:
        s = draw_coverage(g, args.coverage)
        print(f"wrote {args.coverage}: {s['calls']} pair calls in layer 0 (bound {s['bound']})", file=sys.stderr)
    if args.output is not None:
        from graphs.pictures.draw import MAX_NODES

        d = draw(g, args.output, format=args.format, layers=args.layers, blocks=args.blocks)
        view = f", collapsed to one box per layer and kind past {MAX_NODES} nodes" if d.view == "collapsed" else ""
        print(f"wrote {args.output}: {d.nodes} nodes, {d.edges} edges as {d.format}{view}", file=sys.stderr)
    return 0


def graph_format(args) -> str | None:
    from graphs.pictures.draw import DrawError, drawing_format

    try:
        return drawing_format(args.output, args.format)
    except DrawError as err:
        raise EmulateError(str(err)) from None


def print_graph_counts(args) -> int:
    """`emulate graph` with no output: the compact graph's counts, any N, in seconds."""
    import time

    from emulate.api import compile as compile_graph
    from emulate.problem import default_model

    t0 = time.perf_counter()
    g = compile_graph(args.model, **problem_keywords(args), compact=True)
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


def decode_step_graph(args) -> int:
    """--decode: one generation step's calls (emulate/generation.py, decode_step), counted or drawn."""
    from emulate.generation import decode_step
    from emulate.outputs import output_target
    from emulate.pictures import draw
    from graphs import NodeKind

    if args.coverage is not None:
        raise EmulateError("--coverage draws a forward's pairs; --decode draws one step with -o FILE")
    if args.output is not None:
        output_target(args.output)
    g = decode_step(args.model, **problem_keywords(args))
    spec = g.graph["spec"]
    position = g.graph["decode"]["position"]
    per_layer = [0] * len(spec["patterns"])
    widest = 0
    for _, a in g.nodes(data=True):
        if a["kind"] == NodeKind.ATTEND:
            per_layer[a["layer"]] += 1
            widest = max(widest, a["tokens"])
    s = {"position": position, "block_size": spec["block_size"], "calls": g.number_of_nodes(),
         "attention_calls": sum(per_layer), "attention_calls_per_layer": per_layer, "max_call_tokens": widest}
    if args.output is not None:
        d = draw(g, args.output, format=args.format, layers=args.layers, blocks=args.blocks)
        print(f"wrote {args.output}: {d.nodes} calls, {d.edges} edges as {d.format}", file=sys.stderr)
    elif args.json:
        print(json.dumps(s))
        return 0
    print(f"decode     the token at position {position}: {s['calls']} calls, {s['attention_calls']} of them pair calls "
          f"({', '.join(map(str, per_layer))} by layer), none of more than {widest} keys (M = {s['block_size']})",
          file=sys.stderr if args.output is not None else sys.stdout)
    return 0


def write_graph_json(args) -> int:
    """-o FILE.json: the compact graph's nodes streamed to the file (graphs.export.write_json)."""
    from emulate.api import compile as compile_graph
    from emulate.outputs import output_target
    from graphs.export import write_json
    from graphs.files import OutputError

    output_target(args.output)
    progress = None if args.quiet else ProgressReport()
    try:
        g = compile_graph(args.model, **problem_keywords(args), compact=True)
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
    from emulate.outputs import check_distinct, output_target
    from emulate.pictures import draw_trace

    check_distinct(trace=args.trace, **{"-o": args.output})
    output_target(args.output)
    s = draw_trace(args.trace, args.output)
    busy = ", ".join(f"{u:.0%}" for u in s["utilisation"])
    print(f"wrote {args.output}: {s['bars']} tasks on {s['workers']} worker(s) (busy {busy}), makespan "
          f"{s['makespan_s']:.3f} s, critical path {s['critical_path_s']:.3f} s", file=sys.stderr)
    return 0
