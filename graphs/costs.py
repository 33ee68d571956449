"""The price of each node kind, (flops, bytes), in one place: the graph, the plan and the planner read it here.

m, mk, visible and partials may be ints or numpy int64 arrays (one entry per node).
"""
from __future__ import annotations

from graphs.spec import ForwardSpec

MLP_MATS = 3  # gate/up/down (SwiGLU); GELU MLPs have 2 and are priced alike for simplicity


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
