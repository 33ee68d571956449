"""What runs each pair call: one small interface, two implementations.

An oracle takes one attend node of the graph, described as a `PairCall` (the query and key spans,
the pair's mask and the layer's pattern), with its projected q, k, v, and returns the partial
(o, lse): the block average B/A and log A per query row and head (docs/paper.md, Setting). The
run loop never asks which oracle it holds.

    KernelOracle  block attention returning (o, lse) (emulate/kernels.py): the fast, exact path.
    PaperOracle   the paper's literal constructions on a small transformer of capacity M + 1
                  (emulate/paper/): the research path, every invocation counted.

Users pass the frozen descriptions above; `bind` gives the object that runs one forward (the
paper oracle's invocation counts belong to one run, never to the description).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from emulate.config import EmulateError
from graphs import MaskKind, Pattern
from graphs.patterns import relative_range

Partial = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class PairCall:
    """One attend node: query block `span` against key block `key_span` (None: a sample of keys)."""

    layer: int
    span: tuple[int, int]
    key_span: tuple[int, int] | None
    mask: MaskKind
    pattern: Pattern

    @classmethod
    def of(cls, node: dict, pattern: Pattern) -> PairCall:
        key_span = node.get("key_span")
        return cls(node["layer"], tuple(node["span"]), tuple(key_span) if key_span else None,
                   MaskKind(node["mask"]), pattern)

    def visible(self) -> np.ndarray:
        """Boolean [mq, mk]: the pair's mask over its global positions."""
        return self.pattern.visible(np.arange(*self.span), np.arange(*self.key_span))


@runtime_checkable
class AttentionOracle(Protocol):
    """A pair call's implementation, bound to one forward."""

    name: str

    def attend(self, pair: PairCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Partial:
        """q [H, mq, dh], k and v [Hkv, mk, dh] -> (o [H, mq, dh], lse [H, mq])."""
        ...

    def summary(self) -> dict:
        """Keys this oracle adds to a run's stats (none for the kernel)."""
        ...


@dataclass(frozen=True)
class KernelOracle:
    """Block attention that returns (o, lse) (emulate/kernels.py); stateless, so it binds to itself."""

    name: str = "kernel"

    def bind(self, block_size: int, heads: int) -> KernelOracle:
        return self

    def attend(self, pair: PairCall, q, k, v, scale: float) -> Partial:
        from emulate.kernels import attend, attend_intervals

        if pair.mask == MaskKind.EXPLICIT:
            # the mask as per-row intervals: the call is cut to the band each row sees, never the whole block
            return attend_intervals(q, k, v, scale, *relative_range(pair.pattern, pair.span, pair.key_span))
        mask = MaskKind.NONE if pair.mask == MaskKind.SAMPLE else pair.mask
        return attend(q, k, v, scale, mask)

    def summary(self) -> dict:
        return {}


@dataclass(frozen=True)
class PaperOracle:
    """The paper's constructions on a small transformer of capacity M + 1 (docs/paper.md).

    stable: the stabilised variant (the same calls, the A call's scores shifted by a norm bound).
    pack_heads: Lemma 3.3, single-head instances per call: 1..heads, or "all".
    literal_exp: softmax as raw exponential sums, to measure where they overflow.
    """

    stable: bool = False
    pack_heads: int | str = 1
    literal_exp: bool = False

    @property
    def name(self) -> str:
        return "paper-stable" if self.stable else "paper"

    def packed(self, heads: int) -> int:
        """The number of heads per call for a model with `heads` heads; refuses what cannot be packed."""
        if self.pack_heads == "all":
            return heads
        if isinstance(self.pack_heads, bool) or not isinstance(self.pack_heads, int) or not 1 <= self.pack_heads <= heads:
            raise EmulateError(f"pack_heads must be an integer in [1, {heads}] (the model's heads) or 'all', "
                               f"got {self.pack_heads!r}")
        return self.pack_heads

    def bind(self, block_size: int, heads: int) -> AttentionOracle:
        from emulate.paper.oracle import PaperAttention

        return PaperAttention(block_size, stable=self.stable, pack_heads=self.packed(heads),
                              literal_exp=self.literal_exp)


Oracle = KernelOracle | PaperOracle
ORACLE_NAMES = ("kernel", "paper", "paper-stable")


def oracle_named(name: str, pack_heads: int | str | None = None) -> Oracle:
    """The oracle a run names by string (the CLI's --oracle): kernel, paper or paper-stable."""
    if name not in ORACLE_NAMES:
        raise EmulateError(f"unknown oracle {name!r} (choose from {', '.join(ORACLE_NAMES)})")
    if name == "kernel":
        if pack_heads is not None:
            raise EmulateError("--pack-heads packs the paper oracle's calls; add --oracle paper")
        return KernelOracle()
    return PaperOracle(stable=name == "paper-stable", pack_heads=1 if pack_heads is None else pack_heads)
