"""Published model shapes, as plain data: what the graph and the planner need, with no weights.

A shape is a ModelConfig without weights: `emulate graph --shape` and `emulate plan --shape` compile
and price the forward of a real model size (FLOPs and bytes follow the widths) without loading it.
emulate/models/config_shapes.py reads one from a checkpoint's config.json, of any family.
Figures from the models' published configurations (Hugging Face config.json of meta-llama's
Llama-3.1-8B, -70B, -405B and Llama-3.2-1B, -3B): hidden_size, num_hidden_layers,
num_attention_heads, num_key_value_heads, intermediate_size, vocab_size, rope_theta.
"""
from __future__ import annotations

from emulate.errors import EmulateError
from emulate.models.config import ModelConfig

_LLAMA3 = dict(family="llama", vocab=128256, rope_theta=500000.0, norm_eps=1e-5)

SHAPES: dict[str, dict] = {
    "llama3.2-1b": dict(layers=16, width=2048, heads=32, kv_heads=8, head_dim=64, mlp_width=8192),
    "llama3.2-3b": dict(layers=28, width=3072, heads=24, kv_heads=8, head_dim=128, mlp_width=8192),
    "llama3-8b": dict(layers=32, width=4096, heads=32, kv_heads=8, head_dim=128, mlp_width=14336),
    "llama3-70b": dict(layers=80, width=8192, heads=64, kv_heads=8, head_dim=128, mlp_width=28672),
    "llama3-405b": dict(layers=126, width=16384, heads=128, kv_heads=8, head_dim=128, mlp_width=53248),
}
TIED = {"llama3.2-1b", "llama3.2-3b"}  # the LM head is the embedding matrix (tie_word_embeddings)


def shape_config(name: str) -> ModelConfig:
    """The ModelConfig of a published shape."""
    if name not in SHAPES:
        raise EmulateError(f"unknown shape {name!r} (choose from {', '.join(SHAPES)})")
    return ModelConfig(name=name, **_LLAMA3, **SHAPES[name])


def parameters(config: ModelConfig) -> int:
    """Weights of a config (embeddings, every layer's attention and MLP, norms, the LM head)."""
    qkv = (config.heads + 2 * config.kv_heads) * config.head_dim
    mlp = (3 if config.mlp == "swiglu" else 2) * config.width * config.mlp_width
    layer = config.width * qkv + config.heads * config.head_dim * config.width + mlp + 2 * config.width
    head = config.vocab * config.width if config.lm_head and config.name not in TIED else 0
    return config.vocab * config.width + config.layers * layer + config.width + head


def declared_parameters(config: ModelConfig) -> int:
    """The weights a config's shapes call for, the LM head aside (a file may tie it to the
    embedding): what a checkpoint or GGUF file must hold at least (emulate/models/checkpoints.py)."""
    head = config.vocab * config.width if config.lm_head and config.name not in TIED else 0
    return parameters(config) - head
