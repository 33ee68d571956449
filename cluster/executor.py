"""The Ray executor: the physical plan on worker actors, scheduled as a wavefront.

Every task is submitted up front with the ObjectRefs of its inputs, so Ray starts it the moment
they exist: a block of layer l+1 waits for its own few inputs of layer l, never for the whole
layer (docs/design.md, Executors: O(N/M) modes overlap layers as a wavefront). Workers run
their tasks out of order as inputs arrive, one at a time each.

Values stay where they are made: a value read only on the worker that made it stays in that
worker's memory (its readers wait on the producer's small figures object instead), and only values
read on another worker, and the outputs, go through the object store, as zero-copy numpy arrays
(graphs/plan.py `routes`, cluster/worker.py). The driver keeps the refs of shipped values until
their last reader finished.

Faults: worker actors restart (max_restarts) and Ray re-runs their interrupted tasks
(max_task_retries, lineage reconstruction for values lost with a node). A restarted worker has
lost the values it held, so the driver re-runs their producers from lineage (`_Dispatch.recover`);
tasks are pure functions of their inputs, so a re-run gives the same bits. A run that cannot go on
stops with one line.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

from graphs.plan import Plan, calls, make_plan, routes
from cluster.placement import AUTO, Layout, Placement, check_worker_memory, layout_of
from cluster.session import WorkerPool, capacity, connect, disconnect, pool_size
from cluster.failures import HEALTH_EVERY_S
from cluster.failures import Lost as _Lost
from cluster.failures import check_health as _check_health
from cluster.failures import fetch as _fetch
from cluster.failures import get as _get
from cluster.worker import from_wire
from emulate.errors import EmulateError, Interrupted
from emulate.runtime.contract import CallCounts, Execution, Job, Progress, combine_summaries
from emulate.runtime.trace import check_trace_path



def start(job: Job, opts, progress: Progress | None = None) -> Execution:
    """Start (or join) Ray and the workers, then return the run's Execution (opts: cluster.options.Ray).

    Set-up happens here, before the first value is asked for; the execution's figures hold the
    plan's (physical_tasks, workers, bytes_transferred, ...) by the time its iteration ends.
    """
    if opts.trace:  # a bad trace path fails before any work
        check_trace_path(opts.trace)
    g = job.compact  # the plan's tasks carry their nodes, made row by row: no networkx graph of the run
    placed = None
    if opts.workers is not None:  # a placement that cannot fit is refused before Ray starts
        placed = _placement(job, opts, opts.workers)
    t0 = time.perf_counter()
    import ray

    handlers = _SignalHandlers()
    owned, pool = False, None
    # what connect() will start when it is given no cluster: to be stopped even if interrupted inside
    private = not ray.is_initialized() and not (opts.address or os.environ.get("RAY_ADDRESS"))
    if private and progress is not None:  # ray.init takes seconds, in silence
        print("emulate: starting a private Ray instance ...", file=sys.stderr, flush=True)
    try:
        with _no_native_signal_handler():
            owned = connect(opts.address)
        handlers.restore()
        _pickle_by_value(job.oracle)
        size = pool_size(opts)
        if placed is None or placed[1].workers != size:
            placed = _placement(job, opts, size)
        need, layout, chosen = placed
        pool = WorkerPool(opts, job.device, job.model.config, job.model.weights, job.tokens, g.graph_attrs(),
                          str(job.dtype).rsplit(".", 1)[-1], job.oracle, size, layout.owned(_shapes(job)),
                          keep_kv=job.kv is not None)
        handlers.restore()
        plan = make_plan(g, layout.plan_workers)
        layout.place(plan)
    except BaseException as err:
        with handlers.ignored(), _native_stderr_silenced():  # Ray's core logs what the interrupt cut short
            if pool is not None:
                pool.close()
            disconnect(owned or private, linger_s=3.0)
        if isinstance(err, SystemExit) and err.code == signal.SIGTERM:
            raise Interrupted(signal.SIGTERM) from None  # ray.init's own handler: sys.exit(SIGTERM)
        raise
    _, nodes = capacity(opts.cpus_per_worker, opts.gpus_per_worker)
    figures = {
        "workers": pool.size, "cpus_per_worker": opts.cpus_per_worker, "gpus_per_worker": opts.gpus_per_worker,
        "threads_per_worker": pool.info[0]["threads"], "physical_tasks": len(plan.tasks),
        "ray_cluster": ("private local instance, " if owned else "joined, ") + nodes,
        "ray_workers": [{"name": n, "host": i["host"], "pid": i["pid"]} for n, i in zip(pool.names, pool.info)],
        "ray_setup_s": round(time.perf_counter() - t0, 4), "plan": plan.describe(),
        "placement": str(need.placement), "worker_need_mb": round(need.total / 2**20, 1),
    }
    if need.grid is not None:
        figures["grid"] = str(need.grid)
    if chosen is not None:
        figures["placement_auto"] = chosen
    if layout.grid.layers > 1:
        figures["worker_layers"] = [[r.start, r.stop] for r in layout.ranges]
    counts = CallCounts()
    # generation: the workers' kept blocks outlive the prefill
    keep = None if job.kv is None else _Keep(job.model.config.layers, job.kv.block_size, len(job.tokens))
    execution = Execution(_execute(plan, pool, owned, opts, layout, figures, counts, progress, handlers, keep),
                          figures, counts)
    if keep is not None:
        keep.execution = execution  # before the first block is asked for, so before _execute reads it
    return execution


def _shapes(job: Job) -> dict:
    from emulate.models.presets import weight_names

    return {n: tuple(w.shape) for n, w in job.model.weights.items()} or weight_names(job.model.config)


def _placement(job: Job, opts, workers: int):
    """The run's placement priced per worker (refused when over --worker-memory), its layout (which
    layers and blocks each worker runs, which weights it loads) and, under auto, the planner's
    figures it chose by (cluster/auto_placement.py; one line on stderr names the choice)."""
    config, chosen, placement, grid = job.model.config, None, opts.placement, opts.grid
    if placement == AUTO:
        from cluster.auto_placement import choose

        choice = choose(job, opts, workers, _shapes(job))
        placement, grid, chosen = choice.placement, choice.grid, choice.figures
        print(f"emulate: {choice.line}", file=sys.stderr, flush=True)
    layout: Layout = layout_of(placement, workers, config.layers, grid)  # one that cannot be laid out: one line
    need = check_worker_memory(placement, config, _shapes(job), len(job.tokens), workers, job.dtype.itemsize,
                               opts.worker_memory, layout.grid if placement == Placement.GRID else None)
    return need, layout, chosen


@contextlib.contextmanager
def _no_native_signal_handler():
    """The driver's Ray core without its native failure-signal handler, which turns SIGTERM into a
    stack dump and an abort (status 134); read once, when ray.init builds the core worker."""
    name = "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"
    before = os.environ.get(name)
    os.environ[name] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


class _SignalHandlers:
    """The caller's signal handlers, put back after each step that starts Ray's machinery.

    Ray's core worker replaces SIGTERM's handler with one that dumps a native stack and exits
    (status 15 or 134), at initialisation and again as its workers come up; the caller's handlers
    (the CLI's clean exit with 128 + signal) must win.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self):
        main = threading.current_thread() is threading.main_thread()
        self.before = {sig: signal.getsignal(sig) for sig in self.SIGNALS} if main else {}

    def restore(self) -> None:
        for sig, handler in self.before.items():
            if handler is not None:  # set again even when Python's view is unchanged: Ray's is in C
                signal.signal(sig, handler)

    @contextlib.contextmanager
    def ignored(self):
        """No signal interrupts the clean-up (stopping Ray signals its own processes); then the
        caller's handlers again."""
        for sig in self.before:
            signal.signal(sig, signal.SIG_IGN)
        try:
            yield
        finally:
            self.restore()


@contextlib.contextmanager
def _native_stderr_silenced():
    """File descriptor 2 to /dev/null while Ray stops: its C++ core writes there directly."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        sys.stderr.flush()  # what Ray's threads printed meanwhile goes where fd 2 pointed
        os.dup2(saved, 2)
        os.close(saved)


def _pickle_by_value(oracle) -> None:
    """A user's oracle travels to the workers as code, not as a module name to import: its module (a
    script, a test file, a notebook's) is often not on the workers' path. The package's own travel by name."""
    module = sys.modules.get(type(oracle).__module__)
    if module is None or module.__name__ == "__main__" or module.__name__.split(".")[0] in ("emulate", "cluster", "graphs"):
        return  # __main__ always travels by value
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(module)


def _execute(plan: Plan, pool: WorkerPool, owned: bool, opts, layout: Layout, figures: dict, counts: CallCounts,
             progress: Progress | None, handlers: _SignalHandlers, keep: _Keep | None = None):
    """The run's blocks in order, then its figures. With `keep` (generation), the workers and their
    kept keys and values stay up after the last block: the execution's kv is then the store that
    decodes on them (cluster/decode.py, RemoteKV), which stops the workers when it is closed."""
    import ray

    try:
        t0 = time.time()
        run = _Dispatch(plan, pool, opts, layout.ranges if layout.grid.layers > 1 else None)
        run.submit(plan.tasks)
        handlers.restore()
        yield from _drive(run, plan, pool, opts, progress)
        figures.update(_figures(run, pool))
        counts.add(_counts(run))
        figures.update(combine_summaries(_get(ray, [a.summary.remote(pool.shared) for a in pool.actors],
                                              "the oracle's figures", pool)))
        memory = _get(ray, [a.memory.remote() for a in pool.actors], "the workers' memory", pool)
        figures["worker_weights_mb"] = [m["weights_mb"] for m in memory]
        figures["worker_peak_rss_mb"] = [m["peak_rss_mb"] for m in memory]  # each process's VmHWM
        if opts.trace:
            from emulate.runtime.trace import write_trace

            write_trace(opts.trace, run.records, pool.info, t0)
            figures["trace"] = opts.trace
        if keep is not None:
            from cluster.decode import RemoteKV

            def prefill_again(first: int) -> int:
                return _prefill_again(plan, pool, opts, first)

            keep.execution.kv = RemoteKV(pool, opts, keep.layers, keep.block_size, keep.tokens, prefill_again,
                                         run.recoveries, owned)
    except BaseException:
        with handlers.ignored(), _native_stderr_silenced():  # Ray's core logs a line for each task cut short
            _teardown(pool, owned, linger_s=3.0)
        raise
    if keep is not None:
        return  # the store stops the workers (and a private instance) when the generation ends
    # A private instance stops when this process exits (atexit), not here: its shutdown takes a
    # second or more, which is no part of the forward.
    _teardown(pool, False)
    if owned:
        import atexit

        atexit.register(disconnect, True)


def _prefill_again(plan: Plan, pool: WorkerPool, opts, first: int) -> int:
    """Run every task of `plan` again as submission `first` onwards (the workers refuse the calls of
    earlier ones); the heads are dropped, the workers keep the keys and values the projections make.
    Returns the last submission it used."""
    run = _Dispatch(plan, pool, opts, first=first)
    run.submit(plan.tasks)
    for _ in _drive(run, plan, pool, opts, None):
        pass
    return run.recoveries


def _drive(run: _Dispatch, plan: Plan, pool: WorkerPool, opts, progress: Progress | None):
    """Wait on the dispatch's calls and yield (block, head value) in block order, recovering lost
    values on the way; every call has finished when it ends."""
    import ray

    heads = {t.block: t.index for t in plan.tasks if t.head}
    # Outputs copied out of the object store as their calls finish, in whatever order: blocks
    # are yielded in order, and a worker's later blocks often finish before another worker's
    # last earlier one; taken then, while the workers compute, rather than all after that block.
    outputs: dict[int, dict] = {}
    next_block = 0
    last_done = last_health = time.monotonic()
    while next_block < plan.blocks:
        while run.heads_done:
            block = run.heads_done.pop()
            if block not in run.heads or heads[block] not in run.done:
                continue  # taken already, or lost since and to be made again
            try:
                value = _fetch(ray, run.heads[block], f"the output of block {block}", pool, opts)
            except _Lost:  # its node went with the value: run the head again
                run.undo(plan.tasks[heads[block]])
                continue
            del run.heads[block]
            outputs[block] = from_wire(value, copy=True)
        if next_block in outputs:
            yield next_block, outputs.pop(next_block)
            next_block += 1
            continue
        if not run.in_flight:
            if not run.lost:
                raise EmulateError(f"every task finished but block {next_block}'s output never came")
            run.recover()
            last_done = time.monotonic()
            continue
        pending = list(run.in_flight)
        ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
        if ready and pending:
            more, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
            ready += more
        now = time.monotonic()
        for ref in ready:
            run.finished(ref)
            if progress is not None:
                progress(len(run.done), len(plan.tasks))
            last_done = now
        if not ready and now - last_health >= HEALTH_EVERY_S:
            last_health = now
            _check_health(pool, opts, now - last_done)
    for ref in list(run.in_flight):  # finished, but not yet seen when the last head came in
        run.finished(ref)


@dataclass
class _Keep:
    """A generation's prefill: the cache's shape, and its Execution, to be handed the workers' KV store."""

    layers: int
    block_size: int
    tokens: int
    execution: Execution | None = None


def _teardown(pool: WorkerPool, owned: bool, linger_s: float = 0.0) -> None:
    pool.close()
    disconnect(owned, linger_s)



class _Dispatch:
    """The driver's side of one run: what is in flight, what is done and where each value lives.

    Values a worker made and reads again stay in that worker's memory (cluster/worker.py); only
    values read on another worker (and the heads) go through the object store, and the driver
    keeps their refs until every reader has finished, so it can hand them to a re-run. A worker
    that dies takes its held values with it: its restarted process answers a task that needs one
    with LostLocal, and everything downstream fails with that error without running. Once nothing
    is in flight, `recover` re-runs the unfinished tasks together with the finished producers
    whose values are gone (held by a dead process, or shipped from a dead node), back through the
    lineage as far as needed: at worst from the embeddings. Tasks are pure functions of their
    inputs, so a re-run gives the same bits.
    """

    def __init__(self, plan: Plan, pool: WorkerPool, opts, ranges: list[range] | None = None, first: int = 0):
        """ranges: each worker's layers under the layers and grid placements; first: the number of its
        first submission (a prefill run again starts after the last one's)."""
        self.plan, self.pool, self.opts = plan, pool, opts
        self.producer = {key: t for t in plan.tasks for key in t.writes}
        self.readers_left: dict = {}  # key -> indices of its readers not yet finished
        for t in plan.tasks:
            for key in t.reads:
                self.readers_left.setdefault(key, set()).add(t.index)
        self.refs: dict = {}  # shipped values some unfinished task reads
        self.heads: dict = {}  # block -> the ref of its head output, until the driver takes it
        self.heads_done: list[int] = []  # blocks whose head finished since the driver last looked
        self.in_flight: dict = {}  # figures ref of a call -> its tasks
        self.done: dict[int, dict] = {}  # task index -> the figures of the run that counts
        self.lost: set[int] = set()  # tasks whose run failed for a lost worker or value
        self.records: list[dict] = []
        # under the layers and grid placements (`ranges`: each worker's layers) the trace's slices are
        # coloured by layer range (graphs/pictures/gantt.py colours by kind), so the pipeline's fill
        # and drain show: one colour per range, the same for the workers of a grid's row
        self.ranges = None if ranges is None else [f"layers {r.start}-{r.stop - 1}" for r in ranges]
        self.first = first
        self.recoveries = first  # the current submission's number
        self.calls = 0  # Ray calls submitted
        self.last_loss = ""  # why the latest lost call failed, for the message when recovery gives up
        import ray

        # the plan's tasks go to each worker once, with the weights; a call names its task by index
        self.shared = [*pool.shared, ray.put(plan.tasks)]

    def submit(self, chosen: list) -> None:
        """Submit `chosen` (in plan order) as calls (graphs.plan.calls) with the refs of their
        shipped inputs and, for inputs held in a worker's memory, the figures refs of the calls
        that make them in this submission, so Ray starts a call only once those ran."""
        route = routes(self.plan, chosen)
        made_by: dict[int, object] = {}  # task index -> the figures ref of its call, in this submission
        for call in calls(self.plan, chosen):
            self.calls += 1
            args, makers = [], {}
            for t in call:
                r = route[t.index]
                args += [self.refs[key] for at, key in enumerate(t.reads) if at not in r.held]
                for at in r.held:
                    ref = made_by.get(self.producer[t.reads[at]].index)
                    if ref is not None:
                        makers[ref] = None
            # out of order, a call waits for the calls that make its held inputs; in order, it comes after them
            marks = [] if self.pool.in_order else list(makers)
            ship = [(t, at) for t in call for at in route[t.index].ship]
            n = len(ship) + 1
            worker = self.pool.actors[call[0].worker]
            out = worker.run.options(num_returns=n).remote(self.recoveries, tuple((t.index, route[t.index]) for t in call),
                                                           self.shared, *args, *marks)
            out = out if n > 1 else [out]
            for (t, at), ref in zip(ship, out):
                if t.head:
                    self.heads[t.block] = ref
                else:
                    self.refs[t.writes[at]] = ref
            self.in_flight[out[-1]] = call
            for t in call:
                made_by[t.index] = out[-1]

    def finished(self, ref) -> None:
        import ray

        call = self.in_flight.pop(ref)
        try:
            metas = _get(ray, ref, f"task {call[0].name}" + (f" (and {len(call) - 1} more)" if len(call) > 1 else ""),
                         self.pool, call[0])
        except _Lost as err:
            self.lost.update(t.index for t in call)
            self.last_loss = str(err)
            return
        for task, m in zip(call, metas):
            self.done[task.index] = m
            if task.head:
                self.heads_done.append(task.block)
            self.lost.discard(task.index)
            record = _record(task, m, self.producer, traced=bool(self.opts.trace))
            if self.ranges is not None:
                record["kind"] = self.ranges[task.worker]
            self.records.append(record)
            for key in task.reads:
                left = self.readers_left[key]
                left.discard(task.index)
                if not left:
                    self.refs.pop(key, None)

    def undo(self, task) -> None:
        """A finished task to run again: its output is gone."""
        self.done.pop(task.index, None)
        self.lost.add(task.index)
        for key in task.reads:
            self.readers_left[key].add(task.index)

    def recover(self) -> None:
        """Re-run what was lost: every unfinished task, and every finished producer one of them needs
        whose value is no longer anywhere (recursively)."""
        import ray

        self.recoveries += 1
        limit = self.pool.size * (self.opts.max_restarts + 1)
        if self.recoveries - self.first > limit:
            raise EmulateError(f"values lost with dead workers {self.recoveries - self.first - 1} times; the run stops "
                               f"(at most {limit} recoveries for {self.pool.size} worker(s)); last: {self.last_loss}")
        # what each worker holds now, asked of it (a restarted one holds nothing); from here on the
        # workers refuse calls of earlier submissions, which Ray may run again to rebuild a lost
        # output and which would consume values this submission counts on
        held = self.pool.holdings(self.recoveries, lambda idle_s: _check_health(self.pool, self.opts, idle_s))
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        tasks = self.plan.tasks
        for t in tasks:  # outputs not yet fetched that lived on a dead node: made again at once, not one by one
            if t.head and t.block in self.heads and t.index in self.done and self.done[t.index]["node"] not in alive:
                self.undo(t)
        todo = {t.index for t in tasks if t.index not in self.done}
        stack = list(todo)
        while stack:
            t = tasks[stack.pop()]
            for key in t.reads:
                p = self.producer[key]
                if p.index in todo:
                    continue
                if p.worker == t.worker:
                    here = key in held[p.worker]
                else:
                    here = key in self.refs and self.done[p.index]["node"] in alive
                if not here:
                    todo.add(p.index)
                    self.undo(p)
                    stack.append(p.index)
        self.lost.clear()
        self.submit([tasks[i] for i in sorted(todo)])


def _record(task, m: dict, producer: dict, traced: bool) -> dict:
    """One finished task; with `traced`, also what only the trace shows: nodes, the logical nodes
    it ran, and deps, the indices of the tasks it read from (the schedule's dependency DAG).

    bytes_in: what it received through the object store, all of it made on other workers (values
    made on its own stay in its memory, graphs/plan.py `routes`); bytes_held: what it read from
    its worker's own memory.
    """
    record = {"task": task.index, "name": task.name, "kind": task.kind, "worker": task.worker, "pid": m["pid"],
              "start": m["start"], "end": m["end"], "bytes_in": m["bytes_in"], "bytes_held": m["bytes_held"],
              "bytes_out": m["bytes_out"], "counts": m["counts"]}
    if traced:
        record.update(nodes=task.logical_nodes(), deps=sorted({producer[key].index for key in task.reads}))
    return record


def _figures(run: _Dispatch, pool: WorkerPool) -> dict:
    records = run.records
    busy = [0.0] * pool.size
    for r in records:
        busy[r["worker"]] += r["end"] - r["start"]
    pids = {}
    for r in records:
        pids.setdefault(r["worker"], set()).add(r["pid"])
    shipped = sum(r["bytes_in"] for r in records)
    return {
        "bytes_transferred": shipped,  # all of it between workers: only values read on another worker are shipped in
        "bytes_returned": sum(r["bytes_out"] for r in records),
        "bytes_held": sum(r["bytes_held"] for r in records),
        "worker_busy_s": [round(b, 3) for b in busy],
        "worker_processes": sum(len(p) for p in pids.values()),
        "ray_calls": run.calls, "recoveries": run.recoveries - run.first,
        "tasks_rerun": len(records) - len(run.plan.tasks),
    }


def _counts(run: _Dispatch) -> CallCounts:
    """The calls that made the outputs: each task's counts from its last run (a task run again by a
    recovery replaced the values of its earlier run; tasks_rerun says how many ran twice)."""
    last = {r["task"]: r["counts"] for r in run.records}
    total = CallCounts()
    for c in last.values():
        total.add(c)
    return total
