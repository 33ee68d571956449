"""Generation side by side with transformers' `generate`: SmolLM2-135M, same weights, threads and dtype.

For each prompt length N (real text, the embedded default repeated as needed), greedy, float32:

    emulate       emulate.generate(..., block_size=M) on the local executor: its measured
                  time_to_first_token_s, time_per_output_token_s and kv_bytes
    transformers  LlamaForCausalLM with the same (dequantized GGUF) weights (tests/hf_models.py,
                  as_transformers), sdpa, its dynamic cache, one generate of K new tokens: a logits
                  processor stamps the time each step's logits come; time to first token = the first
                  stamp; time per output token = (last stamp - first) / (K - 1); its cache's bytes =
                  2 x layers x KV heads x head_dim x (N + K) x 4

Both run K steps whatever token comes (ours with ignore_eos, transformers' with min_new_tokens = K).
Each side also stamps the process's CPU time as each token comes (ours as generate_iter yields
it, transformers' in the logits processor): CPU ms per output token = (last - first) / (K - 1),
the figure to compare on a shared machine, where a process's wall time grows with the others' load.

and prints a markdown table with both, their ratios, and whether the greedy tokens agree.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/generate_vs_transformers.py [--tokens 1024,4096] [--new 16] [-M 512]
"""
from __future__ import annotations

import argparse
import os
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


class _Stamps:
    """A logits processor that notes when each step's logits reach it (and changes nothing)."""

    def __init__(self):
        self.times: list[float] = []
        self.cpu: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        self.cpu.append(time.process_time())
        return scores


def hf_times(hf, ids: np.ndarray, new: int) -> tuple[float, float, float, list[int]]:
    """transformers' time to first token, wall and CPU seconds per output token, and its tokens."""
    from transformers import LogitsProcessorList

    x = torch.from_numpy(ids)[None]
    stamps = _Stamps()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([stamps]))
    first = stamps.times[0] - t0
    return (first, (stamps.times[-1] - stamps.times[0]) / (new - 1), (stamps.cpu[-1] - stamps.cpu[0]) / (new - 1),
            out[0, len(ids):].tolist())


def emulate_run(model, ids: np.ndarray, new: int, block_size: int) -> tuple[dict, float]:
    """emulate.generate's stats (through generate_iter) and its CPU seconds per output token."""
    import emulate

    cpu = []
    stream = emulate.generate_iter(model, ids, max_new_tokens=new, block_size=block_size, threads=1,
                                   ignore_eos=True, allow_past_positions=True)
    for _ in stream:
        cpu.append(time.process_time())
    return stream.result.stats, (cpu[-1] - cpu[0]) / (new - 1)


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
          f"{torch.get_num_threads()} torch thread(s), load average {os.getloadavg()[0]:.2f} at the start\n", flush=True)
    print("| prompt N | TTFT emulate s | TTFT transformers s | TPOT emulate ms | TPOT transformers ms | TPOT ratio | "
          "CPU/token emulate ms | CPU/token transformers ms | CPU ratio | "
          "KV emulate MiB | KV transformers MiB | same tokens | load average |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for n in (int(t) for t in args.tokens.split(",")):
        ids = prompt_ids(model, n)
        s, cpu = emulate_run(model, ids, args.new, args.block_size)
        first, per_token, hf_cpu, tokens = hf_times(hf, ids, args.new)
        kv_hf = 2 * c.layers * c.kv_heads * c.head_dim * (n + args.new) * 4
        print(f"| {n} | {s['time_to_first_token_s']:.2f} | {first:.2f} | {1000 * s['time_per_output_token_s']:.1f} | "
              f"{1000 * per_token:.1f} | {s['time_per_output_token_s'] / per_token:.2f} | "
              f"{1000 * cpu:.1f} | {1000 * hf_cpu:.1f} | {cpu / hf_cpu:.2f} | "
              f"{s['kv_bytes'] / 2**20:.1f} | {kv_hf / 2**20:.1f} | {s['tokens'] == tokens} | "
              f"{os.getloadavg()[0]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
