"""Where the Ray executor's tasks run and which weights each worker loads: the placements.

    sequence  every worker loads the whole model and runs every layer for its run of query blocks
              (graphs/plan.py `place`): context parallelism
    layers    each worker owns a contiguous range of layers and loads only their weights (the
              embedding on the first worker, the final norm and head on the last); every block
              flows through the workers as a pipeline, and the plan runs block by block
              (`pipeline_order`) so that a worker takes block i + 1 while the next worker takes
              block i: the sequence-pipeline parallelism of docs/cluster.md

A row task of layer l ends with the projection of layer l + 1 (graphs/plan.py), so the worker
owning layer l also loads the next layer's pre-norm and q, k, v projections where its range ends:
a few width x width matrices, never a layer's MLP.

`worker_need` prices a worker's memory under a placement from the shapes alone, so that
--worker-memory refuses a placement that would not fit before any worker starts, naming one that fits.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from enum import StrEnum

from emulate.errors import EmulateError

MB = 1 << 20


class Placement(StrEnum):
    SEQUENCE = "sequence"
    LAYERS = "layers"


def placement_of(value) -> Placement:
    try:
        return Placement(value)
    except ValueError:
        raise EmulateError(f"placement must be {' or '.join(p.value for p in Placement)}, got {value!r}") from None


def layer_ranges(layers: int, workers: int) -> list[range]:
    """Contiguous ranges of layers, one per worker, their sizes differing by at most one."""
    if workers > layers:
        raise EmulateError(f"the layers placement gives each worker at least one layer: {workers} workers for "
                           f"{layers} layers (use --workers {layers} or fewer, or --placement sequence)")
    base, extra = divmod(layers, workers)
    ranges, start = [], 0
    for w in range(workers):
        stop = start + base + (1 if w < extra else 0)
        ranges.append(range(start, stop))
        start = stop
    return ranges


def owned_weights(names, layers: int, own: range) -> list[str]:
    """The canonical weight names (emulate/models/presets.py `weight_names`) a worker owning `own` loads."""
    prefixes = [f"layers.{layer}." for layer in own]
    if own.stop < layers:  # the next layer's projection rides with this range's last mix
        nxt = f"layers.{own.stop}."
        prefixes += [nxt + part + "." for part in ("attn_norm", "q", "k", "v")]
    if own.start == 0:
        prefixes.append("embed.")
    if own.stop == layers:
        prefixes += ["final_norm.", "lm_head."]
    return [n for n in names if n.startswith(tuple(prefixes))]


def worker_of_layer(ranges: list[range]) -> dict[int, int]:
    """layer -> the worker owning it; the start tasks (layer -1) run on the first worker."""
    owner = {layer: w for w, r in enumerate(ranges) for layer in r}
    owner[-1] = 0
    return owner


def place_by_layers(plan, ranges: list[range]) -> None:
    """Put each task of `plan` (graphs/plan.py) on the worker owning its layer, then order the plan
    block by block (`pipeline_order`)."""
    owner = worker_of_layer(ranges)
    for t in plan.tasks:
        t.worker = owner[t.layer]
    pipeline_order(plan)


def pipeline_order(plan) -> None:
    """Reorder the plan's tasks, still topologically, so that among the tasks whose inputs are made
    the lowest (block, layer) comes first: block i's layers before block i + 1's wherever the mask
    allows (a causal or windowed block never reads a later one). The Ray executor submits calls in
    plan order, so each worker runs its layers of block i, ships the residual on, and takes block
    i + 1 while the next worker runs block i: the pipeline fills after one block per worker.
    Values, merges and their order are untouched: the same bits in any order."""
    tasks = plan.tasks
    producer = {key: t.index for t in tasks for key in t.writes}
    waiting = [0] * len(tasks)
    readers: dict[int, list[int]] = {}
    for t in tasks:
        sources = {producer[key] for key in t.reads}
        waiting[t.index] = len(sources)
        for s in sources:
            readers.setdefault(s, []).append(t.index)
    ready = [(t.block, t.layer, t.index) for t in tasks if waiting[t.index] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, _, i = heapq.heappop(ready)
        order.append(tasks[i])
        for r in readers.get(i, ()):
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, (tasks[r].block, tasks[r].layer, r))
    if len(order) != len(tasks):
        raise ValueError("the plan's tasks are not a DAG")
    for k, t in enumerate(order):
        t.index = k
    plan.tasks[:] = order


@dataclass(frozen=True)
class WorkerNeed:
    """One worker's memory under a placement, priced from the shapes: the largest over the workers."""

    placement: Placement
    workers: int
    weights: int  # bytes of the weights the most loaded worker holds, in the run's dtype
    activations: int  # bytes of one layer's residuals, keys, values and queries for the tokens it holds

    @property
    def total(self) -> int:
        return self.weights + self.activations

    def describe(self) -> str:
        return (f"{self.placement} on {self.workers} workers: {self.total / MB:.0f} MB per worker "
                f"({self.weights / MB:.0f} MB of weights, {self.activations / MB:.0f} MB of activations)")


def worker_need(placement: Placement, config, shapes: dict[str, tuple[int, ...]], tokens: int, workers: int,
                dtype_bytes: int) -> WorkerNeed:
    """The memory the most loaded worker needs: the weights it loads, and the residuals, keys, values
    and queries of one layer for the tokens whose rows it runs (all N under layers, where every
    block of a layer runs on one worker; about N / P under sequence)."""
    from math import ceil, prod

    size = {n: prod(s) * dtype_bytes for n, s in shapes.items()}
    if placement == Placement.LAYERS:
        ranges = layer_ranges(config.layers, workers)
        weights = max(sum(size[n] for n in owned_weights(shapes, config.layers, r)) for r in ranges)
        held = tokens
    else:
        weights = sum(size.values())
        held = ceil(tokens / workers)
    per_token = (2 * config.width + (config.heads + 2 * config.kv_heads) * config.head_dim) * dtype_bytes
    return WorkerNeed(placement, workers, weights, held * per_token)


def check_worker_memory(placement: Placement, config, shapes: dict, tokens: int, workers: int, dtype_bytes: int,
                        limit: int | None) -> WorkerNeed:
    """Refuse, in one line naming a placement that fits, a placement whose workers would need more
    than `limit` bytes each."""
    need = worker_need(placement, config, shapes, tokens, workers, dtype_bytes)
    if limit is None or need.total <= limit:
        return need
    others = []
    for other in Placement:
        if other == placement or (other == Placement.LAYERS and workers > config.layers):
            continue
        alt = worker_need(other, config, shapes, tokens, workers, dtype_bytes)
        if alt.total <= limit:
            others.append(f"--placement {other} fits ({alt.describe()})")
    hint = "; ".join(others) if others else "no placement fits on this many workers (add workers, or memory)"
    raise EmulateError(f"--worker-memory {limit} is too small for {need.describe()}; {hint}")
