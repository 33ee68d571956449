"""Options more than one command takes: the problem (`run`, `graph`, `generate`), --quiet (`run`, `graph`,
`theorems`), --pack-heads' type (`run`, `theorems`), and the preset names their help lists."""
from __future__ import annotations

import argparse


def preset_names() -> str:
    # emulate/models/presets.py imports torch only to make weights: the names cost nothing
    from emulate.models.presets import FILE_PRESETS, PRESETS

    return ", ".join([*PRESETS, *FILE_PRESETS])


def add_problem_options(p: argparse.ArgumentParser, prompt: bool = False) -> None:
    """The model, its input and how the forward is cut: `run` and `graph` (an input of any kind, random
    ids among them), and `generate` with prompt=True (a decoder's prompt, never random ids; its seed
    seeds the sampling, and its calls are read as keys against the cache)."""
    from emulate.problem import DEFAULT_BLOCK, DEFAULT_MODEL, DEFAULT_TOKENS, IDS_MODEL

    checkpoints = f"a preset ({preset_names()}), a Hugging Face checkpoint directory or a llama-family .gguf file"
    p.add_argument("--model", default=None,
                   help=f"{checkpoints}, of a decoder (default {DEFAULT_MODEL})" if prompt else
                        f"{checkpoints} (default {DEFAULT_MODEL} for text or no input, {IDS_MODEL} for token ids)")
    src = p.add_mutually_exclusive_group()
    if prompt:
        src.add_argument("--input", default=None, help="the prompt: token ids (.npy, .arrow, .parquet) or text (.txt, .md)")
        src.add_argument("--text", default=None, help="the prompt as text (the model's tokenizer, or bytes for presets)")
    else:
        src.add_argument("--input", default=None,
                         help="token ids (.npy, .arrow, .parquet with column `token`) or text (.txt, .md)")
        src.add_argument("--text", default=None, help="text to tokenize (the checkpoint's tokenizer, or bytes for presets)")
        src.add_argument("--random-tokens", type=int, metavar="N", default=None,
                         help=f"N seeded random tokens (the default input of a model without a tokenizer: "
                              f"{DEFAULT_TOKENS}; with one, the default text)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampling's random draws" if prompt else
                   "seeds random tokens and the sampled permutation")
    p.add_argument("--block-size", "-M", type=int, default=DEFAULT_BLOCK,
                   help=f"M: the most {'keys' if prompt else 'tokens'} a small call sees")
    p.add_argument("--attention", default="auto",
                   help="auto (the model's own mask), " + ("causal, sliding or sink" if prompt else
                                                            "full, causal, sliding, sink or sampled"))
    p.add_argument("--window", type=int, default=None, help="sliding window r: query i sees keys i-r+1..i")
    p.add_argument("--sinks", type=int, default=None, help="attention sinks s: the first s tokens stay visible")


def problem_keywords(args, prompt: bool = False) -> dict:
    """The API keywords of the options add_problem_options declared (with prompt=True: generate_iter's,
    whose text is its `prompt`)."""
    shared = {"input": args.input, "seed": args.seed, "block_size": args.block_size, "attention": args.attention,
              "window": args.window, "sinks": args.sinks}
    if prompt:
        return {"prompt": args.text, **shared}
    return {"text": args.text, "random_tokens": args.random_tokens, **shared}


def add_quiet_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "-q", action="store_true",
                   help="no progress on stderr (shown by default: a bar on a terminal, a line every 10%% or 10 s "
                        "in logs for stages longer than 5 s)")


def pack_width(text: str) -> int | str:
    """--pack-heads H' (an integer), or "all" (what the option means with no value)."""
    return text if text == "all" else int(text)


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    """The Ray executor's options, one group shared by `emulate run` and `emulate generate`
    (their values reach cluster/options.py's Ray through ray_keywords)."""
    ray = parser.add_argument_group("Ray executor (with --executor ray)")
    ray.add_argument("--address", default=None, help="join a running cluster: auto or HOST:PORT (default "
                     "$RAY_ADDRESS, else a private local instance, stopped at the end)")
    ray.add_argument("--workers", type=int, default=None, help="worker actors (default: as many as the cluster fits)")
    ray.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs per worker; its torch threads (default 1)")
    ray.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per worker, with --device cuda (default 0)")
    ray.add_argument("--stall-timeout", type=float, default=None, metavar="S",
                     help="stop with an error when no task finishes for S seconds (default 600)")
    ray.add_argument("--placement", choices=("sequence", "layers", "grid", "auto"), default=None,
                     help="sequence: every worker loads the whole model and runs every layer for its run of blocks "
                          "(default); layers: each worker owns a contiguous range of layers and loads only their "
                          "weights, blocks flowing through the workers as a pipeline; grid: P_layers x P_sequence "
                          "workers, a row per range of layers splitting its blocks; auto: the one the planner "
                          "predicts fastest among those that fit (named on stderr)")
    ray.add_argument("--grid", default=None, metavar="LxS",
                     help="the grid placement's shape, P_layers x P_sequence workers (default: the squarest, more "
                          "rows than columns, docs/cluster.md)")
    ray.add_argument("--worker-memory", type=int, default=None, metavar="BYTES",
                     help="the most one worker may hold; a placement that would need more is refused, naming one "
                          "that fits")


def ray_keywords(args) -> dict:
    """The keywords emulate.run and emulate.generate take for the Ray executor, from add_ray_options."""
    return {"address": args.address, "workers": args.workers, "cpus_per_worker": args.cpus_per_worker,
            "gpus_per_worker": args.gpus_per_worker, "stall_timeout": args.stall_timeout,
            "placement": args.placement, "worker_memory": args.worker_memory, "grid": args.grid}

