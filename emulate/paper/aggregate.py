"""Aggregation of a pair's partials: weights A and block averages B/A, in log form.

docs/paper.md: Output_i = sum_t (B/A)_t A_t / sum_t A_t. With lse = log A this is the stable merge the
graph's merge nodes already use (emulate.merge). A construction that differences prefix sums
(Thm 5.1: window = prefix to i minus prefix to i - r) also needs the inverse, removing a partial
whose keys are a subset of another's:

    rho = A_b / A_a = exp(lse_b - lse_a),   lse = lse_a + log1p(-rho),   o = (o_a - rho o_b) / (1 - rho)

No raw exponential of a score appears; what cannot be avoided is the cancellation in 1 - rho when
the removed prefix carries nearly all the weight (the precision loss of docs/numerics.md, Approximate modes).
Lemma A.2 shows these sums could themselves run as oracle calls (uniform attention sums its rows);
here they run as position-wise arithmetic, like the graph's merge nodes.
"""
from __future__ import annotations

import torch

from emulate.runtime.merge import merge_pair


def add(a, b):
    """The partial over the union of two disjoint key sets."""
    return merge_pair(a, b)


def remove(a, b):
    """The partial over a's keys minus b's (b's keys a subset of a's); rows with b empty keep a."""
    (oa, la), (ob, lb) = a, b
    rho = torch.exp(torch.where(torch.isinf(lb) & (lb < 0), lb, lb - la))
    lse = la + torch.log1p(-rho)
    o = (oa - rho[..., None] * ob) / (1.0 - rho)[..., None]
    return o, lse


def scatter(rows: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, m: int):
    """A partial over some query rows, widened to all m rows of the block (empty elsewhere)."""
    H, _, d = o.shape
    full_o = torch.zeros(H, m, d, dtype=o.dtype, device=o.device)
    full_lse = torch.full((H, m), float("-inf"), dtype=lse.dtype, device=lse.device)
    full_o[:, rows] = o
    full_lse[:, rows] = lse
    return full_o, full_lse
