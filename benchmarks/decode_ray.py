"""Decode cost per token on the local executor beside the Ray executor, measured side by side in one run.

`emulate.generate` on a seeded preset (float32, exact causal) with the same prompt, once on the
local executor (one torch thread) and once on a private Ray instance with P workers of one CPU
each, under each placement asked for; prints a markdown table of the measured time per output
token, the pair calls per token (counted where they ran), the KV bytes per worker, whether the
tokens agree, and the load average before and after.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/decode_ray.py [--tokens 4096] [-M 256] [--new 16]
        [--workers 2] [--placements sequence,layers] [--model tiny-llama]

Sized for about a minute at its defaults on this project's CPU machine (most of it Ray's start).
"""
from __future__ import annotations

import argparse
import os

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096, help="prompt length N")
    ap.add_argument("--block-size", "-M", type=int, default=256)
    ap.add_argument("--new", type=int, default=16, help="new tokens per run (the first comes from the prefill)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--placements", default="sequence,layers")
    ap.add_argument("--model", default="tiny-llama")
    args = ap.parse_args()

    import emulate

    prompt = np.random.default_rng(0).integers(0, 1024, args.tokens)
    common = {"max_new_tokens": args.new, "block_size": args.block_size, "attention": "causal", "ignore_eos": True}
    load_before = os.getloadavg()
    runs = [("local", emulate.generate(args.model, prompt, threads=1, **common))]
    for placement in args.placements.split(","):
        ray = emulate.Ray(workers=args.workers, placement=placement)
        runs.append((f"ray {placement}, {args.workers} workers", emulate.generate(args.model, prompt, executor=ray,
                                                                                  **common)))
    load_after = os.getloadavg()
    want = runs[0][1].tokens
    print(f"{args.model}, N = {args.tokens}, M = {args.block_size}, {args.new} new tokens, float32, exact causal; "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after\n")
    print("| executor | prefill s | ms per token | pair calls per token | KV MiB per worker | same tokens |")
    print("| --- | ---: | ---: | ---: | --- | --- |")
    for name, g in runs:
        s = g.stats
        per = ", ".join(f"{b / 2**20:.1f}" for b in s["kv_bytes_per_worker"])
        print(f"| {name} | {s['prefill_s']:.2f} | {1000 * s['time_per_output_token_s']:.2f} | "
              f"{s['decode_attention_calls_per_token']:.0f} | {per} | {g.tokens == want} |")


if __name__ == "__main__":
    main()
