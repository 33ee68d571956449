"""`make bench-gpu`: the emulated forward on one GPU against one monolithic SDPA forward of the same model.

For each N (32,768 and 131,072 tokens) and each mask (exact causal, and a sliding window), on
the same GPU, same weights, same token ids, float32:

    emulate     emulate.run(..., device="cuda", executor local, oracle kernel): every pair call a
                fused kernel that returns the lse (emulate/runtime/kernels_cuda.py); its own forward_s
    monolithic  emulate's monolithic reference (emulate/models/reference.py): causal as one
                F.scaled_dot_product_attention over all N, the window in row chunks of 4096 with
                only the keys the chunk may see; weights moved to the GPU before the clock starts,
                timed between two torch.cuda.synchronize()

and prints a markdown table with both times, their ratio and the error between the two outputs
(max_rel_err, against the float32 contract). The goal: emulate's forward within 1.15x of the
monolithic SDPA forward at 131,072 tokens, exact causal. The monolithic forward is whatever SDPA
kernel torch picks for it, printed above the table: FlashAttention takes only float16 and
bfloat16, so in float32 both sides run the memory-efficient kernel. Sized for under 10 minutes on
one H100-class GPU. Where torch sees no CUDA device it says so in one line and exits 0.

    .venv/bin/python benchmarks/bench_gpu.py [--tokens 32768,131072] [--block-size 4096] [--window 4096]

--device cpu runs the same table on the CPU at whatever size is given: a check of the script itself
on machines without a GPU (its test does that), not a benchmark.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

GOAL = 1.15
GOAL_TOKENS = 131072


def sdpa_backend(model, pattern, chunk: int = 4096) -> str:
    """The kernel torch's SDPA picks for the monolithic forward's attention call (its shapes, dtype, GQA, mask)."""
    from torch.nn.attention import SDPBackend

    c, dev = model.config, model.device
    q = torch.empty(1, c.heads, chunk, c.head_dim, dtype=model.dtype, device=dev)
    kv = torch.empty(1, c.kv_heads, chunk, c.head_dim, dtype=model.dtype, device=dev)
    mask = None if pattern.window is None else torch.ones(chunk, chunk, dtype=torch.bool, device=dev).tril()
    try:
        choice = torch.ops.aten._fused_sdp_choice(q, kv, kv, mask, 0.0, pattern.causal and mask is None,
                                                  scale=model.scale, enable_gqa=c.heads != c.kv_heads)
        return SDPBackend(choice).name.lower()
    except Exception as err:  # noqa: BLE001 - the table is still worth printing
        return f"unknown ({type(err).__name__})"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def monolithic(problem, device: str):
    """(seconds, outputs) of one monolithic forward, weights already on the device, the GPU's queue drained."""
    from emulate.models.reference import reference_forward

    model = problem.model.transformer(problem.dtype, device)
    tokens = torch.from_numpy(problem.tokens)
    synchronize(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = reference_forward(model, tokens, list(problem.patterns))
    synchronize(device)
    return time.perf_counter() - t0, ref


def one_case(model, n: int, block_size: int, pattern: dict, device: str) -> dict:
    import emulate
    from emulate.problem import prepare
    from emulate.runtime.verify import TOLERANCE, compare

    # forward_s ends when the last block's log-probabilities have been summed on the host, so it
    # includes the GPU's queue
    run = emulate.run(model, random_tokens=n, block_size=block_size, **pattern, dtype="float32", device=device)
    problem = prepare(model, random_tokens=n, block_size=block_size, **pattern, dtype="float32")
    mono_s, ref = monolithic(problem, device)
    err = compare(run.hidden, run.logprobs, ref["hidden"], ref.get("logprob_next"), TOLERANCE[torch.float32])
    out = {"emulate_s": run.stats["forward_s"], "mono_s": mono_s, "calls": run.stats["attention_calls"], **err}
    del run, ref
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="32768,131072", help="comma-separated N")
    ap.add_argument("--block-size", type=int, default=4096, help="M, the most tokens any pair call sees")
    ap.add_argument("--window", type=int, default=4096, help="the sliding window r")
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"bench-gpu: skipped: torch {torch.__version__} sees no CUDA device on this machine", file=sys.stderr)
        return 0

    import emulate
    from emulate.runtime.kernels_cuda import choose_kernel, device_capability
    from graphs import MaskKind, Pattern

    tokens = [int(t) for t in args.tokens.split(",")]
    m, model = args.block_size, emulate.load(args.model)
    patterns = [("causal", {"attention": "causal"}), (f"sliding r={args.window}",
                                                      {"attention": "sliding", "window": args.window})]
    device = args.device
    cap = device_capability(torch.device(device))
    c = model.config
    gpu_model = model.transformer(torch.float32, device)
    where = "CPU (a check of this script, not the benchmark)" if cap is None else \
        f"{torch.cuda.get_device_name(0)} (sm{cap[0]}{cap[1]})"
    print(f"bench-gpu: {where}, torch {torch.__version__}; "
          f"{c.name}: {c.layers} layers, {c.heads} heads ({c.kv_heads} KV), head_dim {c.head_dim}; float32, M = {m}")
    kinds = {mask: choose_kernel(torch.float32, mask, c.head_dim, cap, m, m) for mask in MaskKind
             if mask != MaskKind.SAMPLE}
    print("emulate's pair calls: " + ("torch's CPU flash kernel (emulate/runtime/kernels.py)" if cap is None else
                                      ", ".join(f"{mask} -> {kernel}" for mask, kernel in kinds.items())))
    print("monolithic SDPA: causal -> " + sdpa_backend(gpu_model, Pattern("causal")) + ", sliding chunks -> "
          + sdpa_backend(gpu_model, Pattern("sliding", window=args.window)))
    for _, pattern in patterns:  # warm-up: CUDA context, kernels and allocator, both sides
        one_case(model, 2 * m, m, pattern, device)

    print("\n| N | M | attention | pair calls | emulate forward_s | monolithic SDPA forward_s | ratio | "
          "max_rel_err | within contract |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    failed, goal = 0, None
    for n in tokens:
        for name, pattern in patterns:
            try:
                r = one_case(model, n, m, pattern, device)
            except Exception as err:  # noqa: BLE001 - one failed case (out of memory, a refused kernel) is a row
                lines = [line for line in str(err).splitlines() if line.strip()]
                print(f"| {n} | {m} | {name} | - | - | - | - | - | FAILED: {type(err).__name__}: "
                      f"{lines[0] if lines else ''} |", flush=True)
                failed += 1
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            ratio = r["emulate_s"] / r["mono_s"]
            if n == GOAL_TOKENS and pattern["attention"] == "causal":
                goal = ratio
            failed += not r["verified"]
            print(f"| {n} | {m} | {name} | {r['calls']} | {r['emulate_s']:.3f} | {r['mono_s']:.3f} | {ratio:.2f} | "
                  f"{r['max_rel_err']:.1e} | {'yes' if r['verified'] else 'NO'} |", flush=True)
    verdict = "not measured" if goal is None else f"{goal:.2f}x, {'met' if goal <= GOAL else 'not met'}"
    print(f"\ngoal: emulate's forward <= {GOAL}x the monolithic SDPA forward at {GOAL_TOKENS} tokens, exact causal: "
          f"{verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
