"""The oracle O: a real small transformer that refuses inputs longer than its capacity.

The paper's oracle (docs/paper.md, Setting and notation) is a standard transformer on at most M tokens whose weights
the algorithm chooses, and which returns only its final output. This one has L' = 1 layer of H'
softmax attention heads followed by a token-wise map psi (Def 2.1 and 2.2: attention
softmax((X Wq)(X Wk)^T)(X Wv) per head, then an MLP applied to each token). It has no residual, no
side outputs and no access to its own scores: whatever a construction learns, it learns from the
returned rows. Every call is one literal forward pass and is counted.

Masks are the two every transformer has: causal, and key padding (BERT's attention_mask), which
the layouts use only for rows that hold a query but no key (a ragged block, the sink keys of Sec. 5).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch


class CapacityError(ValueError):
    """An input longer than the oracle's capacity: the small transformer never sees it."""


@dataclass(frozen=True)
class Weights:
    """The weights of one call, chosen by the construction (Lemma 3.1's padded Wq, Wk, Wv).

    q, k: [H', width, d_qk] and v: [H', width, d_v] are the diagonal blocks of block-selector
    matrices (Lemma 3.3): head h reads only its own column block of the input, so the full
    [H' width, H' d] matrix is block diagonal and its zero blocks are never multiplied.
    psi is the token-wise output map (the paper's MLP; "MLPs may divide", Lemma 3.1 / A.2).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    psi: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def heads(self) -> int:
        return self.q.shape[0]


class SmallTransformer:
    """One attention layer with H' heads and a token-wise psi, on at most `capacity` rows.

    `literal_exp=True` computes softmax as exp(S) / sum exp(S), the raw form of the paper's proofs,
    instead of the max-subtracted form every real implementation uses; it exists to measure where
    raw exponential sums overflow.
    """

    def __init__(self, capacity: int, literal_exp: bool = False):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.literal_exp = literal_exp
        self.invocations = 0
        self.instances = 0  # single-head instances: H' per invocation (Lemma 3.3)
        self.by_construction: Counter[str] = Counter()
        self.max_rows = 0

    def __call__(self, x: torch.Tensor, w: Weights, causal: bool, key_mask: torch.Tensor | None = None,
                 construction: str = "") -> torch.Tensor:
        """x [n, H' * width] -> y [n, H' * d_v]: one forward pass of the small transformer."""
        n = x.shape[0]
        if n > self.capacity:
            raise CapacityError(f"the small transformer takes at most {self.capacity} rows, got {n}")
        self.invocations += 1
        self.instances += w.heads
        self.by_construction[construction] += 1
        self.max_rows = max(self.max_rows, n)

        visible = None
        if causal:
            visible = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        if key_mask is not None:
            visible = key_mask[None, :].expand(n, n) if visible is None else visible & key_mask[None, :]
        # head h reads its own column block (block-selector weights, Lemma 3.3). The heads run one
        # after another on freshly allocated operands: BLAS rounds differently with the batch size
        # and even with the alignment of a view, and a packed call must give the bits of H' calls.
        width = x.shape[1] // w.heads
        y = torch.stack([self._head(x[:, h * width:(h + 1) * width].clone(), w.q[h].clone(), w.k[h].clone(),
                                    w.v[h].clone(), visible) for h in range(w.heads)])  # [H', n, d_v]
        if w.psi is not None:
            y = w.psi(y)
        return y.transpose(0, 1).reshape(n, -1)

    def _head(self, x, wq, wk, wv, visible):
        """softmax((x Wq)(x Wk)^T) (x Wv) of one head, under the causal / key-padding mask."""
        scores = (x @ wq) @ (x @ wk).T.contiguous()
        if self.literal_exp:  # Def 2.1 as written: raw exponentials, no max subtracted
            e = scores.exp()
            if visible is not None:
                e = e.masked_fill(~visible, 0.0)
            attn = e / e.sum(-1, keepdim=True)
        else:
            if visible is not None:
                scores = scores.masked_fill(~visible, float("-inf"))
            attn = torch.softmax(scores, dim=-1)
        return attn @ (x @ wv)

    def counts(self) -> dict:
        return {"invocations": self.invocations, "instances": self.instances, "max_rows": self.max_rows,
                "by_construction": dict(sorted(self.by_construction.items()))}
