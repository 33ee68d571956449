"""The shape of a model family: one generic block covers llama, mistral, qwen2, gpt2 and bert."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from emulate.errors import EmulateError

# Bounds no real model comes near (the largest published ones have ~130 layers and widths under
# 10^5): a config past them is a broken or hostile file, refused before anything is sized by it.
MAX_LAYERS = 100_000
MAX_DIMENSION = 2**24
SIZES = ("vocab", "width", "layers", "heads", "kv_heads", "head_dim", "mlp_width")


def shown(value) -> str:
    """A config value as a message shows it: a number of thousands of digits (which Python will not
    even print past 4300) as its size, any long value cut short."""
    if isinstance(value, int) and value.bit_length() > 128:
        return f"a {value.bit_length()}-bit number"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class ModelConfig:
    """Everything the position-wise pieces and the attention pattern need to know about a model.

    `windows[l]` is layer l's sliding window r in the paper's sense (query i sees keys
    i-r+1 .. i, Def 2.4), or None for a layer with the model's plain mask. `eos_ids`: the
    end-of-sequence token ids generation stops at (emulate/generation.py), as the checkpoint's
    config.json / generation_config.json or the GGUF metadata gives them; none for the presets.
    """

    name: str
    family: str
    vocab: int
    width: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp_width: int
    causal: bool = True
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-6
    prenorm: bool = True
    positions: str = "rope"  # "rope" | "learned"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_positions: int | None = None  # the limit of learned positions; None for RoPE
    # a RoPE model's declared context (config.json max_position_embeddings, GGUF context_length):
    # generation refuses to go past it unless told to (check_positions); None where none is declared
    rope_positions: int | None = None
    mlp: str = "swiglu"  # "swiglu" | "gelu"
    act: str = "silu"  # "silu" | "gelu" | "gelu_tanh"
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    embed_norm: bool = False  # BERT normalises the embeddings
    token_types: int = 0  # BERT's segment embeddings (type 0 is added)
    final_norm: bool = True
    lm_head: bool = True
    windows: tuple = field(default=())
    eos_ids: tuple = field(default=())

    def __post_init__(self):
        self._check_numbers()
        if not self.windows:
            object.__setattr__(self, "windows", (None,) * self.layers)
        if len(self.windows) != self.layers:
            raise EmulateError(f"{self.name}: {len(self.windows)} window entries for {self.layers} layers")
        if self.heads % self.kv_heads:
            raise EmulateError(f"{self.name}: {self.heads} heads do not group over {self.kv_heads} KV heads")

    def _check_numbers(self) -> None:
        """Every size a positive integer within bounds, every epsilon and base a finite number > 0:
        checked before anything (the windows, the weights' names) is sized by them."""
        for name in SIZES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EmulateError(f"{self.name}: {name} must be a positive integer, got {shown(value)}")
            bound = MAX_LAYERS if name == "layers" else MAX_DIMENSION
            if value > bound:
                raise EmulateError(f"{self.name}: {name} {shown(value)} is past any real model's (at most {bound})")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise EmulateError(f"{self.name}: {name} must be a finite number > 0, got {shown(value)}")
        if not isinstance(self.eos_ids, tuple) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**63 for t in self.eos_ids):
            raise EmulateError(f"{self.name}: eos_ids must be token ids (integers >= 0), got {shown(self.eos_ids)}")
        for name in ("max_positions", "rope_positions"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise EmulateError(f"{self.name}: {name} must be a positive integer, got {shown(value)}")
        for f in fields(self):
            if f.type == "bool" and not isinstance(getattr(self, f.name), bool):
                raise EmulateError(f"{self.name}: {f.name} must be true or false, got {shown(getattr(self, f.name))}")

    @property
    def default_attention(self) -> str:
        if not self.causal:
            return "full"
        return "sliding" if any(w is not None for w in self.windows) else "causal"

    def to_dict(self) -> dict:
        return asdict(self)


def check_positions(config: ModelConfig, prompt: int, new: int, allow_past_positions: bool = False) -> None:
    """Prompt plus new tokens within the model's positions: learned positions end at their table
    (always refused past it); a RoPE model's declared max_position_embeddings is refused past
    unless allow_past_positions (RoPE itself computes any position; quality past the trained
    context is the model's own)."""
    total = prompt + new
    if config.max_positions is not None and total > config.max_positions:
        raise EmulateError(f"{prompt} prompt tokens + {new} new ones exceed {config.name}'s "
                           f"{config.max_positions} positions")
    limit = config.rope_positions
    if limit is not None and total > limit and not allow_past_positions:
        raise EmulateError(f"{prompt} prompt tokens + {new} new ones exceed {config.name}'s {limit} positions "
                           f"(max_position_embeddings); --allow-past-positions goes past them anyway")
