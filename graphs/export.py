"""Serialise a logical graph: JSON node-link (loss-free, reloadable) and Graphviz DOT (for drawing).

`write_json` streams a CompactGraph's nodes to a file one at a time (graphs of any size, through
an AtomicFile, so a failure leaves nothing); the file is the node-link JSON `to_json` writes, with
edges grouped by target, and loads with `from_json`."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

import networkx as nx

from graphs.files import AtomicFile
from graphs.kinds import NodeKind
from graphs.nodes import Node, scan_nodes

if TYPE_CHECKING:
    from graphs.compact import CompactGraph

COLOURS = {"embed": "#cfd8dc", "project": "#bbdefb", "attend": "#ffe0b2", "merge": "#f8bbd0",
           "mix": "#c8e6c9", "head": "#d1c4e9"}


def to_json(g: nx.DiGraph) -> str:
    data = nx.node_link_data(g, edges="edges")
    return json.dumps(data, default=_plain, separators=(",", ":"))


def write_json(graph: CompactGraph, path, on_layer=None) -> tuple[int, int]:
    """Write `graph` as node-link JSON to `path`, node by node (memory stays that of one node).

    Returns (nodes, edges) written. on_layer(done, total) as each layer's nodes are out.
    """
    dump = json.JSONEncoder(default=_plain, separators=(",", ":")).encode
    nodes = edges = 0
    with AtomicFile(path) as out, open(out.tmp, "w", encoding="utf-8") as f:
        head = dump({"directed": True, "multigraph": False, "graph": graph.graph_attrs()})
        f.write(head[:-1] + ',"nodes":[')
        for nid, node in graph.iter_nodes(on_layer):
            f.write(("," if nodes else "") + dump(node.attrs())[:-1] + f',"id":{dump(nid)}}}')
            nodes += 1
        f.write('],"edges":[')
        for src, dst in graph.iter_edges():
            f.write(("," if edges else "") + f'{{"source":{dump(src)},"target":{dump(dst)}}}')
            edges += 1
        f.write("]}")
    return nodes, edges


def from_json(text: str) -> nx.DiGraph:
    g = nx.node_link_graph(json.loads(text), directed=True, edges="edges")
    for _, a in g.nodes(data=True):
        Node.restore(a)
    g.graph["block_spans"] = [tuple(s) for s in g.graph["block_spans"]]
    return g


def to_dot(g: nx.DiGraph) -> str:
    """DOT with one cluster per layer, nodes coloured by kind and labelled with their call size."""
    lines = ["digraph emulate {", "  rankdir=TB;", '  node [shape=box, style="rounded,filled", fontsize=10];']
    # each node's line made in the one pass that groups it by layer: a second pass looking nodes up by
    # id cost more than the typed reads
    by_layer: dict[int, list[str]] = {}
    for n, node in scan_nodes(g):
        kind = node.kind
        label = f"{kind} {node.block}"
        if kind == NodeKind.ATTEND:
            key_block = node.key_block
            label += f"x{'tau' if key_block < 0 else key_block}\\n{node.mask}"
        label += f"\\n{node.tokens} tok"
        by_layer.setdefault(node.layer, []).append(f'    "{n}" [label="{label}", fillcolor="{COLOURS[kind]}"];')
    for layer in sorted(by_layer):
        name = "embed" if layer < 0 else ("head" if layer >= len(g.graph["spec"]["patterns"]) else f"layer {layer}")
        lines.append(f'  subgraph "cluster_{layer}" {{ label="{name}"; color="#9e9e9e";')
        lines.extend(by_layer[layer])
        lines.append("  }")
    for u, v in g.edges():
        lines.append(f'  "{u}" -> "{v}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _plain(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")
