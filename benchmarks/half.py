"""bfloat16 against float32 on this CPU, side by side with transformers in bfloat16 on the same checkpoint.

Builds a seeded Llama checkpoint shaped like the tiny-llama preset (width 256, 4 layers, 8 heads
with 2 KV heads, vocabulary 1024) with `save_pretrained`, then times in this one process, with the
same torch threads: the emulated forward (`emulate.run`, local executor, kernel oracle, causal) in
float32 and in bfloat16 (its forward_s, the best of `--repeat`), and the transformers forward
(sdpa) in float32 and bfloat16. Beside the times, each bfloat16 forward's max and mean per-row
relative error against the float64 transformers forward on the same weights (docs/numerics.md's
1.25x bound is on the norm-wise error; benchmarks/half_ratio.py measures that ratio). Prints a
markdown table; every figure is measured in this run.

    .venv/bin/python benchmarks/half.py --tokens 4096 --block-size 512
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch

import emulate
from vs_transformers import time_transformers  # this folder: the same sdpa timing for both tables


def build_checkpoint(path: str) -> None:
    """The seeded Llama checkpoint of benchmarks/vs_transformers.py (tiny-llama's shape)."""
    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=1 << 20)).save_pretrained(path)


def time_emulate(model, tokens: torch.Tensor, block_size: int, dtype: str, repeat: int):
    best, run = float("inf"), None
    for _ in range(repeat):
        run = emulate.run(model, tokens, block_size=block_size, dtype=dtype, attention="causal")
        best = min(best, run.stats["forward_s"])
    return best, run.hidden


def errors(hidden: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    diff = hidden.double() - exact.double()
    rel = diff.norm(dim=1) / exact.double().norm(dim=1)
    return float(rel.max()), float(rel.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    tokens = torch.randint(0, 1024, (args.tokens,), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as path:
        build_checkpoint(path)
        model = emulate.load(path)
        _, exact = time_transformers(path, tokens, 1, torch.float64)
        rows = []
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).removeprefix("torch.")
            hf_s, hf_hidden = time_transformers(path, tokens, args.repeat, dtype)
            em_s, em_hidden = time_emulate(model, tokens, args.block_size, name, args.repeat)
            rows.append((name, em_s, hf_s, errors(em_hidden, exact), errors(hf_hidden, exact)))
    load = os.getloadavg()[0]
    print(f"N = {args.tokens}, M = {args.block_size}, causal llama (tiny-llama's shape), CPU, torch threads = "
          f"{torch.get_num_threads()}, load average {load:.2f} over {os.cpu_count()} cores\n")
    print("| dtype | emulate s | transformers s | emulate / transformers | emulate max, mean rel err vs float64 "
          "| transformers max, mean rel err vs float64 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, em_s, hf_s, (em_max, em_mean), (hf_max, hf_mean) in rows:
        print(f"| {name} | {em_s:.3f} | {hf_s:.3f} | {em_s / hf_s:.2f} | {em_max:.2e}, {em_mean:.2e} "
              f"| {hf_max:.2e}, {hf_mean:.2e} |")
    (_, f32, _, _, _), (_, b16, hb16, _, _) = rows
    print(f"\nbfloat16 / float32: emulate {b16 / f32:.2f}, transformers {hb16 / rows[0][2]:.2f}")


if __name__ == "__main__":
    main()
