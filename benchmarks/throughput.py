"""Whole-forward throughput: the graph's FLOPs over forward_s, as a fraction of this machine's fp32 matmul rate.

The matmul rate is measured here, in this run, with torch's threads as the forward uses them (a
square fp32 product of --matmul-size, best of several), then each forward runs on tiny-llama
with the local executor; its FLOPs are the logical graph's own count (CompactGraph.counts,
work_flops: every node's matmuls and attention products). Prints a markdown table.

    .venv/bin/python benchmarks/throughput.py --tokens 16384,32768 --block-size 1024
"""
from __future__ import annotations

import argparse
import time

import torch

import emulate


def matmul_rate(size: int, seconds: float = 2.0) -> float:
    """Best FLOP/s of an fp32 [size x size] @ [size x size] product over about `seconds`."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="16384,32768")
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--attention", default="causal")
    ap.add_argument("--matmul-size", type=int, default=2048)
    args = ap.parse_args()
    model = emulate.load("tiny-llama")
    emulate.run(model, random_tokens=2048, block_size=args.block_size)  # warm-up: build the modules once
    peak = matmul_rate(args.matmul_size)
    print(f"fp32 matmul, {args.matmul_size}^3, torch threads {torch.get_num_threads()}: {peak / 1e9:.1f} GFLOP/s\n")
    print("| N | M | attention | forward_s | graph GFLOP | GFLOP/s | fraction of matmul |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n in map(int, args.tokens.split(",")):
        run = emulate.run(model, random_tokens=n, block_size=args.block_size, attention=args.attention, collect=False)
        flops = run.compact.counts()["work_flops"]
        rate = flops / run.stats["forward_s"]
        print(f"| {n} | {args.block_size} | {run.stats['attention']} | {run.stats['forward_s']:.2f} | {flops / 1e9:.0f} "
              f"| {rate / 1e9:.1f} | {rate / peak:.2f} |", flush=True)


if __name__ == "__main__":
    main()
