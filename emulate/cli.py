"""The `emulate` command: run a forward as a task graph of small calls, or export the graph."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from emulate.config import EmulateError
from emulate.paper.options import add_oracle_options, add_theorems_command, make_oracle, oracle_summary

DEFAULT_MODEL = "tiny-llama"
DEFAULT_TOKENS = 4096
DEFAULT_BLOCK = 256  # 16 blocks of the default input: enough for the block structure to matter


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0), or a usage error already reported on one line (2)
        return stop.code if isinstance(stop.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.handler(args)
    except EmulateError as err:
        print(f"emulate: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("emulate: interrupted", file=sys.stderr)
        return 130


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line error contract: `emulate: error: ...`, exit code 2, no usage dump."""

    def error(self, message: str):
        print(f"emulate: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="emulate", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the emulated forward (the embedded default with no options)")
    add_problem_options(run)
    run.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    run.add_argument("--executor", choices=("local", "ray"), default="local")
    run.add_argument("--output", "-o", help="write the outputs to this Arrow IPC file")
    run.add_argument("--hidden", action="store_true", help="add the final-norm hidden states to the output")
    run.add_argument("--verify", action="store_true", help="also run the monolithic forward and report the error")
    run.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else there")
    add_oracle_options(run)
    add_ray_options(run)
    run.set_defaults(handler=cmd_run)
    graph = sub.add_parser("graph", help="export the logical task graph")
    add_problem_options(graph)
    graph.add_argument("--format", choices=("json", "dot"), default="json")
    graph.add_argument("-o", "--output", required=True, help="file to write")
    graph.set_defaults(handler=cmd_graph, dtype="float32")
    add_theorems_command(sub)
    submit = sub.add_parser("submit", help="submit `emulate run ...` to a Ray cluster as a job (Ray Jobs API)")
    submit.add_argument("--address", default=None, help="the job server (default $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS "
                        "or http://127.0.0.1:8265)")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return without following the logs")
    submit.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- run <run options>")
    submit.set_defaults(handler=lambda a: _cluster_command("cluster.jobs", "cmd_submit", a))
    cluster = sub.add_parser("cluster", help="start or stop a local multi-node Ray cluster on this machine")
    cluster.add_argument("action", choices=("up", "down", "status"))
    cluster.add_argument("--worker-nodes", type=int, default=2, help="nodes besides the head (default 2)")
    cluster.add_argument("--cpus-per-node", type=float, default=None, help="CPUs each node offers (default: this machine's)")
    cluster.add_argument("--port", type=int, default=6380, help="the head's GCS port (default 6380)")
    cluster.add_argument("--dashboard-port", type=int, default=8265, help="dashboard and job server port on 127.0.0.1")
    cluster.set_defaults(handler=lambda a: _cluster_command("cluster.local", "cmd_cluster", a))
    return parser


def add_problem_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=f"preset name or Hugging Face checkpoint directory (default {DEFAULT_MODEL})")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", help="token ids (.npy, .arrow, .parquet with column `token`) or text (.txt)")
    src.add_argument("--text", help="text to tokenize")
    src.add_argument("--random-tokens", type=int, metavar="N", help="N seeded random tokens")
    p.add_argument("--seed", type=int, default=0, help="seeds random tokens and the sampled permutation")
    p.add_argument("--block-size", "-M", type=int, default=None, help=f"M: the most tokens a small call sees (default {DEFAULT_BLOCK})")
    p.add_argument("--attention", default="auto", help="auto|full|causal|sliding|sink|sampled")
    p.add_argument("--window", type=int, default=None, help="sliding window r: query i sees keys i-r+1..i")
    p.add_argument("--sinks", type=int, default=None, help="attention sinks s: the first s tokens stay visible")


def add_ray_options(p: argparse.ArgumentParser) -> None:
    ray = p.add_argument_group("Ray executor (--executor ray)")
    options = [
        ray.add_argument("--address", default=None, help="join a running cluster: auto or HOST:PORT (default "
                         "$RAY_ADDRESS, else a private local instance, stopped at the end)"),
        ray.add_argument("--workers", type=int, default=None,
                         help="worker actors (default: as many as the cluster fits)"),
        ray.add_argument("--cpus-per-worker", type=float, default=None,
                         help="CPUs per worker; its torch threads (default 1)"),
        ray.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per worker, with --device cuda"),
        ray.add_argument("--trace", default=None, metavar="FILE", help="write the schedule as Chrome trace-event JSON"),
        ray.add_argument("--stall-timeout", type=float, default=None, metavar="S",
                         help="stop with an error when no task finishes for S seconds (default 600)"),
    ]
    # every option of the group defaults to None, so a local run can tell which ones were given
    p.set_defaults(ray_options={o.dest: o.option_strings[0] for o in options})


def _cluster_command(module: str, name: str, args) -> int:
    """Reach cluster/ (and Ray) only when a Ray command is used."""
    import importlib

    return getattr(importlib.import_module(module), name)(args)


def load_problem(args):
    """Model, tokens and the compiled graph for `run` and `graph`; every bad input raises EmulateError."""
    import torch

    from emulate import loaders
    from emulate.forward import check_tokens, compile_forward, resolve_patterns
    from emulate.io import byte_tokens, random_tokens, read_text, read_tokens, tokenizer_tokens

    config, weights, tokenizer = loaders.load_model(args.model or DEFAULT_MODEL, args.seed)
    default_input = args.input is None and args.text is None and args.random_tokens is None
    if default_input:
        tokens = random_tokens(DEFAULT_TOKENS, config.vocab, args.seed)
    elif args.random_tokens is not None:
        tokens = random_tokens(args.random_tokens, config.vocab, args.seed)
    else:
        text = args.text
        if args.input is not None and Path(args.input).suffix.lower() in (".txt", ".text", ".md"):
            text = read_text(args.input)
        if text is None:
            tokens = read_tokens(args.input)
        else:
            tokens = tokenizer_tokens(tokenizer, text) if tokenizer is not None else byte_tokens(text)
    tokens_t = torch.from_numpy(np.ascontiguousarray(tokens))
    check_tokens(config, tokens_t)
    block = DEFAULT_BLOCK if args.block_size is None else args.block_size
    patterns = resolve_patterns(config, args.attention, args.window, args.sinks)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    graph = compile_forward(config, len(tokens), block, patterns, dtype, args.seed)
    return config, weights, tokens, patterns, dtype, graph


def cmd_graph(args) -> int:
    from emulate.io import atomic_write_text
    from graphs import counts, to_dot, to_json

    _, _, _, _, _, g = load_problem(args)
    atomic_write_text(args.output, to_json(g) if args.format == "json" else to_dot(g))
    c = counts(g)
    print(f"wrote {args.output}: {c['graph_nodes']} nodes, {c['graph_edges']} edges, "
          f"{c['attention_calls']} attention calls, depth {c['graph_depth']}", file=sys.stderr)
    return 0


def cmd_run(args) -> int:
    import torch

    from emulate.forward import Collected, new_model, row_errors
    from emulate.io import OutputWriter
    from emulate.memory import peak_rss_mb
    from emulate.ops import NodeRunner
    from emulate.reference import reference_forward
    from graphs import counts

    t_start = time.perf_counter()
    if args.executor == "local":
        # a Ray option on a local run would be silently ignored: the user meant something else
        named = [flag for dest, flag in args.ray_options.items() if getattr(args, dest) is not None]
        if named:
            raise EmulateError(f"{', '.join(named)} {'is a Ray option' if len(named) == 1 else 'are Ray options'}: "
                               "add --executor ray, or drop it for a local run")
    default_run = args.model is None and args.input is None and args.text is None and args.random_tokens is None
    if default_run:
        args.verify = True
    config, weights, tokens, patterns, dtype, g = load_problem(args)
    # Ray workers hold their own model on --device; the driver's copy only serves --verify, on CPU
    model = new_model(config, weights, dtype, args.device if args.executor == "local" else "cpu")
    tokens_t = torch.from_numpy(np.ascontiguousarray(tokens))
    c = counts(g)
    oracle = make_oracle(args, g)  # None: the kernel oracle
    writer = None
    if args.output:
        writer = OutputWriter(args.output, tokens, config.width, dtype, logprob=config.lm_head,
                              hidden=args.hidden or not config.lm_head,
                              metadata={"model": config.name, "block_size": g.graph["spec"]["block_size"],
                                        "attention": patterns[0].describe(), "dtype": args.dtype})
    collected = Collected() if args.verify else None
    extra: dict = {}
    try:
        t0 = time.perf_counter()
        if args.executor == "local":
            from emulate.executor import run_local
            runner = NodeRunner(model, tokens_t, g.graph, oracle=oracle)
            progress = _progress(len(g), len(tokens), args.json)
            blocks = run_local(g, runner, on_node=(lambda n: progress.update(1)) if progress else None)
        else:
            from cluster.executor import run_ray  # lazy: Ray is only imported when asked for
            blocks = run_ray(g, config, weights, tokens_t, dtype, args, extra)
            t0 = time.perf_counter()  # Ray's start-up and the workers' weight loading: extra's ray_setup_s
        for _, value in blocks:
            if writer is not None:
                writer.write(value)
            if collected is not None:
                collected.add(value)
        forward_s = time.perf_counter() - t0
        if writer is not None:
            writer.close()
            writer = None
    finally:
        if writer is not None:
            writer.abort()
    summary = {
        "model": config.name, "family": config.family, "layers": config.layers, "heads": config.heads,
        "kv_heads": config.kv_heads, "tokens": len(tokens), "block_size": g.graph["spec"]["block_size"],
        "blocks": g.graph["blocks"], "attention": _describe(patterns), "window": _window(patterns),
        "sinks": patterns[0].sinks, "oracle": getattr(args, "oracle", "kernel"), "dtype": args.dtype, "device": args.device,
        "executor": args.executor,
        **{k: c[k] for k in ("attention_calls", "attention_calls_per_layer", "attention_calls_bound", "small_calls",
                             "max_call_tokens", "graph_nodes", "graph_edges", "graph_depth")},
        "forward_s": round(forward_s, 4), **extra, **oracle_summary(oracle),
    }
    if args.verify:
        t1 = time.perf_counter()
        with torch.no_grad():
            ref = reference_forward(model, tokens_t, patterns)
        summary["reference_s"] = round(time.perf_counter() - t1, 4)
        got = collected.result()
        summary["max_abs_err"], summary["max_rel_err"] = row_errors(got["hidden"], ref["hidden"])
        if "logprob_next" in got:
            summary["max_logprob_err"] = float((got["logprob_next"].double() - ref["logprob_next"].double()).abs().max()) \
                if got["logprob_next"].numel() else 0.0
    if args.output:
        summary["output"] = args.output
    summary["wall_s"] = round(time.perf_counter() - t_start, 4)
    summary["tokens_per_s"] = round(len(tokens) / forward_s, 1) if forward_s > 0 else None
    summary["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if args.json:
        # NaN is not JSON: a non-finite error (a broken run) is printed as null, never as a bare NaN
        print(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in summary.items()}, allow_nan=False))
    else:
        print(human_summary(summary))
    return 0


def _describe(patterns) -> str:
    kinds = {p.kind for p in patterns}
    if len(kinds) == 1:
        return patterns[0].kind
    return "mixed(" + ",".join(p.kind for p in patterns) + ")"


def _window(patterns):
    windows = {p.window for p in patterns if p.window is not None}
    return windows.pop() if len(windows) == 1 else (sorted(windows) or None)


def _progress(total: int, tokens: int, quiet: bool):
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="node", file=sys.stderr, leave=False)


def human_summary(s: dict) -> str:
    lines = [
        f"model      {s['model']} ({s['family']}): {s['layers']} layers, {s['heads']} heads ({s['kv_heads']} KV), {s['dtype']} on {s['device']}",
        f"input      N = {s['tokens']} tokens in B = {s['blocks']} blocks of M = {s['block_size']}; attention {s['attention']}"
        + (f", window {s['window']}" if s["window"] else "") + (f", sinks {s['sinks']}" if s["sinks"] else ""),
        f"graph      {s['graph_nodes']} nodes, {s['graph_edges']} edges, depth {s['graph_depth']}; "
        f"{s['attention_calls']} attention calls ({s['attention_calls_bound']} the bound allows), "
        f"{s['small_calls']} small calls, none longer than {s['max_call_tokens']} tokens",
        f"forward    {s['forward_s']:.3f} s with the {s['executor']} executor, {s['tokens_per_s']} tokens/s, peak RSS {s['peak_rss_mb']} MB",
    ]
    if "reference_s" in s:
        lines.append(f"verify     monolithic reference {s['reference_s']:.3f} s; max_rel_err {s['max_rel_err']:.3e}, "
                     f"max_abs_err {s['max_abs_err']:.3e}")
    if "output" in s:
        lines.append(f"output     {s['output']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
