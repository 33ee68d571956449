"""Compile a ForwardSpec into the logical task graph: one node per small call.

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
"""
from __future__ import annotations

import networkx as nx
import numpy as np

from graphs.kinds import MaskKind, NodeKind, PatternKind
from graphs.patterns import PatternError, block_spans, key_blocks, pair_mask
from graphs.spec import ForwardSpec


def node_id(kind: NodeKind, layer: int | None, block: int, key_block: int | None = None) -> str:
    parts = [kind] if layer is None else [f"L{layer}", kind]
    parts.append(str(block))
    if key_block is not None:
        parts.append("sample" if key_block < 0 else str(key_block))
    return "/".join(parts)


def sample_permutation(tokens: int, seed: int) -> np.ndarray:
    """The random permutation tau of [N] of Thm 4.1, drawn once per graph (PCG64: stable bits)."""
    return np.random.default_rng(seed).permutation(tokens)


def sampled_keys(tau: np.ndarray, span: tuple[int, int]) -> np.ndarray:
    """Key positions tau(S_t) for the query block spanning `span`, sorted for memory locality."""
    return np.sort(tau[span[0] : span[1]])


def build_graph(spec: ForwardSpec, on_layer=None) -> nx.DiGraph:
    """The logical graph of one forward pass (Thm 1.1 / 3.5 / 4.1 / 5.1 depending on the patterns).

    on_layer(done, total) is called as each layer's nodes are in (progress for large graphs).
    """
    spans = block_spans(spec.tokens, spec.block_size)
    if any(p.kind == PatternKind.SAMPLED for p in spec.patterns) and any(p.causal for p in spec.patterns):
        raise PatternError("sampled attention needs a bidirectional (encoder) model")
    g = nx.DiGraph(spec=spec.to_dict(), blocks=len(spans), block_spans=spans)
    H, Hkv, dh, d, f, b = spec.heads, spec.kv_heads, spec.head_dim, spec.width, spec.mlp_width, spec.dtype_bytes
    tau = None
    if any(p.kind == PatternKind.SAMPLED for p in spec.patterns):
        tau = sample_permutation(spec.tokens, spec.seed)
        g.graph["sample_seed"] = spec.seed

    def add(nid, inputs, **attrs):
        g.add_node(nid, inputs=list(inputs), **attrs)
        for src in dict.fromkeys(inputs):
            g.add_edge(src, nid)

    residual = []
    for i, (s, e) in enumerate(spans):
        m = e - s
        nid = node_id(NodeKind.EMBED, None, i)
        add(nid, [], kind=NodeKind.EMBED, layer=-1, block=i, span=(s, e), tokens=m, flops=m * d, bytes=m * d * b)
        residual.append(nid)

    for layer, pattern in enumerate(spec.patterns):
        projected = []
        for i, (s, e) in enumerate(spans):
            m = e - s
            nid = node_id(NodeKind.PROJECT, layer, i)
            add(nid, [residual[i]], kind=NodeKind.PROJECT, layer=layer, block=i, span=(s, e), tokens=m,
                flops=2 * m * d * (H + 2 * Hkv) * dh, bytes=m * (d + (H + 2 * Hkv) * dh) * b)
            projected.append(nid)
        mixed = []
        for i, (s, e) in enumerate(spans):
            m = e - s
            partials = []
            if pattern.kind == PatternKind.SAMPLED:
                keys = sampled_keys(tau, (s, e))
                sources = sorted({int(k) // spec.block_size for k in keys})
                nid = node_id(NodeKind.ATTEND, layer, i, -1)
                add(nid, [projected[i]] + [projected[j] for j in sources], kind=NodeKind.ATTEND, layer=layer,
                    block=i, key_block=-1, key_blocks=sources, span=(s, e), key_span=None, mask=MaskKind.SAMPLE,
                    tokens=max(m, len(keys)), flops=4 * H * dh * m * len(keys),
                    bytes=(m * H * (2 * dh + 1) + 2 * len(keys) * Hkv * dh) * b)
                partials.append(nid)
            else:
                for j in key_blocks(pattern, spans, i):
                    pm = pair_mask(pattern, spans[i], spans[j])
                    mk = spans[j][1] - spans[j][0]
                    nid = node_id(NodeKind.ATTEND, layer, i, j)
                    add(nid, [projected[i], projected[j]], kind=NodeKind.ATTEND, layer=layer, block=i, key_block=j,
                        span=(s, e), key_span=spans[j], mask=pm.kind, tokens=max(m, mk),
                        flops=4 * H * dh * pm.visible, bytes=(m * H * (2 * dh + 1) + 2 * mk * Hkv * dh) * b)
                    partials.append(nid)
            if len(partials) > 1:
                nid = node_id(NodeKind.MERGE, layer, i)
                add(nid, partials, kind=NodeKind.MERGE, layer=layer, block=i, span=(s, e), tokens=m,
                    flops=5 * m * H * dh * (len(partials) - 1), bytes=(len(partials) + 1) * m * H * (dh + 1) * b)
                attention = nid
            else:
                attention = partials[0]
            nid = node_id(NodeKind.MIX, layer, i)
            mlp_mats = 3  # gate/up/down (SwiGLU); GELU MLPs have 2 and are priced alike for simplicity
            add(nid, [residual[i], attention], kind=NodeKind.MIX, layer=layer, block=i, span=(s, e), tokens=m,
                flops=2 * m * (H * dh * d + mlp_mats * d * f), bytes=m * (2 * d + H * dh) * b)
            mixed.append(nid)
        residual = mixed
        if on_layer is not None:
            on_layer(layer + 1, spec.layers)

    for i, (s, e) in enumerate(spans):
        m = e - s
        add(node_id(NodeKind.HEAD, None, i), [residual[i]], kind=NodeKind.HEAD, layer=spec.layers, block=i, span=(s, e),
            tokens=m, flops=2 * m * d * spec.vocab, bytes=m * (d + (1 if spec.vocab else 0)) * b)
    return g
