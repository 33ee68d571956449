"""The built-in oracles: what runs each pair call, registered by name as a user's are (registry.py).

An oracle takes one attend node of the graph, described as a `PairCall` (the query and key spans,
the pair's mask and the layer's pattern), with its projected q, k, v, and returns the partial
(o, lse): the block average B/A and log A per query row and head (docs/paper.md, Setting). The
run loop never asks which oracle it holds (emulate/runtime/contract.py, AttentionOracle).

    KernelOracle  block attention returning (o, lse) (emulate/runtime/kernels.py): the fast, exact path.
    PaperOracle   the paper's literal constructions on a small transformer of capacity M + 1
                  (emulate/paper/): the research path, every invocation counted.

Users pass the frozen descriptions above; `bind` gives the object that runs one forward (the
paper oracle's invocation counts belong to one run, never to the description).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from emulate.errors import EmulateError
from emulate.runtime.contract import BoundOracle, PairCall, Partial
from graphs import MaskKind
from graphs.patterns import relative_range

# what the raw paper oracle promises (PaperOracle.tolerance): measured on the presets, docs/numerics.md
RAW_PAPER_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-8}


@dataclass(frozen=True)
class KernelOracle:
    """Block attention that returns (o, lse) (emulate/runtime/kernels.py); stateless, so it binds to itself."""

    name: str = "kernel"
    concurrent = True  # stateless: call workers may share it
    distributed = True  # pickles, and has no counts to add up
    half = True  # bfloat16 and float16 calls, float32 partials (emulate/runtime/kernels.py)

    def bind(self, block_size: int, heads: int) -> KernelOracle:
        return self

    def attend(self, pair: PairCall, q, k, v, scale: float) -> Partial:
        from emulate.runtime.kernels import attend, attend_intervals

        if pair.mask == MaskKind.EXPLICIT:
            # the mask as per-row intervals: the call is cut to the band each row sees, never the whole block
            return attend_intervals(q, k, v, scale, *relative_range(pair.pattern, pair.span, pair.key_span))
        mask = MaskKind.NONE if pair.mask == MaskKind.SAMPLE else pair.mask
        return attend(q, k, v, scale, mask)

    def attend_blocks(self, pairs: list[PairCall], q, k, v, scale: float) -> Partial:
        """The pair calls of one query against whole key blocks (mask none), stacked k, v [n, Hkv, mk, dh]:
        one kernel invocation, the blocks its batch (emulate/runtime/kernels.py, attend_blocks)."""
        from emulate.runtime.kernels import attend_blocks

        return attend_blocks(q, k, v, scale)

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

    def tolerance(self, dtype: torch.dtype) -> float | None:
        """The raw variant reads A = p / (1 - p) from an output p = A / (A + 1): the cancellation in
        1 - p costs digits as A grows, far more in float32 than in float64 (docs/numerics.md)."""
        return None if self.stable else RAW_PAPER_TOLERANCE[dtype]

    def bind(self, block_size: int, heads: int) -> BoundOracle:
        from emulate.paper.oracle import PaperAttention

        return PaperAttention(block_size, stable=self.stable, pack_heads=self.packed(heads),
                              literal_exp=self.literal_exp)


def paper(pack_heads: int | str = 1) -> PaperOracle:
    """The registered "paper" oracle: the raw constructions."""
    return PaperOracle(stable=False, pack_heads=pack_heads)


def paper_stable(pack_heads: int | str = 1) -> PaperOracle:
    """The registered "paper-stable" oracle: the A call's scores shifted by a norm bound."""
    return PaperOracle(stable=True, pack_heads=pack_heads)
