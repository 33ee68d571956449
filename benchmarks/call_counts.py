"""Attention calls per pattern, counted on the compiled graph, beside the bound of docs/design.md.

Each row's counts are `graphs.counts` of `emulate.compile`'s graph, the graph the executor runs;
max_rel_err is a real, verified run of the same forward (`emulate.run(..., verify=True)`) against
the monolithic forward, whose own counts must match the compiled ones.

    .venv/bin/python benchmarks/call_counts.py
"""
from __future__ import annotations

import emulate
from graphs import counts

RUNS = [  # (model, attention, window and sinks)
    ("tiny-bert", "full", {}),
    ("tiny-llama", "causal", {}),
    ("tiny-llama", "sliding", {"window": 512}),
    ("tiny-llama", "sink", {"window": 512, "sinks": 4}),
    ("tiny-bert", "sampled", {}),
]
COUNTED = ("attention_calls", "attention_calls_per_layer", "attention_calls_bound", "graph_depth")


def measure(model: emulate.Model, attention: str, options: dict, tokens: int, block: int) -> tuple[dict, int, dict]:
    """(counts of the compiled graph, its blocks, the verified run's stats) for one forward."""
    graph = emulate.compile(model, tokens=tokens, block_size=block, attention=attention, **options)
    c = counts(graph)
    run = emulate.run(model, random_tokens=tokens, block_size=block, attention=attention, **options,
                      verify=True, collect=False)
    s = run.stats
    if not s["verified"]:
        raise SystemExit(f"emulate run failed for {model.name} {attention}: max_rel_err {s['max_rel_err']:.3e} "
                         f"is above the tolerance {s['tolerance']:.1e}")
    if any(c[k] != s[k] for k in COUNTED) or graph.graph["blocks"] != s["blocks"]:
        raise SystemExit(f"the compiled graph of {model.name} {attention} is not the one that ran")
    return c, graph.graph["blocks"], s


def main() -> None:
    block = 256
    models = {name: emulate.load(name) for name in dict.fromkeys(name for name, _, _ in RUNS)}
    print(f"M = {block}, 4 layers, float32; calls summed over layers / per layer\n")
    print("| pattern | N | B | attention calls per layer | bound per layer (docs/design.md) | graph depth | max_rel_err |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, attention, options in RUNS:
        model = models[name]
        for tokens in (2048, 4096, 8192):
            c, blocks, s = measure(model, attention, options, tokens, block)
            per_layer = c["attention_calls_per_layer"][0]
            bound = c["attention_calls_bound"] // model.config.layers
            window, sinks = options.get("window"), options.get("sinks")
            label = attention + (f" r={window}" if window else "") + (f" s={sinks}" if sinks else "")
            print(f"| {label} | {tokens} | {blocks} | {per_layer} | {bound} | {c['graph_depth']} | "
                  f"{s['max_rel_err']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
