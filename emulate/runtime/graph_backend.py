"""The graph backend: the compiled task graph run on an executor, as the one loop's Backend (loop.py).

The calls are counted where they ran (runner.py, on whichever executor) and the summary reports
those counts. A run whose executed calls differ from the compiled graph's (an executor that skipped
or repeated a node, an oracle called for a pair the graph does not plan) is refused with one line:
its outputs cannot be the forward the graph describes.
"""
from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from emulate.errors import EmulateError
from emulate.problem import Problem
from emulate.runtime.contract import AttentionOracle, BlockOutput, CallCounts, Executor, Job, capability
from emulate.runtime.kernels_cuda import kernel_figures
from emulate.runtime.loop import Reference, describe, window_of
from emulate.runtime.verify import tolerance_for
from graphs import CompactGraph


class GraphBackend:
    """One forward of `problem` as its compact graph on `executor`, each pair call through `oracle`."""

    def __init__(self, problem: Problem, compact: CompactGraph, executor: Executor, oracle: AttentionOracle,
                 device: str, progress=None, kv=None):
        self.problem, self.compact, self.executor, self.oracle = problem, compact, executor, oracle
        self.kv = kv  # a KV store the executor fills as the projections run (generation's prefill)
        self.device, self.progress = device, progress
        config = problem.model.config
        self.tokens, self.width, self.dtype, self.lm_head = problem.tokens, config.width, problem.dtype, config.lm_head
        self.metadata = {"model": config.name, "block_size": problem.block_size,
                         "attention": problem.patterns[0].describe(), "dtype": str(problem.dtype).removeprefix("torch.")}
        self._execution = None

    def start(self) -> None:
        p = self.problem
        job = Job(self.compact, p.model, torch.from_numpy(p.tokens), p.dtype, self.device, self.oracle, self.kv)
        forward = None if self.progress is None else (lambda done, total: self.progress("forward", done, total))
        self._execution = self.executor.start(job, forward)

    def blocks(self) -> Iterator[BlockOutput]:
        spans = self.compact.spans
        for block, value in self._execution:
            yield BlockOutput(block, tuple(spans[block]), value["hidden"], value.get("logprob_next"))

    @property
    def kept_kv(self):
        """Where the executor kept the prefill's keys and values (generation decodes on it): the Job's
        `kv` store, or the executor's own (contract.py, keeps_kv)."""
        return None if self._execution is None else self._execution.kv

    def close(self) -> None:
        if self._execution is not None:
            self._execution.close()

    def summary(self, forward_s: float) -> dict:
        p, c = self.problem, self.compact.counts()
        counted = self._execution.counts
        check_counts(counted, c, self.compact.layers, p.block_size)
        config = p.model.config
        figures = dict(self._execution.figures)
        oracle_keys = {k: figures.pop(k) for k in list(figures) if k.startswith("oracle_")}
        return {
            "model": config.name, "family": config.family, "layers": config.layers, "heads": config.heads,
            "kv_heads": config.kv_heads, "input": p.source, "tokens": p.length, "block_size": p.block_size,
            "blocks": self.compact.blocks, "attention": describe(p.patterns), "window": window_of(p.patterns),
            "sinks": p.patterns[0].sinks, "oracle": self.oracle.name, "dtype": str(p.dtype).removeprefix("torch."),
            "device": self.device, "executor": self.executor.name, "backend": "graph",
            "attention_calls": counted.attention_calls,
            "attention_calls_per_layer": [counted.per_layer.get(layer, 0) for layer in range(self.compact.layers)],
            "attention_calls_bound": c["attention_calls_bound"], "small_calls": counted.small_calls,
            "max_call_tokens": counted.max_call_tokens,
            **{k: c[k] for k in ("graph_nodes", "graph_edges", "graph_depth")},
            "forward_s": round(forward_s, 4), **figures, **oracle_keys,
            **kernel_figures(p.dtype, config.head_dim, self.device),
        }

    def reference(self, progress=None, dtype: torch.dtype | None = None) -> Reference:
        """The monolithic forward on the same weights (in `dtype`, the run's by default), on the run's
        device where the executor runs in-process."""
        device = self.device if capability(self.executor, "in_process") else "cpu"
        return monolithic_reference(self.problem, device, progress, dtype)

    def tolerance(self) -> float:
        p = self.problem
        return tolerance_for(p.patterns, self.oracle, p.dtype, p.length, p.block_size)

    def __repr__(self) -> str:
        return (f"<GraphBackend {self.problem.model.config.name}: {self.problem.length} tokens, M = "
                f"{self.problem.block_size}, {self.executor.name} executor, {self.oracle.name} oracle>")


def check_counts(counted: CallCounts, compiled: dict, layers: int, block_size: int) -> None:
    """Refuse a run whose executed calls are not the graph's (each node once, each pair call once), or
    one of whose calls saw more than M tokens: the promise every figure of the run rests on."""
    if counted.max_call_tokens > block_size:
        raise EmulateError(f"a call of the run saw {counted.max_call_tokens} tokens, more than M = {block_size}: the "
                           "executor or oracle widened a call the graph plans within M")
    planned = compiled["attention_calls_per_layer"]
    ran = [counted.per_layer.get(layer, 0) for layer in range(layers)]
    if ran != planned or counted.small_calls != compiled["small_calls"]:
        where = next((f" (layer {layer}: {r} pair calls ran, {p} planned)" for layer, (r, p) in
                      enumerate(zip(ran, planned)) if r != p), "")
        raise EmulateError(f"the executor ran {counted.small_calls} calls ({counted.attention_calls} pair calls) where "
                           f"the graph plans {compiled['small_calls']} ({compiled['attention_calls']}){where}: its "
                           "outputs are not this graph's forward")


def monolithic_reference(p: Problem, device: str, progress=None, dtype: torch.dtype | None = None) -> Reference:
    """The monolithic forward (emulate/models/reference.py): one full-length pass of `p` on `device`, in
    `dtype` (the problem's by default)."""
    from emulate.models.reference import reference_forward

    on_layer = None if progress is None else (lambda done, total: progress("reference", done, total))
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = reference_forward(p.model.transformer(p.dtype if dtype is None else dtype, device), torch.from_numpy(p.tokens), list(p.patterns),
                                on_layer=on_layer)
    return Reference(ref["hidden"], ref.get("logprob_next"), {"reference_s": round(time.perf_counter() - t0, 4)})
