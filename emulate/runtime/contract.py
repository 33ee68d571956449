"""The contract at the bottom of the run path: what a node call, an oracle and an executor promise.

    PairCall        one attend node, as an oracle sees it (spans, mask, the layer's pattern)
    AttentionOracle what runs each pair call: `bind(block_size, heads)` gives a BoundOracle
    Executor        where the graph's nodes run: `start(job, progress)` gives an Execution
    Job             one forward to execute: the compact graph and everything its nodes read
    Execution       (block, head value) in block order, then the executor's figures
    BlockOutput     one query block's outputs, what every backend yields to the one run loop
    CallCounts      the calls that ran, counted where they ran (emulate/runtime/runner.py)

Nothing here names an implementation. An oracle or executor is anything with these methods;
what the run loop needs to know about one beyond them it reads from optional capabilities, each
with a safe default, never from its class or name:

    oracle.concurrent  (False)  its bound form may be called from several call workers at once
                                (the local executor then runs independent calls side by side)
    oracle.distributed (False)  it pickles, binds in another process and its summary's numbers
                                add up across processes (the Ray executor runs it on its workers)
    oracle.tolerance(dtype)     the error it promises when looser than the dtype's contract
    oracle.half        (False)  it runs bfloat16 and float16 pair calls, returning float32 partials
    oracle.attend_blocks(pairs, q, k, v, scale)  (absent: one attend per pair) a decode step's pair
                                calls against whole blocks (mask none) in one invocation, k and v
                                stacked [n, Hkv, mk, dh], the partials stacked [n, ...]; each block
                                its own softmax (emulate/runtime/decode.py, KVCache.attend)
    executor.in_process (False) it runs on the caller's device, where verify's reference then runs
    executor.graph_form ("compact")  the form of the graph it holds: "compact" or "plan"
                                (emulate/runtime/memory.py prices each)
    executor.keeps_kv  (False)  given a Job with a `kv` store, it keeps each block's keys and values
                                where they were made and hands back the store that holds them as
                                Execution.kv: the Job's own when they were made in this process, its
                                own otherwise (the Ray workers', cluster/decode.py); generation
                                decodes on it (emulate/generation.py, emulate/runtime/decode.py)

docs/extending.md shows a user's oracle and executor built on this page alone.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from emulate.errors import EmulateError
from graphs import MaskKind, Node, Pattern

if TYPE_CHECKING:  # torch is imported where tensors are made, not to read this page
    import torch

    from emulate.models.loaders import Model
    from graphs import CompactGraph

Partial = tuple["torch.Tensor", "torch.Tensor"]  # (o [H, m, dh], lse [H, m]): a block average and its log weight
Progress = Callable[[int, int], None]  # (done, total) units of work (nodes locally, tasks on Ray)


@dataclass(frozen=True)
class PairCall:
    """One attend node: query block `span` against key block `key_span` (None: a sample of keys)."""

    layer: int
    span: tuple[int, int]
    key_span: tuple[int, int] | None
    mask: MaskKind
    pattern: Pattern

    @classmethod
    def of(cls, node: Node, pattern: Pattern) -> PairCall:
        return cls(node.layer, node.span, node.key_span, node.mask, pattern)

    def visible(self) -> np.ndarray:
        """Boolean [mq, mk]: the pair's mask over its global positions."""
        return self.pattern.visible(np.arange(*self.span), np.arange(*self.key_span))


@runtime_checkable
class BoundOracle(Protocol):
    """An oracle bound to one forward: it runs the pair calls and may keep counts of its own."""

    def attend(self, pair: PairCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Partial:
        """q [H, mq, dh], k and v [Hkv, mk, dh] -> (o [H, mq, dh], lse [H, mq]); rows that see no key carry
        lse = -inf (docs/numerics.md)."""
        ...

    def summary(self) -> dict:
        """Keys this oracle adds to a run's stats ({} for none)."""
        ...


@runtime_checkable
class AttentionOracle(Protocol):
    """What runs each pair call, as a user passes it: a description that binds to one forward.

    name: what the summary's `oracle` says. bind(block_size, heads): the BoundOracle of one forward
    (counts belong to one run, never to the description); it refuses what it cannot run with an
    EmulateError, before any work. Optional capabilities: the module docstring.
    """

    name: str

    def bind(self, block_size: int, heads: int) -> BoundOracle: ...


@dataclass(frozen=True)
class Job:
    """One forward to execute: the compiled graph (compact form) and everything its nodes read."""

    compact: CompactGraph
    model: Model
    tokens: torch.Tensor
    dtype: torch.dtype
    device: str
    oracle: AttentionOracle
    kv: Any = None  # a KV store to keep each block's keys and values in (emulate/runtime/decode.py, KVCache)


class Execution:
    """(block, head value) pairs in block order; `figures` is complete once the iteration ends.

    A head value is {"hidden": [m, width], "logprob_next": [m'] (decoders only)}. `counts` are the
    calls that ran (CallCounts), filled by the executor as they run. `kv`: the store holding the
    blocks' keys and values once the iteration ended, for an executor that keeps them (keeps_kv).
    """

    def __init__(self, blocks: Iterator[tuple[int, dict]], figures: dict | None = None,
                 counts: CallCounts | None = None, kv: Any = None):
        self._blocks = blocks
        self.figures: dict = {} if figures is None else figures
        self.counts = CallCounts() if counts is None else counts
        self.kv = kv

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        return self._blocks

    def close(self) -> None:
        """Stop early: the executor tears down what it started."""
        close = getattr(self._blocks, "close", None)
        if close is not None:
            close()


@runtime_checkable
class Executor(Protocol):
    """Where the graph's nodes run (Dask's `get_async` is the model: the loop hands it the work).

    start(job, progress) returns an Execution; set-up (a cluster's start, loading weights) happens
    inside it, so the caller times the forward as the iteration alone. Run each node with
    emulate.runtime.runner.NodeRunner (it counts the calls) and report its `counts`; hand the
    Execution those counts. Optional capabilities: the module docstring.
    """

    name: str

    def start(self, job: Job, progress: Progress | None = None) -> Execution: ...


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

    def __repr__(self) -> str:
        lp = "None" if self.logprobs is None else f"[{self.logprobs.shape[0]}]"
        return f"BlockOutput(block={self.block}, span={self.span}, hidden={list(self.hidden.shape)}, logprobs={lp})"


# the local executor's call workers count side by side (emulate/runtime/local.py, run_parallel): an
# unguarded `per_layer[layer] = per_layer.get(layer, 0) + 1` loses updates when threads interleave
_COUNTING = threading.Lock()


@dataclass
class CallCounts:
    """The calls that ran, counted as they ran: what the summary reports, never the compile's counts.

    attention_calls: pair calls (an oracle's attend); per_layer: those by layer; small_calls: every
    node call, pair calls included; max_call_tokens: the most rows one call's input held (a pair
    call's queries or keys, whichever is more).
    """

    attention_calls: int = 0
    per_layer: dict[int, int] = field(default_factory=dict)
    small_calls: int = 0
    max_call_tokens: int = 0

    def call(self, tokens: int, layer: int | None = None, attention: bool = False) -> None:
        with _COUNTING:
            self.small_calls += 1
            self.max_call_tokens = max(self.max_call_tokens, int(tokens))
            if attention:
                self.attention_calls += 1
                self.per_layer[layer] = self.per_layer.get(layer, 0) + 1

    def add(self, other: CallCounts) -> None:
        """Fold another process's or task's counts into these."""
        self.attention_calls += other.attention_calls
        self.small_calls += other.small_calls
        self.max_call_tokens = max(self.max_call_tokens, other.max_call_tokens)
        for layer, n in other.per_layer.items():
            self.per_layer[layer] = self.per_layer.get(layer, 0) + n

    def since(self, before: CallCounts) -> CallCounts:
        """The calls made after `before` was copied (one Ray task's share); the widest is this count's."""
        per_layer = {k: n - before.per_layer.get(k, 0) for k, n in self.per_layer.items()
                     if n != before.per_layer.get(k, 0)}
        return CallCounts(self.attention_calls - before.attention_calls, per_layer,
                          self.small_calls - before.small_calls, self.max_call_tokens)

    def copy(self) -> CallCounts:
        return CallCounts(self.attention_calls, dict(self.per_layer), self.small_calls, self.max_call_tokens)


def capability(obj: Any, name: str, default: Any = False) -> Any:
    """An optional capability of an oracle or executor (module docstring), with its safe default."""
    return getattr(obj, name, default)


def check_oracle_dtype(oracle: Any, dtype: torch.dtype) -> None:
    """The one dtype rule of every backend: bfloat16 and float16 pair calls run on an oracle with the
    `half` capability (float32 partials, so that every merge adds in float32); refused in one line otherwise."""
    if dtype.itemsize == 2 and not capability(oracle, "half"):
        raise EmulateError(f"the {oracle.name} oracle runs float32 or float64 only; "
                           f"{str(dtype).removeprefix('torch.')} runs on the kernel oracle")


def combine_summaries(summaries: list[dict]) -> dict:
    """One summary from a distributed oracle's per-process ones: numbers add up, keys starting
    with max_ take the largest, anything else is the first process's."""
    out: dict = {}
    for s in summaries:
        for key, value in s.items():
            if key not in out:
                out[key] = value
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = max(out[key], value) if key.startswith("max_") else out[key] + value
    return out
