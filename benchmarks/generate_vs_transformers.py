"""Generation side by side with transformers' `generate`: SmolLM2-135M, same weights, threads and dtype.

For each prompt length N (real text, the embedded default repeated as needed), greedy, float32:

    emulate       emulate.generate(..., block_size=M) on the local executor: its measured
                  time_to_first_token_s, time_per_output_token_s and kv_bytes
    transformers  LlamaForCausalLM with the same (dequantized GGUF) weights (tests/hf_models.py,
                  as_transformers), sdpa, its dynamic cache: time to first token = generate with one
                  new token; time per output token = (generate with K new - with 1) / (K - 1); its
                  cache's bytes = 2 x layers x KV heads x head_dim x (N + K) x 4

and prints a markdown table with both, their ratios, and whether the greedy tokens agree.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/generate_vs_transformers.py [--tokens 1024,4096] [--new 16] [-M 512]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def prompt_ids(model, n: int) -> np.ndarray:
    from emulate.inputs import default_text

    ids = model.tokenize(default_text())
    return np.resize(ids, n)  # repeated past its end for long prompts


def hf_times(hf, ids: np.ndarray, new: int) -> tuple[float, float, list[int]]:
    x = torch.from_numpy(ids)[None]

    def run(k):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=k, min_new_tokens=k,
                              do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0, out[0, len(ids):].tolist()

    first, _ = run(1)
    whole, tokens = run(new)
    return first, (whole - first) / (new - 1), tokens


def main() -> None:
    from hf_models import as_transformers

    import emulate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1024,4096", help="prompt lengths, comma separated")
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--block-size", "-M", type=int, default=512)
    args = ap.parse_args()
    model = emulate.load("smollm2-135m")
    hf = as_transformers(model)
    c = model.config
    print(f"smollm2-135m, float32, greedy, {args.new} new tokens, M = {args.block_size}, "
          f"{torch.get_num_threads()} torch thread(s)\n")
    print("| prompt N | TTFT emulate s | TTFT transformers s | TPOT emulate ms | TPOT transformers ms | TPOT ratio | "
          "KV emulate MiB | KV transformers MiB | same tokens |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for n in (int(t) for t in args.tokens.split(",")):
        ids = prompt_ids(model, n)
        s = emulate.generate(model, ids, max_new_tokens=args.new, block_size=args.block_size, threads=1).stats
        first, per_token, tokens = hf_times(hf, ids, args.new)
        kv_hf = 2 * c.layers * c.kv_heads * c.head_dim * (n + args.new) * 4
        print(f"| {n} | {s['time_to_first_token_s']:.2f} | {first:.2f} | {1000 * s['time_per_output_token_s']:.1f} | "
              f"{1000 * per_token:.1f} | {s['time_per_output_token_s'] / per_token:.2f} | "
              f"{s['kv_bytes'] / 2**20:.1f} | {kv_hf / 2**20:.1f} | {s['tokens'] == tokens} |")


if __name__ == "__main__":
    main()
