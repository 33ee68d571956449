"""The planner's decode rows against Meta's published decode: Llama-3 405B at batch 1 on one node of
8 H100 (tensor parallel 8 over NVLink, fp8 feed-forward weights), 44.5 to 46.3 ms per output token
from 8K to 128K context (Yang et al., "Context Parallelism for Scalable Million-Token Inference",
arXiv 2411.01783; the issue quotes the range, the per-context figures could not be read here), and
slower as nodes were added.

Rows:

    anchor        Meta's layout: one node, TP8, one attention call per layer over the whole cache
                  (M = the whole context, so the block-merge decode is one call), at 8K, 32K, 128K;
                  the 8K row against 44.5 ms, the 128K row against 46.3, the 32K row against the
                  nearer end of the range (0 inside it)
    block-merge   our decode at M = 4096 on 1, 2, 4, 8 nodes (8 H100 each, TP8 inside a node, the
                  cache where the prefill made it, partials merged as a tree over the 400 Gb/s per GPU
                  links), at the same contexts

No constant of the planner comes from these figures (emulate/planner/costs.py, decode.py).

    .venv/bin/python benchmarks/plan_decode_published.py           # a few seconds
"""
from __future__ import annotations

import argparse

LOW, HIGH = 44.5, 46.3  # ms per token, one node, from 8K to 128K context
CONTEXTS = {"8K": 8192, "32K": 32768, "128K": 131072}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-size", "-M", type=int, default=4096, help="M of the block-merge rows")
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    from emulate.planner.decode import predict_decode

    layout = {"attention": "causal", "device": "h100", "gpus_per_worker": 8, "weight_dtype": "fp8-ffn"}
    K = args.new_tokens
    print(f"Llama-3 405B, batch 1, {K} new tokens after the context, 8 x H100 per node (TP8, NVLink), fp8 "
          "feed-forward weights\n")
    print("| context | predicted ms/token | Meta ms/token | error | weights ms | KV ms | calls ms | TP all-reduce ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, n in CONTEXTS.items():
        prompt = n - K  # the context at the end of the run is n
        p = predict_decode("llama3-405b", prompt, K, block_size=n, **layout)
        ms = p.ms_per_token
        if name == "8K":
            err = ms / LOW - 1
        elif name == "128K":
            err = ms / HIGH - 1
        else:
            err = 0.0 if LOW <= ms <= HIGH else (ms / LOW - 1 if ms < LOW else ms / HIGH - 1)
        parts = p.parts
        print(f"| {name} | {ms:.1f} | {'44.5' if name == '8K' else '46.3' if name == '128K' else '44.5-46.3'} | "
              f"{err:+.0%} | {1000 * parts['weights']:.1f} | {1000 * parts['kv']:.2f} | {1000 * parts['calls']:.1f} | "
              f"{1000 * parts['tp_allreduce']:.2f} |")
    M = args.block_size
    print(f"\nblock-merge decode, M = {M}: predicted ms per output token by nodes (8 H100 each)\n")
    nodes = (1, 2, 4, 8)
    print("| context | " + " | ".join(f"{k} node{'s' if k > 1 else ''}" for k in nodes) +
          " | pair calls per token (1 node) | link hops per token (8 nodes) |")
    print("| --- | " + " | ".join("---:" for _ in nodes) + " | ---: | ---: |")
    for name, n in CONTEXTS.items():
        row = [predict_decode("llama3-405b", n - K, K, block_size=M, workers=k, **layout) for k in nodes]
        trend = " | ".join(f"{p.ms_per_token:.1f}" for p in row)
        print(f"| {name} | {trend} | {row[0].attention_calls_per_token:.0f} | {row[-1].hops_per_token:.0f} |")


if __name__ == "__main__":
    main()
