"""Read counts, depth, work/span and the theorem bounds off a logical graph, never by formula."""
from __future__ import annotations

from collections import Counter

import networkx as nx

from graphs.kinds import NodeKind
from graphs.nodes import Node, NodeAttrs, scan_nodes
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

    def layer_major(node: NodeAttrs):
        key_block = 0 if node.key_block is None else node.key_block
        return (node.layer, stage[node.kind], node.block, within.get(node.kind, 0), key_block)

    def wavefront(node: NodeAttrs):
        key_block = 0 if node.key_block is None else node.key_block
        return (node.block, node.layer, within.get(node.kind, 0), key_block)

    # every node's sort key worked out in one pass: the sort asks for each node's key once anyway,
    # and a pass over the node data is cheaper than looking each node up by id
    order_key = wavefront if wavefront_order else layer_major
    keys = {n: order_key(node) for n, node in scan_nodes(g)}
    return list(nx.lexicographical_topological_sort(g, key=keys.__getitem__))


def schedule(g: nx.DiGraph):
    """(id, Node, readers) in execution_order: what the local executor runs (CompactGraph.schedule
    gives the same without holding the graph)."""
    return ((n, Node.of(g.nodes[n]), g.out_degree(n)) for n in execution_order(g))


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
    return _span_flops(g, {n: node.flops for n, node in scan_nodes(g)})


def _span_flops(g: nx.DiGraph, flops: dict[str, int]) -> int:
    best: dict[str, int] = {}
    for n in nx.topological_sort(g):
        best[n] = flops[n] + max((best[p] for p in g.predecessors(n)), default=0)
    return max(best.values(), default=0)


def counts(g: nx.DiGraph) -> dict:
    """The quantities the theorems bound and the JSON summary reports, counted node by node."""
    # one pass over the nodes for every per-node figure, the FLOPs kept for span_flops
    kinds: Counter = Counter()
    per_layer: Counter = Counter()
    flops: dict[str, int] = {}
    max_tokens = 0
    for n, node in scan_nodes(g):
        kinds[node.kind] += 1
        if node.kind == NodeKind.ATTEND:
            per_layer[node.layer] += 1
        flops[n] = node.flops
        max_tokens = max(max_tokens, node.tokens)
    spec = g.graph["spec"]
    layers = len(spec["patterns"])
    work = sum(flops.values())
    bounds = [Pattern(**p).calls_bound(g.graph["blocks"], spec["block_size"]) for p in spec["patterns"]]
    return {
        "attention_calls": kinds[NodeKind.ATTEND],
        "attention_calls_per_layer": [per_layer[layer] for layer in range(layers)],
        "attention_calls_bound": sum(bounds),
        "small_calls": g.number_of_nodes(),
        "calls_by_kind": {str(k): kinds[k] for k in NodeKind},
        "max_call_tokens": max_tokens,
        "graph_nodes": g.number_of_nodes(),
        "graph_edges": g.number_of_edges(),
        "graph_depth": depth(g),
        "work_flops": work,
        "span_flops": _span_flops(g, flops),
    }
