"""The stable merge of partial softmax results (PAPER.md: Output_i = sum_t (B/A)_t A_t / sum_t A_t).

With lse = log A, two partials combine as
    lse = logaddexp(lse_a, lse_b),  out = out_a - sigmoid(lse_b - lse_a) * (out_a - out_b),
which never exponentiates a raw score. Empty rows (lse = -inf) carry no weight.
"""
from __future__ import annotations

import torch


def merge_pair(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]):
    """(o_a, lse_a) + (o_b, lse_b) -> (o, lse); o is [H, m, dh], lse is [H, m]."""
    (oa, la), (ob, lb) = a, b
    # sigmoid(lb - la) is b's share; -inf - -inf would be NaN, and a row empty in both stays empty
    both_empty = torch.isinf(la) & torch.isinf(lb) & (la < 0) & (lb < 0)
    share_b = torch.sigmoid(torch.where(both_empty, torch.zeros_like(la), lb - la))
    out = oa - share_b[..., None] * (oa - ob)
    return out, torch.logaddexp(la, lb)


def merge(partials: list[tuple[torch.Tensor, torch.Tensor]]):
    """Merge partials in a fixed balanced tree over their order, so the bits do not depend on timing."""
    level = list(partials)
    while len(level) > 1:
        nxt = [merge_pair(level[k], level[k + 1]) for k in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]

