"""Thm 4.1 on inputs meeting its assumption: bounded scores, values that do not cancel.

Thm 4.1: if 1/C <= a_ij = exp(<q_i, k_j>) <= C and the values do not cancel (constant D), then
query block t attending only to the keys tau(S_t) of one random permutation tau gives a (1 + eps)
approximation of every row with probability >= 0.9 once M >= 8 C^4 log(40 N) / eps^2.

`bounded_inputs` draws such an instance with the scores spread over the whole range [-log C, log C]
(q and k on a circle of radius sqrt(log C), so <q_i, k_j> = log C cos(angle)), not bunched near 0
as random high-dimensional directions would be; values are uniform in [0, 1] (no cancellation).
`sampled_estimate` runs the estimator with the paper oracle, one B/A call per block.
"""
from __future__ import annotations

import math

import torch

from emulate.runtime.contract import PairCall
from emulate.paper.oracle import PaperAttention
from graphs import MaskKind, Pattern, block_spans, sample_permutation, sampled_keys


def bounded_inputs(tokens: int, C: float, value_dim: int = 8, seed: int = 0, dtype=torch.float64):
    """q, k [1, N, 2] with |<q_i, k_j>| <= log C (the whole range is used); v [1, N, value_dim] in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    radius = math.sqrt(math.log(C))
    angles = 2 * math.pi * torch.rand(2, tokens, generator=gen, dtype=dtype)
    q = radius * torch.stack([angles[0].cos(), angles[0].sin()], -1)[None]
    k = radius * torch.stack([angles[1].cos(), angles[1].sin()], -1)[None]
    v = torch.rand(1, tokens, value_dim, generator=gen, dtype=dtype)
    # the oracle's head dim is the value width; pad q, k with zero columns to match (scores unchanged)
    pad = torch.zeros(1, tokens, value_dim - 2, dtype=dtype)
    return torch.cat([q, pad], -1), torch.cat([k, pad], -1), v


def exact_attention(q, k, v, chunk: int = 1024) -> torch.Tensor:
    """softmax(q k^T) v in row chunks (scale 1, as in Def 2.1), never an N x N matrix."""
    return torch.cat([torch.softmax(q[:, a:a + chunk] @ k.transpose(-1, -2), -1) @ v
                      for a in range(0, q.shape[1], chunk)], dim=1)


def sampled_estimate(q, k, v, block_size: int, seed: int, oracle: PaperAttention | None = None) -> torch.Tensor:
    """Thm 4.1's estimate: block t of queries against the keys tau(S_t), one oracle call per block."""
    tokens = q.shape[1]
    oracle = oracle or PaperAttention(block_size)
    tau = sample_permutation(tokens, seed)
    out = torch.empty_like(v[:, :tokens])
    for span in block_spans(tokens, block_size):
        keys = torch.from_numpy(sampled_keys(tau, span))
        pair = PairCall(0, span, None, MaskKind.SAMPLE, Pattern("sampled"))
        o, _ = oracle.attend(pair, q[:, span[0]:span[1]], k[:, keys], v[:, keys], 1.0)
        out[:, span[0]:span[1]] = o
    return out


def row_rel_err(est: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """||est_i - exact_i|| / ||exact_i|| per row (the paper's per-row measure)."""
    return (est - exact).norm(dim=-1).flatten() / exact.norm(dim=-1).flatten()


def thm41_bound(C: float, tokens: int, eps: float) -> float:
    """The block size Thm 4.1 asks for: M >= 8 C^4 log(40 N) / eps^2."""
    return 8 * C ** 4 * math.log(40 * tokens) / eps ** 2

