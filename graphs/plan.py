"""The physical plan: the logical graph's nodes grouped into tasks and placed on P workers.

Pure data over the compact graph: the Ray executor runs it (cluster/executor.py), the planner
prices it (emulate/planner/), and neither needs Ray to read it.

One Ray task per pair call would drown in Ray's ~1 ms per task (docs/design.md, Logical graph and
physical plan), so the plan groups the logical graph per query block and layer:

    start i       embed i, project 0 i
    row l i       attend l i j for every key block j (folded by a streaming tree merge),
                  merge l i, mix l i, then project l+1 i (or head i after the last layer)

The projection of layer l+1 rides with the mix of layer l, not with the attends of layer l+1:
block i's keys are needed by other blocks' rows of the same layer, and a row that also held the
attends would make those rows wait for all of block i's pairs.

When query blocks are fewer than workers, a block's key range is split into slices, each a
`slice` task returning one partial (o, lse), and a `combine` task merges them and goes on with the
mix. Slices are aligned subtrees of the merge tree of `emulate.runtime.merge.merge` (chunks of 2^h
partials), so the split result has the same bits as the unsplit one: merge(P) ==
merge([merge(P[t*2^h:(t+1)*2^h]) for t]).

Values travel between tasks under typed keys: `ValueKey(node)` for a logical node's value,
`ValueKey(project, Part.Q)` and `ValueKey(project, Part.KV)` for the two halves of a projection (a
block's queries go only to its own row, its keys and values to every row that reads them), and
`SliceKey(merge, a, b)` for the partial of a slice.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from math import ceil, log2
from types import SimpleNamespace

import networkx as nx
import numpy as np

from graphs import CompactGraph, Node, NodeKind, Pattern, node_id
from graphs.costs import attend_cost
from graphs.nodes import NodeAttrs, residual_id
from graphs.compact import MASKS
from graphs.patterns import kernel_entries


class Part(StrEnum):
    """Which part of a logical node's value a key names."""

    WHOLE = "whole"
    Q = "q"  # a projection's queries
    KV = "kv"  # a projection's keys and values


@dataclass(frozen=True)
class ValueKey:
    """A logical node's value, or one part of it, as it travels between tasks."""

    node: str
    part: Part = Part.WHOLE


@dataclass(frozen=True)
class SliceKey:
    """The partial (o, lse) of the pairs merge.inputs[start:stop]: one aligned subtree of its merge."""

    merge: str
    start: int
    stop: int


class TaskKind(StrEnum):
    START = "start"
    ROW = "row"
    SLICE = "slice"
    COMBINE = "combine"


Key = ValueKey | SliceKey


@dataclass
class Task:
    """One physical task: the logical nodes it runs, the values it reads and the values it returns."""

    index: int
    kind: TaskKind
    layer: int  # -1 for start tasks
    block: int
    nodes: list[str | SliceKey]  # logical node ids (and a slice's merge) in execution order
    reads: list[Key]  # values made by earlier tasks, one Ray argument each
    writes: list[Key]  # values returned, one Ray object each
    merges: dict[Key, list[Key]] = field(default_factory=dict)  # merge -> its partials, in tree order
    attrs: dict[str, Node] = field(default_factory=dict)  # the logical nodes run here
    flops: int = 0
    worker: int = 0
    bytes: int = 0  # bytes its logical nodes touch (the graph's `bytes`, summed)
    calls: int = 0  # logical calls it runs
    pairs: int = 0  # of which attend calls
    attend_flops: int = 0  # the FLOPs of those attend calls
    attend_blocks: list[int] = field(default_factory=lambda: [0] * len(MASKS))  # FLOPs of the scores their kernel computes, by mask
    attend_counts: list[int] = field(default_factory=lambda: [0] * len(MASKS))  # ... and their calls, by mask
    # its merges (graphs/costs.py, merge_cost): their FLOPs and the pairwise merges of partials they
    # run (emulate/runtime/merge.py, merge_pair), which the planner prices at the merge's measured rate
    merge_flops: int = 0
    merge_pairs: int = 0

    @property
    def name(self) -> str:
        where = f"L{self.layer} " if self.layer >= 0 else ""
        last = self.nodes[-1]
        return f"{where}{self.kind} {self.block}" + (f" [{last.start}:{last.stop}]" if isinstance(last, SliceKey) else "")

    @property
    def head(self) -> bool:
        last = self.nodes[-1]
        return isinstance(last, str) and self.attrs[last].kind == NodeKind.HEAD

    def logical_nodes(self) -> list[str]:
        """The logical graph's nodes this task computes (a slice's merge is part of its merge node)."""
        return [n for n in self.nodes if isinstance(n, str)]


@dataclass
class Plan:
    tasks: list[Task]  # in a topological order: every read is written by an earlier task
    workers: int
    blocks: int
    split_blocks: int  # (layer, block) rows cut into slices

    def describe(self) -> dict:
        kinds = Counter(t.kind for t in self.tasks)
        load = [0] * self.workers
        for t in self.tasks:
            load[t.worker] += t.flops
        total = sum(load) or 1
        return {
            "grouping": "per query block and layer: pairs (streaming tree merge), merge, mix, next projection",
            "tasks_by_kind": dict(kinds),
            "split_rows": self.split_blocks,
            "tasks_per_worker": [sum(1 for t in self.tasks if t.worker == w) for w in range(self.workers)],
            "flops_share_per_worker": [round(x / total, 3) for x in load],
        }


@dataclass(frozen=True)
class Route:
    """Where one submission of a task finds its inputs and sends its outputs, by position.

    held: positions in `reads` of values made earlier on the same worker, taken from its memory
    (the other reads arrive through the object store, as Ray arguments in `reads` order).
    keep: (position in `writes`, readers) for each write the worker keeps in its memory, readers
    being the indices of its tasks in this submission that read it: each reader strikes itself
    off, so a task run again (a recovery re-running a finished producer) cannot strike off a
    reader that has yet to come. ship: positions in `writes` of
    the values returned through the object store (read on another worker, or a head read by the
    driver). Positions, not keys: a route travels with every call and small ints pickle fastest.
    """

    held: tuple[int, ...]
    keep: tuple[tuple[int, tuple[int, ...]], ...]
    ship: tuple[int, ...]


def routes(plan: Plan, chosen: list[Task]) -> dict[int, Route]:
    """The Route of every task in `chosen` (a whole plan, or the tasks a recovery re-runs), by index.

    A value read on the worker that made it never leaves that worker; one read elsewhere, or a
    head, goes through the object store once. Readers outside `chosen` have already run and do not
    count: a write nobody in `chosen` reads is computed and dropped.
    """
    made_on = {key: t.worker for t in plan.tasks for key in t.writes}
    readers: dict[Key, list[Task]] = {}
    for t in chosen:
        for key in t.reads:
            readers.setdefault(key, []).append(t)
    out = {}
    for t in chosen:
        keep, ship = [], []
        for at, key in enumerate(t.writes):
            on = readers.get(key, [])
            local = tuple(r.index for r in on if r.worker == t.worker)
            if local:
                keep.append((at, local))
            if t.head or len(local) < len(on):
                ship.append(at)
        held = tuple(at for at, key in enumerate(t.reads) if made_on[key] == t.worker)
        out[t.index] = Route(held, tuple(keep), tuple(ship))
    return out


CALL_TASKS = 8  # the most tasks one Ray call runs


def calls(plan: Plan, chosen: list[Task], limit: int = CALL_TASKS) -> list[list[Task]]:
    """`chosen` (in plan order) cut into Ray calls: runs of up to `limit` tasks of one worker, run
    one after the other inside a single call, so Ray's cost per call (dispatch, the driver's and
    the raylet's bookkeeping, a round trip through the driver for each call that waits on another)
    is paid once per run rather than once per task.

    A call's outputs appear when the whole call ends, and it starts once all its inputs exist, so
    runs are cut where that would hold work back:

    - a task ends its call when it is the last of its worker's tasks that some task on another
      worker waits for (the latest in plan order of that reader's producers there): the reader
      gets its inputs when this task ends, as with a call per task. The producers before it feed
      that reader too, but it could not start before this one's value existed anyway;
    - a task that reads a value made on another worker joins a run only when the run already waits
      for a producer there as late (in plan order, on that worker) as the one it waits for, so the run
      waits no longer than its first task would alone; and a task that waits for no other worker
      never joins a run that does, where it would wait for inputs it does not read. Otherwise it
      starts a new run.

    Every value a call reads from another worker is thus made by a task earlier in plan order than
    the call's first task, and a call's other inputs come from earlier calls of its own worker: the
    unfinished call that begins earliest in plan order always has every input, so no set of calls
    waits on itself, whatever the order in which the workers run them. Producers outside `chosen`
    (a recovery's re-run) have finished and hold nothing back.
    """
    made_by = {key: t for t in chosen for key in t.writes}
    awaited: list[dict[int, int]] = []  # per task of `chosen`: other worker -> the latest producer it waits for there
    for t in chosen:
        latest: dict[int, int] = {}
        for key in t.reads:
            p = made_by.get(key)
            if p is not None and p.worker != t.worker:
                latest[p.worker] = max(latest.get(p.worker, -1), p.index)
        awaited.append(latest)
    last_awaited = {i for latest in awaited for i in latest.values()}  # tasks that end their call
    out: list[list[Task]] = []
    open_: dict[int, tuple[list[Task], dict[int, int]]] = {}  # worker -> its open run, the latest producer it waits for per worker
    for t, remote in zip(chosen, awaited):
        run = open_.get(t.worker)
        if run is None or len(run[0]) >= limit or bool(remote) != bool(run[1]) or \
                any(i > run[1].get(w, -1) for w, i in remote.items()):
            run = ([], remote)
            out.append(run[0])
            open_[t.worker] = run
        run[0].append(t)
        if t.index in last_awaited:
            del open_[t.worker]
    return out


def slice_size(partials: int, pieces: int) -> int:
    """The aligned slice length 2^h (h >= 0) that cuts `partials` into at most `pieces` subtrees."""
    if pieces <= 1 or partials <= 1:
        return max(partials, 1)
    return 1 << ceil(log2(ceil(partials / pieces)))


def make_plan(g: nx.DiGraph | CompactGraph, workers: int, split: bool | None = None, runnable: bool = True) -> Plan:
    """Group the logical graph `g` into tasks for `workers` workers and place them.

    `g` is the compact form (graphs/compact.py) or the networkx graph of the same nodes: the plan
    is the same. runnable: every task lists its logical nodes and their attributes, what the Ray
    executor runs. runnable=False (the planner, compact form only): the same tasks, reads, writes,
    FLOPs and placement, but a task counts its pair calls instead of naming them one by one, so a
    1M-token plan holds thousands of tasks, not a million nodes.
    `split`: cut rows into slices (default: only when blocks are fewer than workers).
    """
    if workers < 1:
        raise ValueError("a plan needs at least one worker")
    if isinstance(g, CompactGraph):
        view = _CompactRows(g, runnable)
    elif runnable:
        view = _GraphRows(g)
    else:
        raise ValueError("a counted plan (runnable=False) is read off the compact graph")
    layers, blocks = view.layers, view.blocks
    split = blocks < workers if split is None else split
    tasks: list[Task] = []

    def tail(layer: int, i: int, t: Task, x_key: str):
        """After the mix of `layer` (or the embed): project the next layer, or the head."""
        if layer + 1 < layers:
            p = node_id(NodeKind.PROJECT, layer + 1, i)
            t.nodes.append(p)
            t.writes += [ValueKey(x_key), ValueKey(p, Part.Q), ValueKey(p, Part.KV)]
        else:
            h = node_id(NodeKind.HEAD, None, i)
            t.nodes.append(h)
            t.writes.append(ValueKey(h))

    def add(t: Task, layer: int = -1, pairs=()):
        t.index = len(tasks)
        view.price(t, layer, pairs)
        tasks.append(t)

    split_rows = 0
    for i in range(blocks):
        e = node_id(NodeKind.EMBED, None, i)
        t = Task(0, TaskKind.START, -1, i, [e], [], [])
        tail(-1, i, t, e)
        add(t)

    for layer in range(layers):
        rows = [view.row(layer, i) for i in range(blocks)]
        pairs_total = sum(len(r[1]) for r in rows)
        target = ceil(pairs_total / workers)
        for i, (merge_id, pairs, mix_id, x_key) in enumerate(rows):
            q_key = ValueKey(node_id(NodeKind.PROJECT, layer, i), Part.Q)
            kv_keys = view.kv_reads(layer, pairs)
            size = slice_size(len(pairs), ceil(len(pairs) / target)) if split and merge_id else len(pairs)
            if size >= len(pairs):
                t = Task(0, TaskKind.ROW, layer, i, view.ids(layer, pairs), [ValueKey(x_key), q_key] + kv_keys, [])
                if merge_id:
                    t.nodes.append(merge_id)
                    t.merges[ValueKey(merge_id)] = [ValueKey(p) for p in view.ids(layer, pairs)]
                t.nodes.append(mix_id)
                tail(layer, i, t, mix_id)
                add(t, layer, pairs)
                continue
            split_rows += 1
            partials = []
            for a in range(0, len(pairs), size):
                chunk = pairs[a:a + size]
                key = SliceKey(merge_id, a, a + len(chunk))
                names = view.ids(layer, chunk)
                t = Task(0, TaskKind.SLICE, layer, i, names + [key], [q_key] + view.kv_reads(layer, chunk), [key],
                         merges={key: [ValueKey(p) for p in names]})
                add(t, layer, chunk)
                partials.append(key)
            t = Task(0, TaskKind.COMBINE, layer, i, [merge_id, mix_id], [ValueKey(x_key)] + partials, [],
                     merges={ValueKey(merge_id): partials})
            tail(layer, i, t, mix_id)
            add(t, layer)

    place(tasks, workers, layers)
    return Plan(tasks, workers, blocks, split_rows)


class _GraphRows:
    """make_plan's view of a networkx graph: pairs are node ids, tasks carry every node's attributes."""

    def __init__(self, g: nx.DiGraph):
        self.g = g
        self.spec = SimpleNamespace(**g.graph["spec"])
        self.patterns = [Pattern(**p) for p in g.graph["spec"]["patterns"]]
        self.layers = len(self.patterns)
        self.blocks = g.graph["blocks"]

    def view(self, n: str) -> NodeAttrs:
        """A node's fields for finding rows and reads; price makes each node typed, once, for its task."""
        return NodeAttrs(self.g.nodes[n])

    def row(self, layer: int, i: int):
        """(merge id or None, the pair nodes in merge order, mix id, residual id) of query block i."""
        mix_id = node_id(NodeKind.MIX, layer, i)
        x_key, source = self.view(mix_id).inputs
        source_node = self.view(source)
        if source_node.kind == NodeKind.MERGE:
            return source, list(source_node.inputs), mix_id, x_key
        return None, [source], mix_id, x_key

    def ids(self, layer: int, pairs) -> list[str]:
        return list(pairs)

    def kv_reads(self, layer: int, pairs) -> list[ValueKey]:
        """Keys and values read by these pairs; a pair's own query block is read for q, not kv."""
        keys: dict[ValueKey, None] = {}
        for p in pairs:
            for src in self.view(p).inputs[1:]:
                keys[ValueKey(src, Part.KV)] = None
        return list(keys)

    def price(self, t: Task, layer: int, pairs) -> None:
        for n in t.logical_nodes():
            a = t.attrs.setdefault(n, Node.of(self.g.nodes[n]))
            t.flops += a.flops
            t.bytes += a.bytes
            t.calls += 1
            if a.kind == NodeKind.MERGE:
                t.merge_flops += a.flops
                t.merge_pairs += len(a.inputs) - 1
            if a.kind == NodeKind.ATTEND:
                t.attend_flops += a.flops
                span = a.span
                key_span = span if a.key_span is None else a.key_span
                entries = kernel_entries(self.patterns[a.layer], a.mask, span, key_span)
                t.attend_blocks[MASKS.index(a.mask)] += attend_cost(self.spec, span[1] - span[0],
                                                                       key_span[1] - key_span[0], entries)[0]
                t.attend_counts[MASKS.index(a.mask)] += 1
        t.pairs = len(pairs)


class _CompactRows:
    """make_plan's view of a CompactGraph: pairs are index ranges into the layer's template and the
    prices come from the template. Runnable, tasks also name their pair nodes and carry every
    node's attributes, made row by row (graphs/compact.py NodeSource); counted, they name only
    their non-pair nodes and count their pairs."""

    def __init__(self, c: CompactGraph, runnable: bool):
        self.c = c
        self.source = c.nodes() if runnable else None
        self._row: tuple[tuple[int, int], dict] | None = None  # the last row's nodes: a row's slices come in turn
        self.layers, self.blocks = c.layers, c.blocks
        self.kinds = {k: c._prices(k) for k in (NodeKind.EMBED, NodeKind.PROJECT, NodeKind.MIX, NodeKind.HEAD)}
        self.per_template = {}
        for k, t in enumerate(c.templates):
            af, ab = c._prices(NodeKind.ATTEND, t)
            mf, mb = c._prices(NodeKind.MERGE, t)
            m = c.block_tokens()[t.row]
            whole = attend_cost(c.spec, m, t.key_tokens, t.computed)[0]
            # prefix sums: a range of pairs is priced in O(1); Python ints, exact
            prefix = lambda v: np.concatenate([[0], np.cumsum(v)]).tolist()  # noqa: E731
            self.per_template[k] = (prefix(af), prefix(ab), mf.tolist(), mb.tolist(),
                                    [prefix(np.where(t.mask == code, whole, 0)) for code in range(len(MASKS))],
                                    [prefix(t.mask == code) for code in range(len(MASKS))])
        self.kv = {}  # (layer, block) -> its ValueKey, shared by every reader

    def row(self, layer: int, i: int):
        t = self.c.template(layer)
        pairs = range(int(t.starts[i]), int(t.starts[i + 1]))
        merge_id = node_id(NodeKind.MERGE, layer, i) if len(pairs) > 1 else None
        x_key = residual_id(layer, i)
        return merge_id, pairs, node_id(NodeKind.MIX, layer, i), x_key

    def ids(self, layer: int, pairs: range) -> list[str]:
        if self.source is None:
            return []
        t = self.c.template(layer)
        return [node_id(NodeKind.ATTEND, layer, int(t.row[p]), int(t.key_block[p])) for p in pairs]

    def attrs(self, n: str) -> Node:
        """Logical node `n`, as graphs/compact.py's NodeSource makes it."""
        kind, layer, block = _parse(n)
        if kind == NodeKind.EMBED:
            return self.source.embed(block)[1]
        if kind == NodeKind.PROJECT:
            return self.source.project(layer, block)[1]
        if kind == NodeKind.HEAD:
            return self.source.head(block)[1]
        if self._row is None or self._row[0] != (layer, block):
            self._row = (layer, block), dict(self.source.attention(layer, block))
        return self._row[1][n]

    def kv_reads(self, layer: int, pairs: range) -> list[ValueKey]:
        t = self.c.template(layer)
        blocks = t.reads[t.read_starts[pairs.start]:t.read_starts[pairs.stop]].tolist()
        out = []
        for j in dict.fromkeys(blocks):
            key = self.kv.get((layer, j))
            if key is None:
                key = self.kv[(layer, j)] = ValueKey(node_id(NodeKind.PROJECT, layer, j), Part.KV)
            out.append(key)
        return out

    def price(self, t: Task, layer: int, pairs) -> None:
        if len(pairs):
            af, ab, _, _, blocks, counts = self.per_template[self.c.layer_template[layer]]
            t.attend_blocks = [v[pairs.stop] - v[pairs.start] for v in blocks]
            t.attend_counts = [int(v[pairs.stop] - v[pairs.start]) for v in counts]
            t.flops += af[pairs.stop] - af[pairs.start]
            t.attend_flops = af[pairs.stop] - af[pairs.start]
            t.bytes += ab[pairs.stop] - ab[pairs.start]
            t.calls += len(pairs)
            t.pairs = len(pairs)
        for n in t.logical_nodes():
            if self.source is not None:
                t.attrs[n] = self.attrs(n)
            kind, node_layer, block = _parse(n)
            if kind == NodeKind.ATTEND:
                continue  # priced above, by range
            if kind == NodeKind.MERGE:
                _, _, mf, mb, _, _ = self.per_template[self.c.layer_template[node_layer]]
                f, b = mf[block], mb[block]
                t.merge_flops += int(f)
                t.merge_pairs += int(self.c.template(node_layer).partials[block]) - 1
            else:
                f, b = (int(v[block]) for v in self.kinds[kind])
            t.flops += f
            t.bytes += b
            t.calls += 1


def _parse(n: str) -> tuple[NodeKind, int, int]:
    """(kind, layer, query block) of a node id (graphs.nodes.node_id); layer -1 for embed and head."""
    parts = n.split("/")
    if len(parts) == 2:
        return NodeKind(parts[0]), -1, int(parts[1])
    return NodeKind(parts[1]), int(parts[0][1:]), int(parts[2])


def balanced_runs(costs: list[float], workers: int) -> list[int]:
    """The worker of each item of an ordered list: contiguous runs of about equal total cost, an
    item going to the run its cost's midpoint falls in (place's rule, and the decode planner's,
    emulate/planner/decode.py)."""
    total = sum(costs) or 1
    owners, done = [], 0.0
    for c in costs:
        owners.append(min(workers - 1, int((done + c / 2) * workers / total)))
        done += c
    return owners


def place(tasks: list[Task], workers: int, layers: int) -> None:
    """Give each worker a contiguous run of blocks of about equal FLOPs, the same run every layer.

    Contiguous runs keep a sliding window's neighbours on one worker (its keys never move), and
    the same run every layer keeps a block's residual and queries where they were made. Costs are
    balanced per layer, so a causal layer's heavy late rows spread over fewer blocks per worker.
    """
    by_layer: dict[int, list[Task]] = {}
    for t in tasks:
        by_layer.setdefault(t.layer, []).append(t)
    for layer, group in by_layer.items():
        if layer < 0:
            continue
        for t, w in zip(group, balanced_runs([t.flops for t in group], workers)):
            t.worker = w
    first = {t.block: t.worker for t in by_layer.get(0, []) if t.kind in (TaskKind.ROW, TaskKind.COMBINE)}
    for t in by_layer.get(-1, []):
        t.worker = first.get(t.block, t.block * workers // max(1, len(by_layer[-1])))
