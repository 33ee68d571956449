"""Attention patterns: which (query block, key block) pairs exist, and with which mask.

A pattern is the mask of the large transformer T (PAPER.md, Defs 2.3-2.5). Visibility is a
function of global token positions, so a pair's mask is read off the positions it holds, and a
pair with no visible (query, key) entry is never emitted.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import ceil

import numpy as np

PATTERNS = ("full", "causal", "sliding", "sink", "sampled")


class PatternError(ValueError):
    """An attention pattern or its parameters are out of range."""


@dataclass(frozen=True)
class Pattern:
    """The mask of T: `kind` in PATTERNS, `window` r (sliding, sink), `sinks` s (sink).

    sliding r (Def 2.4): query i sees keys i-r+1 .. i.
    sink s + window r (Def 2.5): query i sees keys 0 .. s-1 and the window i-r+1 .. i.
    sampled (Thm 4.1): bidirectional T, estimated from a random sample of M keys per block.
    """

    kind: str
    window: int | None = None
    sinks: int | None = None

    def __post_init__(self):
        if self.kind not in PATTERNS:
            raise PatternError(f"unknown attention pattern {self.kind!r} (choose from {', '.join(PATTERNS)})")
        if self.kind in ("sliding", "sink"):
            if self.window is None or self.window < 1:
                raise PatternError(f"--window must be >= 1 for {self.kind} attention, got {self.window}")
        elif self.window is not None:
            raise PatternError(f"--window applies to sliding and sink attention, not {self.kind}")
        if self.kind == "sink":
            if self.sinks is None or self.sinks < 1:
                raise PatternError(f"--sinks must be >= 1 for sink attention, got {self.sinks}")
        elif self.sinks is not None:
            raise PatternError(f"--sinks applies to sink attention, not {self.kind}")

    @property
    def causal(self) -> bool:
        return self.kind in ("causal", "sliding", "sink")

    def visible(self, q: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Boolean [len(q), len(k)]: may query position q see key position k?"""
        q = np.asarray(q)[:, None]
        k = np.asarray(k)[None, :]
        if not self.causal:
            return np.ones((q.shape[0], k.shape[1]), dtype=bool)
        seen = k <= q
        if self.kind in ("sliding", "sink"):
            near = k > q - self.window
            if self.kind == "sink":
                near = near | (k < self.sinks)
            seen = seen & near
        return seen

    def calls_bound(self, blocks: int, block_size: int) -> int:
        """The per-layer pair-call bound the paper's construction meets (DESIGN.md's table)."""
        B, M = blocks, block_size
        if self.kind == "full":
            return B * B
        if self.kind == "causal":
            return B * (B + 1) // 2
        if self.kind == "sampled":
            return B
        bound = (ceil(self.window / M) + 1) * B
        if self.kind == "sink":
            bound += ceil(self.sinks / M) * B
        return min(bound, B * (B + 1) // 2)

    def describe(self) -> str:
        if self.kind == "sliding":
            return f"sliding(r={self.window})"
        if self.kind == "sink":
            return f"sink(s={self.sinks}, r={self.window})"
        return self.kind


def block_spans(tokens: int, block_size: int) -> list[tuple[int, int]]:
    """Blocks S_t as half-open [start, end) spans; the last block is ragged when M does not divide N."""
    if block_size < 1:
        raise PatternError(f"--block-size must be >= 1, got {block_size}")
    if tokens < 1:
        raise PatternError(f"need at least one token, got {tokens}")
    return [(s, min(s + block_size, tokens)) for s in range(0, tokens, block_size)]


@dataclass(frozen=True)
class PairMask:
    """The mask of one block pair: 'none' (all visible), 'causal' (aligned diagonal) or 'explicit'.

    `visible` counts the (query, key) entries the pair attends to; it prices the pair's FLOPs.
    """

    kind: str
    visible: int


def pair_mask(pattern: Pattern, q_span: tuple[int, int], k_span: tuple[int, int]) -> PairMask:
    """Classify the mask of the pair (q_span, k_span) under `pattern`."""
    q0, q1 = q_span
    k0, k1 = k_span
    total = (q1 - q0) * (k1 - k0)
    if not pattern.causal:
        return PairMask("none", total)
    if k0 > q1 - 1:  # every key lies after every query
        return PairMask("none", 0)
    if pattern.kind == "causal" and k1 - 1 <= q0:
        return PairMask("none", total)
    seen = int(row_counts(pattern, q_span, k_span).sum())
    if seen == total:
        return PairMask("none", total)
    m = q1 - q0
    if (q0, q1) == (k0, k1) and seen == m * (m + 1) // 2:
        # a causal-type mask only shows keys k <= q, so on an aligned diagonal block a full count
        # means the whole lower triangle: a window or sink that never cuts into it (r >= M)
        return PairMask("causal", seen)
    return PairMask("explicit", seen)


def row_counts(pattern: Pattern, q_span: tuple[int, int], k_span: tuple[int, int]) -> np.ndarray:
    """Visible keys in k_span for each query in q_span, in O(len(q_span)) without the mask matrix."""
    q = np.arange(*q_span, dtype=np.int64)
    k0, k1 = k_span
    if not pattern.causal:
        return np.full(q.shape, k1 - k0, dtype=np.int64)
    upper = np.minimum(k1, q + 1)
    if pattern.kind == "causal":
        return np.maximum(0, upper - k0)
    lower = np.maximum(k0, q - pattern.window + 1)
    count = np.maximum(0, upper - lower)
    if pattern.kind == "sink":
        # sink keys below the window: [k0, min(k1, s, window start)), never counted twice
        count += np.maximum(0, np.minimum(np.minimum(k1, pattern.sinks), lower) - k0)
    return count


def key_blocks(pattern: Pattern, spans: list[tuple[int, int]], i: int) -> list[int]:
    """Key blocks j that query block i attends to (non-empty pairs only), in ascending order."""
    if pattern.kind in ("full", "sampled"):
        return list(range(len(spans)))
    q0, q1 = spans[i]
    M = spans[0][1] - spans[0][0]
    # Keys a causal query block can see lie in [0, q1); the window narrows that to [q0 - r + 1, q1).
    lo = 0 if pattern.kind == "causal" else max(0, q0 - pattern.window + 1)
    wanted = set(range(lo // M, i + 1))
    if pattern.kind == "sink":
        wanted |= set(range(0, min(i, (pattern.sinks - 1) // M) + 1))
    return [j for j in sorted(wanted) if pair_mask(pattern, spans[i], spans[j]).visible > 0]
