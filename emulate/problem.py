"""One forward, resolved before anything runs: the model, its token ids, the mask per layer and how it is cut.

    prepare(model, tokens, ...) -> Problem      every bad argument refused here, with one line
    Problem.compact_graph() / .graph()          the logical graph (graphs/compact.py)

The checks that need no model (integers, dtypes) are `positive_int` and `float_dtype`; the backends
share them (emulate/hf/backend.py reads the same names).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import numpy as np
import torch

from emulate.errors import EmulateError
from emulate.models.config import ModelConfig
from emulate.models.loaders import Model, load, tokenize
from emulate.runtime.memory import check_fits, estimate
from graphs import CompactGraph, ForwardSpec, Pattern, PatternError, PatternKind, build_graph

# The embedded default: a real decoder on real English text (emulate.inputs.default_text). Token ids
# without a model (random or read from a file) run on a seeded preset: a synthetic model for a
# synthetic input, and quick.
DEFAULT_MODEL = "smollm2-135m"
IDS_MODEL = "tiny-llama"
DEFAULT_TOKENS = 4096  # random ids when the model has no tokenizer and no input is given
DEFAULT_BLOCK = 256  # 16 blocks of the default input: enough for the block structure to matter
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
# weights, activations and pair calls in 16 bits; each pair's partial and the merge in float32
# (emulate/models/block.py, emulate/runtime/kernels.py), verified by the relative contract of docs/numerics.md
HALF_DTYPES = (torch.bfloat16, torch.float16)
DEVICES = ("cpu", "cuda")

StageProgress = Callable[[str, int, int], None]  # (stage, done, total): stages "graph", "forward", "reference"


@dataclass(frozen=True, repr=False)
class Problem:
    """One forward, resolved: the model, its token ids, the mask per layer and how it is cut."""

    model: Model
    tokens: np.ndarray  # int64 ids, or an empty array when only the count is known (`compile`)
    length: int
    patterns: tuple[Pattern, ...]
    block_size: int
    dtype: torch.dtype
    seed: int
    source: str = "token ids"  # where the ids came from, for the summary (input_source)

    def __repr__(self) -> str:
        return (f"<emulate.Problem {self.model.config.name}: {self.length} tokens ({self.source}), M = {self.block_size}, "
                f"{self.patterns[0].describe()}, {str(self.dtype).removeprefix('torch.')}>")

    def graph(self, progress: StageProgress | None = None) -> nx.DiGraph:
        on_layer = None if progress is None else (lambda done, total: progress("graph", done, total))
        return compile_forward(self.model.config, self.length, self.block_size, list(self.patterns), self.dtype,
                               self.seed, on_layer)

    def compact_graph(self, progress: StageProgress | None = None) -> CompactGraph:
        """The same graph in compact form: one template per layer pattern, any N."""
        on_layer = None if progress is None else (lambda done, total: progress("graph", done, total))
        return compile_compact(self.model.config, self.length, self.block_size, list(self.patterns), self.dtype,
                               self.seed, on_layer)


def float_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise EmulateError(f"dtype must be {', '.join(DTYPES)}, got {dtype!r}")


def positive_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise EmulateError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def token_ids(tokenizer, vocab: int, tokens, text, input, random_tokens, seed: int,
              fits: Callable[[int], None] | None = None) -> np.ndarray:
    """The run's token ids from exactly one source; the embedded default when none is given.

    tokenizer: a model's (emulate.models.loaders.tokenize), or None for byte-level ids; with no source the
    default text where there is a tokenizer, DEFAULT_TOKENS random ids below `vocab` otherwise.
    fits(n): told an input file's id count from its metadata before the ids are read (read_tokens).
    """
    from emulate.inputs import TEXT_SUFFIXES, check_text, default_text, random_ids, read_text, read_tokens

    given = [name for name, v in (("tokens", tokens), ("text", text), ("input", input),
                                  ("random_tokens", random_tokens)) if v is not None]
    if len(given) > 1:
        raise EmulateError(f"give one input, not {' and '.join(given)}")
    if not given and tokenizer is not None:
        return tokenize(tokenizer, default_text())
    if random_tokens is not None or not given:
        n = DEFAULT_TOKENS if random_tokens is None else positive_int("--random-tokens", random_tokens)
        return random_ids(n, vocab, seed)
    if text is not None:
        if not isinstance(text, str):
            raise EmulateError(f"text must be a str, not {type(text).__name__}")
        return tokenize(tokenizer, check_text(text))
    if input is not None:
        if Path(input).suffix.lower() in TEXT_SUFFIXES:
            return tokenize(tokenizer, read_text(input))
        return read_tokens(input, fits)
    if isinstance(tokens, (int, np.integer)) and not isinstance(tokens, bool):
        raise EmulateError(f"tokens={tokens} is a count: give token ids, or random_tokens={tokens} for random ones")
    if isinstance(tokens, torch.Tensor):
        if tokens.device.type == "meta":
            raise EmulateError("tokens are on the meta device: they hold no values (give ids on cpu or cuda)")
        tokens = tokens.detach().cpu().numpy()
    ids = np.asarray(tokens)
    if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) and ids.dtype != np.bool_):
        raise EmulateError(f"tokens must be a 1-d sequence of integer ids, got {ids.dtype} of shape {ids.shape}")
    return ids.astype(np.int64)


def input_source(tokenizer, tokens, text, input, random_tokens, seed: int) -> str:
    """The summary's `input`: which of token_ids's sources the ids came from."""
    from emulate.inputs import DEFAULT_TEXT_NAME

    if text is not None:
        return "text"
    if input is not None:
        return str(input)
    if tokens is not None:
        return "token ids"
    if random_tokens is None and tokenizer is not None:
        return DEFAULT_TEXT_NAME
    return f"random ids (seed {seed})"


def default_model(tokens=None, text=None, input=None, random_tokens=None) -> str:
    """The model a run without one uses: the real default for text (or no input), the preset for token ids."""
    from emulate.inputs import TEXT_SUFFIXES

    ids = tokens is not None or random_tokens is not None or (
        input is not None and Path(input).suffix.lower() not in TEXT_SUFFIXES)
    return IDS_MODEL if ids else DEFAULT_MODEL


def prepare(model=None, tokens=None, *, text: str | None = None, input: str | None = None,
            random_tokens: int | None = None, seed: int = 0, block_size: int = DEFAULT_BLOCK,
            attention: str = "auto", window: int | None = None, sinks: int | None = None,
            dtype="float32", count_only: bool = False, graph_form: str = "networkx") -> Problem:
    """Resolve a forward's inputs: load the model, read the token ids, check them, choose the masks."""
    seed = positive_int("--seed", seed, 0)
    if seed >= 2**64:
        raise EmulateError(f"--seed must be below 2**64, got {seed}")
    block_size = positive_int("--block-size", block_size)
    m = load(default_model(tokens, text, input, random_tokens) if model is None else model)
    dt = float_dtype(dtype)
    patterns = resolve_patterns(m.config, attention, window, sinks)
    bytes_per = torch.finfo(dt).bits // 8

    def fits(n: int) -> None:
        # a compile (count_only) holds the graph alone, in the form asked for
        check_fits(estimate(m.config, n, block_size, patterns, bytes_per, run=not count_only, graph=graph_form),
                   f"{n} tokens at M = {block_size}")

    if count_only and isinstance(tokens, (int, np.integer)) and not isinstance(tokens, bool):
        length = positive_int("tokens", tokens)
        fits(length)
        ids = np.empty(0, dtype=np.int64)
    else:
        if random_tokens is not None and isinstance(random_tokens, (int, np.integer)) and random_tokens > 0:
            fits(int(random_tokens))  # before a single id is drawn
        ids = token_ids(m.tokenizer, m.config.vocab, tokens, text, input, random_tokens, seed, fits)
        length = len(ids)
        check_tokens(m.config, ids)
        fits(length)
    for name, value in (("--window", window), ("--sinks", sinks)):
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > length:
            raise EmulateError(f"{name} {value} is longer than the input's {length} tokens; it would change nothing "
                               f"but the name of the mask (use --attention causal)")
    return Problem(m, ids, length, tuple(patterns), block_size, dt, seed,
                   input_source(m.tokenizer, tokens, text, input, random_tokens, seed))


def shape_or_model(model):
    """A published shape's name, or a checkpoint directory or config.json (of any transformers family:
    its config alone is read, emulate/models/shapes.py), as a weightless Model (compile and plan
    only); anything else as given."""
    from emulate.models.presets import FILE_PRESETS, PRESETS
    from emulate.models.config_shapes import config_file, config_shape
    from emulate.models.shapes import SHAPES, shape_config

    if isinstance(model, str) and model in SHAPES and model not in PRESETS and model not in FILE_PRESETS:
        from emulate.models.loaders import Model

        return Model(shape_config(model), {})
    file = config_file(model) if not (isinstance(model, str) and model in PRESETS) else None
    if file is not None:
        from emulate.models.loaders import Model

        tokenizer = file.parent / "tokenizer.json"
        return Model(config_shape(file), {}, tokenizer if tokenizer.is_file() else None)
    return model


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


def check_device(device) -> None:
    if device not in DEVICES:
        raise EmulateError(f"device must be cpu or cuda, got {device!r}")
