"""Per-token decode cost against prompt length: exact causal grows as N / M calls, a window stays flat.

For each prompt length N, `emulate.generate` on a seeded preset (the local executor, float32,
one torch thread) with a few new tokens, once with exact causal attention and once with a
sliding window; prints a markdown table of the measured time per output token and the pair calls
per token (counted as they ran), and with --plot draws both against N.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/decode_cost.py [--tokens 1024,4096,16384] [-M 256]
        [--window 512] [--new 8] [--model tiny-llama] [--causal-max N] [--plot decode_cost.png]

--causal-max leaves exact causal out past N prompt tokens: its prefill grows as N^2 (a million
tokens of it is hours on a CPU), the window's as N.

Sized for about a minute at its defaults on this project's CPU machine.
"""
from __future__ import annotations

import argparse

import numpy as np


def measure(model: str, n: int, block_size: int, new: int, **attention) -> dict:
    import emulate

    prompt = np.random.default_rng(0).integers(0, 1024, n)
    s = emulate.generate(model, prompt, max_new_tokens=new, block_size=block_size, threads=1, **attention).stats
    return {"ms_per_token": 1000 * s["time_per_output_token_s"], "calls": s["decode_attention_calls_per_token"],
            "max_call_tokens": s["max_call_tokens"], "kv_mib": s["kv_bytes"] / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1024,4096,16384", help="prompt lengths, comma separated")
    ap.add_argument("--block-size", "-M", type=int, default=256)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--new", type=int, default=8, help="new tokens per run (the first comes from the prefill)")
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--causal-max", type=int, default=None, help="exact causal only up to this prompt length")
    ap.add_argument("--plot", default=None, help="draw ms per token against N to this image")
    args = ap.parse_args()
    ns = [int(x) for x in args.tokens.split(",")]
    modes = {"causal": {"attention": "causal"}, f"sliding r={args.window}": {"attention": "sliding",
                                                                            "window": args.window}}
    lengths = {mode: [n for n in ns if mode != "causal" or args.causal_max is None or n <= args.causal_max]
               for mode in modes}
    rows = {mode: [measure(args.model, n, args.block_size, args.new, **kw) for n in lengths[mode]]
            for mode, kw in modes.items()}
    print(f"{args.model}, M = {args.block_size}, {args.new} new tokens, float32, local executor, one thread\n")
    print("| prompt N | mode | ms per token | pair calls per token | max call tokens | KV MiB |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for mode, results in rows.items():
        for n, r in zip(lengths[mode], results):
            print(f"| {n} | {mode} | {r['ms_per_token']:.2f} | {r['calls']:.0f} | {r['max_call_tokens']} | "
                  f"{r['kv_mib']:.1f} |")
    if args.plot:
        draw({mode: (lengths[mode], [r["ms_per_token"] for r in rows[mode]]) for mode in modes}, args.plot,
             f"{args.model}, M = {args.block_size}: decode cost")
        print(f"\nplot: {args.plot}")


def draw(series: dict, path: str, title: str) -> None:
    """ms per output token against the prompt length, one line per mode: {mode: (lengths, ms)}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator

    from emulate.planner.plot import plain_log_axes

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for mode, (ns, ms) in series.items():
        ax.plot(ns, ms, marker="o", label=mode)
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_log_axes(ax)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0,)))  # powers of ten: the labels do not collide
    ax.set_xlabel("prompt tokens N")
    ax.set_ylabel("ms per output token")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)

if __name__ == "__main__":
    main()
