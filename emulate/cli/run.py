"""`emulate run`: its options, the call into the library's run (emulate/api.py), and what it prints:
the human summary, or one JSON object on a stdout kept free of what libraries print (`JsonStdout`)."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from emulate.cli.options import (
    add_problem_options,
    add_quiet_option,
    add_ray_options,
    pack_width,
    problem_keywords,
    ray_keywords,
)
from emulate.cli.parser import Help
from emulate.cli.progress import ProgressReport


def add_run_command(sub) -> None:
    sub.add_parser(
        "run", formatter_class=Help, help="run the emulated forward (the embedded default with no options)",
        options=run_options,
        epilog="examples:\n"
               "  emulate run\n"
               "  emulate run --model ./my-checkpoint --backend transformers --text 'Once upon a time' -M 64 --verify\n"
               "  emulate run --model tiny-mistral --random-tokens 16384 -M 1024 --dtype float64 --verify\n"
               "  emulate run --text 'Hello there' --output out.arrow --hidden\n"
               "  emulate run --executor ray --workers 2 --random-tokens 16384 -M 1024 --json\n"
               "  emulate run --oracle paper-stable --pack-heads --dtype float64 --random-tokens 512 -M 64 --verify\n"
               "exit status: 0 ok; 1 --verify found an error above the tolerance; 2 bad input; 130 interrupted")


def run_options(run: argparse.ArgumentParser) -> None:
    """The description and options of `emulate run`, added once the command is chosen (cli/parser.py, Parser)."""
    from emulate.inputs import DEFAULT_TEXT_NAME
    from emulate.problem import DEFAULT_BLOCK, DEFAULT_MODEL
    from emulate.runtime.registry import EXECUTORS, ORACLES

    run.description = ("Run one forward as a task graph of small calls and print a summary. With no options: "
                       f"{DEFAULT_MODEL} on {DEFAULT_TEXT_NAME}, M = {DEFAULT_BLOCK}, verified.")
    add_problem_options(run)
    run.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "float16"), default="float32",
                     help="the run's float type (bfloat16, float16: partials and merges in float32, verified "
                          "against the monolithic forward in the same dtype)")
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the small calls run")
    run.add_argument("--backend", choices=("graph", "transformers"), default="graph",
                     help="graph: the task graph over emulate's own blocks (presets, checkpoints of llama, mistral, "
                          "qwen2, gpt2, bert, llama .gguf files); transformers: the checkpoint's own transformers model "
                          "(any family), each attention call cut into pair calls; --verify compares with sdpa")
    run.add_argument("--executor", choices=EXECUTORS.names(), default=None,
                     help="local: in-process; ray: worker actors on a Ray cluster; or any registered executor "
                          "(emulate.register_executor, or an 'emulate.executors' entry point) (default: local)")
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
                          "for float64; sampled attention and the raw paper oracle state their own; for bfloat16 and "
                          "float16 the ratio to the monolithic forward's own error, default 1.25)")
    run.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else there")
    add_quiet_option(run)
    oracle = run.add_argument_group("oracle: what runs each pair call")
    oracle.add_argument("--oracle", choices=ORACLES.names(), default="kernel",
                        help="kernel: block attention returning (output, lse); paper: the paper's literal constructions "
                             "on a small transformer of capacity M+1 (Lemma 3.1, Claim B.6, Thm 3.5, Thm 5.1, Sec. 5, "
                             "Thm 4.1); paper-stable: the same calls with the A call's scores shifted by a norm bound; "
                             "or any registered oracle (emulate.register_oracle, or an 'emulate.oracles' entry point)")
    oracle.add_argument("--pack-heads", type=pack_width, nargs="?", const="all", default=None, metavar="H'",
                        help="Lemma 3.3: run H' single-head instances side by side in one call (no value: all heads; "
                             "default 1)")
    add_ray_options(run)
    run.set_defaults(handler=cmd_run)


def threads_option(text: str) -> int | str:
    """--threads N (an integer) or auto."""
    return text if text == "auto" else int(text)


def cmd_run(args) -> int:
    from emulate.api import run

    default_run = args.model is None and args.input is None and args.text is None and args.random_tokens is None
    progress = None if args.quiet else ProgressReport()
    stdout = JsonStdout() if args.json else None  # stdout carries the one JSON object, whatever Ray prints
    try:
        result = run(
            args.model, **problem_keywords(args), dtype=args.dtype, device=args.device, executor=args.executor,
            oracle=args.oracle, pack_heads=args.pack_heads, **ray_keywords(args), trace=args.trace,
            threads=args.threads, output=args.output, hidden=args.hidden,
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
    if "kernel_note" in s:  # a 16-bit run on a GPU whose pair calls miss FlashAttention (kernels_cuda.kernel_note)
        lines.append(f"kernels    {s['kernel_note']}")
    if s.get("perplexity") is not None:
        lines.append(f"next token perplexity {s['perplexity']:.3f} over the {s['tokens'] - 1} next-token predictions")
    if "reference_s" in s:
        verdict = "verified" if s["verified"] else "NOT verified"
        reference = "monolithic reference" if s["backend"] == "graph" else f"the same model under {s['reference']}"
        lines.append(f"verify     {reference} {s['reference_s']:.3f} s; max_rel_err {s['max_rel_err']:.3e}, "
                     f"max_abs_err {s['max_abs_err']:.3e}: {verdict} (tolerance {s['tolerance']:.0e})")
        if "monolithic_rel_err" in s:  # a 16-bit run: the relative contract (docs/numerics.md)
            forwards = "monolithic forwards" if s["backend"] == "graph" else f"forwards under {s['reference']}"
            lines[-1] = (f"verify     float64 and {s['dtype']} {forwards} {s['reference_s']:.3f} s; against "
                         f"float64 norm-wise error {s['normwise_rel_err']:.3e}, the monolithic {s['dtype']} "
                         f"forward's {s['monolithic_normwise_rel_err']:.3e} (ratio {s['error_ratio']:.3f}, at most "
                         f"{s['error_ratio_bound']:g})"
                         + (f", perplexity gap {s['perplexity_gap']:.2e}" if "perplexity_gap" in s else "")
                         + f": {verdict}")
            # the worst rows' figures gate nothing: an extreme value, noisier than the norm-wise ratio
            lines.append(f"           worst row: max_rel_err {s['max_rel_err']:.3e}, the monolithic forward's "
                         f"{s['monolithic_rel_err']:.3e} (ratio {s['max_error_ratio']:.3f}, not gating)")
        if "reference_note" in s:
            lines.append(f"           {s['reference_note']}")
    if "output" in s:
        lines.append(f"output     {s['output']}")
    return "\n".join(lines)
