"""The planner against published prefill latencies: Llama-3 405B on H100 nodes, as Meta's
context-parallel inference reports them (Yang et al., "Context Parallelism for Scalable
Million-Token Inference", arXiv 2411.01783v3), with the deployment it describes: 8 H100s per node
tensor parallel over NVLink, fp8 feed-forward weights, 400 Gb/s RDMA per GPU between nodes.

Only figures found in a citable text are rows (its tables could not be read here; docs/planner.md
says which): the abstract's 77 s for 1M tokens on 16 nodes and 3.8 s for 128K tokens (the abstract
names no node count for it; 16 nodes, its largest, is assumed and marked), and the introduction's
"can take 60 seconds" for 128K on one host of 8 GPUs (a rough figure). No constant of the planner
was taken from any of them (emulate/planner/costs.py: datasheets, FlashAttention and MAMF figures).

    .venv/bin/python benchmarks/plan_published.py            # about 2 minutes on one core
    .venv/bin/python benchmarks/plan_published.py --block-size 8192
"""
from __future__ import annotations

import argparse
import time

ROWS = [  # tokens, nodes, reported seconds, where it is stated
    (1048576, 16, 77.0, "abstract"),
    (131072, 16, 3.8, "abstract (node count not stated; 16 assumed)"),
    (131072, 1, 60.0, "introduction, 'can take 60 seconds' on one host"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-size", "-M", type=int, default=4096)
    args = ap.parse_args()
    from emulate.planner import predict

    print("| tokens | nodes x GPUs | M | predicted_s | reported_s | error | reported where |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    errors = []
    for tokens, nodes, reported, where in ROWS:
        t0 = time.perf_counter()
        p = predict("llama3-405b", tokens, block_size=args.block_size, attention="causal", workers=nodes,
                    gpus_per_worker=8, device="h100", weight_dtype="fp8-ffn")
        err = p.predicted_s / reported - 1
        errors.append(abs(err))
        print(f"| {tokens} | {nodes} x 8 | {args.block_size} | {p.predicted_s:.1f} | {reported:g} | {err:+.0%} | {where} |"
              f"  <!-- {time.perf_counter() - t0:.0f} s to plan -->", flush=True)
    print(f"\nlargest error {max(errors):.0%}")


if __name__ == "__main__":
    main()
