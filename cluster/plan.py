"""The physical plan: logical nodes grouped into Ray tasks, sized from the number of workers.

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
mix. Slices are aligned subtrees of the merge tree of `emulate.merge.merge` (chunks of 2^h
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

import networkx as nx

from graphs import NodeKind, node_id


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
    attrs: dict[str, dict] = field(default_factory=dict)  # attributes of the logical nodes run here
    flops: int = 0
    worker: int = 0

    @property
    def name(self) -> str:
        where = f"L{self.layer} " if self.layer >= 0 else ""
        last = self.nodes[-1]
        return f"{where}{self.kind} {self.block}" + (f" [{last.start}:{last.stop}]" if isinstance(last, SliceKey) else "")

    @property
    def head(self) -> bool:
        last = self.nodes[-1]
        return isinstance(last, str) and self.attrs[last]["kind"] == NodeKind.HEAD

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


def slice_size(partials: int, pieces: int) -> int:
    """The aligned slice length 2^h (h >= 0) that cuts `partials` into at most `pieces` subtrees."""
    if pieces <= 1 or partials <= 1:
        return max(partials, 1)
    return 1 << ceil(log2(ceil(partials / pieces)))


def make_plan(g: nx.DiGraph, workers: int, split: bool | None = None) -> Plan:
    """Group the logical graph `g` into tasks for `workers` workers and place them.

    `split`: cut rows into slices (default: only when blocks are fewer than workers).
    """
    if workers < 1:
        raise ValueError("a plan needs at least one worker")
    spec = g.graph["spec"]
    layers = len(spec["patterns"])
    blocks = g.graph["blocks"]
    split = blocks < workers if split is None else split
    tasks: list[Task] = []

    def attrs(n):
        return dict(g.nodes[n])

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
        for n in t.logical_nodes():
            t.attrs.setdefault(n, attrs(n))

    def add(t: Task):
        t.index = len(tasks)
        t.flops = sum(g.nodes[n]["flops"] for n in t.logical_nodes())
        tasks.append(t)

    split_rows = 0
    for i in range(blocks):
        e = node_id(NodeKind.EMBED, None, i)
        t = Task(0, TaskKind.START, -1, i, [e], [], [])
        tail(-1, i, t, e)
        add(t)

    for layer in range(layers):
        rows = [_row(g, layer, i) for i in range(blocks)]
        pairs_total = sum(len(r[1]) for r in rows)
        target = ceil(pairs_total / workers)
        for i, (merge_id, pairs, mix_id) in enumerate(rows):
            x_key = g.nodes[mix_id]["inputs"][0]
            q_key = ValueKey(node_id(NodeKind.PROJECT, layer, i), Part.Q)
            kv_keys = _kv_reads(g, pairs)
            size = slice_size(len(pairs), ceil(len(pairs) / target)) if split and merge_id else len(pairs)
            if size >= len(pairs):
                t = Task(0, TaskKind.ROW, layer, i, list(pairs), [ValueKey(x_key), q_key] + kv_keys, [])
                if merge_id:
                    t.nodes.append(merge_id)
                    t.merges[ValueKey(merge_id)] = [ValueKey(p) for p in pairs]
                t.nodes.append(mix_id)
                tail(layer, i, t, mix_id)
                add(t)
                continue
            split_rows += 1
            partials = []
            for a in range(0, len(pairs), size):
                chunk = pairs[a:a + size]
                key = SliceKey(merge_id, a, a + len(chunk))
                t = Task(0, TaskKind.SLICE, layer, i, chunk + [key], [q_key] + _kv_reads(g, chunk), [key],
                         merges={key: [ValueKey(p) for p in chunk]}, attrs={n: attrs(n) for n in chunk})
                add(t)
                partials.append(key)
            t = Task(0, TaskKind.COMBINE, layer, i, [merge_id, mix_id], [ValueKey(x_key)] + partials, [],
                     merges={ValueKey(merge_id): partials})
            tail(layer, i, t, mix_id)
            add(t)

    place(tasks, workers, layers)
    return Plan(tasks, workers, blocks, split_rows)


def _row(g: nx.DiGraph, layer: int, i: int):
    """(merge id or None, the pair nodes in merge order, mix id) of query block i in `layer`."""
    mix_id = node_id(NodeKind.MIX, layer, i)
    source = g.nodes[mix_id]["inputs"][1]
    if g.nodes[source]["kind"] == NodeKind.MERGE:
        return source, list(g.nodes[source]["inputs"]), mix_id
    return None, [source], mix_id


def _kv_reads(g: nx.DiGraph, pairs: list[str]) -> list[ValueKey]:
    """Keys and values read by these pairs; a pair's own query block is read for q, not kv."""
    keys: dict[ValueKey, None] = {}
    for p in pairs:
        for src in g.nodes[p]["inputs"][1:]:
            keys[ValueKey(src, Part.KV)] = None
    return list(keys)


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
        total = sum(t.flops for t in group) or 1
        done = 0
        for t in group:
            middle = done + t.flops / 2
            t.worker = min(workers - 1, int(middle * workers / total))
            done += t.flops
    first = {t.block: t.worker for t in by_layer.get(0, []) if t.kind in (TaskKind.ROW, TaskKind.COMBINE)}
    for t in by_layer.get(-1, []):
        t.worker = first.get(t.block, t.block * workers // max(1, len(by_layer[-1])))
