"""Hugging Face checkpoints on disk (config.json + safetensors) loaded into the generic block.

A checkpoint is read with safetensors only, never with pickle: a model file can then hold
numbers and nothing that runs. config.json becomes a ModelConfig and the checkpoint's tensor
names become the canonical names of `emulate.models.presets.weight_names`, so the model never knows
which family it runs. Anything wrong with the directory is one EmulateError line.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import torch

from emulate.errors import EmulateError
from emulate.models.config import MAX_LAYERS, ModelConfig, shown
from emulate.models.presets import weight_names

FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "bert")

# Canonical module -> checkpoint module, per family: per layer (under `layers`) and at the top.
LLAMA = dict(
    layers="layers.{}.",
    layer={"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
           "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},
    top={"embed.tokens": "embed_tokens", "final_norm": "norm"},
    anchor="embed_tokens.weight",
)
GPT2 = dict(
    layers="h.{}.",
    layer={"attn_norm": "ln_1", "mlp_norm": "ln_2", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
    top={"embed.tokens": "wte", "embed.positions": "wpe", "final_norm": "ln_f"},
    anchor="wte.weight",
)
BERT = dict(
    layers="encoder.layer.{}.",
    layer={"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
           "o": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
           "up": "intermediate.dense", "down": "output.dense", "mlp_norm": "output.LayerNorm"},
    top={"embed.tokens": "embeddings.word_embeddings", "embed.positions": "embeddings.position_embeddings",
         "embed.types": "embeddings.token_type_embeddings", "embed.norm": "embeddings.LayerNorm"},
    anchor="embeddings.word_embeddings.weight",
)
LAYOUTS = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "gpt2": GPT2, "bert": BERT}
TIED_BY_DEFAULT = {"llama": False, "mistral": False, "qwen2": False, "gpt2": True, "bert": True}
ROPE_KEYS = {"default": (), "linear": ("factor",),  # what emulate.models.block reads for each RoPE scaling
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
GELUS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def load_checkpoint(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Path | None]:
    """(config, canonical weights, tokenizer.json or None) of a Hugging Face checkpoint directory."""
    path = Path(path)
    hf = read_config(path)
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise EmulateError(f"{path}: emulate's own loader does not read model_type {family!r} (it reads "
                           f"{', '.join(FAMILIES)}); --backend transformers runs any family transformers reads "
                           "(backend=\"transformers\" in Python), and emulate graph draws it from its config.json")
    config = (bert_config if family == "bert" else gpt2_config if family == "gpt2" else decoder_config)(hf, str(path))
    config = replace(config, eos_ids=eos_ids(hf, path))
    check_weights_fit(config, path)
    tensors = read_tensors(path)
    check_weights_held(config, tensors, path)
    weights = canonical_weights(tensors, config, hf, path)
    tokenizer = path / "tokenizer.json"
    return config, weights, tokenizer if tokenizer.is_file() else None


# -- config.json -> ModelConfig ---------------------------------------------------------------
def read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise EmulateError(f"{path}: not a checkpoint directory (no config.json)")
    hf = read_json(file)
    if not isinstance(hf, dict):
        raise EmulateError(f"{file}: expected a JSON object, got {type(hf).__name__}")
    return hf


def read_json(file: Path):
    """A JSON file's value; unreadable, not UTF-8, not JSON or nested past Python's recursion limit
    (a file of 100,000 '[') is one line."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except RecursionError:
        raise EmulateError(f"{file}: cannot read JSON (nested too deep)") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise EmulateError(f"{file}: cannot read JSON ({type(err).__name__}: {str(err).splitlines()[0]})") from None


def eos_ids(hf: dict, path: Path) -> tuple[int, ...]:
    """The end-of-sequence ids generation stops at: generation_config.json's `eos_token_id` where it
    gives one (transformers' generate reads that file first), else config.json's; an int, a list or null."""
    source, file = hf, path / "config.json"
    gen = path / "generation_config.json"
    if gen.is_file():
        held = read_json(gen)
        if isinstance(held, dict) and "eos_token_id" in held:
            source, file = held, gen
    value = source.get("eos_token_id")
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**63 for t in ids):
        raise EmulateError(f"{file}: eos_token_id must be a token id or a list of them, got {shown(value)}")
    return tuple(dict.fromkeys(ids))


def _int(hf: dict, key: str, name: str, default=None) -> int:
    value = hf.get(key, default)
    if value is None:
        raise EmulateError(f"{name}: config.json lacks {key!r}")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EmulateError(f"{name}: config.json {key!r} must be a positive integer, got {shown(value)}")
    return value


def _float(hf: dict, key: str, name: str, default: float) -> float:
    value = hf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise EmulateError(f"{name}: config.json {key!r} must be a positive number, got {shown(value)}")
    return float(value)


def _bool(hf: dict, key: str, name: str, default: bool = False) -> bool:
    value = hf.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise EmulateError(f"{name}: config.json {key!r} must be true or false, got {shown(value)}")
    return value


def _act(hf: dict, key: str, name: str, default: str, allowed: dict) -> str:
    act = hf.get(key, default)
    if not isinstance(act, str) or act not in allowed:
        raise EmulateError(f"{name}: unsupported activation {key}={act!r} (supported: {', '.join(allowed)})")
    return allowed[act]


def decoder_config(hf: dict, name: str) -> ModelConfig:
    """llama, mistral, qwen2: pre-norm RMSNorm, RoPE, GQA, SwiGLU."""
    family = hf["model_type"]
    width, heads = _int(hf, "hidden_size", name), _int(hf, "num_attention_heads", name)
    layers = _layers(hf, "num_hidden_layers", name)
    kv_heads = _int(hf, "num_key_value_heads", name, default=heads)
    if hf.get("head_dim") is None and width % heads:
        raise EmulateError(f"{name}: hidden_size {width} does not split over {heads} heads (and no head_dim is given)")
    head_dim = _int(hf, "head_dim", name) if hf.get("head_dim") is not None else width // heads
    _act(hf, "hidden_act", name, "silu", {"silu": "silu", "swish": "silu"})  # SwiGLU's gate is SiLU
    llama = family == "llama"
    theta, scaling = rope(hf, name)
    return ModelConfig(
        name=name, family=family, vocab=_int(hf, "vocab_size", name), width=width, layers=layers, heads=heads,
        kv_heads=kv_heads, head_dim=head_dim, mlp_width=_int(hf, "intermediate_size", name),
        norm_eps=_float(hf, "rms_norm_eps", name, 1e-6), rope_theta=theta, rope_scaling=scaling,
        qkv_bias=family == "qwen2" or (llama and _bool(hf, "attention_bias", name)),
        out_bias=llama and _bool(hf, "attention_bias", name), mlp_bias=llama and _bool(hf, "mlp_bias", name),
        windows=windows(hf, layers, name), rope_positions=_positions(hf, name),
    )


def _positions(hf: dict, name: str) -> int | None:
    """config.json's max_position_embeddings, where it declares one."""
    return None if hf.get("max_position_embeddings") is None else _int(hf, "max_position_embeddings", name)


def rope(hf: dict, name: str) -> tuple[float, dict | None]:
    """(theta, scaling) from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (older)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise EmulateError(f"{name}: unsupported rope parameters {params!r} (one flat set for all layers expected)")
    params = dict(params)
    theta = _float(params, "rope_theta", name, hf.get("rope_theta", 10000.0))
    params.pop("rope_theta", None)
    kind = params.setdefault("rope_type", params.pop("type", "default"))
    if not isinstance(kind, str):
        raise EmulateError(f"{name}: rope_type must be a name, got {kind!r}")
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor") or 1.0) != 1.0:
        raise EmulateError(f"{name}: partial rotary embeddings are not supported")
    if kind not in ROPE_KEYS:
        raise EmulateError(f"{name}: unsupported rope scaling {kind!r} (supported: {', '.join(ROPE_KEYS)})")
    if kind == "llama3":
        params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    for key in ROPE_KEYS[kind]:
        _float(params, key, name, None)
    return theta, (None if kind == "default" else params)


def _layers(hf: dict, key: str, name: str) -> int:
    """The layer count, bounded before any per-layer list is made from it."""
    layers = _int(hf, key, name)
    if layers > MAX_LAYERS:
        raise EmulateError(f"{name}: config.json {key!r} is {shown(layers)}, past any real model's (at most {MAX_LAYERS})")
    return layers


def windows(hf: dict, layers: int, name: str) -> tuple:
    """Each layer's sliding window r, or None for plain causal attention.

    transformers masks key j for query i unless i - W < j <= i (masking_utils'
    sliding_window_overlay: kv_idx > q_idx - sliding_window), so its W keys per query are our r = W.
    mistral: one `sliding_window` for every layer (null: none; absent: transformers' default 4096).
    qwen2: `sliding_window` only counts when `use_sliding_window`; the layers that slide are those
    `layer_types` marks "sliding_attention", or else the layers from `max_window_layers` on.
    """
    family = hf["model_type"]
    if family == "mistral":
        w = hf.get("sliding_window", 4096)
        return (None,) * layers if w is None else (_int(hf, "sliding_window", name, 4096),) * layers
    if family != "qwen2":
        return (None,) * layers
    use = _bool(hf, "use_sliding_window", name) and hf.get("sliding_window") is not None
    w = _int(hf, "sliding_window", name) if use else None
    kinds = hf.get("layer_types")
    if kinds is None:
        first = hf.get("max_window_layers", 28)
        if isinstance(first, bool) or not isinstance(first, int):
            raise EmulateError(f"{name}: config.json 'max_window_layers' must be an integer, got {first!r}")
        kinds = ["sliding_attention" if w is not None and i >= first else "full_attention" for i in range(layers)]
    if not isinstance(kinds, list) or len(kinds) != layers or not all(isinstance(k, str) for k in kinds) \
            or not set(kinds) <= {"sliding_attention", "full_attention"}:
        raise EmulateError(f"{name}: config.json layer_types must list 'sliding_attention' or 'full_attention' "
                           f"for each of the {layers} layers")
    if "sliding_attention" in kinds and w is None:
        raise EmulateError(f"{name}: layer_types asks for sliding attention, but no sliding_window is in use")
    return tuple(w if kind == "sliding_attention" else None for kind in kinds)


def gpt2_config(hf: dict, name: str) -> ModelConfig:
    """gpt2: pre-norm LayerNorm, learned positions, GELU (tanh) MLP, biases everywhere."""
    width, heads = _int(hf, "n_embd", name), _int(hf, "n_head", name)
    if width % heads:
        raise EmulateError(f"{name}: n_embd {width} does not split over {heads} heads")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise EmulateError(f"{name}: only the standard 1/sqrt(head_dim) attention scale is supported")
    return ModelConfig(
        name=name, family="gpt2", vocab=_int(hf, "vocab_size", name), width=width, layers=_layers(hf, "n_layer", name),
        heads=heads, kv_heads=heads, head_dim=width // heads,
        mlp_width=_int(hf, "n_inner", name) if hf.get("n_inner") is not None else 4 * width,
        norm="layer", norm_eps=_float(hf, "layer_norm_epsilon", name, 1e-5), positions="learned",
        max_positions=_int(hf, "n_positions", name, 1024), mlp="gelu",
        act=_act(hf, "activation_function", name, "gelu_new", GELUS),
        qkv_bias=True, out_bias=True, mlp_bias=True,
    )


def bert_config(hf: dict, name: str) -> ModelConfig:
    """bert: a post-norm encoder with learned positions and segment embeddings; no LM head here."""
    width, heads = _int(hf, "hidden_size", name), _int(hf, "num_attention_heads", name)
    if width % heads:
        raise EmulateError(f"{name}: hidden_size {width} does not split over {heads} heads")
    if not isinstance(hf.get("position_embedding_type", "absolute"), str) \
            or hf.get("position_embedding_type", "absolute") != "absolute":
        kind = hf["position_embedding_type"]
        raise EmulateError(f"{name}: unsupported position_embedding_type {kind!r} (absolute only)")
    if _bool(hf, "is_decoder", name):
        raise EmulateError(f"{name}: BERT as a decoder (is_decoder) is not supported")
    return ModelConfig(
        name=name, family="bert", vocab=_int(hf, "vocab_size", name), width=width,
        layers=_layers(hf, "num_hidden_layers", name), heads=heads, kv_heads=heads, head_dim=width // heads,
        mlp_width=_int(hf, "intermediate_size", name), causal=False, norm="layer",
        norm_eps=_float(hf, "layer_norm_eps", name, 1e-12), prenorm=False, positions="learned",
        max_positions=_int(hf, "max_position_embeddings", name, 512), mlp="gelu",
        act=_act(hf, "hidden_act", name, "gelu", GELUS), qkv_bias=True, out_bias=True, mlp_bias=True,
        embed_norm=True, token_types=_int(hf, "type_vocab_size", name, 2) if hf.get("type_vocab_size", 2) else 0,
        final_norm=False, lm_head=False,
    )


# -- safetensors -> canonical weights ---------------------------------------------------------
def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of `model.safetensors`, or of the shards `model.safetensors.index.json` names."""
    from safetensors import safe_open

    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = read_json(index)["weight_map"]
            names = sorted(set(weight_map.values()))
        except (KeyError, TypeError, AttributeError) as err:
            raise EmulateError(f"{index}: not a safetensors index ({type(err).__name__})") from None
        files = [_shard(path, index, name) for name in names]
    else:
        raise EmulateError(f"{path}: no model.safetensors or model.safetensors.index.json "
                           "(only safetensors checkpoints are read, never pickle files)")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise EmulateError(f"{file}: safetensors shard is missing")
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except Exception as err:  # safetensors raises its own SafetensorError on a corrupt file
            raise EmulateError(f"{file}: corrupt or truncated safetensors file ({str(err).splitlines()[0]})") from None
    return tensors


def _shard(path: Path, index: Path, name) -> Path:
    """A shard the index names: a plain file name inside the checkpoint directory, never a path
    that leads out of it (../x.safetensors, an absolute path, or a link to elsewhere)."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise EmulateError(f"{index}: weight_map names a shard {name!r} that is not a file name")
    file = path / name
    root = path.resolve()
    if Path(name).is_absolute() or ".." in Path(name).parts or not file.resolve().is_relative_to(root):
        raise EmulateError(f"{index}: weight_map names {name!r}, outside the checkpoint directory; refused")
    return file


def check_weights_fit(c: ModelConfig, path: Path) -> None:
    """Refuse, before a tensor is read, weights that could not fit in memory once built in float32."""
    from emulate.models.shapes import declared_parameters
    from emulate.runtime.memory import check_fits

    check_fits({"weights": 4 * declared_parameters(c)}, what=f"{path}: the weights config.json declares")


def check_weights_held(c: ModelConfig, tensors: dict, path: Path) -> None:
    """A config that declares more weights than the files hold (more layers, a wider model) is one
    line naming both counts, not a missing tensor found deep in the renaming."""
    from emulate.models.shapes import declared_parameters

    held = sum(t.numel() for t in tensors.values())
    want = declared_parameters(c)
    if want > held:
        raise EmulateError(f"{path}: config.json declares {c.layers} layers of width {c.width} ({want:,} parameters), "
                           f"more than the {held:,} its safetensors hold")


def canonical_weights(tensors: dict, c: ModelConfig, hf: dict, path: Path) -> dict[str, torch.Tensor]:
    """Rename (and for GPT-2 transpose and split) the checkpoint's tensors into `weight_names(c)`."""
    layout = LAYOUTS[c.family]
    prefix = _prefix(tensors, layout["anchor"], path)

    def take(key: str, shape: tuple, bare: bool = False) -> torch.Tensor:
        key = key if bare else prefix + key
        t = tensors.get(key)
        if t is None:
            raise EmulateError(f"{path}: checkpoint lacks tensor {key}")
        if tuple(t.shape) != tuple(shape):
            raise EmulateError(f"{path}: tensor {key} has shape {list(t.shape)}, expected {list(shape)}")
        return t

    weights = {}
    for name, shape in weight_names(c).items():
        module, param = name.rsplit(".", 1)
        if name == "lm_head.weight":
            tied = _bool(hf, "tie_word_embeddings", str(path), TIED_BY_DEFAULT[c.family]) or "lm_head.weight" not in tensors
            weights[name] = weights["embed.tokens.weight"] if tied else take(name, shape, bare=True)
            continue
        if module.startswith("layers."):
            _, layer, part = module.split(".")
            if c.family == "gpt2" and part in ("q", "k", "v"):
                weights[name] = _gpt2_qkv(take, layout["layers"].format(layer), part, param, c)
                continue
            source = layout["layers"].format(layer) + layout["layer"][part] + "." + param
            if c.family == "gpt2" and param == "weight" and part in ("o", "up", "down"):
                weights[name] = take(source, shape[::-1]).T.contiguous()  # Conv1D stores [in, out]
                continue
        else:
            source = layout["top"][module] + "." + param
        weights[name] = take(source, shape)
    return weights


def _prefix(tensors: dict, anchor: str, path: Path) -> str:
    """The name prefix of the base model ('model.', 'transformer.', 'bert.' or none), read off the embedding."""
    found = sorted(k[: -len(anchor)] for k in tensors if k == anchor or k.endswith("." + anchor))
    if not found:
        raise EmulateError(f"{path}: checkpoint lacks tensor {anchor}")
    return found[0]


def _gpt2_qkv(take, layer: str, part: str, param: str, c: ModelConfig) -> torch.Tensor:
    """GPT-2 fuses q, k, v into one Conv1D c_attn: weight [width, 3 width], bias [3 width]."""
    i = "qkv".index(part)
    if param == "weight":
        fused = take(layer + "attn.c_attn.weight", (c.width, 3 * c.width))
        return fused[:, i * c.width:(i + 1) * c.width].T.contiguous()
    return take(layer + "attn.c_attn.bias", (3 * c.width,))[i * c.width:(i + 1) * c.width].clone()
