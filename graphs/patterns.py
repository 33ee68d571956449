"""Attention patterns: which (query block, key block) pairs exist, and with which mask.

A pattern is the mask of the large transformer T (docs/paper.md, Defs 2.3-2.5). Visibility is a
function of global token positions, so a pair's mask is read off the positions it holds, and a
pair with no visible (query, key) entry is never emitted. The mask arithmetic lives in one method,
`Pattern.key_range`; everything else (visibility matrices, row counts, key blocks, the reference's
chunks, the paper oracle's layouts) reads it.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from math import ceil

import numpy as np

from graphs.kinds import MaskKind, PatternKind

PATTERNS = tuple(PatternKind)


class PatternError(ValueError):
    """An attention pattern or its parameters are out of range."""


@dataclass(frozen=True)
class Pattern:
    """The mask of T: `kind` in PATTERNS, `window` r (sliding, sink), `sinks` s (sink).

    sliding r (Def 2.4): query i sees keys i-r+1 .. i.
    sink s + window r (Def 2.5): query i sees keys 0 .. s-1 and the window i-r+1 .. i.
    sampled (Thm 4.1): bidirectional T, estimated from a random sample of M keys per block.
    """

    kind: PatternKind
    window: int | None = None
    sinks: int | None = None

    def __post_init__(self):
        for name in ("window", "sinks"):  # a str, a float or a bool would pass the comparisons below, or fail deep
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise PatternError(f"--{name} must be an integer, got {value!r}")
            if value is not None:
                object.__setattr__(self, name, int(value))
        if self.kind not in PATTERNS:
            raise PatternError(f"unknown attention pattern {self.kind!r} (choose from {', '.join(PATTERNS)})")
        object.__setattr__(self, "kind", PatternKind(self.kind))
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

    def key_range(self, q, k_span: tuple[int, int | None] = (0, None)) -> KeyRange:
        """The keys of k_span = [k0, k1) that each query position in q sees (k1 None: no end).

        Def 2.4/2.5: query t sees the window [t - r + 1, t] (r infinite for causal, and every key
        for a bidirectional mask) and the sink keys [0, s). Returned per query as the window
        [lo, hi) and the sinks [k0, sink_hi), both cut to k_span; the two may overlap.
        """
        q = np.asarray(q, dtype=np.int64)
        k0, k1 = k_span
        end = np.iinfo(np.int64).max if k1 is None else k1
        if not self.causal:
            return KeyRange(np.full(q.shape, k0), np.full(q.shape, end), np.full(q.shape, k0))
        hi = np.minimum(end, q + 1)
        lo = np.full(q.shape, k0) if self.window is None else np.maximum(k0, q - self.window + 1)
        sink_hi = np.full(q.shape, k0)
        if self.kind == PatternKind.SINK:
            sink_hi = np.clip(np.minimum(self.sinks, q + 1), k0, max(k0, end))
        return KeyRange(lo, hi, sink_hi)

    def visible(self, q: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Boolean [len(q), len(k)]: may query position q see key position k?"""
        r = self.key_range(q)
        k = np.asarray(k)[None, :]
        return ((k >= r.lo[:, None]) & (k < r.hi[:, None])) | (k < r.sink_hi[:, None])

    def calls_bound(self, blocks: int, block_size: int) -> int:
        """The per-layer pair-call bound the paper's construction meets (docs/design.md, Attention patterns)."""
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


@dataclass(frozen=True)
class KeyRange:
    """Per query: the visible window [lo, hi) and the visible sink keys [k0, sink_hi) of a key span."""

    lo: np.ndarray
    hi: np.ndarray
    sink_hi: np.ndarray

    @property
    def window_keys(self) -> np.ndarray:
        return np.maximum(0, self.hi - self.lo)

    def counts(self, k0: int) -> np.ndarray:
        """Visible keys per query, each counted once: the window plus the sinks below it."""
        return self.window_keys + np.maximum(0, np.minimum(self.sink_hi, self.lo) - k0)


def windowed(kinds) -> bool:
    """Every layer's pattern kind sliding or sink: a block's keys die once the few later blocks whose
    windows hold it have passed, so the local executor runs block by block through all layers."""
    return all(k in (PatternKind.SLIDING, PatternKind.SINK) for k in kinds)


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

    kind: MaskKind
    visible: int


def pair_mask(pattern: Pattern, q_span: tuple[int, int], k_span: tuple[int, int]) -> PairMask:
    """Classify the mask of the pair (q_span, k_span) under `pattern`."""
    q0, q1 = q_span
    k0, k1 = k_span
    total = (q1 - q0) * (k1 - k0)
    if not pattern.causal:
        return PairMask(MaskKind.NONE, total)
    if k0 > q1 - 1:  # every key lies after every query
        return PairMask(MaskKind.NONE, 0)
    if pattern.kind == PatternKind.CAUSAL and k1 - 1 <= q0:
        return PairMask(MaskKind.NONE, total)
    seen = int(row_counts(pattern, q_span, k_span).sum())
    if seen == total:
        return PairMask(MaskKind.NONE, total)
    m = q1 - q0
    if (q0, q1) == (k0, k1) and seen == m * (m + 1) // 2:
        # a causal-type mask only shows keys k <= q, so on an aligned diagonal block a full count
        # means the whole lower triangle: a window or sink that never cuts into it (r >= M)
        return PairMask(MaskKind.CAUSAL, seen)
    return PairMask(MaskKind.EXPLICIT, seen)


# Query rows per tile of a windowed pair. A window or sink pair shows each row a band of keys, but a
# whole-block call with an additive mask computes every (query, key) score; cut into tiles of this
# many rows, each tile reads only the keys its rows see (emulate/runtime/kernels.py, attend_intervals). 128
# rows was the fastest of 128, 256 and 512 on this project's CPU (M = 2048, r = 1020: 33 ms for
# the diagonal pair against 70 ms whole, 12 ms against 71 ms for the previous block, 1.8 ms
# against 68 ms for the sinks).
TILE_ROWS = 128


def tile_boxes(lo: np.ndarray, hi: np.ndarray, sink: np.ndarray, mk: int,
               rows: int = TILE_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Per tile of `rows` query rows, the smallest run of keys [a, b) holding every key they see.

    Row t sees the keys [0, sink[t]) and [lo[t], hi[t]) of a key block of mk keys (KeyRange, made
    relative to the block's start); a tile that sees nothing has a >= b.
    """
    window = hi > lo
    first = np.where(sink > 0, 0, np.where(window, lo, mk))
    last = np.maximum(np.where(window, hi, 0), sink)  # one past the last visible key
    starts = np.arange(0, len(lo), rows)
    return np.minimum.reduceat(first, starts), np.maximum.reduceat(last, starts)


def tile_seen(lo: np.ndarray, hi: np.ndarray, sink: np.ndarray, rows: slice, a: int, b: int) -> np.ndarray:
    """The boolean [rows, b - a] mask of the keys [a, b) the query rows `rows` see (rows as
    tile_boxes takes them): all true where the tile runs unmasked on its box."""
    cols = np.arange(a, b)
    return ((cols >= lo[rows, None]) & (cols < hi[rows, None])) | (cols < sink[rows, None])


def relative_range(pattern: Pattern, q_span: tuple[int, int], k_span: tuple[int, int]):
    """(lo, hi, sink) per query of q_span: its visible keys as offsets into k_span."""
    k0 = k_span[0]
    r = pattern.key_range(np.arange(*q_span, dtype=np.int64), k_span)
    return r.lo - k0, r.hi - k0, r.sink_hi - k0


def kernel_entries(pattern: Pattern, mask: MaskKind, q_span: tuple[int, int], k_span: tuple[int, int]) -> int:
    """(query, key) scores the kernel oracle computes for a pair: the whole block, or for an
    explicit mask each tile's rows times its box (emulate/runtime/kernels.py, attend_intervals)."""
    m, mk = q_span[1] - q_span[0], k_span[1] - k_span[0]
    if mask != MaskKind.EXPLICIT:
        return m * mk
    a, b = tile_boxes(*relative_range(pattern, q_span, k_span), mk)
    rows = np.minimum(TILE_ROWS, m - np.arange(0, m, TILE_ROWS))
    return int((rows * np.maximum(0, b - a)).sum())


def row_counts(pattern: Pattern, q_span: tuple[int, int], k_span: tuple[int, int]) -> np.ndarray:
    """Visible keys in k_span for each query in q_span, in O(len(q_span)) without the mask matrix."""
    return pattern.key_range(np.arange(*q_span, dtype=np.int64), k_span).counts(k_span[0])


def key_blocks(pattern: Pattern, spans: list[tuple[int, int]], i: int) -> list[int]:
    """Key blocks j that query block i attends to (non-empty pairs only), in ascending order."""
    if not pattern.causal:
        return list(range(len(spans)))
    q0, q1 = spans[i]
    M = spans[0][1] - spans[0][0]
    ends = pattern.key_range(np.array([q0, q1 - 1]))
    # the block's first query sees the lowest window key, its last query the highest
    wanted = set(range(int(ends.lo[0]) // M, i + 1))
    if int(ends.sink_hi[1]) > 0:
        wanted |= set(range(0, min(i, (int(ends.sink_hi[1]) - 1) // M) + 1))
    return [j for j in sorted(wanted) if pair_mask(pattern, spans[i], spans[j]).visible > 0]


def sample_permutation(tokens: int, seed: int) -> np.ndarray:
    """The random permutation tau of [N] of Thm 4.1, drawn once per graph (PCG64: stable bits)."""
    return np.random.default_rng(seed).permutation(tokens)


def sampled_keys(tau: np.ndarray, span: tuple[int, int]) -> np.ndarray:
    """Key positions tau(S_t) for the query block spanning `span`, sorted for memory locality."""
    return np.sort(tau[span[0] : span[1]])
