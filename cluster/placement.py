"""Where the Ray executor's tasks run and which weights each worker loads: the placements.

    sequence  every worker loads the whole model and runs every layer for its run of query blocks
              (graphs/plan.py `place`): context parallelism
    layers    each worker owns a contiguous range of layers and loads only their weights (the
              embedding on the first worker, the final norm and head on the last); every block
              flows through the workers as a pipeline, and the plan runs block by block
              (`pipeline_order`) so that a worker takes block i + 1 while the next worker takes
              block i: the sequence-pipeline parallelism of docs/cluster.md
    grid      P = P_layers x P_sequence workers: a row of P_sequence workers per contiguous range
              of layers, each loading only that range's weights; the row spreads its range's query
              blocks over its workers as `sequence` spreads them over all (graphs/plan.py `place`
              with P_sequence workers, or block by block in turn under a causal mask:
              `place_on_grid`), and the rows form the `layers` pipeline. `--grid 2x2` gives the
              shape; without it `default_grid` picks one from P

A row task of layer l ends with the projection of layer l + 1 (graphs/plan.py), so the worker
owning layer l also loads the next layer's pre-norm and q, k, v projections where its range ends:
a few width x width matrices, never a layer's MLP.

`worker_need` prices a worker's memory under a placement from the shapes alone, so that
--worker-memory refuses a placement that would not fit before any worker starts, naming one that fits.
"""
from __future__ import annotations

import heapq
import math
import re
from dataclasses import dataclass
from enum import StrEnum

from emulate.errors import EmulateError
from graphs.plan import Part, TaskKind

MB = 1 << 20


class Placement(StrEnum):
    SEQUENCE = "sequence"
    LAYERS = "layers"
    GRID = "grid"


AUTO = "auto"  # not a layout: the planner's fastest that fits (cluster/auto_placement.py) picks one


def placement_of(value, auto: bool = False) -> Placement | str:
    """A Placement; with `auto`, also the word "auto"."""
    if auto and value == AUTO:
        return AUTO
    try:
        return Placement(value)
    except ValueError:
        names = [p.value for p in Placement] + ([AUTO] if auto else [])
        raise EmulateError(f"placement must be {', '.join(names[:-1])} or {names[-1]}, got {value!r}") from None


@dataclass(frozen=True)
class Grid:
    """P_layers rows of P_sequence workers: row r owns the r-th range of layers (`layer_ranges`)."""

    layers: int
    sequence: int

    @property
    def workers(self) -> int:
        return self.layers * self.sequence

    def __str__(self) -> str:
        return f"{self.layers}x{self.sequence}"


def parse_grid(text) -> Grid:
    """"2x2" (P_layers x P_sequence) -> Grid; anything else is refused in one line."""
    found = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text) if isinstance(text, str) else None
    if found is None or int(found[1]) < 1 or int(found[2]) < 1:
        raise EmulateError(f"--grid must be P_LAYERSxP_SEQUENCE with both >= 1, e.g. 2x2, got {text!r}")
    return Grid(int(found[1]), int(found[2]))


def default_grid(workers: int, layers: int) -> Grid:
    """The grid of P workers when none is given: P_layers is the smallest divisor of P at least
    sqrt(P) (the squarest grid, more rows than columns when it cannot be square: a row's weights
    shrink with P_layers), among the divisors at most the layer count; where every such divisor is
    past the layer count, the largest divisor that is not. 4 -> 2x2, 6 -> 3x2, 8 -> 4x2, and a prime
    P is P x 1 (the layers placement's layout) or, past the layers, 1 x P (the sequence placement's)."""
    divisors = [d for d in range(1, workers + 1) if workers % d == 0 and d <= layers]
    square = [d for d in divisors if d * d >= workers]
    rows = square[0] if square else divisors[-1]
    return Grid(rows, workers // rows)


def grid_of(value, workers: int, layers: int) -> Grid:
    """The run's grid: `value` ("2x2", a Grid, or None for `default_grid`) checked against P and L."""
    if value is None:
        return default_grid(workers, layers)
    grid = value if isinstance(value, Grid) else parse_grid(value)
    if grid.workers != workers:
        raise EmulateError(f"--grid {grid} is {grid.workers} workers, but the run has {workers} (--workers)")
    if grid.layers > layers:
        raise EmulateError(f"--grid {grid} gives each of {grid.layers} rows of workers at least one layer, but the "
                           f"model has {layers} layers (use at most {layers} rows)")
    return grid


@dataclass(frozen=True)
class Layout:
    """A placement on P workers, as a grid: `sequence` is 1 x P, `layers` P x 1, `grid` any shape.
    Worker w sits in row w // P_sequence (its range of layers) and column w % P_sequence."""

    placement: Placement
    grid: Grid
    layers: int  # the model's

    @property
    def workers(self) -> int:
        return self.grid.workers

    @property
    def ranges(self) -> list[range]:
        """Each worker's range of layers."""
        rows = layer_ranges(self.layers, self.grid.layers)
        return [rows[w // self.grid.sequence] for w in range(self.workers)]

    @property
    def plan_workers(self) -> int:
        """The workers graphs/plan.py `make_plan` spreads the query blocks over: a row's under a
        grid of several rows and columns; P otherwise (a grid of one row or one column is laid out
        exactly as sequence or layers)."""
        g = self.grid
        return g.sequence if g.layers > 1 and g.sequence > 1 else self.workers

    def place(self, plan) -> None:
        """Put the tasks of `plan` (made by make_plan for `plan_workers`) on this layout's workers."""
        g = self.grid
        if g.layers == 1:
            return  # make_plan's own placement: sequence
        rows = layer_ranges(self.layers, g.layers)
        if g.sequence == 1:
            place_by_layers(plan, rows)
            return
        place_on_grid(plan, g, rows)

    def owned(self, names) -> list[list[str]] | None:
        """The weight names each worker loads; None: every worker loads them all."""
        if self.grid.layers == 1:
            return None
        return [owned_weights(names, self.layers, r) for r in self.ranges]

    def describe(self) -> str:
        return f"grid {self.grid}" if self.placement == Placement.GRID else str(self.placement)


def layout_of(placement: Placement, workers: int, layers: int, grid=None) -> Layout:
    """The layout of `placement` on P workers of a model of L layers, refused in one line where it
    cannot be laid out (more rows than layers, a --grid that is not P workers, --grid without grid)."""
    if placement == Placement.GRID:
        return Layout(placement, grid_of(grid, workers, layers), layers)
    if grid is not None:
        raise EmulateError(f"--grid is the shape of --placement grid (or auto), not of --placement {placement}")
    if placement == Placement.LAYERS:
        layer_ranges(layers, workers)  # more workers than layers: refused in one line
        return Layout(placement, Grid(workers, 1), layers)
    return Layout(placement, Grid(1, workers), layers)


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


def place_on_grid(plan, grid: Grid, rows: list[range]) -> None:
    """Put each task of `plan`, made by make_plan for P_sequence workers, on the worker of its column
    in the row owning its layer (the start tasks in the first row), then order the plan block by
    block (`pipeline_order`).

    The column: where a mask's rows read back over most earlier blocks (causal, full, sampled:
    `reaches_back`), block i's, i mod P_sequence; otherwise (sliding, sink) make_plan's contiguous
    run of blocks, which keeps a window's neighbours on one worker. A contiguous split of a causal
    layer would stall the pipeline: the row of the last column's first block in a range's first
    layer reads the keys of every earlier block, so it waits until the row above has run all of
    them through its layers, and the rows run one after the other (the planner: 25% utilisation for
    Llama-3 8B, 1M causal tokens on 4x4, against 85% with blocks dealt out in turn). Rows cut into slices
    (fewer blocks than P_sequence) keep make_plan's slices, spread over the columns."""
    owner = worker_of_layer(rows)
    dealt = not plan.split_blocks and reaches_back(plan)
    for t in plan.tasks:
        column = t.block % grid.sequence if dealt else t.worker
        t.worker = owner[t.layer] * grid.sequence + column
    plan.workers = grid.workers
    pipeline_order(plan)


def reaches_back(plan) -> bool:
    """Whether some row of `plan` reads the keys of more than half the blocks (a causal, full or
    sampled mask; not a sliding window or sinks narrower than half the sequence)."""
    reach = max((sum(1 for k in t.reads if getattr(k, "part", None) == Part.KV) for t in plan.tasks
                 if t.kind == TaskKind.ROW), default=0)
    return 2 * reach > plan.blocks


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
    grid: Grid | None = None  # the grid placement's shape

    @property
    def total(self) -> int:
        return self.weights + self.activations

    @property
    def option(self) -> str:
        """The command-line options that ask for this placement."""
        return f"--placement {self.placement}" + (f" --grid {self.grid}" if self.grid else "")

    def describe(self) -> str:
        name = f"grid {self.grid}" if self.grid else str(self.placement)
        return (f"{name} on {self.workers} workers: {self.total / MB:.0f} MB per worker "
                f"({self.weights / MB:.0f} MB of weights, {self.activations / MB:.0f} MB of activations)")


def worker_need(placement: Placement, config, shapes: dict[str, tuple[int, ...]], tokens: int, workers: int,
                dtype_bytes: int, grid=None) -> WorkerNeed:
    """The memory the most loaded worker needs: the weights it loads, and the residuals, keys, values
    and queries of one layer for the tokens whose rows it runs (all N under layers, where every
    block of a layer runs on one worker; about N / P under sequence, N / P_sequence under grid)."""
    layout = layout_of(placement, workers, config.layers, grid)
    size = {n: math.prod(s) * dtype_bytes for n, s in shapes.items()}
    owned = layout.owned(shapes)
    weights = sum(size.values()) if owned is None else max(sum(size[n] for n in names) for names in owned)
    held = math.ceil(tokens / layout.grid.sequence)
    per_token = (2 * config.width + (config.heads + 2 * config.kv_heads) * config.head_dim) * dtype_bytes
    return WorkerNeed(placement, workers, weights, held * per_token,
                      layout.grid if placement == Placement.GRID else None)


def fitting(config, shapes: dict, tokens: int, workers: int, dtype_bytes: int, limit: int | None,
            grid=None) -> list[WorkerNeed]:
    """Each placement that can be laid out on P workers and whose workers fit `limit` bytes (all of
    them without a limit), priced; grid in `grid`'s shape (default_grid when None)."""
    out = []
    for p in Placement:
        try:
            need = worker_need(p, config, shapes, tokens, workers, dtype_bytes, grid if p == Placement.GRID else None)
        except EmulateError:  # cannot be laid out here (more workers than layers, a grid of other P)
            continue
        if limit is None or need.total <= limit:
            out.append(need)
    return out


def check_worker_memory(placement: Placement, config, shapes: dict, tokens: int, workers: int, dtype_bytes: int,
                        limit: int | None, grid=None) -> WorkerNeed:
    """Refuse, in one line naming a placement that fits, a placement whose workers would need more
    than `limit` bytes each."""
    need = worker_need(placement, config, shapes, tokens, workers, dtype_bytes, grid)
    if limit is None or need.total <= limit:
        return need
    others = [f"{alt.option} fits ({alt.describe()})" for alt in fitting(config, shapes, tokens, workers, dtype_bytes,
                                                                           limit, grid)
              if alt.placement != placement]
    hint = "; ".join(others) if others else "no placement fits on this many workers (add workers, or memory)"
    raise EmulateError(f"--worker-memory {limit} is too small for {need.describe()}; {hint}")
