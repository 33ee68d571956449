"""Realise one layout as literal oracle calls: build the inputs and weights, invoke, read A and B/A.

Input rows of one single-head instance, built from vectors already in memory (the project node has
applied T's position-wise Wq, Wk, Wv and RoPE at global positions, so T's weights enter here as the
projected rows and the oracle's own weights are selectors):

    columns  K (d) | V (d) | Q (d) | ONE | REAL | SHIFT
    row      the key of key_src[row] (0 on z), its value, the query of that row (0 if none),
             1, 1 on real keys and 0 on z, minus the row's query shift c (stabilised variant)

Lemma 3.1's A call pads Wq, Wk with one extra output column (the "corner"):
    paper:      query corner <- ONE, key corner <- ONE: real scores gain +1, z scores exactly 1, so
                softmax weights are a_ij / (A + 1); value REAL; psi(p) = p / (1 - p) returns A.
    stabilised: query corner <- SHIFT (= -c), key corner <- REAL: real scores s - c, z scores 0, so
                the call returns A e^{-c}; with c near log A (between a norm bound and a mean-key
                bound, see `shift`) p stays away from 1 and from underflow, and the readout
                p / (1 - p) keeps full precision. Same calls, same rows: only where the padded
                corner entries sit changes.
The B call is plain softmax attention on the same packing without z (value V, psi the identity), so
it returns B/A; the stabilised variant shifts its scores by -c too, which softmax ignores.
Lemma 3.3: H' instances with the same rows run as one call, inputs concatenated by columns.
"""
from __future__ import annotations

import math

import torch

from emulate.paper.layouts import Layout, Rows
from emulate.paper.small import SmallTransformer, Weights


def _readout_a(p: torch.Tensor) -> torch.Tensor:
    """psi of the A call (Lemma 3.1): A = p / (1 - p), token-wise."""
    return p / (1.0 - p)


class Calls:
    """Builds weights once per (head dim, dtype, pack width) and runs layouts on a SmallTransformer."""

    def __init__(self, module: SmallTransformer, stable: bool = False, pack_heads: int = 1):
        self.module = module
        self.stable = stable
        self.pack_heads = max(1, pack_heads)
        self._weights: dict = {}

    # -- weights ----------------------------------------------------------------------------
    def weights(self, call: str, d: int, scale: float, heads: int, dtype, device) -> Weights:
        key = (call, d, scale, heads, dtype, device)
        if key not in self._weights:
            self._weights[key] = self._build(call, d, scale, dtype, device).expand(heads)
        return self._weights[key]

    def _build(self, call: str, d: int, scale: float, dtype, device) -> _OneHead:
        K, V, Q, ONE, REAL, SHIFT = 0, d, 2 * d, 3 * d, 3 * d + 1, 3 * d + 2
        width = 3 * d + 3
        eye = torch.eye(d, dtype=dtype, device=device)
        corner = call == "A" or self.stable
        dqk = d + 1 if corner else d
        wq = torch.zeros(width, dqk, dtype=dtype, device=device)
        wk = torch.zeros(width, dqk, dtype=dtype, device=device)
        wq[Q:Q + d, :d] = scale * eye  # the model's 1/sqrt(d) folds into Wq
        wk[K:K + d, :d] = eye
        if corner:
            wq[SHIFT if self.stable else ONE, d] = 1.0
            wk[REAL if self.stable else ONE, d] = 1.0
        if call == "A":
            wv = torch.zeros(width, 1, dtype=dtype, device=device)
            wv[REAL, 0] = 1.0  # value 1 on real tokens, 0 on z
            return _OneHead(wq, wk, wv, _readout_a)
        wv = torch.zeros(width, d, dtype=dtype, device=device)
        wv[V:V + d] = eye
        return _OneHead(wq, wk, wv, None)

    # -- the stabilised shift ---------------------------------------------------------------
    def shift(self, layout: Layout, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        """c [H, nq] for the stabilised variant, from norms and a mean key alone (no scores); 0 otherwise.

        Over the n keys a query sees (running along the layout's key order for prefix layouts):
            upper  U = max_j s_j + log n >= log A,  max_j s_j <= min(|q| max|k_j|, sum_d |q_d| max|k_jd|)
            lower  L = mean_j s_j + log n <= log A  (Jensen),  mean_j s_j = <q, mean_j k_j>
        c = min(U, L + R): A e^{-c} >= e^{-R} never underflows (R = 90% of the dtype's exponent
        range below 1), and when the norm bound is that tight, A e^{-c} <= 1 keeps p <= 1/2.
        """
        H, nq = q.shape[0], len(layout.queries)
        if not self.stable or nq == 0:
            return torch.zeros(H, nq, dtype=q.dtype, device=q.device)
        keys = k[:, torch.as_tensor(layout.keys, device=k.device)]  # [H, n, d] in layout order
        qu = q[:, torch.as_tensor(layout.queries, device=q.device)]  # [H, nq, d]
        if layout.kind == "prefix":
            at = torch.as_tensor(layout.counts, device=q.device).clamp_min(1) - 1  # the last key each query sees
            nk = (at + 1).to(q.dtype)
            norm_max = keys.norm(dim=-1).cummax(dim=1).values[:, at]  # [H, nq]
            coord_max = keys.abs().cummax(dim=1).values[:, at]  # [H, nq, d]
            mean_key = keys.cumsum(dim=1)[:, at] / nk[None, :, None]
        else:
            nk = torch.tensor(float(max(1, len(layout.keys))), dtype=q.dtype, device=q.device)
            norm_max = keys.norm(dim=-1).amax(dim=1, keepdim=True)
            coord_max = keys.abs().amax(dim=1, keepdim=True)
            mean_key = keys.mean(dim=1, keepdim=True)
        upper = scale * torch.minimum(qu.norm(dim=-1) * norm_max, (qu.abs() * coord_max).sum(-1)) + torch.log(nk)
        lower = scale * (qu * mean_key).sum(-1) + torch.log(nk)
        reach = -0.9 * math.log(torch.finfo(q.dtype).tiny)  # 637 nats in float64, 79 in float32
        return torch.minimum(upper, lower + reach)

    # -- one call ---------------------------------------------------------------------------
    def inputs(self, rows: Rows, layout: Layout, q, k, v, c) -> torch.Tensor:
        """X [H, n, 3d + 3] of every head's single-head instance."""
        H, _, d = q.shape
        n, dev = rows.n, q.device
        ks = torch.as_tensor(rows.key_src, device=dev)
        real = ks >= 0
        kidx = torch.where(real, ks, torch.full_like(ks, k.shape[1]))
        zero_k = torch.zeros(H, 1, d, dtype=q.dtype, device=dev)
        x = torch.zeros(H, n, 3 * d + 3, dtype=q.dtype, device=dev)
        x[:, :, 0:d] = torch.cat([k, zero_k], 1)[:, kidx]
        x[:, :, d:2 * d] = torch.cat([v, zero_k], 1)[:, kidx]
        x[:, :, 3 * d] = 1.0
        x[:, :, 3 * d + 1] = real.to(q.dtype)
        present = torch.as_tensor(rows.query_row >= 0, device=dev)
        at = torch.as_tensor(rows.query_row, device=dev)[present]
        u = torch.as_tensor(layout.queries, device=dev)[present]
        x[:, at, 2 * d:3 * d] = q[:, u]
        x[:, at, 3 * d + 2] = -c[:, present]
        return x

    def invoke(self, x: torch.Tensor, w: Weights, rows: Rows, construction: str) -> torch.Tensor:
        """Run the H instances of X [H, n, width] in calls of pack_heads heads each -> [H, n, d_v]."""
        H, n, width = x.shape
        mask = rows.key_mask
        mask = torch.as_tensor(mask, device=x.device) if mask is not None else None
        out = []
        for h in range(0, H, self.pack_heads):
            group = x[h:h + self.pack_heads]
            g = group.shape[0]
            packed = group.transpose(0, 1).reshape(n, g * width)  # Lemma 3.3: side by side by columns
            wg = Weights(w.q[:g], w.k[:g], w.v[:g], w.psi)
            y = self.module(packed, wg, rows.causal, mask, construction)
            out.append(y.view(n, g, -1).transpose(0, 1))
        return torch.cat(out, 0)

    def run(self, layout: Layout, q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(o [H, nq, d], lse [H, nq]) of the layout's queries: B/A and log A = log(psi output) + c.

        q [H, mq, d]; k, v [H, mk, d] already expanded to the query heads (GQA).
        """
        H, _, d = q.shape
        nq = len(layout.queries)
        c = self.shift(layout, q, k, scale)
        lse = torch.full((H, nq), float("nan"), dtype=q.dtype, device=q.device)
        if layout.weighted:
            rows = layout.a_rows()
            x = self.inputs(rows, layout, q, k, v, c)
            w = self.weights("A", d, scale, self.pack_heads, q.dtype, q.device)
            y = self.invoke(x, w, rows, layout.construction)
            lse = torch.log(y[:, torch.as_tensor(rows.query_row, device=q.device), 0]) + c
        rows = layout.b_rows()
        o = torch.zeros(H, nq, d, dtype=q.dtype, device=q.device)
        present = rows.query_row >= 0
        if present.any():
            x = self.inputs(rows, layout, q, k, v, c)
            w = self.weights("B", d, scale, self.pack_heads, q.dtype, q.device)
            y = self.invoke(x, w, rows, layout.construction)
            sel = torch.as_tensor(present, device=q.device)
            o[:, sel] = y[:, torch.as_tensor(rows.query_row[present], device=q.device)]
        return o, lse


class _OneHead:
    """One head's padded weights; `expand` gives the block-diagonal blocks for H' packed heads."""

    def __init__(self, wq, wk, wv, psi):
        self.wq, self.wk, self.wv, self.psi = wq, wk, wv, psi

    def expand(self, heads: int) -> Weights:
        return Weights(self.wq.expand(heads, *self.wq.shape).contiguous(),
                       self.wk.expand(heads, *self.wk.shape).contiguous(),
                       self.wv.expand(heads, *self.wv.shape).contiguous(), self.psi)

