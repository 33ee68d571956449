"""The closed sets of the graph, in one place: node kinds, pair masks and attention patterns.

`StrEnum`s, so a member is its own string: graphs serialise to the same JSON and DOT as plain
strings would, and a graph reloaded from JSON compares equal member for member.
"""
from __future__ import annotations

from enum import StrEnum


class NodeKind(StrEnum):
    """One small call of the logical graph (docs/design.md, data flow)."""

    EMBED = "embed"  # token ids -> x_0[i]
    PROJECT = "project"  # x_l[i] -> q, k, v (norm, QKV, RoPE at global positions)
    ATTEND = "attend"  # q[i] x (k[j], v[j]) -> (o_ij, lse_ij): the pair call the theorems count
    MERGE = "merge"  # the partials of block i -> o[i], in a fixed balanced tree
    MIX = "mix"  # x_l[i], o[i] -> x_{l+1}[i] (out-projection, residual, norm, MLP)
    HEAD = "head"  # x_L[i] -> final-norm hidden state and next-token log-probabilities


class MaskKind(StrEnum):
    """The mask of one attend node."""

    NONE = "none"  # every key of the pair is visible
    CAUSAL = "causal"  # an aligned diagonal block: key k visible to query q when k <= q
    EXPLICIT = "explicit"  # anything else: the pattern's mask over the pair's positions
    SAMPLE = "sample"  # Thm 4.1: the block's queries against a random sample of keys


class PatternKind(StrEnum):
    """The mask of the large transformer T (docs/paper.md, Defs 2.3-2.5 and Thm 4.1)."""

    FULL = "full"
    CAUSAL = "causal"
    SLIDING = "sliding"
    SINK = "sink"
    SAMPLED = "sampled"
