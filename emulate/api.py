"""The library's entry points: `load`, `compile`, `stream` and `run`, and the one run loop behind them.

    model, tokens, options --prepare--> Problem --compile--> logical graph
    graph + executor + oracle --Stream--> (block, BlockOutput) in block order, memory bounded
    Stream + output file + verify --run--> Run (hidden, logprobs, stats, graph)

Every bad argument raises EmulateError with the one line the CLI prints (emulate/cli.py parses options,
this module, and print). The numerics contract that `verify` checks is docs/numerics.md's.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import networkx as nx
import numpy as np
import torch

from emulate.config import EmulateError
from emulate.executor import EXECUTORS, Executor, Job, Local, Ray
from emulate.forward import check_tokens, compile_compact, compile_forward, resolve_patterns, row_errors
from emulate.loaders import Model, load, tokenize
from emulate.memory import check_fits, estimate
from emulate.oracles import KernelOracle, Oracle, PaperOracle, oracle_named
from graphs import CompactGraph, Pattern, PatternKind

# The embedded default: a real decoder on real English text (emulate.io.default_text). Token ids
# without a model (random or read from a file) run on a seeded preset: a synthetic model for a
# synthetic input, and quick.
DEFAULT_MODEL = "smollm2-135m"
IDS_MODEL = "tiny-llama"
DEFAULT_TOKENS = 4096  # random ids when the model has no tokenizer and no input is given
DEFAULT_BLOCK = 256  # 16 blocks of the default input: enough for the block structure to matter
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEVICES = ("cpu", "cuda")

# The numerics contract of the exact modes (docs/numerics.md): max per-row relative error.
TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-10}
# The approximate modes state their own (docs/numerics.md, measured on the presets):
# sampled attention (Thm 4.1) estimates full attention from M keys per block; its error is the
# estimate's, and the theorem bounds it only for bounded scores, so the stated figure is loose.
SAMPLED_TOLERANCE = 0.5
# the raw paper oracle reads A = p / (1 - p) from an output p = A / (A + 1): the cancellation in
# 1 - p costs digits as A grows, far more in float32 than in float64.
RAW_PAPER_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-8}

StageProgress = Callable[[str, int, int], None]  # (stage, done, total): stages "graph", "forward", "reference"

RAY_KEYWORDS = {"address": "--address", "workers": "--workers", "cpus_per_worker": "--cpus-per-worker",
                "gpus_per_worker": "--gpus-per-worker", "stall_timeout": "--stall-timeout"}


@dataclass(frozen=True)
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

    def graph(self, progress: StageProgress | None = None) -> nx.DiGraph:
        on_layer = None if progress is None else (lambda done, total: progress("graph", done, total))
        return compile_forward(self.model.config, self.length, self.block_size, list(self.patterns), self.dtype,
                               self.seed, on_layer)

    def compact_graph(self, progress: StageProgress | None = None) -> CompactGraph:
        """The same graph in compact form: one template per layer pattern, any N."""
        on_layer = None if progress is None else (lambda done, total: progress("graph", done, total))
        return compile_compact(self.model.config, self.length, self.block_size, list(self.patterns), self.dtype,
                               self.seed, on_layer)


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in TOLERANCE:
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise EmulateError(f"dtype must be float32 or float64, got {dtype!r}")


def _int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise EmulateError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def token_ids(tokenizer, vocab: int, tokens, text, input, random_tokens, seed: int) -> np.ndarray:
    """The run's token ids from exactly one source; the embedded default when none is given.

    tokenizer: a model's (emulate.loaders.tokenize), or None for byte-level ids; with no source the
    default text where there is a tokenizer, DEFAULT_TOKENS random ids below `vocab` otherwise.
    """
    from emulate.io import TEXT_SUFFIXES, check_text, default_text, random_ids, read_text, read_tokens

    given = [name for name, v in (("tokens", tokens), ("text", text), ("input", input),
                                  ("random_tokens", random_tokens)) if v is not None]
    if len(given) > 1:
        raise EmulateError(f"give one input, not {' and '.join(given)}")
    if not given and tokenizer is not None:
        return tokenize(tokenizer, default_text())
    if random_tokens is not None or not given:
        n = DEFAULT_TOKENS if random_tokens is None else _int("--random-tokens", random_tokens)
        return random_ids(n, vocab, seed)
    if text is not None:
        if not isinstance(text, str):
            raise EmulateError(f"text must be a str, not {type(text).__name__}")
        return tokenize(tokenizer, check_text(text))
    if input is not None:
        if Path(input).suffix.lower() in TEXT_SUFFIXES:
            return tokenize(tokenizer, read_text(input))
        return read_tokens(input)
    if isinstance(tokens, (int, np.integer)) and not isinstance(tokens, bool):
        raise EmulateError(f"tokens={tokens} is a count: give token ids, or random_tokens={tokens} for random ones")
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    ids = np.asarray(tokens)
    if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) and ids.dtype != np.bool_):
        raise EmulateError(f"tokens must be a 1-d sequence of integer ids, got {ids.dtype} of shape {ids.shape}")
    return ids.astype(np.int64)


def input_source(tokenizer, tokens, text, input, random_tokens, seed: int) -> str:
    """The summary's `input`: which of token_ids's sources the ids came from."""
    from emulate.io import DEFAULT_TEXT_NAME

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
    from emulate.io import TEXT_SUFFIXES

    ids = tokens is not None or random_tokens is not None or (
        input is not None and Path(input).suffix.lower() not in TEXT_SUFFIXES)
    return IDS_MODEL if ids else DEFAULT_MODEL


def prepare(model=None, tokens=None, *, text: str | None = None, input: str | None = None,
            random_tokens: int | None = None, seed: int = 0, block_size: int = DEFAULT_BLOCK,
            attention: str = "auto", window: int | None = None, sinks: int | None = None,
            dtype="float32", count_only: bool = False, graph_form: str = "networkx") -> Problem:
    """Resolve a forward's inputs: load the model, read the token ids, check them, choose the masks."""
    seed = _int("--seed", seed, 0)
    if seed >= 2**64:
        raise EmulateError(f"--seed must be below 2**64, got {seed}")
    block_size = _int("--block-size", block_size)
    m = load(default_model(tokens, text, input, random_tokens) if model is None else model)
    dt = _dtype(dtype)
    patterns = resolve_patterns(m.config, attention, window, sinks)
    bytes_per = torch.finfo(dt).bits // 8

    def fits(n: int) -> None:
        # a compile (count_only) holds the graph alone, in the form asked for
        check_fits(estimate(m.config, n, block_size, patterns, bytes_per, run=not count_only, graph=graph_form),
                   f"{n} tokens at M = {block_size}")

    if count_only and isinstance(tokens, (int, np.integer)) and not isinstance(tokens, bool):
        length = _int("tokens", tokens)
        fits(length)
        ids = np.empty(0, dtype=np.int64)
    else:
        if random_tokens is not None and isinstance(random_tokens, (int, np.integer)) and random_tokens > 0:
            fits(int(random_tokens))  # before a single id is drawn
        ids = token_ids(m.tokenizer, m.config.vocab, tokens, text, input, random_tokens, seed)
        length = len(ids)
        check_tokens(m.config, ids)
        fits(length)
    for name, value in (("--window", window), ("--sinks", sinks)):
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > length:
            raise EmulateError(f"{name} {value} is longer than the input's {length} tokens; it would change nothing "
                               f"but the name of the mask (use --attention causal)")
    return Problem(m, ids, length, tuple(patterns), block_size, dt, seed,
                   input_source(m.tokenizer, tokens, text, input, random_tokens, seed))


def compile(model=None, tokens=None, progress: StageProgress | None = None, *, compact: bool = False,
            **options) -> nx.DiGraph | CompactGraph:
    """The logical task graph of one forward; nothing runs. `tokens` may be a count (an int).

    Options as `run`'s problem keywords: text, input, random_tokens, seed, block_size, attention,
    window, sinks, dtype (which prices the graph's bytes). progress("graph", done, total) per layer.
    compact=True gives a graphs.CompactGraph instead of networkx: one template per layer pattern,
    analysed without materialising a node (`.counts()`), nodes generated on demand (`.iter_nodes()`,
    `.to_networkx()`); it compiles a 1M-token forward in well under a second. `model` may also be a
    published shape (emulate.shapes.SHAPES, e.g. "llama3-8b"): its widths, no weights.
    """
    problem = prepare(_shape_or_model(model), tokens, count_only=True, graph_form="compact" if compact else "networkx",
                      **options)
    return problem.compact_graph(progress) if compact else problem.graph(progress)


def _shape_or_model(model):
    """A published shape's name as a weightless Model (compile and plan only); anything else as given."""
    from emulate.presets import FILE_PRESETS, PRESETS
    from emulate.shapes import SHAPES, shape_config

    if isinstance(model, str) and model in SHAPES and model not in PRESETS and model not in FILE_PRESETS:
        from emulate.loaders import Model

        return Model(shape_config(model), {})
    return model


@dataclass(frozen=True)
class BlockOutput:
    """One query block's outputs: final-norm hidden states and next-token log-probabilities.

    logprobs[t] = log p(token[start + t + 1] | tokens <= start + t), for the rows that have a next
    token (all of them but the input's last); None for encoders.
    """

    block: int
    span: tuple[int, int]
    hidden: torch.Tensor
    logprobs: torch.Tensor | None


def _executor(executor, ray_keywords: dict, trace: str | None = None, threads=None) -> Executor:
    given = {k: v for k, v in ray_keywords.items() if v is not None}
    if threads is not None and executor != "local":
        raise EmulateError("--threads is the local executor's: Ray workers take --cpus-per-worker, and an executor "
                           "object takes emulate.Local(threads=...)")
    if isinstance(executor, str):
        if executor not in EXECUTORS:
            raise EmulateError(f"unknown executor {executor!r} (choose from {', '.join(EXECUTORS)})")
        if executor == "local":
            if given:
                flags = [RAY_KEYWORDS[k] for k in given]
                raise EmulateError(f"{', '.join(flags)} {'is a Ray option' if len(flags) == 1 else 'are Ray options'}: "
                                   "add --executor ray, or drop it for a local run")
            return Local(trace=trace, threads=threads)
        return Ray(**given, trace=trace)
    if given:
        raise EmulateError(f"Ray options ({', '.join(given)}) go inside emulate.Ray(...) when an executor object is given")
    if trace is not None:
        raise EmulateError("trace goes inside emulate.Local(trace=...) or emulate.Ray(trace=...) when an executor "
                           "object is given")
    if not hasattr(executor, "start"):
        raise EmulateError(f"executor must be 'local', 'ray', emulate.Local() or emulate.Ray(...), not {executor!r}")
    return executor


def _oracle(oracle, pack_heads, heads: int | None) -> Oracle:
    if isinstance(oracle, str):
        chosen = oracle_named(oracle, pack_heads)
    else:
        if pack_heads is not None:
            raise EmulateError("pack_heads goes inside emulate.PaperOracle(...) when an oracle object is given")
        if not isinstance(oracle, (KernelOracle, PaperOracle)):
            raise EmulateError(f"oracle must be 'kernel', 'paper', 'paper-stable', emulate.KernelOracle() or "
                               f"emulate.PaperOracle(...), not {oracle!r}")
        chosen = oracle
    if isinstance(chosen, PaperOracle) and heads is not None:
        chosen.packed(heads)  # refuse a bad pack width before any work
    return chosen


class Perplexity:
    """exp of the mean negative log-likelihood of the next tokens, summed block by block in float64."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, logprobs: torch.Tensor | None) -> None:
        if logprobs is not None and logprobs.numel():
            self.total -= float(logprobs.double().sum())
            self.count += logprobs.numel()

    def value(self) -> float | None:
        """None for a one-token input (nothing to predict); inf where a log-probability is -inf."""
        return math.exp(self.total / self.count) if self.count else None


class Stream:
    """The outputs of one forward, block by block in block order, as the executor completes them.

    Iterate once: each item is (block, BlockOutput). Only the executor's live set and one block's
    outputs are held, so memory does not grow with N. `graph` is the logical graph; `stats` holds
    the run's figures (the keys of `emulate run --json` that a forward alone fills) once the
    iteration has ended.
    """

    def __init__(self, problem: Problem, compact: CompactGraph, executor: Executor, oracle: Oracle, device: str,
                 progress: StageProgress | None = None):
        self.problem, self.compact, self.executor, self.oracle = problem, compact, executor, oracle
        self.device, self.progress = device, progress
        self.stats: dict = {}
        self._execution = None

    @cached_property
    def graph(self) -> nx.DiGraph:
        """The logical graph in networkx, built on first use (the run itself reads `compact`)."""
        return self.compact.to_networkx()

    def __iter__(self) -> Iterator[tuple[int, BlockOutput]]:
        if self._execution is not None:
            raise EmulateError("a stream runs once; call emulate.stream again for another pass")
        p = self.problem
        job = Job(self.compact, p.model, torch.from_numpy(p.tokens), p.dtype, self.device, self.oracle)
        forward = None if self.progress is None else (lambda done, total: self.progress("forward", done, total))
        self._execution = self.executor.start(job, forward)
        spans = self.compact.spans
        nll = Perplexity()
        t0 = time.perf_counter()
        try:
            for block, value in self._execution:
                out = BlockOutput(block, tuple(spans[block]), value["hidden"], value.get("logprob_next"))
                nll.add(out.logprobs)
                yield block, out
        finally:
            self._execution.close()
        self.stats = self._summary(time.perf_counter() - t0)
        if p.model.config.lm_head:
            self.stats["perplexity"] = nll.value()

    def close(self) -> None:
        if self._execution is not None:
            self._execution.close()

    def _summary(self, forward_s: float) -> dict:
        p, c = self.problem, self.compact.counts()
        config = p.model.config
        figures = dict(self._execution.figures)
        oracle_keys = {k: figures.pop(k) for k in list(figures) if k.startswith("oracle_")}
        return {
            "model": config.name, "family": config.family, "layers": config.layers, "heads": config.heads,
            "kv_heads": config.kv_heads, "input": p.source, "tokens": p.length, "block_size": p.block_size,
            "blocks": self.compact.blocks, "attention": describe(p.patterns), "window": _window(p.patterns),
            "sinks": p.patterns[0].sinks, "oracle": self.oracle.name, "dtype": str(p.dtype).removeprefix("torch."),
            "device": self.device, "executor": self.executor.name, "backend": "graph",
            **{k: c[k] for k in ("attention_calls", "attention_calls_per_layer", "attention_calls_bound", "small_calls",
                                 "max_call_tokens", "graph_nodes", "graph_edges", "graph_depth")},
            "forward_s": round(forward_s, 4), **figures, **oracle_keys,
        }


def stream(model=None, tokens=None, *, text: str | None = None, input: str | None = None,
           random_tokens: int | None = None, seed: int = 0, block_size: int = DEFAULT_BLOCK, attention: str = "auto",
           window: int | None = None, sinks: int | None = None, dtype="float32", device: str = "cpu",
           executor="local", oracle="kernel", pack_heads: int | str | None = None, address: str | None = None,
           workers: int | None = None, cpus_per_worker: float | None = None, gpus_per_worker: float | None = None,
           trace: str | None = None, stall_timeout: float | None = None, threads: int | str | None = None,
           progress: StageProgress | None = None) -> Stream:
    """Compile and start one forward; iterate the result for (block, BlockOutput) in block order.

    The keywords are `run`'s, less those that need every block at once (output, hidden, verify).
    """
    if device not in DEVICES:
        raise EmulateError(f"device must be cpu or cuda, got {device!r}")
    ex = _executor(executor, dict(address=address, workers=workers, cpus_per_worker=cpus_per_worker,
                                  gpus_per_worker=gpus_per_worker, stall_timeout=stall_timeout), trace, threads)
    # the local executor reads the compact graph; the Ray executor's physical plan holds every node
    problem = prepare(model, tokens, text=text, input=input, random_tokens=random_tokens, seed=seed,
                      block_size=block_size, attention=attention, window=window, sinks=sinks, dtype=dtype,
                      graph_form=graph_form(ex))
    chosen = _oracle(oracle, pack_heads, problem.model.config.heads)
    return Stream(problem, problem.compact_graph(progress), ex, chosen, device, progress)


def graph_form(executor: Executor) -> str:
    """The form of the logical graph a run holds: memory.estimate prices it. The Ray executor's
    physical plan lists every node with its attributes; the local executor reads the compact form."""
    return "plan" if executor.name == "ray" else "compact"


@dataclass
class Run:
    """The result of `run`: outputs over all N tokens, the run's figures and its logical graph.

    hidden [N, width]: final-norm hidden states. logprobs [N - 1]: log p(token[t+1] | tokens <= t)
    for decoders, None for encoders. Both are None with collect=False. stats: the keys of
    `emulate run --json`. tokens: the ids that ran. compact: the logical graph in compact form
    (graphs.CompactGraph); `graph` gives it in networkx, built on first use. Both are None where no
    task graph ran (the transformers backend, the monolithic reference).
    """

    hidden: torch.Tensor | None
    logprobs: torch.Tensor | None
    stats: dict
    compact: CompactGraph | None
    tokens: np.ndarray

    @cached_property
    def graph(self) -> nx.DiGraph | None:
        return None if self.compact is None else self.compact.to_networkx()


BACKENDS = ("graph", "transformers")


def run(model=None, tokens=None, *, output: str | None = None, hidden: bool = False, verify: bool = False,
        tolerance: float | None = None, collect: bool = True, backend: str = "graph", **options) -> Run:
    """Run one emulated forward end to end, in-process (executor="local") or on Ray.

    model: a preset name, a checkpoint directory, a .gguf file or an emulate.Model (default: smollm2-135m
    for text or no input, tiny-llama for token ids; api.default_model).
    tokens: 1-d integer ids (array, tensor or list); or text=, input= (a file), random_tokens=N;
    with none of them, DEFAULT_TOKENS seeded random ids. block_size: M, the most tokens any call
    sees. attention: auto (the model's own mask), full, causal, sliding, sink or sampled; window r
    and sinks s for those that take them. dtype: float32 or float64. device: cpu or cuda.
    executor: "local", "ray", emulate.Local() or emulate.Ray(...); the Ray keywords (address,
    workers, cpus_per_worker, gpus_per_worker, stall_timeout) are shorthand for the latter, and
    trace (the executed schedule as Chrome trace-event JSON) for either; threads (an integer, or
    "auto": every core this process may use; default torch's own setting) for emulate.Local: its
    call workers on CPU.
    oracle: "kernel", "paper", "paper-stable", emulate.KernelOracle() or emulate.PaperOracle(...);
    pack_heads with a named paper oracle. progress(stage, done, total) reports the stages "graph"
    (layers built), "forward" (calls or Ray tasks done) and "reference" (layers of verify's pass).
    output: an Arrow IPC file written block by block (hidden states added with hidden=True, and
    always for encoders). verify: also run the monolithic forward and check the error against the
    tolerance of the dtype (docs/numerics.md) or `tolerance`. collect=False keeps no outputs in
    memory (run.hidden and run.logprobs are None; verify collects what it needs).
    backend: "graph" runs the task graph (emulate's own blocks); "transformers" runs a checkpoint's
    own transformers model (a directory, a .gguf file or a loaded model) with every attention call
    cut into pair calls (emulate/hf_model.py); verify then compares with the same model under sdpa.
    """
    if backend == "transformers":
        from emulate.hf_model import run as run_transformers

        return run_transformers(DEFAULT_MODEL if model is None else model, tokens, output=output, hidden=hidden,
                                verify=verify, tolerance=tolerance, collect=collect, **options)
    if backend != "graph":
        raise EmulateError(f"backend must be graph or transformers, got {backend!r}")
    from emulate.io import OutputWriter, output_target

    t_start = time.perf_counter()
    if output is not None:
        output_target(output)  # a path that cannot be written is refused before any work
    check_tolerance(tolerance)
    s = stream(model, tokens, **options)
    p, config = s.problem, s.problem.model.config
    check_fits(estimate(config, p.length, p.block_size, p.patterns, torch.finfo(p.dtype).bits // 8, collect, verify,
                        graph=graph_form(s.executor)),
               f"{p.length} tokens at M = {p.block_size}" + (" with verify" if verify else ""))
    writer = None
    if output is not None:
        writer = OutputWriter(output, p.tokens, config.width, p.dtype, logprob=config.lm_head,
                              hidden=hidden or not config.lm_head,
                              metadata={"model": config.name, "block_size": p.block_size,
                                        "attention": p.patterns[0].describe(), "dtype": str(p.dtype).removeprefix("torch.")})
    keep = collect or verify
    hiddens, logprobs = [], []
    try:
        for _, out in s:
            if writer is not None:
                writer.write(out)
            if keep:
                hiddens.append(out.hidden)
                if out.logprobs is not None:
                    logprobs.append(out.logprobs)
        if writer is not None:
            writer.close()
            writer = None
    finally:
        if writer is not None:
            writer.abort()
        s.close()
    got_hidden = torch.cat(hiddens) if keep else None
    got_logprobs = (torch.cat(logprobs) if logprobs else None) if keep and config.lm_head else None
    stats = dict(s.stats)
    if verify:
        stats.update(_verify(s, got_hidden, got_logprobs, tolerance, options.get("progress")))
    if output is not None:
        stats["output"] = output
    finish_stats(stats, t_start)
    if not collect:
        got_hidden = got_logprobs = None
    return Run(got_hidden, got_logprobs, stats, s.compact, p.tokens)


def finish_stats(stats: dict, t_start: float) -> None:
    """The figures every run ends with: wall time since `t_start`, tokens/s of the forward, peak RSS."""
    from emulate.memory import peak_rss_mb

    stats["wall_s"] = round(time.perf_counter() - t_start, 4)
    stats["tokens_per_s"] = round(stats["tokens"] / stats["forward_s"], 1) if stats["forward_s"] > 0 else None
    stats["peak_rss_mb"] = round(peak_rss_mb(), 1)


def check_tolerance(tolerance) -> None:
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                  or not math.isfinite(tolerance) or tolerance <= 0):
        raise EmulateError(f"--tolerance must be a finite number > 0, got {tolerance!r}")


def monolithic(model=None, tokens=None, *, text: str | None = None, input: str | None = None,
              random_tokens: int | None = None, seed: int = 0, attention="auto", window: int | None = None,
              sinks: int | None = None, dtype="float32", device: str = "cpu") -> Run:
    """The monolithic forward (emulate/reference.py): one full-length pass, what every run is checked against.

    Takes `run`'s problem keywords; returns a Run whose graph is None (no graph ran) and whose stats
    hold reference_s. The sampled pattern's reference is exact full attention.
    """
    if device not in DEVICES:
        raise EmulateError(f"device must be cpu or cuda, got {device!r}")
    p = prepare(model, tokens, text=text, input=input, random_tokens=random_tokens, seed=seed, attention=attention,
                window=window, sinks=sinks, dtype=dtype)
    return _reference(p, device)


def _reference(p: Problem, device: str, progress: StageProgress | None = None) -> Run:
    from emulate.reference import reference_forward

    on_layer = None if progress is None else (lambda done, total: progress("reference", done, total))
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = reference_forward(p.model.transformer(p.dtype, device), torch.from_numpy(p.tokens), list(p.patterns),
                                on_layer=on_layer)
    return Run(ref["hidden"], ref.get("logprob_next"), {"reference_s": round(time.perf_counter() - t0, 4)}, None,
               p.tokens)


def tolerance_for(patterns, oracle: Oracle, dtype: torch.dtype) -> float:
    """The error a run's mode promises: the dtype's contract, or what an approximate mode states."""
    if any(pat.kind == PatternKind.SAMPLED for pat in patterns):
        return SAMPLED_TOLERANCE
    if isinstance(oracle, PaperOracle) and not oracle.stable:
        return RAW_PAPER_TOLERANCE[dtype]
    return TOLERANCE[dtype]


def _verify(s: Stream, hidden: torch.Tensor, logprobs: torch.Tensor | None, tolerance: float | None,
            progress: StageProgress | None = None) -> dict:
    """The monolithic forward on the same weights; the per-row error against the tolerance."""
    p = s.problem
    ref = _reference(p, s.device if isinstance(s.executor, Local) else "cpu", progress)
    tol = tolerance_for(p.patterns, s.oracle, p.dtype) if tolerance is None else float(tolerance)
    return {**ref.stats, **compare(hidden, logprobs, ref.hidden, ref.logprobs, tol)}


def compare(hidden: torch.Tensor, logprobs: torch.Tensor | None, want_hidden: torch.Tensor,
            want_logprobs: torch.Tensor | None, tolerance: float) -> dict:
    """verify's figures: per-row errors of the hidden states (and log-probabilities) against a reference."""
    out = {}
    out["max_abs_err"], out["max_rel_err"] = row_errors(hidden, want_hidden.to(hidden.device))
    finite = math.isfinite(out["max_rel_err"])
    if logprobs is not None:
        err = float((logprobs.double() - want_logprobs.double().to(logprobs.device)).abs().max()) \
            if logprobs.numel() else 0.0
        out["max_logprob_err"] = err
        finite = finite and math.isfinite(err)
    out["tolerance"] = tolerance
    out["verified"] = bool(finite and out["max_rel_err"] <= tolerance)  # NaN never passes
    return out


def describe(patterns) -> str:
    kinds = {pat.kind for pat in patterns}
    if len(kinds) == 1:
        return str(patterns[0].kind)
    return "mixed(" + ",".join(str(pat.kind) for pat in patterns) + ")"


def _window(patterns):
    windows = {pat.window for pat in patterns if pat.window is not None}
    return windows.pop() if len(windows) == 1 else (sorted(windows) or None)
