"""The shape of any transformers family, from its config.json alone.

Compiling and drawing a forward (`emulate graph`, `emulate.compile`) need a model's widths, layers
and masks, not its weights, nor a loader for its family: `config_shape` reads them, through emulate's
own loader for the families it reads (emulate/models/checkpoints.py) and from the widths
transformers' configs share for the rest. The published shapes without a file are in
emulate/models/shapes.py.
"""
from __future__ import annotations

import json
from pathlib import Path

from emulate.errors import EmulateError
from emulate.models.config import ModelConfig

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
