"""forward_s of the emulated forward against Hugging Face transformers on the same checkpoint, side by side.

Builds seeded Llama and Mistral checkpoints shaped like the presets (width 256, 4 layers, 8 heads
with 2 KV heads, vocabulary 1024) with `save_pretrained`, loads them with `emulate.load`, and times,
in this one process with the same threads, the transformers forward (sdpa) and the emulated forward
(`emulate.run`: local executor, kernel oracle, the checkpoint's own mask) on the same N tokens, and
the transformers backend (`emulate.run(..., backend="transformers")`: the same transformers model
with every attention call cut into pair calls of M tokens). The emulated times are the runs'
forward_s, as `emulate run` reports it (the forward alone; loading and compiling are outside it).
Each is run `--repeat` times and the best time is kept.

The checkpoints' attention is sharpened before they are saved (`sharpen`: every layer's q and k
projections scaled by one seeded factor so that layer 0's attention logits have std --logit-std,
4 by default, where transformers' default initialisation gives about 0.1 and nearly uniform
attention, on which the max_rel_err column could not see a wrong key block or merge). The timings
do not depend on the weights' values. The logit std is measured and printed with the table.
Prints a markdown table; every figure is measured in this run.

--breakdown: where the causal Llama forward's time goes on each side, both on one torch thread (the
same kernels then run the same way), both measured alike: each forward under torch's profiler, its
wall time, and the profiler's self time of the CPU flash-attention op that both sides call as the
attention kernel's time; the rest is the difference. The attention's rate in GFLOP/s is beside an
fp32 2048 x 2048 matmul's measured in the same run; emulate's time by node kind (wall time of the
nodes, from a separate traced run) follows the table.

    .venv/bin/python benchmarks/vs_transformers.py --tokens 16384 --block-size 1024
    .venv/bin/python benchmarks/vs_transformers.py --tokens 16384 --block-size 1024 --breakdown
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

import emulate
from emulate import row_errors
from graphs import NodeKind


def build_checkpoint(family: str, path: str, window: int, logit_std: float | None = None) -> float:
    """Save a seeded checkpoint at `path`; with `logit_std`, its attention sharpened to that (sharpen).
    Returns layer 0's attention-logit std as saved."""
    import transformers

    shape = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1 << 20)
    torch.manual_seed(0)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
    else:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**shape, sliding_window=window))
    measured = sharpen(model, logit_std) if logit_std is not None else attention_logit_std(model)
    model.save_pretrained(path)
    return measured


def attention_logit_std(model, tokens: int = 512) -> float:
    """The std of layer 0's attention logits (q k^T times the model's scaling, before the rotary
    embedding, which turns q and k but keeps their norms) on `tokens` seeded ids."""
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    layer, config = model.model.layers[0], model.config
    attn = layer.self_attn
    with torch.no_grad():
        x = layer.input_layernorm(model.model.embed_tokens(ids))[0]
        q = attn.q_proj(x).view(tokens, config.num_attention_heads, attn.head_dim).transpose(0, 1)
        k = attn.k_proj(x).view(tokens, config.num_key_value_heads, attn.head_dim).transpose(0, 1)
        k = k.repeat_interleave(config.num_attention_heads // config.num_key_value_heads, 0)
        return float((q @ k.transpose(-1, -2) * attn.scaling).std())


def sharpen(model, logit_std: float) -> float:
    """Scale every layer's q and k projections by one factor so that layer 0's attention logits have
    std `logit_std`; returns the std measured after. transformers' default initialisation (weights of
    std 0.02) gives logits of std about 0.1: attention nearly uniform over the keys, where a wrong
    mask, a missing key block or a bad merge hardly moves the output, so an error column measured on
    it would hide the errors it is there to show."""
    factor = (logit_std / attention_logit_std(model)) ** 0.5
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor)
    return attention_logit_std(model)


def time_transformers(path: str, tokens: torch.Tensor, repeat: int, dtype: torch.dtype = torch.float32):
    """transformers' sdpa forward of the checkpoint at `path`: the fastest of `repeat` and its last hidden state."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=dtype).eval()
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(tokens[None], output_hidden_states=True)
        best = min(best, time.perf_counter() - t0)
    return best, out.hidden_states[-1][0]


def time_emulate(path: str, tokens: torch.Tensor, block_size: int, repeat: int):
    model = emulate.load(path)  # loaded once, run `repeat` times
    best, run = float("inf"), None
    for _ in range(repeat):
        run = emulate.run(model, tokens, block_size=block_size, dtype="float32")
        best = min(best, run.stats["forward_s"])
    attention = emulate.prepare(model, tokens).patterns[0].describe()
    return best, run.hidden, attention, run.compact.node_count()


def time_backend(path: str, tokens: torch.Tensor, block_size: int, repeat: int):
    best, run = float("inf"), None
    for _ in range(repeat):
        run = emulate.run(path, tokens, block_size=block_size, dtype="float32", backend="transformers")
        best = min(best, run.stats["forward_s"])
    return best, run.hidden


FLASH_OP = "aten::_scaled_dot_product_flash_attention_for_cpu"


def matmul_gflops(size: int = 2048, repeat: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeat))
    return 2 * size**3 / best / 1e9


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def flash_self_s(prof) -> float:
    """Seconds of self CPU time in torch's CPU flash-attention op, summed over every thread the profiler saw."""
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key == FLASH_OP) / 1e6


def breakdown(path: str, tokens: torch.Tensor, block_size: int, repeat: int) -> tuple[list[tuple], dict]:
    """(side, forward s, attention kernel s, attention GFLOP) of the best of `repeat` forwards of each
    side, and the seconds of that best emulated forward by node kind (its trace).

    Both sides are measured alike: each forward runs under torch's profiler, its time is the wall time
    of the forward under the profiler, and its attention time is the profiler's self time of the CPU
    flash-attention op (the op every attend node calls, emulate/runtime/kernels.py, and the one
    transformers' sdpa calls). The node kinds come from a separate traced run (wall time per node)."""
    import transformers
    from torch.profiler import ProfilerActivity, profile

    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa",
                                                              dtype=torch.float32).eval()
    hf = []
    for _ in range(repeat):
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            model(tokens[None])
            total = time.perf_counter() - t0
        hf.append((total, flash_self_s(prof)))
    em = []
    loaded = emulate.load(path)
    for _ in range(repeat):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run = emulate.run(loaded, tokens, block_size=block_size, dtype="float32", threads=1)
        em.append((run.stats["forward_s"], flash_self_s(prof)))
    flops = sum(node.flops for _, node in run.compact.iter_nodes() if node.kind == NodeKind.ATTEND)
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        emulate.run(loaded, tokens, block_size=block_size, dtype="float32", threads=1, trace=trace)
        with open(trace) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    kinds: dict[str, float] = {}
    for e in events:
        if e.get("ph") == "X":
            kinds[e["cat"]] = kinds.get(e["cat"], 0.0) + e["dur"] / 1e6
    return [("transformers (sdpa)", *min(hf), flops / 1e9), ("emulate graph", *min(em), flops / 1e9)], kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--window", type=int, default=4096, help="Mistral's sliding window (Hugging Face's sliding_window)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--logit-std", type=float, default=4.0, help="layer 0's attention-logit std the checkpoints "
                    "are sharpened to (their q and k projections scaled), so the error column sees a wrong key")
    ap.add_argument("--breakdown", action="store_true", help="time in the attention kernel against the rest, "
                    "causal Llama, both sides on one thread")
    args = ap.parse_args()
    tokens = torch.randint(0, 1024, (args.tokens,), generator=torch.Generator().manual_seed(0))
    if args.breakdown:
        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory() as path:
            build_checkpoint("llama", path, args.window)
            rows, kinds = breakdown(path, tokens, args.block_size, args.repeat)
        mm = matmul_gflops()
        print(f"N = {args.tokens}, M = {args.block_size}, float32, CPU, one torch thread, causal llama; "
              f"fp32 2048 x 2048 matmul: {mm:.1f} GFLOP/s\n")
        print("| side | forward s | attention kernel s | share | rest s | attention GFLOP/s | of matmul |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for side, total, kernel, gflop in rows:
            print(f"| {side} | {total:.2f} | {kernel:.2f} | {kernel / total:.2f} | {total - kernel:.2f} "
                  f"| {gflop / kernel:.1f} | {gflop / kernel / mm:.2f} |")
        print("\nemulate's forward by node kind (s, wall time of the nodes in a separate traced run): " + ", ".join(
              f"{k} {v:.2f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
        return
    print(f"N = {args.tokens}, M = {args.block_size}, float32, CPU, torch threads = {torch.get_num_threads()}; "
          f"q and k projections sharpened to layer-0 attention logits of std {args.logit_std}\n")
    print("| model | attention | layer-0 logit std | transformers (sdpa) s | emulate graph s | graph / sdpa "
          "| transformers backend s | backend / sdpa | max_rel_err graph, backend |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for family in ("llama", "mistral"):
        with tempfile.TemporaryDirectory() as path:
            logit_std = build_checkpoint(family, path, args.window, args.logit_std)
            hf_s, hf_hidden = time_transformers(path, tokens, args.repeat)
            em_s, em_hidden, attention, _ = time_emulate(path, tokens, args.block_size, args.repeat)
            be_s, be_hidden = time_backend(path, tokens, args.block_size, args.repeat)
        rel, be_rel = (row_errors(h, hf_hidden)[1] for h in (em_hidden, be_hidden))
        print(f"| {family} | {attention} | {logit_std:.2f} | {hf_s:.2f} | {em_s:.2f} | {em_s / hf_s:.2f} | {be_s:.2f} | {be_s / hf_s:.2f} "
              f"| {rel:.1e}, {be_rel:.1e} |", flush=True)


if __name__ == "__main__":
    main()
