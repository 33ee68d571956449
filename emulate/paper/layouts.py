"""Row layouts: which key and which query each row of an oracle call holds (docs/paper.md, "Row layouts").

Every construction of the paper reduces a block pair to one of two layouts, each realised by two
calls of the small transformer: an A call (with the synthetic token, returns the block weight A)
and a B call (plain softmax, returns the block average B/A), Lemma 3.1.

    prefix  (causal oracle): keys in a chosen order, one per row; the query that must see the
            first c keys sits in the row of the c-th key, so the causal mask does the selecting.
            Claim B.6 (ascending), Thm 3.5's A^(1) / A^(2) (ascending / reversed), Thm 5.1's
            shifted call (ascending, query i beside key i - r).
    pack    (bidirectional oracle): the pair packed by columns, every query sees every key:
            Lemma 3.1's off-diagonal layout, the sink keys of Sec. 5, Thm 4.1's sampled keys.

Indices here are local: keys index the pair's key list, queries index the query block's rows.
Pure index arithmetic on numpy, no tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emulate.runtime.contract import PairCall
from graphs import MaskKind, Pattern

SYNTHETIC = -2  # the synthetic token z = (0, ..., 0, 1) of Lemma 3.1: score 1 (or 0), value 0
NO_KEY = -1  # a padding row: it holds a query but no key, and is masked out as a key


@dataclass(frozen=True)
class Rows:
    """One call's input rows: key_src[row] (a key index, SYNTHETIC or NO_KEY), query_row[u] (the row of
    query u, or -1 when this call does not carry it), the causal flag."""

    key_src: np.ndarray
    query_row: np.ndarray
    causal: bool

    @property
    def n(self) -> int:
        return len(self.key_src)

    @property
    def key_mask(self) -> np.ndarray | None:
        padded = self.key_src == NO_KEY
        return ~padded if padded.any() else None


@dataclass(frozen=True)
class Layout:
    """A construction's layout for one block pair: `sign` -1 marks a partial to subtract (Thm 5.1).

    prefix: query queries[u] sees keys[:counts[u]] (counts distinct, 0 allowed: an empty prefix).
    pack: every query sees every key. `weighted` False: no A call (Thm 4.1 needs only B/A).
    """

    construction: str
    kind: str
    keys: np.ndarray
    queries: np.ndarray
    counts: np.ndarray | None = None
    sign: int = 1
    weighted: bool = True

    def a_rows(self) -> Rows:
        """The A call: the synthetic token joins the keys (first for prefix layouts, last for packs)."""
        u = np.arange(len(self.queries))
        if self.kind == "prefix":
            # Claim B.6: rows [z, K_0, ..., K_{n-1}]; row c sees z and the first c keys
            return Rows(np.concatenate([[SYNTHETIC], self.keys]), self.counts.copy(), causal=True)
        n = max(len(self.keys), len(self.queries)) + 1
        key_src = np.full(n, NO_KEY)
        key_src[: len(self.keys)] = self.keys
        key_src[-1] = SYNTHETIC
        return Rows(key_src, u, causal=False)

    def b_rows(self) -> Rows:
        """The B call: the same packing with no synthetic token, so softmax returns B/A itself."""
        if self.kind == "prefix":
            # row c - 1 holds the c-th key and sees exactly the first c; an empty prefix has no B/A
            return Rows(self.keys.copy(), np.where(self.counts > 0, self.counts - 1, -1), causal=True)
        n = max(len(self.keys), len(self.queries))
        key_src = np.full(n, NO_KEY)
        key_src[: len(self.keys)] = self.keys
        return Rows(key_src, np.arange(len(self.queries)), causal=False)

    def seen_keys(self, u: int) -> np.ndarray:
        """The keys query u sees in this layout (for tests and for the stable shift)."""
        return self.keys[: self.counts[u]] if self.kind == "prefix" else self.keys


def _all(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)


def lemma31_pair(mq: int, mk: int) -> list[Layout]:
    """Lemma 3.1, a full (bidirectional) pair: [X[S_t] | X[S_t']] packed by columns."""
    return [Layout("lemma3.1", "pack", _all(mk), _all(mq))]


def thm41_sample(mq: int, mk: int) -> list[Layout]:
    """Thm 4.1: the block's queries beside its random key sample tau(S_t); the call's B/A is the estimate."""
    return [Layout("thm4.1", "pack", _all(mk), _all(mq), weighted=False)]


def window_pair(pattern: Pattern, q_span: tuple[int, int], k_span: tuple[int, int]) -> tuple[list[Layout], np.ndarray]:
    """Layouts for a pair of a causal-family mask, and which query rows see any key at all.

    Query t sees, inside key block [k0, k1), the window [lo, hi) and the sink keys [k0, sink_hi)
    below it (`Pattern.key_range`; Def 2.5, never a key twice). causal is r = infinity, no sinks.
      diagonal pair, the window reaching the block start (or the sinks): Claim B.6, prefix to t.
      diagonal pair, a gap between sinks and window: Thm 5.1, prefix to t minus the shifted prefix
          [g0, t - r] with g0 the first non-sink key (one ordinary and one shifted call).
      earlier pair, whole block visible: Thm 3.5, A^(1) (keys <= own index) + A^(2) (keys above it).
      earlier pair, window starting inside the block: the sink keys, then the block reversed; query t
          sees s_j + (k1 - lo) of them (Claim B.6's reversal: a suffix is a prefix read backwards).
      earlier pair, window past the block, sinks in it: Sec. 5, the sink keys packed beside the queries.
    """
    q0, q1 = q_span
    k0, k1 = k_span
    mk = k1 - k0
    t = np.arange(q0, q1, dtype=np.int64)
    rho = t - q0
    keys = pattern.key_range(t, k_span)
    lo, sink_hi = keys.lo, keys.sink_hi
    has_window = keys.window_keys > 0
    prefix = has_window & (sink_hi >= lo)  # sinks and window join up: the visible keys are [k0, hi)
    gap = has_window & ~prefix
    sinks_only = ~has_window & (sink_hi > k0)
    # where sinks and window part, every query sees the same sinks: the whole of [k0, min(s, k1))
    sink_end = int(sink_hi[gap | sinks_only].max()) if (gap | sinks_only).any() else k0
    layouts = []
    if q_span == k_span:
        ordinary = prefix | gap
        if ordinary.any():
            layouts.append(Layout("claimB.6", "prefix", _all(mk), rho[ordinary], t[ordinary] - k0 + 1))
        if gap.any():
            g0 = sink_end - k0
            layouts.append(Layout("thm5.1-shifted", "prefix", np.arange(g0, mk), rho[gap], lo[gap] - k0 - g0, sign=-1))
    else:
        if q1 - q0 > mk:
            raise ValueError(f"an earlier key block {k_span} shorter than its query block {q_span}")
        if prefix.any():
            u = rho[prefix]
            layouts.append(Layout("thm3.5-lower", "prefix", _all(mk), u, u + 1))
            layouts.append(Layout("thm3.5-upper", "prefix", _all(mk)[::-1].copy(), u, mk - 1 - u))
        if gap.any():
            s_j = sink_end - k0
            order = np.concatenate([_all(s_j), np.arange(mk - 1, s_j - 1, -1)])
            layouts.append(Layout("thm5.1-suffix", "prefix", order, rho[gap], s_j + (k1 - lo[gap])))
        if sinks_only.any():
            layouts.append(Layout("sec5-sinks", "pack", _all(sink_end - k0), rho[sinks_only]))
    return layouts, has_window | sinks_only


def plan_pair(pair: PairCall, key_count: int) -> tuple[list[Layout], np.ndarray]:
    """All layouts of one attend node of the graph, and its query rows that see some key."""
    mq = pair.span[1] - pair.span[0]
    if pair.mask == MaskKind.SAMPLE:
        return thm41_sample(mq, key_count), np.ones(mq, dtype=bool)
    if not pair.pattern.causal:
        return lemma31_pair(mq, key_count), np.ones(mq, dtype=bool)
    return window_pair(pair.pattern, pair.span, pair.key_span)
