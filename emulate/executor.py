"""Executors: where the graph's nodes run. One small interface, handed to the one run loop.

    Local  in-process, in a topological order that keeps the live set small (the "local mode" of
           tests and debugging)
    Ray    worker actors on a Ray cluster (cluster/executor.py), reached only when chosen

`start(job, progress)` returns an `Execution`: the head values (final hidden states and
log-probabilities) block by block in block order, as they complete, and the executor's figures
once the iteration ends. Set-up (Ray's start, the workers' weight loading) happens inside
`start`, so the caller times the forward as the iteration alone. `progress(done, total)` is
called as units of work (nodes locally, physical tasks on Ray) finish.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import networkx as nx
import torch

from emulate.config import EmulateError
from emulate.loaders import Model
from emulate.oracles import KernelOracle, Oracle
from graphs import NodeKind, execution_order, last_uses

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Job:
    """One forward to execute: the compiled graph and everything its nodes read."""

    graph: nx.DiGraph
    model: Model
    tokens: torch.Tensor
    dtype: torch.dtype
    device: str
    oracle: Oracle


class Execution:
    """(block, head value) pairs in block order; `figures` is complete once the iteration ends."""

    def __init__(self, blocks: Iterator[tuple[int, dict]], figures: dict | None = None):
        self._blocks = blocks
        self.figures: dict = {} if figures is None else figures

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        return self._blocks

    def close(self) -> None:
        """Stop early: the executor tears down what it started."""
        close = getattr(self._blocks, "close", None)
        if close is not None:
            close()


class Executor(Protocol):
    name: str

    def start(self, job: Job, progress: Progress | None = None) -> Execution: ...


@dataclass(frozen=True)
class Local:
    """The in-process executor: every value is freed once its last reader has run.

    trace: write the schedule (one slice per logical node, one track) as Chrome trace-event JSON
    when the run ends (emulate/trace.py); nothing is timed without it. threads: torch's intra-op
    threads for the run: None (torch's setting), an integer, or "auto" for the cores no other
    process is running on, looked at again as the run goes (emulate/threads.py).
    """

    trace: str | None = None
    threads: int | str | None = None

    def __post_init__(self):
        from emulate.threads import check_threads

        object.__setattr__(self, "threads", check_threads(self.threads))

    name = "local"

    def start(self, job: Job, progress: Progress | None = None) -> Execution:
        from emulate.ops import NodeRunner

        if self.trace is not None:  # a bad trace path fails before any work
            from emulate.trace import check_trace_path

            check_trace_path(self.trace)
        spec = job.graph.graph["spec"]
        oracle = job.oracle.bind(spec["block_size"], spec["heads"])
        model = job.model.transformer(job.dtype, job.device)
        runner = NodeRunner(model, job.tokens, job.graph.graph, oracle)
        figures: dict = {}

        def blocks():
            from emulate.threads import ThreadPolicy

            total = job.graph.number_of_nodes()
            records = None if self.trace is None else []
            t0 = time.perf_counter()
            with torch.no_grad(), ThreadPolicy(self.threads) as policy:

                def on_node(done: int) -> None:
                    policy.tick()
                    if progress is not None:
                        progress(done, total)

                sync = torch.cuda.synchronize if records is not None and job.device == "cuda" else None
                yield from run_local(job.graph, runner, on_node, records, sync)
            figures["threads"] = policy.used
            figures.update(oracle.summary())
            if records is not None:
                from emulate.trace import write_trace

                label = f"local executor (pid {os.getpid()}, {job.device})"
                write_trace(self.trace, records, [{"worker": 0, "label": label}], t0, "emulate local executor")
                figures["trace"] = self.trace

        return Execution(blocks(), figures)


def run_local(g: nx.DiGraph, runner, on_node: Callable[[int], None] | None = None,
              records: list[dict] | None = None, sync: Callable[[], None] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (block, head value) in block order as the graph completes; memory follows the live set.

    Every value is dropped as soon as the last node that reads it has run, so a causal layer holds
    its keys and values plus one query block's partials, never an N x N matrix.
    records: when given, one trace record per node is appended as it finishes (emulate/trace.py):
    its place in the order (task), start and end (time.perf_counter), and deps (its inputs' tasks);
    sync (torch.cuda.synchronize on a GPU) is called after each node, so its end is its real end.
    """
    order = execution_order(g)
    freed = last_uses(g, order)
    values: dict[str, object] = {}
    ready_heads: dict[int, dict] = {}
    index = {n: k for k, n in enumerate(order)} if records is not None else None
    next_block = 0
    for done, n in enumerate(order, 1):
        a = g.nodes[n]
        if records is None:
            values[n] = runner.run(a, [values[src] for src in a["inputs"]])
        else:
            start = time.perf_counter()
            values[n] = runner.run(a, [values[src] for src in a["inputs"]])
            if sync is not None:
                sync()
            end = time.perf_counter()
            records.append({"task": done - 1, "name": n, "kind": str(a["kind"]), "worker": 0, "start": start,
                            "end": end, "nodes": [n], "deps": sorted({index[src] for src in a["inputs"]})})
        for src in freed[n]:
            del values[src]
        if on_node is not None:
            on_node(done)
        if a["kind"] == NodeKind.HEAD:
            ready_heads[a["block"]] = values.pop(n)
            while next_block in ready_heads:
                yield next_block, ready_heads.pop(next_block)
                next_block += 1


@dataclass(frozen=True)
class Ray:
    """The Ray executor (cluster/executor.py): worker actors that load the weights once.

    address: join a running cluster ("auto" or HOST:PORT; default $RAY_ADDRESS, else a private
    local instance, stopped at the end). workers: actors (default: as many as the cluster fits).
    cpus_per_worker: CPUs per actor, also its torch threads. gpus_per_worker: with device "cuda".
    trace: write the schedule as Chrome trace-event JSON. stall_timeout: stop with an error when no
    task finishes for that many seconds. max_restarts: per actor, then the run stops.
    start_timeout: seconds for the workers to be placed.
    """

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    trace: str | None = None
    stall_timeout: float = 600.0
    max_restarts: int = 3
    start_timeout: float = 120.0

    name = "ray"

    def __post_init__(self):
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise EmulateError(f"--workers must be an integer >= 1, got {self.workers!r}")
        for name, strict in (("--cpus-per-worker", True), ("--gpus-per-worker", False), ("--stall-timeout", True),
                             ("start_timeout", True)):
            value = getattr(self, name.lstrip("-").replace("-", "_"))
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or (value <= 0 if strict else value < 0):
                raise EmulateError(f"{name} must be a finite number {'>' if strict else '>='} 0, got {value!r}")
        if isinstance(self.max_restarts, bool) or not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise EmulateError(f"max_restarts must be an integer >= 0, got {self.max_restarts!r}")

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus_per_worker))

    def start(self, job: Job, progress: Progress | None = None) -> Execution:
        if not isinstance(job.oracle, KernelOracle):
            raise EmulateError(f"oracle {job.oracle.name} runs on the local executor only (its invocation counts "
                               "live in-process); the Ray executor runs the kernel oracle")
        if job.device == "cuda" and self.gpus_per_worker == 0:
            raise EmulateError("device cuda with the Ray executor needs gpus_per_worker (--gpus-per-worker) > 0")
        if self.gpus_per_worker > 0 and job.device != "cuda":
            raise EmulateError("gpus_per_worker (--gpus-per-worker) needs device cuda")
        from cluster.executor import start  # lazy: Ray is imported only when asked for

        return start(job, self, progress)


EXECUTORS = {"local": Local, "ray": Ray}
