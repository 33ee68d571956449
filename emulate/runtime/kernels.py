"""Block attention that returns (output, lse): the kernel oracle's small call.

One call attends the queries of one block to the keys of one block (or of a sample of keys) and
returns the normalised block average B/A and log A per query row and head (docs/paper.md, Setting and notation: the
(output, log-sum-exp) pair that the merge combines). A row with no visible key returns output 0
and lse = -inf, so the merge counts it as empty.
"""
from __future__ import annotations

import numpy as np
import torch

from graphs import MaskKind
from graphs.patterns import TILE_ROWS, tile_boxes, tile_seen

NEG_INF = float("-inf")



def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: MaskKind = MaskKind.NONE,
           visible: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [H, mq, dh], k and v [Hkv, mk, dh] -> (o [H, mq, dh], lse [H, mq]).

    mask: 'none' (all visible), 'causal' (aligned diagonal block) or 'explicit' with `visible`
    a boolean [mq, mk] matrix. GQA: each KV head serves H / Hkv consecutive query heads.
    bfloat16 and float16 calls run in their dtype (the kernels accumulate in float32) and return
    the partial in float32, so that the merge of a 16-bit run adds its partials in float32.
    """
    bias = None
    if mask == MaskKind.EXPLICIT:
        bias = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, NEG_INF)
    if q.device.type != "cpu":
        # fused CUDA kernels that return the lse (math where none applies); GQA and rows with no
        # visible key are handled there, without a host sync
        from emulate.runtime.kernels_cuda import attend_cuda

        return _partial(*attend_cuda(q, k, v, scale, mask, bias))
    H, Hkv = q.shape[0], k.shape[0]
    if Hkv != H and mask == MaskKind.NONE:
        # GQA without a mask: fold each KV head's query heads into its rows (a view for contiguous q); every
        # row is its own softmax, so the result is the same, bit for bit, as repeating the keys
        o, lse = attend(q.reshape(Hkv, -1, q.shape[2]), k, v, scale)
        return o.reshape(q.shape), lse.reshape(q.shape[:2])
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=0)
        v = v.repeat_interleave(H // Hkv, dim=0)
    # torch's CPU flash kernel returns the lse and runs at ~75% of this machine's matmul rate
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q[None], k[None], v[None], 0.0, mask == MaskKind.CAUSAL, attn_mask=bias, scale=scale)[:2]
    o, lse = o[0], lse[0]
    if mask == MaskKind.EXPLICIT:
        # the flash kernel returns (0, 0) for a fully masked row; e^0 would weigh it as one key
        empty = ~visible.any(dim=1)
        if bool(empty.any()):
            lse = lse.masked_fill(empty[None, :], NEG_INF)
            o = o.masked_fill(empty[None, :, None], 0.0)
    return _partial(o, lse)


def attend_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`attend` of one query block against n key blocks, all their keys visible: q [H, mq, dh], k and v
    [n, Hkv, mk, dh] -> (o [n, H, mq, dh], lse [n, H, mq]), block b's partial that of `attend(q, k[b], v[b])`.

    One kernel invocation with the blocks as its batch: every (block, head) is its own softmax over
    the block's mk keys, so each block is still its own call of at most mk keys, without paying a
    kernel's start n times (a decode step's query against the cache's full blocks, emulate/runtime/decode.py).
    """
    n, Hkv = k.shape[0], k.shape[1]
    H, mq, dh = q.shape
    if q.device.type != "cpu":
        o, lse = zip(*(attend(q, k[b], v[b], scale) for b in range(n)))
        return torch.stack(o), torch.stack(lse)
    # GQA: each KV head's query heads folded into its rows (every row is its own softmax, as in `attend`)
    qb = q.reshape(Hkv, -1, dh)[None].expand(n, Hkv, (H // Hkv) * mq, dh)
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qb, k, v, 0.0, False, scale=scale)[:2]
    return _partial(o.reshape(n, H, mq, dh), lse.reshape(n, H, mq))


def _partial(o: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 16-bit call's (o, lse) in float32; float32 and float64 as they are (promote_types is the identity)."""
    acc = torch.promote_types(o.dtype, torch.float32)
    return o.to(acc), lse.to(acc)


def attend_intervals(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, lo: np.ndarray,
                     hi: np.ndarray, sink: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """`attend` for a mask whose row t shows the keys [0, sink[t]) and [lo[t], hi[t]) of the key block.

    Every causal-type pattern's pair has this form (graphs/patterns.py, Pattern.key_range: a window
    and the sinks, indices here relative to the key block). The rows run in tiles of TILE_ROWS,
    each against the smallest run of keys holding everything its rows see, unmasked where that run
    is all visible: the same softmax per row as one masked call over the whole block (each row is
    its own softmax), for the work of the band instead of the block. A tile with no visible key
    gives output 0 and lse -inf.
    """
    H, mq, dh = q.shape
    firsts, lasts = tile_boxes(lo, hi, sink, k.shape[1])
    outs, lses = [], []
    for r0, a, b in zip(range(0, mq, TILE_ROWS), firsts.tolist(), lasts.tolist()):
        r1 = min(mq, r0 + TILE_ROWS)
        if a >= b:
            acc = torch.promote_types(q.dtype, torch.float32)
            outs.append(q.new_zeros(H, r1 - r0, dh, dtype=acc))
            lses.append(q.new_full((H, r1 - r0), NEG_INF, dtype=acc))
            continue
        rows = slice(r0, r1)
        seen = tile_seen(lo, hi, sink, rows, a, b)
        qt = q[:, rows] if (r0, r1) != (0, mq) else q
        if seen.all():
            o, lse = attend(qt, k[:, a:b], v[:, a:b], scale)
        else:
            o, lse = attend(qt, k[:, a:b], v[:, a:b], scale, MaskKind.EXPLICIT, torch.from_numpy(seen).to(q.device))
        outs.append(o)
        lses.append(lse)
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)
