"""The planner's discrete-event simulation: a physical plan (graphs/plan.py) run on P simulated
workers, each task priced by the cost model (emulate/planner/costs.py), giving the makespan, each
worker's busy time and peak memory, the bytes moved and the critical path (`Simulation`).

Each worker runs one task at a time: among the tasks placed on it whose inputs have arrived, the
first in plan order (the order Ray is handed them). A value read on a worker other than the one
that made it crosses once per worker (it then stays in that worker's object store), one transfer
at a time per worker (its inbound link is a queue): link latency + bytes / link bandwidth. Memory
per worker: the weights (split over its G GPUs) plus every value alive on it (made there or
fetched, until its last reader has run) plus the running task's MLP intermediate. The placement
is the plan's (each task's worker, emulate/planner/placements.py); so are the weights, one figure
for every worker or one per worker (the layers placement holds only a worker's layers).

Hardware with `shared` set is the local executor: P call workers of one process. Its values never
cross a link, and a free worker takes the first ready task of the whole plan (the executor's
workers take their next node themselves, emulate/runtime/local.py, run_parallel); memory is the
process's, one figure. The Python of a task's calls (emulate/planner/costs.py, task_parts: the
per-call cost measured with P workers) holds the process's one GIL: it runs one task at a time
across the workers, and a worker whose task needs it while another holds it waits; the kernels
run beside each other (torch releases the GIL inside them).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

from emulate.planner.costs import Hardware, task_parts, value_bytes


@dataclass
class Simulation:
    """What one simulated run of a plan gives: times per task and per worker, bytes and memory."""

    makespan: float
    start: list[float]  # per task, by its index in the plan
    end: list[float]
    busy: list[float]  # per worker: the sum of its tasks' times
    bytes_moved: int  # between workers, each value once per worker that reads it
    peak_memory: list[float]  # per worker, bytes, weights included
    critical_path_s: float  # the longest chain of task times and transfers, with unbounded workers
    critical_path: list[int]  # that chain's task indices, first to last


def forward_spec(config, tokens: int, block_size: int, patterns, dtype_bytes: int):
    """The graph's ForwardSpec (graphs) of a forward of `config` (emulate.models.config.ModelConfig),
    its layers' masks `patterns`, values of `dtype_bytes` each: what a plan compiles and prices."""
    from graphs import ForwardSpec

    return ForwardSpec(tokens=tokens, block_size=block_size, patterns=tuple(patterns), heads=config.heads,
                       kv_heads=config.kv_heads, head_dim=config.head_dim, width=config.width,
                       mlp_width=config.mlp_width, vocab=config.vocab if config.lm_head else 0,
                       dtype_bytes=dtype_bytes)


def simulate(plan, spec, spans, hw: Hardware, weights_bytes: float | list[float] = 0.0) -> Simulation:
    """Run `plan` (graphs.plan.Plan) on hw.workers simulated workers; see the module docstring."""
    from graphs.plan import calls

    tasks = plan.tasks
    shared = hw.shared
    n, P = len(tasks), (hw.workers if shared else plan.workers)
    # the executor runs consecutive tasks of a worker in one Ray call (graphs.plan.calls)
    firsts = {c[0].index for c in calls(plan, tasks)}
    parts = [task_parts(t, hw, t.index in firsts) for t in tasks]
    dur = [a + b for a, b in parts]
    gil_free = 0.0  # shared: when the one GIL of the call workers' process is next free
    size_of: dict = {}

    def size(key) -> int:
        s = size_of.get(key)
        if s is None:
            s = size_of[key] = value_bytes(key, spec, spans)
        return s

    producer = {key: t.index for t in tasks for key in t.writes}
    succ: list[list[int]] = [[] for _ in range(n)]
    waiting = [0] * n
    readers: dict = {}
    for t in tasks:
        deps = {producer[key] for key in t.reads}
        waiting[t.index] = len(deps)
        for d in deps:
            succ[d].append(t.index)
        for key in t.reads:
            readers[key] = readers.get(key, 0) + 1
    bw, lat = hw.link_bytes_per_s, hw.link_latency_s
    start, end = [0.0] * n, [0.0] * n
    arrived: dict = {}  # (worker, key) -> when the value is on that worker
    link_free = [0.0] * P
    moved = 0
    mem_events: list[list[tuple[float, float]]] = [[] for _ in range(P)]

    def ready_time(t, now: float) -> float:
        nonlocal moved
        if shared:
            return now
        w, latest = t.worker, now
        for key in t.reads:
            p = tasks[producer[key]]
            if p.worker == w:
                continue
            at = arrived.get((w, key))
            if at is None:
                s = size(key)
                begin = max(end[p.index], link_free[w])
                link_free[w] = begin + s / bw
                at = arrived[(w, key)] = link_free[w] + lat
                moved += s
                mem_events[w].append((at, s))
            latest = max(latest, at)
        return latest

    events: list = []  # (time, order, kind, task): kind 0 finish, 1 inputs arrived
    queues: list[list[int]] = [[] for _ in range(P)]
    free = [True] * P
    ran_on = [t.worker for t in tasks]  # shared: the worker that took it
    order = 0

    def push(at: float, kind: int, index: int):
        nonlocal order
        heapq.heappush(events, (at, order, kind, index))
        order += 1

    def try_start(w: int, now: float):
        nonlocal gil_free
        if shared:  # one queue: every free worker takes the first ready task
            while queues[0] and True in free:
                w = free.index(True)
                i = heapq.heappop(queues[0])
                free[w], ran_on[i], start[i] = False, w, now
                # its calls' Python runs while no other worker's does (one GIL), its kernels beside them
                serial, parallel = parts[i]
                held = max(now, gil_free) if serial else now
                gil_free = held + serial if serial else gil_free
                push(held + serial + parallel, 0, i)
            return
        if free[w] and queues[w]:
            i = heapq.heappop(queues[w])
            free[w] = False
            start[i] = now
            push(now + dur[i], 0, i)

    for t in tasks:
        if waiting[t.index] == 0:
            push(ready_time(t, 0.0), 1, t.index)
    while events:
        now, _, kind, i = heapq.heappop(events)
        w = 0 if shared and kind == 1 else ran_on[i]
        if kind == 1:
            heapq.heappush(queues[w], i)
            try_start(w, now)
            continue
        end[i] = now
        free[w] = True
        for s in succ[i]:
            waiting[s] -= 1
            if waiting[s] == 0:
                push(ready_time(tasks[s], now), 1, s)
        try_start(w, now)
    makespan = max(end, default=0.0)
    busy = [0.0] * P
    for t in tasks:
        busy[ran_on[t.index]] += dur[t.index]
    home = (lambda t: 0) if shared else (lambda t: t.worker)  # whose memory a value occupies

    # memory: values live from when they are made (or arrive) until their last reader ends
    last_read: dict = {}
    for t in tasks:
        for key in t.reads:
            last_read[key] = max(last_read.get(key, 0.0), end[t.index])
    for t in tasks:
        for key in t.writes:
            s = size(key)
            mem_events[home(t)].append((end[t.index], s))
            mem_events[home(t)].append((last_read.get(key, end[t.index]), -s))
        scratch = _scratch_bytes(t, spec, spans)
        mem_events[home(t)].append((start[t.index], scratch))
        mem_events[home(t)].append((end[t.index], -scratch))
    for (w, key), at in arrived.items():
        mem_events[w].append((max(at, last_read.get(key, at)), -size(key)))
    held = [weights_bytes] * P if isinstance(weights_bytes, (int, float)) else list(weights_bytes)
    if len(held) != P:
        raise ValueError(f"weights for {len(held)} workers, the plan has {P}")
    peak = []
    for ev, weights in zip(mem_events[:1] if shared else mem_events, held):
        level = top = 0.0
        for _, delta in sorted(ev, key=lambda e: (e[0], -e[1])):  # what arrives at an instant before what leaves
            level += delta
            top = max(top, level)
        peak.append(top + weights)

    # critical path: the longest chain of task times and transfers, with unbounded workers
    cp = [0.0] * n
    via = [-1] * n
    for t in tasks:
        best, arg = 0.0, -1
        for key in t.reads:
            p = producer[key]
            c = cp[p] + (lat + size(key) / bw if not shared and tasks[p].worker != t.worker else 0.0)
            if c > best:
                best, arg = c, p
        cp[t.index], via[t.index] = best + dur[t.index], arg
    last = max(range(n), key=cp.__getitem__) if n else -1
    path = []
    while last >= 0:
        path.append(last)
        last = via[last]
    return Simulation(makespan, start, end, busy, moved, peak, max(cp, default=0.0), path[::-1])


def _scratch_bytes(t, spec, spans) -> int:
    """The running task's transient: the MLP intermediate of its block (gate and up)."""
    m = spans[t.block][1] - spans[t.block][0]
    return 2 * m * spec.mlp_width * spec.dtype_bytes
