"""The shape of a model family: one generic block covers llama, mistral, qwen2, gpt2 and bert."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from emulate.errors import EmulateError


@dataclass(frozen=True)
class ModelConfig:
    """Everything the position-wise pieces and the attention pattern need to know about a model.

    `windows[l]` is layer l's sliding window r in the paper's sense (query i sees keys
    i-r+1 .. i, Def 2.4), or None for a layer with the model's plain mask.
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

    def __post_init__(self):
        if not self.windows:
            object.__setattr__(self, "windows", (None,) * self.layers)
        if len(self.windows) != self.layers:
            raise EmulateError(f"{self.name}: {len(self.windows)} window entries for {self.layers} layers")
        if self.heads % self.kv_heads:
            raise EmulateError(f"{self.name}: {self.heads} heads do not group over {self.kv_heads} KV heads")

    @property
    def default_attention(self) -> str:
        if not self.causal:
            return "full"
        return "sliding" if any(w is not None for w in self.windows) else "causal"

    def to_dict(self) -> dict:
        return asdict(self)
