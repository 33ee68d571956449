"""Read counts, depth, work/span and the theorem bounds off a logical graph, never by formula."""
from __future__ import annotations

from collections import Counter

import networkx as nx

from graphs.kinds import NodeKind
from graphs.patterns import Pattern, windowed


def execution_order(g: nx.DiGraph) -> list[str]:
    """A topological order that keeps the live set small.

    Windowed graphs (every layer sliding or sink) run as a wavefront: block by block through all
    layers, the smallest available node first, so a block's values die once the few blocks whose
    window holds it have passed, and memory is O(window x layers) whatever N is. Other graphs run
    layer by layer: all projections of a layer first (every later block reads their keys), then each
    query block's pairs, merge and mix together, so a block's partials die before the next block's
    are made; memory is O(N) for the layer's keys and values, never N x N.
    """
    stage = {"embed": 0, "project": 0, "attend": 1, "merge": 1, "mix": 1, "head": 1}
    within = {"project": 0, "attend": 1, "merge": 2, "mix": 3, "head": 4}
    wavefront_order = windowed(p["kind"] for p in g.graph["spec"]["patterns"])

    def layer_major(n):
        a = g.nodes[n]
        return (a["layer"], stage[a["kind"]], a["block"], within.get(a["kind"], 0), a.get("key_block", 0))

    def wavefront(n):
        a = g.nodes[n]
        return (a["block"], a["layer"], within.get(a["kind"], 0), a.get("key_block", 0))

    return list(nx.lexicographical_topological_sort(g, key=wavefront if wavefront_order else layer_major))


def schedule(g: nx.DiGraph):
    """(id, attributes, readers) in execution_order: what the local executor runs (CompactGraph.schedule
    gives the same without holding the graph)."""
    return ((n, g.nodes[n], g.out_degree(n)) for n in execution_order(g))


def last_uses(g: nx.DiGraph, order: list[str]) -> dict[str, list[str]]:
    """For each node in `order`, the inputs whose last consumer it is: free them after it runs."""
    position = {n: k for k, n in enumerate(order)}
    freed: dict[str, list[str]] = {n: [] for n in order}
    for n in order:
        consumers = list(g.successors(n))
        if consumers:
            freed[max(consumers, key=position.__getitem__)].append(n)
    return freed


def depth(g: nx.DiGraph) -> int:
    """Longest path, counted in nodes."""
    return nx.dag_longest_path_length(g) + 1 if g.number_of_nodes() else 0


def span_flops(g: nx.DiGraph) -> int:
    """The critical path weighted by FLOPs: the time of a machine with unbounded workers."""
    best: dict[str, int] = {}
    for n in nx.topological_sort(g):
        best[n] = g.nodes[n]["flops"] + max((best[p] for p in g.predecessors(n)), default=0)
    return max(best.values(), default=0)


def counts(g: nx.DiGraph) -> dict:
    """The quantities the theorems bound and the JSON summary reports, counted node by node."""
    kinds = Counter(a["kind"] for _, a in g.nodes(data=True))
    per_layer = Counter(a["layer"] for _, a in g.nodes(data=True) if a["kind"] == NodeKind.ATTEND)
    spec = g.graph["spec"]
    layers = len(spec["patterns"])
    work = sum(a["flops"] for _, a in g.nodes(data=True))
    bounds = [Pattern(**p).calls_bound(g.graph["blocks"], spec["block_size"]) for p in spec["patterns"]]
    return {
        "attention_calls": kinds[NodeKind.ATTEND],
        "attention_calls_per_layer": [per_layer[layer] for layer in range(layers)],
        "attention_calls_bound": sum(bounds),
        "small_calls": g.number_of_nodes(),
        "calls_by_kind": {str(k): kinds[k] for k in NodeKind},
        "max_call_tokens": max(a["tokens"] for _, a in g.nodes(data=True)),
        "graph_nodes": g.number_of_nodes(),
        "graph_edges": g.number_of_edges(),
        "graph_depth": depth(g),
        "work_flops": work,
        "span_flops": span_flops(g),
    }
