"""The planner against published prefill latencies: Llama-3 405B on H100 nodes, as Meta's
context-parallel inference reports them (Yang et al., "Context Parallelism for Scalable
Million-Token Inference", arXiv 2411.01783v3), with the deployment it describes: 8 H100s per node
tensor parallel over NVLink, fp8 feed-forward weights, 400 Gb/s RDMA per GPU between nodes, and its
pass-KV ring attention over load-balanced chunks (emulate/planner/ring.py, `predict_ring`).

The paper's own text could not be read here. Its rows come from two places, each named in the
table: the abstract and the introduction (read directly: 77 s for 1M tokens and 3.8 s for 128K;
"can take 60 seconds" for 128K and about 1200 s for 1M on one host of 8 GPUs, rough figures), and
its Figure 6a, Figure 8, Table 4 and Table 6 as a public summary of the paper quotes them
(github.com/bzhng-development/summary-of-some-paper-in-cuda,
docs/inference-optimization/ContextParallelismforScalableMillion-TokenInference.md and its
docs_backup copy): 128K tokens on 1, 2, 8 and 16 nodes (Figure 8 names 16 nodes for the abstract's
3.8 s), and the persistent-KV prefills of Table 4: 128,000 tokens in all on 4 nodes, of which
1, 2.5, 5 and 10% are new, by pass-Q and by pass-KV. A reader should check those against the paper.

No constant of the planner was taken from any of them (emulate/planner/costs.py: datasheets,
FlashAttention-3's curves, MAMF, DeepGEMM). Each full-prefill row also prints the executor's own
sequence placement (contiguous query blocks of M tokens) on the same nodes.

The second table is Mnemosyne/Medha's comparison (arXiv 2409.17264: sequence pipelining up to 1.64x
faster than context parallelism at 1M tokens, Llama-3 8B, 16 nodes of 8 H100s): the ring baseline
beside the executor's sequence and layers placements, bf16.

    .venv/bin/python benchmarks/plan_published.py            # a few minutes on one core
    .venv/bin/python benchmarks/plan_published.py --ring-only  # the ring rows alone, in a second
"""
from __future__ import annotations

import argparse
import statistics
import time

QUOTED = "as quoted by the public summary"
ROWS = [  # new tokens, cached tokens, nodes, variant, reported seconds, where it is stated
    (1048576, 0, 16, "pass-kv", 77.0, "abstract; Figure 8 (16 nodes)"),
    (131072, 0, 16, "pass-kv", 3.8, f"abstract; Figure 8 (16 nodes) {QUOTED}"),
    (131072, 0, 8, "pass-kv", 5.85, f"Figure 6a (8 nodes, RDMA) {QUOTED}"),
    (131072, 0, 2, "pass-kv", 21.0, f"Table 6, TTFT with CP2 (about 21 s) {QUOTED}"),
    (131072, 0, 1, "pass-kv", 42.0, f"Table 6, TTFT with TP8 on one node (about 42 s) {QUOTED}"),
    (131072, 0, 1, "pass-kv", 60.0, "introduction: 'can take 60 seconds' on one host (rough)"),
    (1048576, 0, 1, "pass-kv", 1200.0, f"introduction: about 1200 s on one host (rough) {QUOTED}"),
    (1280, 126720, 4, "pass-q", 0.8987, f"Table 4, 1% new {QUOTED}"),
    (1280, 126720, 4, "pass-kv", 1.0234, f"Table 4, 1% new {QUOTED}"),
    (3200, 124800, 4, "pass-q", 1.046, f"Table 4, 2.5% new {QUOTED}"),
    (3200, 124800, 4, "pass-kv", 1.110, f"Table 4, 2.5% new {QUOTED}"),
    (6400, 121600, 4, "pass-q", 1.302, f"Table 4, 5% new {QUOTED} (the two variants 'essentially tied')"),
    (6400, 121600, 4, "pass-kv", 1.305, f"Table 4, 5% new {QUOTED}"),
    (12800, 115200, 4, "pass-q", 2.2053, f"Table 4, 10% new {QUOTED}"),
    (12800, 115200, 4, "pass-kv", 2.0807, f"Table 4, 10% new {QUOTED}"),
]
MNEMOSYNE = ("llama3-8b", 1048576, 16)  # shape, tokens, nodes of 8 H100s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-size", "-M", type=int, default=4096)
    ap.add_argument("--ring-only", action="store_true", help="the ring baseline alone (no placement is planned)")
    args = ap.parse_args()
    from emulate.planner import predict, predict_placements
    from emulate.planner.ring import predict_ring

    print("| new tokens | cached | nodes x GPUs | variant | ring predicted_s (attention, GEMMs, all-reduce, "
          "all-to-all) | reported_s | ring error | sequence placement predicted_s (M) | reported where |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    errors, placed = [], {}
    for tokens, cached, nodes, variant, reported, where in ROWS:
        t0 = time.perf_counter()
        r = predict_ring("llama3-405b", tokens, nodes=nodes, gpus_per_node=8, device="h100", weight_dtype="fp8-ffn",
                         cached=cached, variant=variant)
        err = r.predicted_s / reported - 1
        errors.append(err)
        seq = "not planned" if args.ring_only else "(a full prefill only)"
        if not args.ring_only and not cached:
            if (tokens, nodes) not in placed:
                placed[tokens, nodes] = predict("llama3-405b", tokens, block_size=args.block_size, attention="causal",
                                                workers=nodes, gpus_per_worker=8, device="h100",
                                                weight_dtype="fp8-ffn", allow_overcommit=True)
            p = placed[tokens, nodes]
            seq = f"{p.predicted_s:.1f} (M = {args.block_size})" + ("" if p.fits else ", does not fit: overcommitted")
        print(f"| {tokens} | {cached} | {nodes} x 8 | {variant} | {r.predicted_s:.3g} ({r.attention_s:.3g}, "
              f"{r.gemm_s:.3g}, {r.allreduce_s:.3g}, {r.all_to_all_s:.3g}) | {reported:g} | {err:+.0%} | {seq} "
              f"| {where} |  <!-- {time.perf_counter() - t0:.0f} s -->", flush=True)
    within = sum(abs(e) <= 0.15 for e in errors)
    print(f"\nring baseline: {within} of {len(errors)} within 15%; errors {min(errors):+.0%} to {max(errors):+.0%}, "
          f"median {statistics.median(errors):+.0%}")

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
