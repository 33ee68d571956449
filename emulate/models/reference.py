"""The monolithic forward of T: one full-length pass, the reference every emulation is checked against.

Each query row takes one softmax over every key its mask lets it see; no block merges. For
windowed masks the rows are taken in chunks and each chunk is given only the keys that some
row of it may see (the sink keys and the window span): a key outside that set has weight
exp(-inf) = 0 exactly, so this is the same softmax, not an approximation.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from emulate.models.block import Transformer
from graphs import Pattern


def reference_forward(model: Transformer, tokens: torch.Tensor, patterns: list[Pattern], chunk: int = 4096,
                      on_layer=None) -> dict:
    """Hidden states after the final norm for all N tokens, and the next-token log-probabilities.

    on_layer(done, total) is called as each layer is done (progress: a long reference is minutes)."""
    tokens = tokens.to(model.device)
    positions = torch.arange(tokens.shape[0], device=model.device)
    x = model.embed(tokens, positions)
    for layer, pattern in enumerate(patterns):
        q, k, v = model.project(layer, x, positions)
        o = reference_attention(q, k, v, model.scale, pattern, chunk)
        x = model.mix(layer, x, o)
        del q, k, v, o
        if on_layer is not None:
            on_layer(layer + 1, len(patterns))
    hidden = model.final(x)
    out = {"hidden": hidden}
    if model.config.lm_head:
        out["logprob_next"] = torch.cat([model.logprobs(hidden[s:s + chunk], tokens[s + 1:s + chunk + 1])
                                         for s in range(0, tokens.shape[0], chunk)])
    return out


def reference_attention(q, k, v, scale: float, pattern: Pattern, chunk: int = 4096) -> torch.Tensor:
    """Monolithic attention of T under `pattern`; q [H, N, dh], k and v [Hkv, N, dh] -> [H, N, dh].

    The sampled pattern estimates bidirectional T, so its reference is full attention.
    """
    gqa = q.shape[0] != k.shape[0]
    if pattern.window is None:  # full, sampled and causal: one SDPA call over all N
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=pattern.causal, scale=scale,
                                              enable_gqa=gqa)[0]
    n = q.shape[1]
    out = torch.empty_like(q)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        # the chunk's first query sees the lowest window key; sinks below the window come first
        reach = pattern.key_range(np.array([a, b - 1]))
        lo = int(reach.lo[0])
        keys = np.concatenate([np.arange(0, min(int(reach.sink_hi[1]), lo)), np.arange(lo, b)])
        visible = torch.from_numpy(pattern.visible(np.arange(a, b), keys)).to(q.device)
        idx = torch.from_numpy(keys).to(q.device)
        out[:, a:b] = F.scaled_dot_product_attention(q[None, :, a:b], k[None][:, :, idx], v[None][:, :, idx],
                                                     attn_mask=visible, scale=scale, enable_gqa=gqa)[0]
    return out
