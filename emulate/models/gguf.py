"""GGUF files (llama.cpp's format) loaded into the generic block: config, dequantized weights, tokenizer.

A GGUF holds metadata (the model's shape under `llama.*` keys, the tokenizer under
`tokenizer.ggml.*`) and tensors, most of them quantized. `load_gguf` reads both with the llama.cpp
project's own reader (`gguf.GGUFReader`), dequantizes every tensor with `gguf.quants.dequantize`
to float32 (what the file holds is exactly representable there; the run casts to its dtype) and
renames the tensors into the canonical names of `emulate.models.presets.weight_names`. Like a safetensors
checkpoint, a GGUF holds numbers only: nothing in it runs.

Two conversions undo what llama.cpp's convert_hf_to_gguf.py did:
- q and k rows: llama.cpp permutes them so that RoPE rotates adjacent pairs (x[2i], x[2i+1]); our
  model (like Hugging Face) rotates halves (x[i], x[i + d/2]), so the permutation is undone
  (`unpermute`), head by head.
- the tokenizer: a byte-level BPE (`tokenizer.ggml.model` = "gpt2") is rebuilt from the tokens and
  merges, with the control tokens as special tokens, exactly as transformers builds it from a GGUF
  (transformers.integrations.gguf.gguf_tokenizer_mapping). Only the default GPT-2 pre-tokenizer
  regex is known here: a file whose `tokenizer.ggml.pre` asks for another split is refused.

Anything else (another architecture, a quantization type not listed in SUPPORTED_TYPES, a
sentencepiece vocabulary) is one EmulateError line.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from emulate.errors import EmulateError, error_line
from emulate.models.config import ModelConfig, shown
from emulate.models.presets import weight_names

ARCHITECTURES = ("llama",)
# pre-tokenizer names whose split is GPT-2's default ByteLevel regex (transformers treats every name
# it has no regex for this way; these are the ones checked against it here)
DEFAULT_SPLIT_PRE = ("default", "gpt2", "smollm")
# GGUF tensor name per canonical module
LAYER = {"attn_norm": "attn_norm", "mlp_norm": "ffn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v",
         "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
TOP = {"embed.tokens": "token_embd", "final_norm": "output_norm", "lm_head": "output"}


def _supported_types() -> tuple:
    from gguf import GGMLQuantizationType as T

    names = ("F32", "F16", "BF16", "F64", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
             "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
    return tuple(getattr(T, n) for n in names if hasattr(T, n))


def _reader(path: Path):
    try:
        import gguf
    except ImportError:
        raise EmulateError(f"{path}: reading a .gguf file needs the gguf package (pip install gguf)") from None
    if not path.is_file():
        raise EmulateError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as err:  # the reader raises ValueError, struct errors ... on a bad file
        raise EmulateError(f"{path}: not a readable GGUF file ({type(err).__name__}: "
                           f"{(str(err).strip().splitlines() or [''])[0]})") from None


def read_metadata(reader) -> dict:
    """Every metadata field as a Python value (strings, numbers, lists)."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # a field this gguf version cannot decode: left out
            continue
    return meta


def _meta_int(meta: dict, key: str, path: Path, default=None) -> int:
    value = meta.get(key, default)
    if value is None:
        raise EmulateError(f"{path}: GGUF metadata lacks {key!r}")
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise EmulateError(f"{path}: GGUF metadata {key!r} must be a positive integer, got {value!r}")
    return int(value)


def _meta_float(meta: dict, key: str, path: Path, default=None) -> float:
    value = meta.get(key, default)
    if value is None:
        raise EmulateError(f"{path}: GGUF metadata lacks {key!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not (value > 0 and np.isfinite(value)):
        raise EmulateError(f"{path}: GGUF metadata {key!r} must be a positive number, got {value!r}")
    return float(value)


def gguf_config(meta: dict, tensors: dict, path: Path) -> ModelConfig:
    """A llama GGUF's metadata as a ModelConfig (pre-norm RMSNorm, RoPE, GQA, SwiGLU)."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise EmulateError(f"{path}: unsupported GGUF architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")
    a = arch + "."
    width, heads = _meta_int(meta, a + "embedding_length", path), _meta_int(meta, a + "attention.head_count", path)
    kv_heads = _meta_int(meta, a + "attention.head_count_kv", path, default=heads)
    head_dim = _meta_int(meta, a + "attention.key_length", path, default=width // heads)
    if meta.get(a + "attention.value_length", head_dim) != head_dim:
        raise EmulateError(f"{path}: different key and value head sizes are not supported")
    if meta.get(a + "rope.dimension_count", head_dim) != head_dim:
        raise EmulateError(f"{path}: partial rotary embeddings are not supported "
                           f"(rope.dimension_count {meta[a + 'rope.dimension_count']} != head size {head_dim})")
    if "rope_freqs.weight" in tensors:
        raise EmulateError(f"{path}: per-frequency RoPE factors (rope_freqs.weight, llama3 scaling) are not supported")
    kind = meta.get(a + "rope.scaling.type", "none")
    if kind == "none":
        scaling = None
    elif kind == "linear":
        scaling = {"rope_type": "linear", "factor": _meta_float(meta, a + "rope.scaling.factor", path)}
    else:
        raise EmulateError(f"{path}: unsupported rope scaling {kind!r} (supported: none, linear)")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get(a + "vocab_size") or (len(tokens) if tokens else None)
    if vocab is None and "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[-1])  # GGUF shapes list the fastest axis first
    if vocab is None:
        raise EmulateError(f"{path}: GGUF metadata gives no vocabulary size")
    if meta.get(a + "expert_count"):
        raise EmulateError(f"{path}: mixture-of-experts GGUF files are not supported")
    has = lambda part: any(k.startswith("blk.") and k.endswith(f".{part}.bias") for k in tensors)  # noqa: E731
    eos = meta.get("tokenizer.ggml.eos_token_id")
    if eos is not None and (isinstance(eos, bool) or not isinstance(eos, (int, np.integer)) or not 0 <= eos < 2**63):
        raise EmulateError(f"{path}: GGUF metadata 'tokenizer.ggml.eos_token_id' must be a token id, got {eos!r}")
    return ModelConfig(
        name=str(path), family="llama", vocab=int(vocab), width=width, layers=_meta_int(meta, a + "block_count", path),
        heads=heads, kv_heads=kv_heads, head_dim=head_dim, mlp_width=_meta_int(meta, a + "feed_forward_length", path),
        norm_eps=_meta_float(meta, a + "attention.layer_norm_rms_epsilon", path, 1e-5),
        rope_theta=_meta_float(meta, a + "rope.freq_base", path, 10000.0), rope_scaling=scaling,
        qkv_bias=has("attn_q"), out_bias=has("attn_output"), mlp_bias=has("ffn_up"),
        eos_ids=() if eos is None else (int(eos),),
        rope_positions=None if meta.get(a + "context_length") is None else _meta_int(meta, a + "context_length", path),
    )


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's `permute` of q/k rows (or biases): per head, llama.cpp stores rows
    (0, d/2, 1, d/2 + 1, ...) in adjacent pairs; Hugging Face and emulate.models.block keeps halves."""
    d2 = w.shape[0] // heads // 2
    return w.reshape(heads, d2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def dequantize(tensor, path: Path) -> torch.Tensor:
    """One GGUF tensor as a float32 torch tensor in the row-major shape PyTorch uses ([out, in])."""
    from gguf.quants import dequantize as dq

    if tensor.tensor_type not in _supported_types():
        supported = ", ".join(t.name for t in _supported_types())
        raise EmulateError(f"{path}: tensor {tensor.name} has unsupported quantization type "
                           f"{tensor.tensor_type.name} (supported: {supported})")
    try:
        values = dq(tensor.data, tensor.tensor_type)
    except Exception as err:
        raise EmulateError(f"{path}: cannot dequantize {tensor.name} ({type(err).__name__}: "
                           f"{(str(err).strip().splitlines() or [''])[0]})") from None
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists the fastest axis first
    return torch.from_numpy(np.array(values, dtype=np.float32, order="C").reshape(shape))  # a copy: the file is memory-mapped


def canonical_gguf_weights(reader, tensors: dict, c: ModelConfig, path: Path) -> dict[str, torch.Tensor]:
    """Dequantize and rename the file's tensors into `weight_names(c)`; q/k un-permuted; lm_head tied
    to the embedding when the file has no output.weight."""
    weights: dict[str, torch.Tensor] = {}
    for name, shape in weight_names(c).items():
        module, param = name.rsplit(".", 1)
        if module.startswith("layers."):
            _, layer, part = module.split(".")
            source = f"blk.{layer}.{LAYER[part]}.{param}"
        else:
            source = f"{TOP[module]}.{param}"
        if name == "lm_head.weight" and source not in tensors:
            weights[name] = weights["embed.tokens.weight"]  # tied output weights
            continue
        if source not in tensors:
            raise EmulateError(f"{path}: GGUF file lacks tensor {source}")
        t = dequantize(tensors[source], path)
        if tuple(t.shape) != tuple(shape):
            raise EmulateError(f"{path}: tensor {source} has shape {list(t.shape)}, expected {list(shape)}")
        if module.startswith("layers.") and part in ("q", "k"):
            t = unpermute(t, c.heads if part == "q" else c.kv_heads)
        weights[name] = t
    return weights


def gguf_tokenizer(meta: dict, path: Path):
    """The file's byte-level BPE tokenizer as a `tokenizers.Tokenizer`, built as transformers builds it."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise EmulateError(f"{path}: unsupported GGUF tokenizer {kind!r} (supported: gpt2, a byte-level BPE)")
    if pre not in DEFAULT_SPLIT_PRE:
        raise EmulateError(f"{path}: unsupported GGUF pre-tokenizer {pre!r} (supported: {', '.join(DEFAULT_SPLIT_PRE)})")
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise EmulateError(f"{path}: GGUF metadata lacks the tokenizer's tokens or merges")
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) if isinstance(m, str) else () for m in merges]
    odd = next((m for m, pair in zip(merges, pairs) if len(pair) != 2), None)
    if odd is not None:
        raise EmulateError(f"{path}: GGUF tokenizer merge {shown(odd)} is not two tokens separated by a space")
    try:
        tok = Tokenizer(BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="", fuse_unk=False))
    except Exception as err:  # noqa: BLE001 -- tokenizers raises its own type for a merge outside the vocabulary
        raise EmulateError(f"{path}: GGUF tokenizer does not fit its vocabulary ({error_line(err)})") from None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(meta.get("tokenizer.ggml.add_space_prefix")))
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or ()
    control = [AddedToken(t, normalized=False, special=True)
               for t, kind in zip(tokens, types) if kind == 3 and set(t) <= alphabet]  # 3: CONTROL
    if control:
        tok.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False)
            for t, kind in zip(tokens, types) if kind == 4 and t in vocab]  # 4: USER_DEFINED
    if user:
        tok.add_tokens(user)
    if meta.get("tokenizer.ggml.add_bos_token") or meta.get("tokenizer.ggml.add_eos_token"):
        raise EmulateError(f"{path}: GGUF tokenizers that add BOS/EOS tokens are not supported")
    tok.no_truncation()
    tok.no_padding()
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def read_tokenizer(path):
    """The tokenizer of a GGUF file alone, without dequantizing its tensors."""
    path = Path(path)
    return gguf_tokenizer(read_metadata(_reader(path)), path)


def check_gguf_weights(c: ModelConfig, tensors: dict, path: Path) -> None:
    """Before a tensor is dequantized: the file must hold the weights its metadata declares, and
    their float32 copies must fit in memory (a 4-bit file grows eightfold)."""
    from emulate.models.shapes import declared_parameters
    from emulate.runtime.memory import check_fits

    held = sum(int(t.n_elements) for t in tensors.values())
    want = declared_parameters(c)
    if want > held:
        raise EmulateError(f"{path}: GGUF metadata declares {c.layers} layers of width {c.width} ({want:,} parameters), "
                           f"more than the {held:,} its tensors hold")
    check_fits({"weights": 4 * held}, what=f"{path}: the dequantized weights")


def load_gguf(path) -> tuple[ModelConfig, dict[str, torch.Tensor], object]:
    """(config, canonical float32 weights, tokenizers.Tokenizer) of a llama GGUF file."""
    path = Path(path)
    reader = _reader(path)
    meta = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    config = gguf_config(meta, tensors, path)
    check_gguf_weights(config, tensors, path)
    tokenizer = gguf_tokenizer(meta, path)
    weights = canonical_gguf_weights(reader, tensors, config, path)
    return config, weights, tokenizer
