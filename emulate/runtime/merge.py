"""The stable merge of partial softmax results (docs/numerics.md; Output_i = sum_t (B/A)_t A_t / sum_t A_t).

With lse = log A, two partials combine as
    lse = logaddexp(lse_a, lse_b),  out = out_a - sigmoid(lse_b - lse_a) * (out_a - out_b),
which never exponentiates a raw score. Empty rows (lse = -inf) carry no weight.

Every merge in the project (the local merge node, the Ray row and combine tasks, the paper
oracle's sums) goes through `TreeMerge`, one streaming accumulator over a fixed balanced tree, so
the bits of a merged result never depend on when its partials arrived or where they ran.
"""
from __future__ import annotations

import torch

Partial = tuple[torch.Tensor, torch.Tensor]  # (o [H, m, dh], lse [H, m])


def merge_pair(a: Partial, b: Partial) -> Partial:
    """(o_a, lse_a) + (o_b, lse_b) -> (o, lse); o is [H, m, dh], lse is [H, m]."""
    (oa, la), (ob, lb) = a, b
    # sigmoid(lb - la) is b's share; -inf - -inf would be NaN, and a row empty in both stays empty
    both_empty = (la == float("-inf")) & (lb == float("-inf"))
    share_b = torch.sigmoid(torch.where(both_empty, torch.zeros_like(la), lb - la))
    out = oa - share_b[..., None] * (oa - ob)
    return out, torch.logaddexp(la, lb)


class TreeMerge:
    """Partials pushed in order, merged in the balanced tree over that order; O(log n) held at once.

    The tree pairs neighbours level by level and carries an odd one out up a level. Folded as the
    partials arrive, that is a binary counter: a partial merges with the left neighbour of equal
    height; what is left at the end is the tree's right spine, folded right to left, which is
    exactly where the level-by-level tree carries its odd elements. Aligned runs of 2^h partials
    are whole subtrees, so merging their results gives the same bits as merging them all.
    """

    def __init__(self):
        self.stack: list[tuple[int, Partial]] = []

    def push(self, partial: Partial) -> None:
        height = 0
        while self.stack and self.stack[-1][0] == height:
            partial = merge_pair(self.stack.pop()[1], partial)
            height += 1
        self.stack.append((height, partial))

    def result(self) -> Partial:
        if not self.stack:
            raise ValueError("nothing to merge")
        partial = self.stack.pop()[1]
        while self.stack:
            partial = merge_pair(self.stack.pop()[1], partial)
        return partial


def merge(partials: list[Partial]) -> Partial:
    """Merge partials in the fixed balanced tree over their order (`TreeMerge`)."""
    tree = TreeMerge()
    for p in partials:
        tree.push(p)
    return tree.result()


def merge_stacked(o: torch.Tensor, lse: torch.Tensor) -> Partial:
    """Merge n partials stacked along a first axis (o [n, H, m, dh], lse [n, H, m]) in the same
    balanced tree as `merge` over their order, one level at a time: each level merges every
    neighbouring pair in one vectorized `merge_pair` and carries an odd last partial up a level,
    which is the tree TreeMerge folds (its docstring), so the result is the same math as
    `merge([(o[0], lse[0]), ..., (o[n-1], lse[n-1])])`."""
    if o.shape[0] == 0:
        raise ValueError("nothing to merge")
    while o.shape[0] > 1:
        n = o.shape[0] - o.shape[0] % 2
        mo, ml = merge_pair((o[0:n:2], lse[0:n:2]), (o[1:n:2], lse[1:n:2]))
        if n < o.shape[0]:
            mo, ml = torch.cat((mo, o[n:])), torch.cat((ml, lse[n:]))
        o, lse = mo, ml
    return o[0], lse[0]
