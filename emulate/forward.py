"""One emulated forward, end to end: resolve the mask, compile the graph, run it, collect the outputs."""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch

from emulate.config import EmulateError, ModelConfig
from emulate.model import Transformer
from graphs import ForwardSpec, Pattern, PatternError, build_graph


def resolve_patterns(config: ModelConfig, attention: str = "auto", window: int | None = None,
                     sinks: int | None = None) -> list[Pattern]:
    """The mask of T, layer by layer.

    'auto' keeps the model's own mask: full for encoders, causal for decoders, and each layer's
    own sliding window where the checkpoint has one (a --window given with 'auto' replaces it).
    Any other value redefines T with that mask on every layer.
    """
    try:
        if attention == "auto":
            if sinks is not None:
                raise PatternError("--sinks needs --attention sink")
            if not config.causal:
                if window is not None:
                    raise PatternError(f"--window needs a causal model; {config.name} is an encoder")
                return [Pattern("full")] * config.layers
            # `window is None`, not falsiness: --window 0 must reach Pattern and be refused
            own = [w if window is None else window for w in config.windows]
            return [Pattern("causal") if w is None else Pattern("sliding", window=w) for w in own]
        if attention == "sliding" and window is None:
            own = {w for w in config.windows if w is not None}
            if len(own) != 1:
                raise PatternError("--attention sliding needs --window R (the model has no single window of its own)")
            window = own.pop()
        if attention == "sink" and window is None:
            raise PatternError("--attention sink needs --window R")
        pattern = Pattern(attention, window=window, sinks=sinks)
    except PatternError as err:
        raise EmulateError(str(err)) from None
    if pattern.kind == "sampled" and config.causal:
        raise EmulateError(f"sampled attention (Thm 4.1) needs an encoder; {config.name} is causal")
    return [pattern] * config.layers


def forward_spec(config: ModelConfig, tokens: int, block_size: int, patterns: list[Pattern],
                 dtype: torch.dtype, seed: int = 0) -> ForwardSpec:
    if block_size < 1:
        raise EmulateError(f"--block-size must be >= 1, got {block_size}")
    if tokens < 1:
        raise EmulateError("the input holds no tokens")
    if config.max_positions is not None and tokens > config.max_positions:
        raise EmulateError(f"{tokens} tokens exceed {config.name}'s {config.max_positions} learned positions")
    return ForwardSpec(tokens=tokens, block_size=block_size, patterns=tuple(patterns), heads=config.heads,
                       kv_heads=config.kv_heads, head_dim=config.head_dim, width=config.width,
                       mlp_width=config.mlp_width, vocab=config.vocab if config.lm_head else 0,
                       dtype_bytes=torch.finfo(dtype).bits // 8, seed=seed)


def compile_forward(config: ModelConfig, tokens: int, block_size: int, patterns: list[Pattern],
                    dtype: torch.dtype, seed: int = 0) -> nx.DiGraph:
    try:
        return build_graph(forward_spec(config, tokens, block_size, patterns, dtype, seed))
    except PatternError as err:
        raise EmulateError(str(err)) from None


def check_tokens(config: ModelConfig, tokens: torch.Tensor) -> None:
    if tokens.numel() == 0:
        raise EmulateError("the input holds no tokens")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= config.vocab:
        bad = lo if lo < 0 else hi
        raise EmulateError(f"token id {bad} is outside {config.name}'s vocabulary [0, {config.vocab})")


@dataclass
class Collected:
    """Outputs gathered block by block: final-norm hidden states and next-token log-probabilities."""

    hidden: list = field(default_factory=list)
    logprob_next: list = field(default_factory=list)

    def add(self, value: dict) -> None:
        self.hidden.append(value["hidden"])
        if "logprob_next" in value:
            self.logprob_next.append(value["logprob_next"])

    def result(self) -> dict:
        out = {"hidden": torch.cat(self.hidden)}
        if self.logprob_next:
            out["logprob_next"] = torch.cat(self.logprob_next)
        return out


def row_errors(hidden: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max |y - t|, max_i ||y_i - t_i|| / ||t_i||): the paper's per-row relative error."""
    diff = hidden.double() - reference.double()
    rel = diff.norm(dim=1) / reference.double().norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    return float(diff.abs().max()), float(rel.max())


def new_model(config: ModelConfig, weights: dict, dtype: torch.dtype, device: str) -> Transformer:
    if device == "cuda" and not torch.cuda.is_available():
        raise EmulateError("--device cuda asked for, but torch sees no CUDA device here")
    return Transformer(config, weights, dtype=dtype, device=device)
