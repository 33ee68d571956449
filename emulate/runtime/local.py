"""The local executor: the graph's nodes in-process, every value freed once its last reader has run.

    Local       the executor description (registered as "local", emulate/runtime/registry.py)
    run_local   one thread, in execution order; memory follows the live set
    run_parallel  call workers side by side, with the bits of the one-thread run

It is the "local mode" of tests and debugging, and the model for a user's executor
(docs/extending.md): bind the oracle, run each node with a NodeRunner, yield the heads in block order.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from emulate.runtime.contract import Execution, Job, Progress, capability
from emulate.runtime.runner import NodeRunner
from graphs import Node, NodeKind

# (id, Node, readers) of each node in execution order: CompactGraph.schedule, graphs.schedule
NodeOrder = Iterable[tuple[str, Node, int]]


@dataclass(frozen=True)
class Local:
    """The in-process executor: every value is freed once its last reader has run.

    threads: on CPU with the kernel oracle, the call workers (`run_parallel`): independent nodes
    run side by side, each worker one node at a time on one torch thread, with the bits of the
    one-thread run whatever their count; None (torch's setting, OMP_NUM_THREADS or the cores), an
    integer, or "auto" for every core this process may use (emulate/runtime/threads.py, worker_count).
    With 1, or where calls run in turn (the paper oracle, whose counters are plain Python state, and
    cuda), `run_local` runs them in the calling thread with torch's intra-op threads: None (torch's
    setting), that many, or "auto", the cores no other process is running on, looked at again as
    the run goes (ThreadPolicy).
    trace: write the schedule (one slice per logical node, one track per worker) as Chrome
    trace-event JSON when the run ends (emulate/runtime/trace.py); nothing is timed without it.
    """

    trace: str | None = None
    threads: int | str | None = None

    def __post_init__(self):
        from emulate.runtime.threads import check_threads

        object.__setattr__(self, "threads", check_threads(self.threads))

    name = "local"
    in_process = True  # verify's reference runs on the run's own device
    graph_form = "compact"  # it reads the compact graph's schedule, no node held per graph node
    keeps_kv = True  # a Job's kv store is filled in this process, where the keys were made

    def start(self, job: Job, progress: Progress | None = None) -> Execution:

        if self.trace is not None:  # a bad trace path fails before any work
            from emulate.runtime.trace import check_trace_path

            check_trace_path(self.trace)
        graph = job.compact
        oracle = job.oracle.bind(graph.spec.block_size, graph.spec.heads)
        model = job.model.transformer(job.dtype, job.device)
        runner = NodeRunner(model, job.tokens, graph.graph_attrs(), oracle, job.kv)
        # calls run side by side on CPU with an oracle that says it may (contract.py, `concurrent`); one that
        # keeps counts in plain Python state (the paper oracle's), and a GPU's one stream, run them in turn
        parallel = job.device == "cpu" and capability(job.oracle, "concurrent")
        figures: dict = {}

        def blocks():
            from emulate.runtime.threads import ThreadPolicy, worker_count

            total = graph.node_count()
            records = None if self.trace is None else []
            t0 = time.perf_counter()
            workers = worker_count(self.threads) if parallel else 1
            if workers > 1:
                def on_node(done: int) -> None:
                    if progress is not None:
                        progress(done, total)

                yield from run_parallel(graph.schedule(), runner, workers, on_node, records)
                figures["threads"] = [workers]
            else:
                with torch.no_grad(), ThreadPolicy(self.threads) as policy:

                    def on_node(done: int) -> None:
                        policy.tick()
                        if progress is not None:
                            progress(done, total)

                    sync = torch.cuda.synchronize if records is not None and job.device == "cuda" else None
                    yield from run_local(graph.schedule(), runner, on_node, records, sync)
                    figures["threads"] = policy.used
            figures.update(oracle.summary())
            if records is not None:
                from emulate.runtime.trace import write_trace

                label = f"local executor (pid {os.getpid()}, {job.device})"
                tracks = ([{"worker": 0, "label": label}] if workers == 1 else
                          [{"worker": w, "label": f"local executor worker {w} (pid {os.getpid()}, {job.device})"}
                           for w in range(workers)])
                write_trace(self.trace, records, tracks, t0, "emulate local executor")
                figures["trace"] = self.trace

        return Execution(blocks(), figures, runner.counts, job.kv)


def run_local(schedule: NodeOrder, runner, on_node: Callable[[int], None] | None = None,
              records: list[dict] | None = None, sync: Callable[[], None] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (block, head value) in block order as the graph completes; memory follows the live set.

    schedule: (id, attributes, readers) in execution order (CompactGraph.schedule, generated as it
    is read, or graphs.schedule of a networkx graph). Every value is dropped as soon as its last
    reader has run, so a causal layer holds its keys and values plus one query block's partials,
    never an N x N matrix, and a windowed graph holds a window's worth of blocks whatever N is.
    records: when given, one trace record per node is appended as it finishes (emulate/runtime/trace.py):
    its place in the order (task), start and end (time.perf_counter), and deps (its inputs' tasks);
    sync (torch.cuda.synchronize on a GPU) is called after each node, so its end is its real end.
    """
    values: dict[str, object] = {}
    remaining: dict[str, int] = {}  # readers of a live value that have not run yet
    task: dict[str, int] = {}  # a live value's place in the order, for its readers' trace records
    ready_heads: dict[int, dict] = {}
    next_block = 0
    for done, (n, a, readers) in enumerate(schedule, 1):
        if records is None:
            value = runner.run(a, [values[src] for src in a.inputs])
        else:
            start = time.perf_counter()
            value = runner.run(a, [values[src] for src in a.inputs])
            if sync is not None:
                sync()
            end = time.perf_counter()
            records.append({"task": done - 1, "name": n, "kind": str(a.kind), "worker": 0, "start": start,
                            "end": end, "nodes": [n], "deps": sorted({task[src] for src in a.inputs})})
        for src in dict.fromkeys(a.inputs):
            remaining[src] -= 1
            if remaining[src] == 0:
                del values[src], remaining[src]
                task.pop(src, None)
        if a.kind == NodeKind.HEAD:
            ready_heads[a.block] = value
        elif readers:
            values[n], remaining[n] = value, readers
            if records is not None:
                task[n] = done - 1
        del value
        if on_node is not None:
            on_node(done)
        while next_block in ready_heads:
            yield next_block, ready_heads.pop(next_block)
            next_block += 1


LOOK_AHEAD = 64  # nodes past the earliest unfinished one (in execution_order) that may run early


def run_parallel(schedule: NodeOrder, runner, workers: int, on_node: Callable[[int], None] | None = None,
                 records: list[dict] | None = None, look_ahead: int = LOOK_AHEAD) -> Iterator[tuple[int, dict]]:
    """`run_local`'s contract on `workers` threads: independent nodes run at the same time.

    Each worker runs one node at a time with one torch thread (torch releases the GIL inside its
    kernels), so a worker whose core another process takes delays its own call only, never a barrier
    of all of them. Workers take their next node themselves as they finish one, so no thread waits
    for another to hand out work. A node's value depends on its inputs alone and every merge's order
    is fixed by the graph, so the bits are those of the one-thread run in execution order.
    Memory: the schedule is read only `look_ahead` places past the earliest unfinished node, a node
    runs once its inputs are done, and a value is dropped once all its readers have finished, so the
    live set is the sequential one plus at most `look_ahead` values, and nothing is held per node
    of the whole graph; finished heads the caller has not taken yet hold the workers back at
    `look_ahead` of them.
    The progress callback and the yield run in the calling thread (records are appended as nodes
    finish, each with its worker); on an exception, an interrupt or `close()` the workers finish the
    node they hold and end before this returns or raises.
    """
    import heapq
    import threading

    nodes = iter(schedule)
    pending: dict[int, tuple[str, Node]] = {}  # read from the schedule, not finished: by place in the order
    position: dict[str, int] = {}  # place in the order of each pending node and live value
    waiting: dict[str, int] = {}  # a pending node's inputs not yet finished
    dependents: dict[str, list[str]] = {}  # pending nodes waiting on a pending node
    remaining: dict[str, int] = {}  # readers not yet finished, of each pending node and live value
    values: dict[str, object] = {}
    heads: dict[int, dict] = {}
    ready: list[int] = []  # places of nodes whose inputs are done, a heap
    state = {"earliest": 0, "read": 0, "exhausted": False, "done": 0, "stop": False, "error": None}
    cond = threading.Condition()

    def read_ahead() -> None:
        """Read the schedule up to `look_ahead` places past the earliest unfinished node (under the lock)."""
        while not state["exhausted"] and state["read"] < state["earliest"] + look_ahead:
            item = next(nodes, None)
            if item is None:
                state["exhausted"] = True
                return
            n, a, readers = item
            k = state["read"]
            state["read"] += 1
            pending[k] = (n, a)
            position[n], remaining[n] = k, readers
            unfinished = [src for src in dict.fromkeys(a.inputs) if position[src] in pending]
            waiting[n] = len(unfinished)
            for src in unfinished:
                dependents.setdefault(src, []).append(n)
            if not unfinished:
                heapq.heappush(ready, k)

    def over() -> bool:
        return state["exhausted"] and not pending

    def take():
        """The next node to run (under the lock), or None when the run is over or stopped."""
        while True:
            if state["stop"] or state["error"] is not None or over():
                return None
            # back-pressure: a caller slower than the workers (an output file, a consumer of the
            # stream) holds at most `look_ahead` finished heads; fewer than that can be out of
            # order (they lie within look_ahead places), so the caller can always take one
            if ready and len(heads) < look_ahead:
                n, a = pending[heapq.heappop(ready)]
                return n, a, [values[src] for src in a.inputs]
            cond.wait()

    def finish(n: str, a: Node, value, worker: int, start: float, end: float) -> None:
        """Book a finished node (under the lock): free what it was the last reader of, wake what it readies."""
        k = position[n]
        del pending[k]
        while state["earliest"] < state["read"] and state["earliest"] not in pending:
            state["earliest"] += 1
        if records is not None:
            records.append({"task": k, "name": n, "kind": str(a.kind), "worker": worker, "start": start,
                            "end": end, "nodes": [n], "deps": sorted({position[src] for src in a.inputs})})
        for src in dict.fromkeys(a.inputs):
            remaining[src] -= 1
            if remaining[src] == 0:
                del values[src], remaining[src], position[src]
        del waiting[n]
        for dst in dependents.pop(n, ()):
            waiting[dst] -= 1
            if waiting[dst] == 0:
                heapq.heappush(ready, position[dst])
        if a.kind == NodeKind.HEAD:
            heads[a.block] = value
        if remaining[n]:  # a head has no reader
            values[n] = value
        else:
            del remaining[n], position[n]
        state["done"] += 1
        read_ahead()
        cond.notify_all()

    def work(worker: int) -> None:
        torch.set_num_threads(1)  # this thread's intra-op threads (OpenMP's count is per thread)
        try:
            with torch.no_grad():  # grad mode is per thread too
                while True:
                    with cond:
                        item = take()
                    if item is None:
                        return
                    n, a, inputs = item
                    start = time.perf_counter()
                    value = runner.run(a, inputs)
                    end = time.perf_counter()
                    del inputs
                    with cond:
                        finish(n, a, value, worker, start, end)
                    del value
        except BaseException as err:  # handed to the calling thread, which raises it
            with cond:
                if state["error"] is None:
                    state["error"] = err
                cond.notify_all()

    threads = [threading.Thread(target=work, args=(k,), name=f"emulate-local-{k}", daemon=True)
               for k in range(workers)]
    with cond:
        read_ahead()
    for t in threads:
        t.start()
    reported = 0
    next_block = 0
    try:
        while True:
            with cond:
                while state["done"] == reported and state["error"] is None and not over():
                    cond.wait(0.2)  # a timeout, so that a signal's handler runs in this thread while it waits
                if state["error"] is not None:
                    raise state["error"]
                done, ended = state["done"], over()
                out = []
                while next_block in heads:
                    out.append((next_block, heads.pop(next_block)))
                    next_block += 1
                if out:
                    cond.notify_all()  # workers held back by unread heads may go on
            if on_node is not None:
                for d in range(reported + 1, done + 1):
                    on_node(d)
            reported = done
            yield from out
            del out
            if ended:
                return
    finally:
        with cond:
            state["stop"] = True
            cond.notify_all()
        for t in threads:
            t.join()
