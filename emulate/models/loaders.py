"""Where a model comes from: a preset name or a Hugging Face checkpoint directory, loaded once."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from emulate.errors import EmulateError
from emulate.models.config import ModelConfig
from emulate.models.block import Transformer
from emulate.models.presets import FILE_PRESETS, PRESETS, preset


@dataclass(eq=False, repr=False)
class Model:
    """A model loaded once and run many times: its config, weights and tokenizer.

    `weights` use the canonical names of emulate/models/presets.py (`weight_names`); `tokenizer` is a
    checkpoint's tokenizer.json, a `tokenizers.Tokenizer` (a GGUF file's, rebuilt from its metadata),
    or None for the presets' byte-level tokens. The position-wise
    pieces for a dtype and device are built on first use and kept (`transformer`).
    """

    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Path | object | None = None  # a tokenizer.json path or a tokenizers.Tokenizer
    _built: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.config.name

    def __repr__(self) -> str:
        c = self.config
        weights = "no weights (a published shape)" if not self.weights else \
            f"{sum(w.numel() for w in self.weights.values()) / 1e6:.1f}M parameters"
        return (f"<emulate.Model {c.name} ({c.family}): {c.layers} layers, {c.heads} heads ({c.kv_heads} KV), width "
                f"{c.width}, {weights}{', a tokenizer' if self.tokenizer is not None else ''}>")

    def transformer(self, dtype: torch.dtype, device: str = "cpu") -> Transformer:
        if device == "cuda" and not torch.cuda.is_available():
            raise EmulateError("device cuda asked for, but torch sees no CUDA device here")
        key = (dtype, device)
        if key not in self._built:
            self._built[key] = Transformer(self.config, self.weights, dtype=dtype, device=device)
        return self._built[key]

    def tokenize(self, text: str) -> np.ndarray:
        return tokenize(self.tokenizer, text)


def tokenize(tokenizer, text: str) -> np.ndarray:
    """Token ids of `text`: a tokenizer.json path, a tokenizers.Tokenizer, or one id per UTF-8 byte (None)."""
    from emulate.inputs import byte_tokens, tokenizer_tokens

    if tokenizer is None:
        return byte_tokens(text)
    if isinstance(tokenizer, (str, Path)):
        return tokenizer_tokens(tokenizer, text)
    return np.asarray(tokenizer.encode(text).ids, dtype=np.int64)  # a tokenizers.Tokenizer


def load(model: str | Path | Model) -> Model:
    """A preset name, a checkpoint directory (config.json + safetensors), a .gguf file or an already loaded Model."""
    if isinstance(model, Model):
        return model
    if not isinstance(model, (str, Path)):
        raise EmulateError(f"model must be a preset name, a checkpoint directory or an emulate.Model, "
                           f"not {type(model).__name__}")
    name = str(model)
    if name in PRESETS:
        config, weights = preset(name, seed=0)  # preset weights are fixed; a run's seed draws its input
        return Model(config, weights)
    if name in FILE_PRESETS:
        loaded = load(FILE_PRESETS[name]())
        return Model(replace(loaded.config, name=name), loaded.weights, loaded.tokenizer)
    path = Path(name)
    if path.suffix.lower() == ".gguf":
        from emulate.models.gguf import load_gguf

        return Model(*load_gguf(path))
    if path.is_dir():
        from emulate.models.checkpoints import load_checkpoint

        return Model(*load_checkpoint(path))
    raise EmulateError(f"unknown preset {name!r} and no such checkpoint directory "
                      f"(presets: {', '.join([*PRESETS, *FILE_PRESETS])})")
