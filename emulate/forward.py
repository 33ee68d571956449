"""What one forward computes: the mask per layer, the graph's spec, checked token ids, and errors."""
from __future__ import annotations

import networkx as nx
import numpy as np
import torch

from emulate.config import EmulateError, ModelConfig
from graphs import CompactGraph, ForwardSpec, Pattern, PatternError, PatternKind, build_graph


def resolve_patterns(config: ModelConfig, attention="auto", window: int | None = None,
                     sinks: int | None = None) -> list[Pattern]:
    """The mask of T, layer by layer.

    'auto' keeps the model's own mask: full for encoders, causal for decoders, and each layer's
    own sliding window where the checkpoint has one (a --window given with 'auto' replaces it).
    Any other name redefines T with that mask on every layer. A Pattern, or a sequence of one
    per layer, is taken as it is (window and sinks then belong inside the Pattern).
    """
    if isinstance(attention, Pattern) or isinstance(attention, (list, tuple)):
        return _given_patterns(config, attention, window, sinks)
    if not isinstance(attention, str):
        raise EmulateError(f"attention must be a pattern name, a Pattern or a list of them, not {attention!r}")
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


def _given_patterns(config: ModelConfig, attention, window, sinks) -> list[Pattern]:
    if window is not None or sinks is not None:
        raise EmulateError("window and sinks go inside the Pattern when attention is given as Pattern objects")
    patterns = [attention] * config.layers if isinstance(attention, Pattern) else list(attention)
    if len(patterns) != config.layers or not all(isinstance(p, Pattern) for p in patterns):
        raise EmulateError(f"attention as a list needs one Pattern per layer ({config.layers} for {config.name})")
    if any(p.kind == PatternKind.SAMPLED for p in patterns) and config.causal:
        raise EmulateError(f"sampled attention (Thm 4.1) needs an encoder; {config.name} is causal")
    return patterns


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
                    dtype: torch.dtype, seed: int = 0, on_layer=None) -> nx.DiGraph:
    try:
        return build_graph(forward_spec(config, tokens, block_size, patterns, dtype, seed), on_layer)
    except PatternError as err:
        raise EmulateError(str(err)) from None


def compile_compact(config: ModelConfig, tokens: int, block_size: int, patterns: list[Pattern],
                    dtype: torch.dtype, seed: int = 0, on_layer=None) -> CompactGraph:
    """The logical graph in compact form (graphs/compact.py): any size, nodes generated on demand."""
    try:
        return CompactGraph.build(forward_spec(config, tokens, block_size, patterns, dtype, seed), on_layer)
    except PatternError as err:
        raise EmulateError(str(err)) from None


def check_tokens(config: ModelConfig, tokens: np.ndarray) -> None:
    if tokens.size == 0:
        raise EmulateError("the input holds no tokens")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= config.vocab:
        bad = lo if lo < 0 else hi
        raise EmulateError(f"token id {bad} is outside {config.name}'s vocabulary [0, {config.vocab})")


def row_errors(hidden: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max |y - t|, max_i ||y_i - t_i|| / ||t_i||): the paper's per-row relative error."""
    diff = hidden.double() - reference.double()
    rel = diff.norm(dim=1) / reference.double().norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    return float(diff.abs().max()), float(rel.max())
