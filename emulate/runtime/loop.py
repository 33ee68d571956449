"""The one run loop: every backend yields typed block outputs; one consumer does the rest.

    backend (Backend)   the graph on any executor (graph_backend.py), the transformers model
                        (emulate/hf/backend.py), ... : BlockOutputs in block order, its own figures
    Stream              iterates a backend once: perplexity and the summary, the same for all
    finish              a Stream to a Run: the output file, the collected outputs, verify, the
                        figures every run ends with

A backend knows how to run a forward and where its reference is; it never writes a file,
collects outputs or checks errors itself.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from emulate.errors import EmulateError
from emulate.problem import HALF_DTYPES
from emulate.runtime.contract import BlockOutput
from emulate.runtime.verify import compare, compare_half

if TYPE_CHECKING:
    import networkx as nx

    from graphs import CompactGraph

@dataclass(frozen=True)
class Reference:
    """The forward a run is checked against: hidden states, log-probabilities, and its own figures."""

    hidden: torch.Tensor
    logprobs: torch.Tensor | None
    stats: dict


class Backend(Protocol):
    """One forward, run by some backend: what the one loop consumes.

    tokens: the ids that run. width, dtype, lm_head: the shape of its outputs. metadata: the output
    file's metadata, or None until the forward has run (the transformers backend learns each layer's
    mask as it runs). compact: its logical graph, or None where no task graph runs. start() does the
    set-up (an executor's start: a cluster, the workers' weights), outside the forward's time;
    blocks() then yields BlockOutputs in block order, once; summary(forward_s) gives the run's
    figures afterwards (the keys of `emulate run --json` a forward fills, counted where the calls ran).
    reference(progress) runs the forward it is checked against; tolerance() is the error it promises.
    A 16-bit run is checked by the relative contract instead (docs/numerics.md): reference(progress,
    torch.float64) is then the exact forward and reference(progress) the monolithic one in its dtype.
    """

    tokens: np.ndarray
    width: int
    dtype: torch.dtype
    lm_head: bool
    metadata: dict | None
    compact: CompactGraph | None

    def start(self) -> None: ...

    def blocks(self) -> Iterator[BlockOutput]: ...

    def close(self) -> None: ...

    def summary(self, forward_s: float) -> dict: ...

    def reference(self, progress=None, dtype: torch.dtype | None = None) -> Reference: ...

    def tolerance(self) -> float: ...


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
    """The outputs of one forward, block by block in block order, as the backend completes them.

    Iterate once: each item is (block, BlockOutput). Only the backend's live set and one block's
    outputs are held, so memory does not grow with N. `graph` is the logical graph (None where no
    task graph runs); `stats` holds the run's figures (the keys of `emulate run --json` that a
    forward alone fills) once the iteration has ended.
    """

    def __init__(self, backend: Backend):
        self.backend = backend
        self.stats: dict = {}
        self._started = False

    @property
    def compact(self) -> CompactGraph | None:
        return self.backend.compact

    # what the graph backend runs on (None for a backend without one): a stream's executor, oracle and problem
    @property
    def executor(self):
        return getattr(self.backend, "executor", None)

    @property
    def oracle(self):
        return getattr(self.backend, "oracle", None)

    @property
    def problem(self):
        return getattr(self.backend, "problem", None)

    @cached_property
    def graph(self) -> nx.DiGraph | None:
        """The logical graph in networkx, built on first use (the run itself reads `compact`)."""
        return None if self.compact is None else self.compact.to_networkx()

    def __iter__(self) -> Iterator[tuple[int, BlockOutput]]:
        if self._started:
            raise EmulateError("a stream runs once; call emulate.stream again for another pass")
        self._started = True
        nll = Perplexity()
        try:
            self.backend.start()
            t0 = time.perf_counter()
            for out in self.backend.blocks():
                nll.add(out.logprobs)
                yield out.block, out
        finally:
            self.backend.close()
        self.stats = self.backend.summary(time.perf_counter() - t0)
        if self.backend.lm_head:
            self.stats["perplexity"] = nll.value()

    def close(self) -> None:
        self.backend.close()

    def __repr__(self) -> str:
        b = self.backend
        return f"<emulate.Stream {type(b).__name__}: {len(b.tokens)} tokens{', done' if self.stats else ''}>"


@dataclass(repr=False)
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
    tokens: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    @cached_property
    def graph(self) -> nx.DiGraph | None:
        return None if self.compact is None else self.compact.to_networkx()

    def __repr__(self) -> str:
        s = self.stats
        shape = "no outputs kept" if self.hidden is None else f"hidden {list(self.hidden.shape)}"
        bits = [f"{s.get('model', '?')}", f"{len(self.tokens)} tokens", shape]
        if "verified" in s:
            bits.append(f"verified={s['verified']} (max_rel_err {s['max_rel_err']:.3g})")
        if "forward_s" in s:
            bits.append(f"forward {s['forward_s']} s")
        return f"<emulate.Run {', '.join(bits)}>"


def finish(stream: Stream, *, output: str | None = None, hidden: bool = False, verify: bool = False,
           tolerance: float | None = None, collect: bool = True, progress=None,
           t_start: float | None = None) -> Run:
    """The one consumer: run `stream` to its end, writing `output` block by block, keeping the outputs
    (collect, or verify's need), checking them against the backend's reference (verify), and
    finishing the figures. A failure anywhere removes the half-written output."""
    from emulate.outputs import OutputWriter

    t_start = time.perf_counter() if t_start is None else t_start
    b = stream.backend
    def new_writer():
        return OutputWriter(output, b.tokens, b.width, b.dtype, logprob=b.lm_head, hidden=hidden or not b.lm_head,
                            metadata=b.metadata)

    # the output file is begun before the forward, or at its first block where the metadata comes with it
    writer = new_writer() if output is not None and b.metadata is not None else None
    keep = collect or verify
    hiddens, logprobs = [], []
    try:
        for _, out in stream:
            if output is not None:
                if writer is None:
                    writer = new_writer()
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
        stream.close()
    got_hidden = torch.cat(hiddens) if keep else None
    got_logprobs = (torch.cat(logprobs) if logprobs else None) if keep and b.lm_head else None
    del hiddens, logprobs
    stats = dict(stream.stats)
    if verify and b.dtype in HALF_DTYPES:
        # the relative contract (docs/numerics.md): the float64 forward, and the monolithic one in the run's dtype
        exact, same = b.reference(progress, torch.float64), b.reference(progress)
        named = {"reference": same.stats["reference"]} if "reference" in same.stats else {}  # what the forwards ran
        stats.update({**named, "reference_s": round(exact.stats["reference_s"] + same.stats["reference_s"], 4),
                      **compare_half(got_hidden, got_logprobs, exact.hidden, exact.logprobs, same.hidden,
                                     same.logprobs, tolerance)})
    elif verify:
        ref = b.reference(progress)
        tol = b.tolerance() if tolerance is None else float(tolerance)
        stats.update({**ref.stats, **compare(got_hidden, got_logprobs, ref.hidden, ref.logprobs, tol)})
    if output is not None:
        stats["output"] = output
    finish_stats(stats, t_start)
    if not collect:
        got_hidden = got_logprobs = None
    return Run(got_hidden, got_logprobs, stats, b.compact, b.tokens)


def finish_stats(stats: dict, t_start: float) -> None:
    """The figures every run ends with: wall time since `t_start`, tokens/s of the forward, peak RSS."""
    from emulate.runtime.memory import peak_rss_mb

    stats["wall_s"] = round(time.perf_counter() - t_start, 4)
    stats["tokens_per_s"] = round(stats["tokens"] / stats["forward_s"], 1) if stats["forward_s"] > 0 else None
    stats["peak_rss_mb"] = round(peak_rss_mb(), 1)


def describe(patterns) -> str:
    """The summary's `attention`: the one pattern's name, or mixed(...) layer by layer."""
    kinds = {pat.kind for pat in patterns}
    if len(kinds) == 1:
        return str(patterns[0].kind)
    return "mixed(" + ",".join(str(pat.kind) for pat in patterns) + ")"


def window_of(patterns):
    """The summary's `window`: the one window, the sorted distinct ones, or None."""
    windows = {pat.window for pat in patterns if pat.window is not None}
    return windows.pop() if len(windows) == 1 else (sorted(windows) or None)
