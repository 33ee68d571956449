"""`emulate generate`: its options, the call into the library's generate_iter (emulate/generation.py),
the new text streamed to stdout as it comes, and the summary (stderr, or one JSON object with --json).

Ctrl-C during generation prints what was generated so far and exits 130 (emulate/cli/program.py
turns the interrupt into the exit status)."""
from __future__ import annotations

import argparse
import json
import math
import sys

from emulate.cli.options import (
    add_problem_options,
    add_ray_options,
    problem_keywords,
    ray_keywords,
)
from emulate.cli.parser import Help


def add_generate_command(sub) -> None:
    sub.add_parser(
        "generate", formatter_class=Help, help="generate tokens after a prompt, decoding on the block KV cache",
        options=generate_options,
        epilog="examples:\n"
               "  emulate generate --text 'The quick brown fox' --max-new-tokens 16\n"
               "  emulate generate --model tiny-mistral --input prompt.npy --max-new-tokens 64 -M 128 --json\n"
               "  emulate generate --text 'Once upon a time' --temperature 0.8 --top-p 0.9 --seed 7\n"
               "  emulate generate --model tiny-llama --text 'abc' --max-new-tokens 8 --dtype float64 --verify\n"
               "  emulate generate --model tiny-llama --text 'abc' --stop-id 10 --stop-id 32\n"
               "  emulate generate --model tiny-llama --input prompt.npy -M 256 --executor ray --workers 2 --json\n"
               "exit status: 0 ok; 1 --verify found an error above the tolerance; 2 bad input; 130 interrupted")


def generate_options(g: argparse.ArgumentParser) -> None:
    """The description and options of `emulate generate`, added once the command is chosen (cli/parser.py)."""
    from emulate.runtime.registry import EXECUTORS, ORACLES

    g.description = ("Prefill the prompt as a task graph of small calls, keep each block's keys and values where "
                     "they were made, then generate: each new token attends every key block it may see in calls of "
                     "at most M keys, merged as the prefill merges. The new text goes to stdout as it comes.")
    add_problem_options(g, prompt=True)
    g.add_argument("--max-new-tokens", type=int, default=16,
                   help="the most tokens to generate (fewer when an end-of-sequence or stop id comes first)")
    g.add_argument("--allow-past-positions", action="store_true",
                   help="go past a RoPE model's declared context (max_position_embeddings; refused by default): "
                        "RoPE computes any position, the model was trained only up to it")
    g.add_argument("--ignore-eos", action="store_true",
                   help="go on past the model's end-of-sequence token (generation stops after it by default)")
    g.add_argument("--stop-id", type=int, action="append", default=None, metavar="ID",
                   help="also stop after this token id (kept in the output); may be given more than once")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sample from softmax(logits / T)")
    g.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens of probability >= P")
    g.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "float16"), default="float32",
                   help="the run's float type (16 bits: pair partials and merges in float32, docs/numerics.md)")
    g.add_argument("--executor", choices=EXECUTORS.names(), default=None,
                   help="where the prefill runs and the keys are kept: local (this process) or ray (each block's "
                        "keys on the worker that made them; the decode calls run there) (default: local)")
    g.add_argument("--oracle", choices=ORACLES.names(), default="kernel", help="what runs each pair call")
    g.add_argument("--verify", action="store_true",
                   help="also run the monolithic forward over prompt and new tokens and compare every step's logits")
    g.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else there")
    add_ray_options(g)
    g.set_defaults(handler=cmd_generate)


def cmd_generate(args) -> int:
    from emulate.generation import generate_iter

    stream = generate_iter(args.model, **problem_keywords(args, prompt=True), max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_p=args.top_p, dtype=args.dtype, executor=args.executor,
                           oracle=args.oracle, verify=args.verify, ignore_eos=args.ignore_eos, stop_ids=args.stop_id,
                           **ray_keywords(args),
                           allow_past_positions=args.allow_past_positions)
    shown: list[str] = []  # what stdout has of the new text (or ids, for a model without a tokenizer)
    try:
        for token in stream:
            if not args.json:
                piece = token.text if token.text is not None else f"{token.id} "
                sys.stdout.write(piece)
                sys.stdout.flush()
                shown.append(piece)
    except KeyboardInterrupt:
        so_far = stream.partial
        if args.json:
            print(json.dumps(clean(so_far.stats)), flush=True)
        else:
            # a token chosen just before the interrupt may not be on stdout yet: it goes out first
            whole = so_far.text if so_far.text is not None else "".join(f"{t} " for t in so_far.tokens)
            print(whole[len("".join(shown)):], flush=True)
            print(f"emulate: generated {len(so_far.tokens)} tokens before the interrupt: {so_far.tokens}",
                  file=sys.stderr)
        raise
    s = stream.result.stats
    if args.json:
        print(json.dumps(clean(s), allow_nan=False))
    else:
        print(flush=True)
        print(summary(s), file=sys.stderr)
    if s.get("verified") is False:
        print(f"emulate: verify failed: {verify_figures(s)}", file=sys.stderr)
        return 1
    return 0


def clean(stats: dict) -> dict:
    """NaN is not JSON: a non-finite figure is printed as null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in stats.items()}


STOPPED = {"eos": "after the end-of-sequence token", "stop_id": "after a stop id",
           "max_new_tokens": "at --max-new-tokens"}


def summary(s: dict) -> str:
    lines = [
        (f"generated  {s['new_tokens']} tokens after {s['prompt_tokens']} prompt tokens ({s['model']}, {s['dtype']}, "
         f"M = {s['block_size']}, attention {s['attention']}, {s['executor']} executor); stopped "
         f"{STOPPED.get(s['stopped'], s['stopped'])}"),
        (f"prefill    {s['prefill_s']:.3f} s ({s['prefill_calls']} calls); time to first token "
         f"{s['time_to_first_token_s']:.3f} s"),
    ]
    if s["decode_steps"]:
        lines.append(f"decode     {s['time_per_output_token_s'] * 1000:.2f} ms per token ({s['decode_tokens_per_s']} "
                     f"tokens/s), {s['decode_calls_per_token']} calls per token of which "
                     f"{s['decode_attention_calls_per_token']} attention; none longer than {s['max_call_tokens']} "
                     f"tokens")
    per = s.get("kv_bytes_per_worker") or []
    on = (f" on {len(per)} workers ({', '.join(f'{b / 2**20:.2f}' for b in per)} MiB)" if s["executor"] == "ray" else "")
    rebuilt = f"; rebuilt {s['kv_rebuilds']} time(s) after a worker died" if s.get("kv_rebuilds") else ""
    lines.append(f"KV cache   {s['kv_bytes'] / 2**20:.2f} MiB{on}{rebuilt}; peak RSS {s['peak_rss_mb']} MB")
    if "verified" in s:
        lines.append(f"verify     monolithic reference {s['reference_s']:.3f} s; {verify_figures(s)}: "
                     f"{'verified' if s['verified'] else 'NOT verified'}")
    return "\n".join(lines)


def verify_figures(s: dict) -> str:
    """The reference comparison in words: the logits' error against its tolerance (in 16 bits, the
    norm-wise error beside the same-dtype monolithic forward's, emulate/generation.py _compare)."""
    match = f", greedy tokens match: {s['reference_tokens_match']}" if "reference_tokens_match" in s else ""
    if "error_ratio" in s:
        return (f"logit error {s['logit_err']:.3e} against float64, {s['error_ratio']:.3f}x the monolithic "
                f"{s['dtype']} forward's {s['monolithic_logit_err']:.3e} (at most {s['error_ratio_bound']}x){match}")
    return f"max_logit_err {s['max_logit_err']:.3e} (tolerance {s['tolerance']:.0e}){match}"
