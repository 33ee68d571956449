"""Options more than one command takes: the problem (`run`, `graph`), --quiet (`run`, `graph`,
`theorems`), --pack-heads' type (`run`, `theorems`), and the preset names their help lists."""
from __future__ import annotations

import argparse


def preset_names() -> str:
    # emulate/models/presets.py imports torch only to make weights: the names cost nothing
    from emulate.models.presets import FILE_PRESETS, PRESETS

    return ", ".join([*PRESETS, *FILE_PRESETS])


def add_problem_options(p: argparse.ArgumentParser) -> None:
    from emulate.problem import DEFAULT_BLOCK, DEFAULT_MODEL, DEFAULT_TOKENS, IDS_MODEL

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


def problem_keywords(args) -> dict:
    """The API keywords of the options shared by `run` and `graph`."""
    return dict(text=args.text, input=args.input, random_tokens=args.random_tokens, seed=args.seed,
                block_size=args.block_size, attention=args.attention, window=args.window, sinks=args.sinks)


def add_quiet_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "-q", action="store_true",
                   help="no progress on stderr (shown by default: a bar on a terminal, a line every 10%% or 10 s "
                        "in logs for stages longer than 5 s)")


def pack_width(text: str) -> int | str:
    """--pack-heads H' (an integer), or "all" (what the option means with no value)."""
    return text if text == "all" else int(text)
