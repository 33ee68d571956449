"""The logical graph in compact form: one template of pairs per distinct layer pattern.

Layers repeat. A layer's structure depends on its pattern alone (which key blocks each query block
reads, with which mask), so `CompactGraph` keeps one `LayerTemplate` per distinct pattern, a few
numpy arrays over that layer's pairs, and derives every layer from it:

- the analysis (`counts`, `depth`, `span_flops`, `work_flops`, `work_bytes`) in
  O(layers x pairs per layer) numpy steps, with no node materialised;
- the nodes themselves, lazily (`iter_nodes`), with the ids and attributes of the networkx graph,
  in build order; `to_networkx` collects them for graphs small enough to
  hold (`build_graph` is exactly that).

A 1M-token forward of a 32-layer causal model at M = 4096 (256 blocks, 1.05M attend nodes) holds
one template of 32,896 pairs: well under a megabyte, analysed in a fraction of a second. Node
prices come from graphs/costs.py's `*_cost` functions, the one place they are written.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import networkx as nx
import numpy as np

from graphs.costs import attend_cost, embed_cost, head_cost, merge_cost, mix_cost, project_cost
from graphs.nodes import Node, node_id, residual_id
from graphs.kinds import MaskKind, NodeKind, PatternKind
from graphs.patterns import (Pattern, PatternError, block_spans, kernel_entries, key_blocks, pair_mask, sample_permutation,
                             sampled_keys, windowed)
from graphs.spec import ForwardSpec

MASKS = tuple(MaskKind)  # a template stores each pair's mask as its index here


@dataclass(frozen=True, eq=False, repr=False)
class LayerTemplate:
    """The pairs of one layer pattern, as flat arrays over the layer's attend nodes in build order.

    Query block i owns pairs starts[i]:starts[i+1] (at least one each). Pair p is query block row[p]
    against key block key_block[p] (-1: a sampled call); it reads the projections of blocks
    reads[read_starts[p]:read_starts[p+1]] besides its own queries' block (one entry for a pair, the
    blocks holding the sampled keys for a sampled call).
    """

    pattern: Pattern
    starts: np.ndarray  # int64 [B + 1]
    row: np.ndarray  # int64 [P]
    key_block: np.ndarray  # int64 [P]
    mask: np.ndarray  # int8 [P], an index into MASKS
    visible: np.ndarray  # int64 [P]: (query, key) entries attended
    key_tokens: np.ndarray  # int64 [P]: keys the call reads
    computed: np.ndarray  # int64 [P]: (query, key) scores the kernel computes (graphs.patterns.kernel_entries)
    read_starts: np.ndarray  # int64 [P + 1]
    reads: np.ndarray  # int64: projection blocks read for keys and values

    @property
    def pairs(self) -> int:
        return len(self.row)

    def __repr__(self) -> str:
        return f"<LayerTemplate {self.pattern.describe()}: {self.pairs} pairs over {len(self.starts) - 1} blocks>"

    @property
    def partials(self) -> np.ndarray:
        """Attend nodes per query block: a block with more than one has a merge node."""
        return np.diff(self.starts)

    def key_blocks_of(self, i: int) -> list[int]:
        """The key blocks query block i reads (a sampled call's source blocks), ascending."""
        a, b = self.starts[i], self.starts[i + 1]
        if self.key_block[a] < 0:
            return self.reads[self.read_starts[a]:self.read_starts[a + 1]].tolist()
        return self.key_block[a:b].tolist()

    def attend_inputs(self) -> np.ndarray:
        """(pair, projection block) of each distinct input of the layer's attend nodes, one row per
        edge into them: an attend node reads its own queries' projection and its key blocks', each once."""
        pair = np.repeat(np.arange(self.pairs), np.diff(self.read_starts))
        return np.unique(np.concatenate([np.stack([np.arange(self.pairs), self.row], 1),
                                         np.stack([pair, self.reads], 1)]), axis=0)

    def edges(self) -> int:
        """The edges into the layer's attend nodes."""
        return len(self.attend_inputs())


def _template(pattern: Pattern, spans: list[tuple[int, int]], block_size: int, tau: np.ndarray | None) -> LayerTemplate:
    starts, row, key, mask, visible, key_tokens, read_starts, reads, computed = [0], [], [], [], [], [], [0], [], []
    code = {m: k for k, m in enumerate(MASKS)}
    for i, (s, e) in enumerate(spans):
        if pattern.kind == PatternKind.SAMPLED:
            keys = sampled_keys(tau, (s, e))
            sources = np.unique(keys // block_size)
            row.append(i), key.append(-1), mask.append(code[MaskKind.SAMPLE])
            visible.append((e - s) * len(keys)), key_tokens.append(len(keys))
            computed.append((e - s) * len(keys))
            reads.extend(sources.tolist())
            read_starts.append(len(reads))
        else:
            for j in key_blocks(pattern, spans, i):
                pm = pair_mask(pattern, spans[i], spans[j])
                row.append(i), key.append(j), mask.append(code[pm.kind])
                visible.append(pm.visible), key_tokens.append(spans[j][1] - spans[j][0])
                computed.append(kernel_entries(pattern, pm.kind, spans[i], spans[j]))
                reads.append(j)
                read_starts.append(len(reads))
        starts.append(len(row))
    i64 = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    return LayerTemplate(pattern, i64(starts), i64(row), i64(key), np.asarray(mask, dtype=np.int8), i64(visible),
                         i64(key_tokens), i64(computed), i64(read_starts), i64(reads))


@dataclass(frozen=True, eq=False)
class CompactGraph:
    """The logical graph of one forward, without its nodes: the spec, the blocks and one template
    per distinct layer pattern (`layer_template[l]` indexes `templates`)."""

    spec: ForwardSpec
    spans: tuple[tuple[int, int], ...]
    templates: tuple[LayerTemplate, ...]
    layer_template: tuple[int, ...]

    def __repr__(self) -> str:
        kinds = sorted({str(p.kind) for p in self.spec.patterns})
        return (f"<CompactGraph {self.spec.tokens} tokens in {self.blocks} blocks of M = {self.spec.block_size}, "
                f"{self.layers} layers ({'/'.join(kinds)}), {len(self.templates)} template(s), "
                f"{self.node_count()} nodes>")

    @classmethod
    def build(cls, spec: ForwardSpec, on_layer=None) -> CompactGraph:
        """on_layer(done, total) after each layer's template is found (made, or shared with an earlier layer)."""
        spans = block_spans(spec.tokens, spec.block_size)
        sampled = any(p.kind == PatternKind.SAMPLED for p in spec.patterns)
        if sampled and any(p.causal for p in spec.patterns):
            raise PatternError("sampled attention needs a bidirectional (encoder) model")
        tau = sample_permutation(spec.tokens, spec.seed) if sampled else None
        index: dict[Pattern, int] = {}
        templates = []
        for layer, p in enumerate(spec.patterns):
            if p not in index:
                index[p] = len(templates)
                templates.append(_template(p, spans, spec.block_size, tau))
            if on_layer is not None:
                on_layer(layer + 1, len(spec.patterns))
        return cls(spec, tuple(spans), tuple(templates), tuple(index[p] for p in spec.patterns))

    # -- shape ---------------------------------------------------------------------------------
    @property
    def blocks(self) -> int:
        return len(self.spans)

    @property
    def layers(self) -> int:
        return self.spec.layers

    @property
    def sampled(self) -> bool:
        return any(p.kind == PatternKind.SAMPLED for p in self.spec.patterns)

    def template(self, layer: int) -> LayerTemplate:
        return self.templates[self.layer_template[layer]]

    def block_tokens(self) -> np.ndarray:
        """m per query block (the last may be ragged)."""
        return np.asarray([e - s for s, e in self.spans], dtype=np.int64)

    def graph_attrs(self) -> dict:
        """The networkx graph's own attributes (g.graph)."""
        attrs = {"spec": self.spec.to_dict(), "blocks": self.blocks, "block_spans": list(self.spans)}
        if self.sampled:
            attrs["sample_seed"] = self.spec.seed
        return attrs

    # -- analysis --------------------------------------------------------------------------------
    def counts(self) -> dict:
        """graphs.analysis.counts of the networkx graph, worked out from the templates."""
        B, L = self.blocks, self.layers
        per_layer = [self.template(layer).pairs for layer in range(L)]
        by_kind = self._nodes_by_kind()
        nodes = sum(by_kind.values())
        m = self.block_tokens()
        longest = max(int(m.max()), max(int(np.maximum(m[t.row], t.key_tokens).max()) for t in self.templates))
        bounds = sum(p.calls_bound(B, self.spec.block_size) for p in self.spec.patterns)
        return {
            "attention_calls": by_kind[NodeKind.ATTEND],
            "attention_calls_per_layer": per_layer,
            "attention_calls_bound": bounds,
            "small_calls": nodes,
            "calls_by_kind": {str(k): by_kind[k] for k in NodeKind},
            "max_call_tokens": longest,
            "graph_nodes": nodes,
            "graph_edges": self.edges(),
            "graph_depth": self.depth(),
            "work_flops": self.work_flops(),
            "span_flops": self.span_flops(),
        }

    def node_count(self) -> int:
        return sum(self._nodes_by_kind().values())

    def _nodes_by_kind(self) -> dict[NodeKind, int]:
        B, L = self.blocks, self.layers
        per_template = [(t.pairs, int((t.partials > 1).sum())) for t in self.templates]
        return {NodeKind.EMBED: B, NodeKind.PROJECT: B * L,
                NodeKind.ATTEND: sum(per_template[k][0] for k in self.layer_template),
                NodeKind.MERGE: sum(per_template[k][1] for k in self.layer_template), NodeKind.MIX: B * L,
                NodeKind.HEAD: B}

    def edges(self) -> int:
        B = self.blocks
        per_template = [B + t.edges() + int(t.partials[t.partials > 1].sum()) + 2 * B for t in self.templates]
        return sum(per_template[k] for k in self.layer_template) + B

    def depth(self) -> int:
        """Longest path, counted in nodes."""
        return self._longest(lambda kind, t=None: 1)

    def span_flops(self) -> int:
        """The critical path weighted by FLOPs: the time of a machine with unbounded workers."""
        return self._longest(lambda kind, t=None: self._prices(kind, t)[0])

    def work_flops(self) -> int:
        return self._work(0)

    def work_bytes(self) -> int:
        return self._work(1)

    def _work(self, which: int) -> int:
        total = _sum(self._prices(NodeKind.EMBED)[which]) + _sum(self._prices(NodeKind.HEAD)[which])
        per_template = [sum(_sum(self._prices(kind, t)[which])
                            for kind in (NodeKind.PROJECT, NodeKind.ATTEND, NodeKind.MERGE, NodeKind.MIX))
                        for t in self.templates]
        return total + sum(per_template[k] for k in self.layer_template)

    def _prices(self, kind: NodeKind, t: LayerTemplate | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(flops, bytes) arrays: per block, per pair of template t (attend), or per block with 0
        where a block has no merge (merge)."""
        s, m = self.spec, self.block_tokens()
        if kind == NodeKind.EMBED:
            return embed_cost(s, m)
        if kind == NodeKind.PROJECT:
            return project_cost(s, m)
        if kind == NodeKind.ATTEND:
            return attend_cost(s, m[t.row], t.key_tokens, t.visible)
        if kind == NodeKind.MERGE:
            f, b = merge_cost(s, m, t.partials)
            has = t.partials > 1
            return np.where(has, f, 0), np.where(has, b, 0)
        if kind == NodeKind.MIX:
            return mix_cost(s, m)
        return head_cost(s, m)

    def _longest(self, weight) -> int:
        """The heaviest path, node weights from weight(kind, template), one layer at a time."""
        B = self.blocks
        ones = np.ones(B, dtype=np.int64)

        def w(kind, t=None, n=B):
            v = weight(kind, t)
            return np.broadcast_to(np.asarray(v, dtype=np.int64), (n,)) if np.ndim(v) == 0 else v

        x = w(NodeKind.EMBED) * ones
        for layer in range(self.layers):
            t = self.template(layer)
            p = x + w(NodeKind.PROJECT, t)
            seen = np.maximum(p[t.row], np.maximum.reduceat(p[t.reads], t.read_starts[:-1]))
            a = seen + w(NodeKind.ATTEND, t, t.pairs)
            o = np.maximum.reduceat(a, t.starts[:-1])
            has = t.partials > 1
            o = np.where(has, o + w(NodeKind.MERGE, t), o)
            x = np.maximum(x, o) + w(NodeKind.MIX, t)
        return int((x + w(NodeKind.HEAD)).max())

    # -- the nodes, lazily ----------------------------------------------------------------------------
    @property
    def windowed(self) -> bool:
        """Every layer sliding or sink: block i's keys die once the windows of a few later blocks pass."""
        return windowed(p.kind for p in self.spec.patterns)

    def nodes(self) -> NodeSource:
        """The nodes one row at a time, by (layer, block), for readers that group them (graphs/plan.py)."""
        return NodeSource(self)

    def iter_nodes(self, on_layer=None) -> Iterator[tuple[str, Node]]:
        """(id, Node) of every node in build order, layer by layer; edges are the distinct entries of each
        node's `inputs`. on_layer(done, total) after each layer."""
        return self._layer_major(self.nodes(), on_layer)

    def schedule(self) -> Iterator[tuple[str, Node, int]]:
        """(id, Node, readers) of every node in graphs.execution_order's order, generated lazily.

        readers: the node's consumers (its out-degree), so an executor frees a value once that many
        nodes have read it, without the graph. Windowed graphs run as a wavefront, block by block
        through every layer (a block's keys die once the windows holding them have passed: memory
        O(window x layers) whatever N is); the others layer by layer, which is the builder's order.
        """
        nodes = self.nodes()
        order = self._wavefront(nodes) if self.windowed else self._layer_major(nodes)
        for nid, node in order:
            yield nid, node, nodes.readers(node)

    def _layer_major(self, nodes: NodeSource, on_layer=None) -> Iterator[tuple[str, Node]]:
        for i in range(self.blocks):
            yield nodes.embed(i)
        for layer in range(self.layers):
            for i in range(self.blocks):
                yield nodes.project(layer, i)
            for i in range(self.blocks):
                yield from nodes.attention(layer, i)
            if on_layer is not None:
                on_layer(layer + 1, self.layers)
        for i in range(self.blocks):
            yield nodes.head(i)

    def _wavefront(self, nodes: NodeSource) -> Iterator[tuple[str, Node]]:
        for i in range(self.blocks):
            yield nodes.embed(i)
            for layer in range(self.layers):
                yield nodes.project(layer, i)
                yield from nodes.attention(layer, i)
            yield nodes.head(i)

    def iter_edges(self) -> Iterator[tuple[str, str]]:
        """(source, target) of every edge, grouped by target in node order."""
        for nid, node in self.iter_nodes():
            for src in dict.fromkeys(node.inputs):
                yield src, nid

    def to_networkx(self, on_layer=None) -> nx.DiGraph:
        """The networkx graph users get (graphs.build_graph): hold it only for graphs of modest size."""
        g = nx.DiGraph(**self.graph_attrs())
        for nid, node in self.iter_nodes(on_layer):
            g.add_node(nid, **node.attrs())
            for src in dict.fromkeys(node.inputs):
                g.add_edge(src, nid)
        return g


class NodeSource:
    """The nodes of a compact graph one at a time, typed (graphs/nodes.py), with the networkx graph's ids.

    Each call makes its nodes afresh (the networkx graph holds them all; this holds one template's
    arrays as lists): `embed`, `project` and `head` one node, `attention` a query block's row.
    """

    def __init__(self, g: CompactGraph):
        self.g, s, m = g, g.spec, g.block_tokens()
        self.m = m.tolist()
        self.embed_cost = [v.tolist() for v in embed_cost(s, m)]
        self.project_cost = [v.tolist() for v in project_cost(s, m)]
        self.mix_cost = [v.tolist() for v in mix_cost(s, m)]
        self.head_cost = [v.tolist() for v in head_cost(s, m)]
        self._templates: dict[int, dict] = {}

    def _template(self, layer: int) -> dict:
        """Template arrays as Python lists, once per template; readers per projection block."""
        k = self.g.layer_template[layer]
        if k not in self._templates:
            t = self.g.templates[k]
            af, ab = (v.tolist() for v in self.g._prices(NodeKind.ATTEND, t))
            mf, mb = (v.tolist() for v in self.g._prices(NodeKind.MERGE, t))
            readers = np.bincount(t.attend_inputs()[:, 1], minlength=self.g.blocks).tolist()
            self._templates[k] = dict(starts=t.starts.tolist(), keys=t.key_block.tolist(), masks=t.mask.tolist(),
                                      key_tokens=t.key_tokens.tolist(), read_starts=t.read_starts.tolist(),
                                      reads=t.reads.tolist(), attend=(af, ab), merge=(mf, mb), readers=readers)
        return self._templates[k]

    def embed(self, i: int) -> tuple[str, dict]:
        f, b = self.embed_cost
        return node_id(NodeKind.EMBED, None, i), Node(NodeKind.EMBED, -1, i, (), self.g.spans[i], self.m[i], f[i], b[i])

    def project(self, layer: int, i: int) -> tuple[str, dict]:
        f, b = self.project_cost
        return node_id(NodeKind.PROJECT, layer, i), Node(NodeKind.PROJECT, layer, i, (residual_id(layer, i),),
                                                        self.g.spans[i], self.m[i], f[i], b[i])

    def attention(self, layer: int, i: int) -> Iterator[tuple[str, dict]]:
        """Query block i's attend nodes in one layer, its merge when it has several, and its mix."""
        t, spans, m = self._template(layer), self.g.spans, self.m
        span = spans[i]
        (af, ab), (mf, mb) = t["attend"], t["merge"]
        partials = []
        queries = node_id(NodeKind.PROJECT, layer, i)
        for p in range(t["starts"][i], t["starts"][i + 1]):
            j = t["keys"][p]
            sources = t["reads"][t["read_starts"][p]:t["read_starts"][p + 1]]
            nid = node_id(NodeKind.ATTEND, layer, i, j)
            inputs = (queries, *(node_id(NodeKind.PROJECT, layer, k) for k in sources))
            yield nid, Node(NodeKind.ATTEND, layer, i, inputs, span, max(m[i], t["key_tokens"][p]), af[p], ab[p],
                            key_block=j, key_span=None if j < 0 else spans[j],
                            key_blocks=tuple(sources) if j < 0 else None, mask=MASKS[t["masks"][p]])
            partials.append(nid)
        if len(partials) > 1:
            nid = node_id(NodeKind.MERGE, layer, i)
            yield nid, Node(NodeKind.MERGE, layer, i, tuple(partials), span, m[i], mf[i], mb[i])
            attention = nid
        else:
            attention = partials[0]
        f, b = self.mix_cost
        yield node_id(NodeKind.MIX, layer, i), Node(NodeKind.MIX, layer, i, (residual_id(layer, i), attention), span,
                                                   m[i], f[i], b[i])

    def head(self, i: int) -> tuple[str, dict]:
        f, b = self.head_cost
        return node_id(NodeKind.HEAD, None, i), Node(NodeKind.HEAD, self.g.layers, i, (residual_id(self.g.layers, i),),
                                                    self.g.spans[i], self.m[i], f[i], b[i])

    def readers(self, node: Node) -> int:
        """The node's out-degree in the networkx graph."""
        kind = node.kind
        if kind == NodeKind.HEAD:
            return 0
        if kind in (NodeKind.ATTEND, NodeKind.MERGE):
            return 1  # its block's merge, or its mix
        if kind == NodeKind.PROJECT:
            return self._template(node.layer)["readers"][node.block]
        last = node.layer == self.g.layers - 1  # an embed's layer is -1: the last with no layers
        return 1 if last else 2  # the next layer's projection and mix, or the head


def _sum(values) -> int:
    """An exact sum (Python ints: a large model's FLOPs can pass int64 when added up)."""
    return sum(np.asarray(values).tolist())


def compact_graph(spec: ForwardSpec, on_layer=None) -> CompactGraph:
    """The compact logical graph of `spec` (graphs.build_graph gives the same nodes in networkx)."""
    return CompactGraph.build(spec, on_layer)


def build_graph(spec: ForwardSpec, on_layer=None) -> nx.DiGraph:
    """The logical graph of one forward pass (Thm 1.1 / 3.5 / 4.1 / 5.1 depending on the patterns).

    on_layer(done, total) is called as each layer's nodes are in (progress for large graphs).
    """
    return CompactGraph.build(spec).to_networkx(on_layer)
