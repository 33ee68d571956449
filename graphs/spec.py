"""What one forward computes, as plain data: the shape of T and how it is cut into blocks."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from graphs.patterns import Pattern


@dataclass(frozen=True)
class ForwardSpec:
    """The large transformer T over N tokens, emulated with calls that see at most M tokens.

    `patterns` holds one attention pattern per layer, so models with per-layer sliding windows
    (Mistral-style, Qwen2's max_window_layers) compile to the right pairs layer by layer.
    Widths price each node's FLOPs and bytes; they do not change the graph's shape.
    """

    tokens: int
    block_size: int
    patterns: tuple[Pattern, ...]
    heads: int
    kv_heads: int
    head_dim: int
    width: int
    mlp_width: int
    vocab: int = 0  # 0: no language-model head (encoders)
    dtype_bytes: int = 4
    seed: int = 0  # draws the sampled pattern's permutation tau (Thm 4.1)

    @property
    def layers(self) -> int:
        return len(self.patterns)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patterns"] = [asdict(p) for p in self.patterns]
        return d
