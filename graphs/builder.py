"""The logical task graph of a ForwardSpec: one node per small call, as networkx data.

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
layer pattern, nodes generated lazily); the price of each node kind lives here, in the `*_cost`
functions, which take plain ints or numpy arrays alike. `build_graph` is the compact form's
nodes put into networkx, so both forms hold the same nodes, edges and attributes by construction.
"""
from __future__ import annotations

import networkx as nx
import numpy as np

from graphs.kinds import NodeKind
from graphs.spec import ForwardSpec

MLP_MATS = 3  # gate/up/down (SwiGLU); GELU MLPs have 2 and are priced alike for simplicity


def node_id(kind: NodeKind, layer: int | None, block: int, key_block: int | None = None) -> str:
    parts = [kind] if layer is None else [f"L{layer}", kind]
    parts.append(str(block))
    if key_block is not None:
        parts.append("sample" if key_block < 0 else str(key_block))
    return "/".join(parts)


def residual_id(layer: int, block: int) -> str:
    """The node whose value is block `block`'s residual stream entering `layer`: the embedding, or the last mix."""
    return node_id(NodeKind.EMBED, None, block) if layer == 0 else node_id(NodeKind.MIX, layer - 1, block)


def sample_permutation(tokens: int, seed: int) -> np.ndarray:
    """The random permutation tau of [N] of Thm 4.1, drawn once per graph (PCG64: stable bits)."""
    return np.random.default_rng(seed).permutation(tokens)


def sampled_keys(tau: np.ndarray, span: tuple[int, int]) -> np.ndarray:
    """Key positions tau(S_t) for the query block spanning `span`, sorted for memory locality."""
    return np.sort(tau[span[0] : span[1]])


# -- the price of each node kind: (flops, bytes) for a block of m tokens ----------------------------
# m, mk, visible and partials may be ints or numpy int64 arrays (one entry per node).

def embed_cost(spec: ForwardSpec, m):
    return m * spec.width, m * spec.width * spec.dtype_bytes


def project_cost(spec: ForwardSpec, m):
    qkv = (spec.heads + 2 * spec.kv_heads) * spec.head_dim
    return 2 * m * spec.width * qkv, m * (spec.width + qkv) * spec.dtype_bytes


def attend_cost(spec: ForwardSpec, m, mk, visible):
    """m queries against mk keys of which `visible` (query, key) entries are attended."""
    H, Hkv, dh = spec.heads, spec.kv_heads, spec.head_dim
    return 4 * H * dh * visible, (m * H * (2 * dh + 1) + 2 * mk * Hkv * dh) * spec.dtype_bytes


def merge_cost(spec: ForwardSpec, m, partials):
    H, dh = spec.heads, spec.head_dim
    return 5 * m * H * dh * (partials - 1), (partials + 1) * m * H * (dh + 1) * spec.dtype_bytes


def mix_cost(spec: ForwardSpec, m):
    H, dh, d = spec.heads, spec.head_dim, spec.width
    return 2 * m * (H * dh * d + MLP_MATS * d * spec.mlp_width), m * (2 * d + H * dh) * spec.dtype_bytes


def head_cost(spec: ForwardSpec, m):
    d = spec.width
    return 2 * m * d * spec.vocab, m * (d + (1 if spec.vocab else 0)) * spec.dtype_bytes


def build_graph(spec: ForwardSpec, on_layer=None) -> nx.DiGraph:
    """The logical graph of one forward pass (Thm 1.1 / 3.5 / 4.1 / 5.1 depending on the patterns).

    on_layer(done, total) is called as each layer's nodes are in (progress for large graphs).
    """
    from graphs.compact import CompactGraph  # compact.py reads the prices above

    return CompactGraph.build(spec).to_networkx(on_layer)
