"""Published model shapes, as plain data: what the graph and the planner need, with no weights.

A shape is a ModelConfig without weights: `emulate graph --shape` and `emulate plan --shape` compile
and price the forward of a real model size (FLOPs and bytes follow the widths) without loading it.
`config_shape` reads one from a checkpoint's config.json, of any transformers family: compiling and
drawing need its widths, layers and masks, not its weights, nor a loader for its family.
Figures from the models' published configurations (Hugging Face config.json of meta-llama's
Llama-3.1-8B, -70B, -405B and Llama-3.2-1B, -3B): hidden_size, num_hidden_layers,
num_attention_heads, num_key_value_heads, intermediate_size, vocab_size, rope_theta.
"""
from __future__ import annotations

import json
from pathlib import Path

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


# config.json spellings of one quantity across transformers families, in order of preference
_KEYS = {"width": ("hidden_size", "n_embd", "d_model"), "layers": ("num_hidden_layers", "n_layer", "num_layers"),
         "heads": ("num_attention_heads", "n_head"), "vocab": ("vocab_size",),
         "mlp_width": ("intermediate_size", "n_inner", "ffn_dim")}
DECODER_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def config_file(model) -> Path | None:
    """The config.json a model argument names (a directory holding one, or the file), else None."""
    if not isinstance(model, (str, Path)):
        return None
    path = Path(model)
    try:
        if path.is_dir() and (path / "config.json").is_file():
            return path / "config.json"
        if path.suffix.lower() == ".json" and path.is_file():
            return path
    except OSError:  # a name too long for the file system, say
        pass
    return None


def config_shape(file: Path) -> ModelConfig:
    """The weightless ModelConfig of a checkpoint's config.json: through emulate's own loader for the
    families it reads (emulate/models/checkpoints.py, so the masks are the ones a run uses), else from
    the widths transformers' configs share, with each layer's sliding window from `layer_types` and
    `sliding_window`. Causal unless `architectures` names no decoder head."""
    from emulate.models import checkpoints

    name = str(file.parent if file.name == "config.json" else file)
    hf = checkpoints.read_config(file.parent) if file.name == "config.json" else _read(file)
    family = hf.get("model_type")
    if family in checkpoints.FAMILIES:
        read = {"bert": checkpoints.bert_config, "gpt2": checkpoints.gpt2_config}.get(family, checkpoints.decoder_config)
        return read(hf, name)
    sizes = {}
    for quantity, keys in _KEYS.items():
        key = next((k for k in keys if hf.get(k) is not None), None)
        if key is None and quantity != "mlp_width":
            raise EmulateError(f"{name}: config.json has none of {', '.join(map(repr, keys))}: no {quantity} to draw")
        sizes[quantity] = checkpoints._int(hf, key, name) if key else None
    heads = sizes["heads"]
    head_dim = checkpoints._int(hf, "head_dim", name) if hf.get("head_dim") is not None else sizes["width"] // heads
    architectures = hf.get("architectures") or []
    causal = not architectures or any(a.endswith(DECODER_HEADS) for a in architectures) or bool(hf.get("is_decoder"))
    return ModelConfig(
        name=name, family=str(family), vocab=sizes["vocab"], width=sizes["width"], layers=sizes["layers"],
        heads=heads, kv_heads=checkpoints._int(hf, "num_key_value_heads", name, heads), head_dim=head_dim,
        mlp_width=sizes["mlp_width"] or 4 * sizes["width"], causal=causal, lm_head=causal,
        windows=_windows(hf, sizes["layers"], name) if causal else (),
    )


def _read(file: Path) -> dict:
    try:
        hf = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EmulateError(f"{file}: cannot read JSON ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if not isinstance(hf, dict):
        raise EmulateError(f"{file}: expected a JSON object, got {type(hf).__name__}")
    return hf


def _windows(hf: dict, layers: int, name: str) -> tuple:
    """Each layer's window: `layer_types` marks the sliding layers where the config lists them (as
    transformers 5 writes every family's), else `sliding_window` applies to all layers where set."""
    from emulate.models.checkpoints import _int

    window = _int(hf, "sliding_window", name) if hf.get("sliding_window") is not None else None
    if hf.get("use_sliding_window") is False:
        window = None
    kinds = hf.get("layer_types")
    if kinds is None:
        return (window,) * layers
    if not isinstance(kinds, list) or len(kinds) != layers:
        raise EmulateError(f"{name}: config.json layer_types must list one kind for each of the {layers} layers")
    unknown = sorted(set(kinds) - {"sliding_attention", "full_attention"})
    if unknown:
        raise EmulateError(f"{name}: config.json layer_types {unknown[0]!r} is not a mask emulate can draw "
                           "(sliding_attention and full_attention are)")
    if "sliding_attention" in kinds and window is None:
        raise EmulateError(f"{name}: layer_types asks for sliding attention, but no sliding_window is in use")
    return tuple(window if kind == "sliding_attention" else None for kind in kinds)


def declared_parameters(config: ModelConfig) -> int:
    """The weights a config's shapes call for, the LM head aside (a file may tie it to the
    embedding): what a checkpoint or GGUF file must hold at least (emulate/models/checkpoints.py)."""
    head = config.vocab * config.width if config.lm_head and config.name not in TIED else 0
    return parameters(config) - head
