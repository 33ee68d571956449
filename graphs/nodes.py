"""The nodes of the logical task graph: one node per small call, and the id each goes by.

The graph is plain data (networkx DiGraph, Dask-style): every node carries its `kind`, `layer`,
`block`, ordered `inputs`, the token spans it touches, its mask, `tokens` (the longest input any
of its calls sees), `flops` and `bytes`. Counts, depth and the theorem bounds are read off it.

Node kinds, for query block i of layer l (docs/design.md, data flow of one layer):
    embed  i        token ids -> x_0[i]
    project l i     x_l[i] -> q, k, v (norm, QKV, RoPE at global positions)
    attend l i j    q[i] x (k[j], v[j]) -> (o_ij, lse_ij); j = -1 for the sampled pattern
    merge l i       the partials of block i -> o[i], balanced tree over ascending j
    mix l i         x_l[i], o[i] -> x_{l+1}[i] (out-proj, residual, norm, MLP)
    head i          x_L[i] -> final-norm hidden state (+ log-probabilities)
A query block with a single partial has no merge node: its mix reads the partial directly.

The structure lives in graphs/compact.py (`CompactGraph`: one template of pairs per distinct
layer pattern, nodes generated lazily); the price of each node kind in graphs/costs.py.
`build_graph` is the compact form's nodes put into networkx, so both forms hold the same nodes,
edges and attributes by construction.

The fields of a node are written once, in `Node`. A networkx node's data is `Node.attrs()`; readers
take it back typed with `Node.of`, or, in scans over every node of a large graph, read the same
fields through `NodeAttrs` (`scan_nodes`) without building a Node each.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, fields

from graphs.kinds import MaskKind, NodeKind


def node_id(kind: NodeKind, layer: int | None, block: int, key_block: int | None = None) -> str:
    parts = [kind] if layer is None else [f"L{layer}", kind]
    parts.append(str(block))
    if key_block is not None:
        parts.append("sample" if key_block < 0 else str(key_block))
    return "/".join(parts)


def residual_id(layer: int, block: int) -> str:
    """The node whose value is block `block`'s residual stream entering `layer`: the embedding, or the last mix."""
    return node_id(NodeKind.EMBED, None, block) if layer == 0 else node_id(NodeKind.MIX, layer - 1, block)


@dataclass(frozen=True, slots=True)
class Node:
    """One node of the logical graph, typed: made in one place (graphs/compact.py, NodeSource) and read
    by attribute everywhere. A networkx graph keeps `attrs()` as each node's data, so `G.nodes[n]["kind"]`
    reads the same value as `node.kind`; `Node.of(G.nodes[n])` gives the typed node back.

    kind, layer (-1 for embed, L for head), block (the query block), inputs (node ids, in the order the
    node reads them), span (its query tokens [s, e)), tokens (the longest input any of its calls sees),
    flops and bytes (graphs/costs.py). An attend node also has key_block (-1: a sampled call),
    key_span (None for a sampled call, whose source blocks are key_blocks) and mask.
    """

    kind: NodeKind
    layer: int
    block: int
    inputs: tuple[str, ...]
    span: tuple[int, int]
    tokens: int
    flops: int
    bytes: int
    key_block: int | None = None
    key_span: tuple[int, int] | None = None
    key_blocks: tuple[int, ...] | None = None
    mask: MaskKind | None = None

    def attrs(self) -> dict:
        """The networkx attribute dict: today's keys only (an attend node's key fields, a sampled call's
        key_blocks), inputs as a list, as graphs/export.py writes them."""
        a = dict(inputs=list(self.inputs), kind=self.kind, layer=self.layer, block=self.block)
        if self.kind == NodeKind.ATTEND:
            a["key_block"] = self.key_block
            if self.key_blocks is not None:
                a["key_blocks"] = list(self.key_blocks)
            a.update(span=self.span, key_span=self.key_span, mask=self.mask)
        else:
            a["span"] = self.span
        a.update(tokens=self.tokens, flops=self.flops, bytes=self.bytes)
        return a

    @classmethod
    def of(cls, a) -> Node:
        """The typed node of a networkx attribute dict (a Node is returned as it is).

        A graph made by attrs() or graphs.from_json already holds the enums, so they are taken as they
        are: converting them again was a third of the cost of a call."""
        if isinstance(a, Node):
            return a
        kind, key_span, key_blocks, mask = a["kind"], a.get("key_span"), a.get("key_blocks"), a.get("mask")
        return cls(kind if kind.__class__ is NodeKind else NodeKind(kind), int(a["layer"]), int(a["block"]),
                   tuple(a["inputs"]), tuple(a["span"]), int(a["tokens"]), int(a["flops"]), int(a["bytes"]),
                   a.get("key_block"), None if key_span is None else tuple(key_span),
                   None if key_blocks is None else tuple(key_blocks),
                   mask if mask is None or mask.__class__ is MaskKind else MaskKind(mask))

    @staticmethod
    def restore(a: dict) -> dict:
        """Put back in place, and return, the types JSON drops from a node's attribute dict: the kind and
        mask enums and the spans as tuples, so a graph reloaded by graphs.from_json holds what attrs()
        wrote (inputs and key_blocks stay lists, as attrs() writes them). In place rather than
        `Node.of(a).attrs()`: it keeps any other keys a user stored on the node, and costs a few dict
        writes a node instead of two conversions."""
        a["kind"] = NodeKind(a["kind"])
        if a.get("mask") is not None:
            a["mask"] = MaskKind(a["mask"])
        for key in ("span", "key_span"):
            if isinstance(a.get(key), list):
                a[key] = tuple(a[key])
        return a


class NodeAttrs:
    """A networkx node's attribute dict read by the Node's field names, without building the Node.

    For scans that read a field or two of every node of a large graph (selecting layers, sorting,
    counting, grouping): Node.of converts and stores all twelve fields, ~2.6 us a node, 0.35 s a pass
    over a 135k-node graph, which would make counting, sorting or selecting it a quarter to two
    thirds slower; a view costs ~0.1 us a field read. The fields and their defaults are Node's (set
    from dataclasses.fields below), so the schema still lives in Node alone. Values are the dict's as
    stored: the types attrs() and graphs.from_json give them.
    """

    __slots__ = ("attrs",)

    def __init__(self, attrs: dict):
        self.attrs = attrs


def _read(name: str, default):
    """A property reading one of Node's fields off the dict: a field with a default (an attend node's
    key fields) may be absent, the others must be there."""
    if default is MISSING:
        return property(lambda view: view.attrs[name], doc=f"Node.{name}")
    return property(lambda view: view.attrs.get(name, default), doc=f"Node.{name}")


for _field in fields(Node):
    setattr(NodeAttrs, _field.name, _read(_field.name, _field.default))
del _field


def scan_nodes(g):
    """(id, NodeAttrs) of every node of a networkx logical graph, in the graph's order, for scans that
    keep nothing of a node past its own step: one view moved from node to node, since a view made per
    node added 8-18% to counting, sorting or selecting a 135k-node graph, one view moved along 1-4%.
    A reader that keeps nodes makes its own NodeAttrs (or Node.of) for each."""
    view = NodeAttrs({})
    for n, a in g.nodes(data=True):
        view.attrs = a
        yield n, view
