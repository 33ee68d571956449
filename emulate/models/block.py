"""The position-wise pieces of one generic transformer block, each applied to one block of tokens.

Everything but the token mixing inside attention is position-wise (docs/paper.md, Setting and notation), so the
emulation and the monolithic reference share these functions and differ only in how attention
is computed. Tensors: activations x are [m, width]; q is [heads, m, head_dim]; k, v are
[kv_heads, m, head_dim].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from emulate.errors import EmulateError
from emulate.models.config import ModelConfig


class Transformer:
    """Weights in canonical names (see `emulate.models.presets.weight_names`) plus the block functions."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], dtype=torch.float32, device="cpu"):
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self.w = {k: t.to(device=self.device, dtype=dtype) for k, t in weights.items()}
        self.scale = 1.0 / math.sqrt(config.head_dim)
        # norms, RoPE angles and log-softmax of a 16-bit run in float32, as Hugging Face's models compute
        # them; float32 and float64 runs compute in their own dtype (promote_types is then the identity)
        self.accumulate = torch.promote_types(dtype, torch.float32)
        self._inv_freq = _rope_inv_freq(config, self.accumulate, self.device) if config.positions == "rope" else None

    # -- position-wise pieces -------------------------------------------------------------
    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        c, w = self.config, self.w
        x = w["embed.tokens.weight"][tokens]
        if c.positions == "learned":
            x = x + w["embed.positions.weight"][positions]
        if c.token_types:
            x = x + w["embed.types.weight"][0]
        if c.embed_norm:
            x = self._norm(x, "embed.norm")
        return x

    def project(self, layer: int, x: torch.Tensor, positions: torch.Tensor, rope=None):
        """x[i] -> q[i], k[i], v[i]: the pre-norm, the QKV projections and RoPE at global positions.
        rope: `self.rope(positions)` when the caller has it already (a decode step's, for every layer)."""
        c, p = self.config, f"layers.{layer}."
        h = self._norm(x, p + "attn_norm") if c.prenorm else x
        q = self._linear(h, p + "q").view(-1, c.heads, c.head_dim).transpose(0, 1)
        k = self._linear(h, p + "k").view(-1, c.kv_heads, c.head_dim).transpose(0, 1)
        v = self._linear(h, p + "v").view(-1, c.kv_heads, c.head_dim).transpose(0, 1)
        if c.positions == "rope":
            cos, sin = self.rope(positions) if rope is None else rope
            cos, sin = cos.to(q.dtype), sin.to(q.dtype)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        return q.contiguous(), k.contiguous(), v.contiguous()

    def mix(self, layer: int, x: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """x[i], o[i] -> x'[i]: out-projection, residual, norm, MLP, residual."""
        c, p = self.config, f"layers.{layer}."
        # a 16-bit run's merged partial is float32 (emulate/runtime/merge.py): back to the run's dtype here
        o = attention.to(x.dtype).transpose(0, 1).reshape(x.shape[0], c.heads * c.head_dim)
        h = x + self._linear(o, p + "o")
        if not c.prenorm:  # post-norm (BERT): normalise after each residual add
            h = self._norm(h, p + "attn_norm")
            return self._norm(h + self._mlp(h, p), p + "mlp_norm")
        return h + self._mlp(self._norm(h, p + "mlp_norm"), p)

    def final(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x, "final_norm") if self.config.final_norm else x

    def logprobs(self, hidden: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """log p(next_tokens[t] | tokens <= t) for the rows of `hidden` that have a next token."""
        rows = next_tokens.shape[0]
        logits = hidden[:rows] @ self.w["lm_head.weight"].T
        return torch.log_softmax(logits.to(self.accumulate), dim=-1).gather(1, next_tokens[:, None]).squeeze(1)

    def rope(self, positions: torch.Tensor):
        """cos, sin of shape [m, head_dim]; angles in float32 (as Hugging Face), float64 in a float64 run."""
        freqs = positions.to(self._inv_freq.dtype)[:, None] * self._inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    # -- helpers --------------------------------------------------------------------------
    def _linear(self, x, name):
        return F.linear(x, self.w[name + ".weight"], self.w.get(name + ".bias"))

    def _norm(self, x, name):
        c = self.config
        if c.norm == "rms":
            h = x.to(self.accumulate)
            return self.w[name + ".weight"] * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + c.norm_eps)).to(x.dtype)
        return F.layer_norm(x, (x.shape[-1],), self.w[name + ".weight"], self.w.get(name + ".bias"), c.norm_eps)

    def _mlp(self, h, p):
        c = self.config
        if c.mlp == "swiglu":
            return self._linear(F.silu(self._linear(h, p + "gate")) * self._linear(h, p + "up"), p + "down")
        act = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[c.act]
        return self._linear(act(self._linear(h, p + "up")), p + "down")


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope_inv_freq(c: ModelConfig, dtype, device) -> torch.Tensor:
    """RoPE inverse frequencies, with the 'linear' and 'llama3' scalings of Hugging Face configs."""
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.int64).to(dtype) / c.head_dim))
    scaling = dict(c.rope_scaling or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        pass
    elif kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old / high) & (wavelen <= old / low)
        inv = torch.where(is_mid, mid, scaled)
    else:
        raise EmulateError(f"{c.name}: unsupported rope scaling {kind!r} (supported: default, linear, llama3)")
    return inv.to(device)
