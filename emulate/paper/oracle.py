"""The paper oracle: each attend node of the graph realised by literal small-transformer calls.

It plays the kernel oracle's role (emulate.runtime.kernels.attend) in the same graph and executors: for a
pair (query block, key block) it returns (o, lse), o the block average B/A and lse = log A, A read
from the oracle's own output through Lemma 3.1's synthetic token (log A = log(p / (1 - p)), plus
the stabilised variant's shift c). Which layouts a pair needs is emulate.paper.layouts' job; how a
layout becomes calls is emulate.paper.calls'; this module only adds and subtracts the partials.

    capacity M + 1: a call holds at most M real rows plus the synthetic token of Lemma 3.1 and
    Claim B.6 (B calls and Thm 4.1's sample calls hold at most M).
"""
from __future__ import annotations

import torch

from emulate.runtime.contract import PairCall, Partial
from emulate.paper import aggregate
from emulate.paper.calls import Calls
from emulate.paper.layouts import plan_pair
from emulate.paper.small import SmallTransformer
from graphs import MaskKind


class PaperAttention:
    """Realises attend nodes with a SmallTransformer of capacity block_size + 1 and counts its calls.

    The running form of `emulate.PaperOracle` for one forward (emulate/runtime/oracles.py, AttentionOracle).
    stable: the stabilised variant (same calls, the A call's scores shifted by a norm bound).
    pack_heads: Lemma 3.3, that many single-head instances per call (1: one head per call).
    literal_exp: the module computes softmax as raw exp sums (to measure where they overflow).
    """

    def __init__(self, block_size: int, stable: bool = False, pack_heads: int = 1, literal_exp: bool = False):
        self.block_size = block_size
        self.stable = stable
        self.module = SmallTransformer(block_size + 1, literal_exp=literal_exp)
        self.calls = Calls(self.module, stable=stable, pack_heads=pack_heads)
        self.name = "paper-stable" if stable else "paper"

    def attend(self, pair: PairCall, q, k, v, scale: float) -> Partial:
        """q [H, mq, d], k and v [Hkv, mk, d] of one attend node -> (o [H, mq, d], lse [H, mq]).

        The sampled pattern (Thm 4.1) makes only the B/A call: its one partial per block is the
        estimate itself and no merge reads a weight, so its lse is NaN (never computed).
        """
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # calls of a few hundred rows: intra-op threads cost 10x more than they give
        try:
            return self._attend(pair, q, k, v, scale)
        finally:
            torch.set_num_threads(threads)

    def _attend(self, pair: PairCall, q, k, v, scale):
        H, mq, _ = q.shape
        if k.shape[0] != H:  # GQA: each query head's instance carries its own copy of its KV head
            k = k.repeat_interleave(H // k.shape[0], dim=0)
            v = v.repeat_interleave(H // v.shape[0], dim=0)
        layouts, visible = plan_pair(pair, k.shape[1])
        if pair.mask == MaskKind.SAMPLE:
            return self.calls.run(layouts[0], q, k, v, scale)
        acc = None
        for sign in (1, -1):  # add every partial first, then take the shifted prefixes away (Thm 5.1)
            for layout in (lay for lay in layouts if lay.sign == sign):
                o, lse = self.calls.run(layout, q, k, v, scale)
                part = aggregate.scatter(torch.as_tensor(layout.queries, device=q.device), o, lse, mq)
                acc = part if acc is None else (aggregate.add if sign > 0 else aggregate.remove)(acc, part)
        if acc is None:  # the graph never emits an empty pair; keep the contract if it ever did
            return torch.zeros_like(q), torch.full((H, mq), float("-inf"), dtype=q.dtype, device=q.device)
        o, lse = acc
        empty = torch.as_tensor(~visible, device=q.device)
        if bool(empty.any()):  # rows whose mask hides the whole block: no weight, never NaN
            o = o.masked_fill(empty[None, :, None], 0.0)
            lse = lse.masked_fill(empty[None, :], float("-inf"))
        return o, lse

    def summary(self) -> dict:
        """The run's oracle keys: literal forward passes, counted, and the capacity."""
        c = self.module.counts()
        return {"oracle_invocations": c["invocations"], "oracle_capacity": self.module.capacity,
                "oracle_instances": c["instances"], "oracle_pack_heads": self.calls.pack_heads,
                "oracle_max_rows": c["max_rows"], "oracle_invocations_by_construction": c["by_construction"]}
