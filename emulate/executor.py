"""The local executor: run the logical graph in-process, freeing each value after its last consumer."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import networkx as nx

from emulate.ops import NodeRunner
from graphs import execution_order, last_uses


def run_local(g: nx.DiGraph, runner: NodeRunner, on_node: Callable[[str], None] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (block, head value) in block order as the graph completes; memory follows the live set.

    Every value is dropped as soon as the last node that reads it has run, so a causal layer holds
    its keys and values plus one query block's partials, never an N x N matrix.
    """
    order = execution_order(g)
    freed = last_uses(g, order)
    values: dict[str, object] = {}
    ready_heads: dict[int, dict] = {}
    next_block = 0
    for n in order:
        a = g.nodes[n]
        values[n] = runner.run(a, [values[src] for src in a["inputs"]])
        for src in freed[n]:
            del values[src]
        if on_node is not None:
            on_node(n)
        if a["kind"] == "head":
            ready_heads[a["block"]] = values.pop(n)
            while next_block in ready_heads:
                yield next_block, ready_heads.pop(next_block)
                next_block += 1
