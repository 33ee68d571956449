"""The planner against published prefill latencies: Llama-3 405B on H100 nodes, as Meta's
context-parallel inference reports them (Yang et al., "Context Parallelism for Scalable
Million-Token Inference", arXiv 2411.01783v3), with the deployment it describes: 8 H100s per node
tensor parallel over NVLink, fp8 feed-forward weights, 400 Gb/s RDMA per GPU between nodes, and its
pass-KV ring attention over load-balanced chunks (emulate/planner/ring.py, `predict_ring`).

Only figures found in a citable text are rows (its tables could not be read here; docs/planner.md
says which): the abstract's 77 s for 1M tokens on 16 nodes and 3.8 s for 128K tokens (the abstract
names no node count for it; 16 nodes, its largest, is assumed and marked), and the introduction's
"can take 60 seconds" for 128K on one host of 8 GPUs (a rough figure). No constant of the planner
was taken from any of them (emulate/planner/costs.py: datasheets, FlashAttention-3's curves, MAMF,
DeepGEMM). Each row prints the ring baseline (the paper's layout, the one compared with its figure)
and the executor's own sequence placement (contiguous query blocks of M tokens) on the same nodes.

The second table is Mnemosyne/Medha's comparison (arXiv 2409.17264: sequence pipelining up to 1.64x
faster than context parallelism at 1M tokens, Llama-3 8B, 16 nodes of 8 H100s): the ring baseline
beside the executor's sequence and layers placements, bf16.

    .venv/bin/python benchmarks/plan_published.py            # a few minutes on one core
    .venv/bin/python benchmarks/plan_published.py --ring-only  # the ring rows alone, in a second
"""
from __future__ import annotations

import argparse
import time

ROWS = [  # tokens, nodes, reported seconds, where it is stated
    (1048576, 16, 77.0, "abstract"),
    (131072, 16, 3.8, "abstract (node count not stated; 16 assumed)"),
    (131072, 1, 60.0, "introduction, 'can take 60 seconds' on one host"),
]
MNEMOSYNE = ("llama3-8b", 1048576, 16)  # shape, tokens, nodes of 8 H100s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-size", "-M", type=int, default=4096)
    ap.add_argument("--ring-only", action="store_true", help="the ring baseline alone (no placement is planned)")
    args = ap.parse_args()
    from emulate.planner import predict, predict_placements
    from emulate.planner.ring import predict_ring

    print("| tokens | nodes x GPUs | ring predicted_s (attention, GEMMs, all-reduce) | reported_s | ring error "
          "| sequence placement predicted_s (M) | reported where |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    errors = []
    for tokens, nodes, reported, where in ROWS:
        t0 = time.perf_counter()
        r = predict_ring("llama3-405b", tokens, nodes=nodes, gpus_per_node=8, device="h100", weight_dtype="fp8-ffn")
        err = r.predicted_s / reported - 1
        errors.append(abs(err))
        seq = "not planned"
        if not args.ring_only:
            p = predict("llama3-405b", tokens, block_size=args.block_size, attention="causal", workers=nodes,
                        gpus_per_worker=8, device="h100", weight_dtype="fp8-ffn")
            seq = f"{p.predicted_s:.1f} (M = {args.block_size})"
        print(f"| {tokens} | {nodes} x 8 | {r.predicted_s:.1f} ({r.attention_s:.1f}, {r.gemm_s:.1f}, {r.allreduce_s:.1f}) "
              f"| {reported:g} | {err:+.0%} | {seq} | {where} |  <!-- {time.perf_counter() - t0:.0f} s -->", flush=True)
    print(f"\nring baseline: largest error {max(errors):.0%}")

    shape, tokens, nodes = MNEMOSYNE
    ring = predict_ring(shape, tokens, nodes=nodes, gpus_per_node=8, device="h100")
    print(f"\n{shape}, N = {tokens}, {nodes} x 8 h100, bf16 (Mnemosyne/Medha's comparison)\n")
    print("| layout | predicted_s |\n| --- | --- |")
    print(f"| ring (context parallel, pass-KV) | {ring.predicted_s:.3f} |")
    if args.ring_only:
        return
    out = {o.placement: o for o in predict_placements(shape, tokens, placement="all", block_size=args.block_size,
                                                        attention="causal", workers=nodes, gpus_per_worker=8,
                                                        device="h100")}
    for name, o in out.items():
        print(f"| {name} (M = {args.block_size}) | {o.prediction.predicted_s:.3f} |")
    layers = out["layers"].prediction.predicted_s
    print(f"\nring / layers predicted time = {ring.predicted_s / layers:.2f} (Medha reports context parallelism "
          "up to 1.64 x the pipeline's time)")


if __name__ == "__main__":
    main()
