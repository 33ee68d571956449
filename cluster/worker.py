"""A worker: holds the model once and runs physical tasks with the shared NodeRunner.

The class is plain Python; the executor wraps it with `ray.remote` and its resources, so the
same code runs a task in a test without a cluster.
"""
from __future__ import annotations

import os
import socket
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from graphs.plan import Key, Part, Route, SliceKey, Task, ValueKey
from emulate.runtime.merge import TreeMerge, merge
from emulate.models.block import Transformer
from emulate.runtime.runner import NodeRunner


def tensor_bytes(value) -> int:
    """Bytes of the tensors inside a value (tensor, tuple, list or dict of them)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    return 0


def run_task(runner: NodeRunner, task: Task, inputs: list) -> list:
    """Compute a task's logical nodes in order and return its writes, in order."""
    values: dict[Key, object] = dict(zip(task.reads, inputs))
    folds = {key: TreeMerge() for key in task.merges}
    feeds = {src: key for key, sources in task.merges.items() for src in sources}
    for n in task.nodes:
        key = n if isinstance(n, SliceKey) else ValueKey(n)
        if key in task.merges:
            fold = folds.pop(key)
            sources = task.merges[key]
            if all(s in values for s in sources):  # partials made elsewhere: the top of the tree
                values[key] = runner.merge([values.pop(s) for s in sources])
            else:
                values[key] = fold.result()
                if not isinstance(key, SliceKey):  # a whole merge node, folded as its partials came
                    runner.counts.call(values[key][0].shape[-2])
            continue
        a = task.attrs[n]
        value = runner.run(a, [_lookup(values, src) for src in a.inputs])
        if key in feeds:
            folds[feeds[key]].push(value)  # a pair's partial lives only until its merge takes it
        else:
            values[key] = value
    return [_select(values, key) for key in task.writes]


def _lookup(values: dict, node: str):
    """A logical value by node id; a projection read from elsewhere arrives as its q and kv parts."""
    whole = values.get(ValueKey(node))
    if whole is not None:
        return whole
    q = values.get(ValueKey(node, Part.Q))
    k, v = values.get(ValueKey(node, Part.KV), (None, None))
    return q, k, v


def _select(values: dict, key: Key):
    if isinstance(key, ValueKey) and key.part == Part.Q:
        return values[ValueKey(key.node)][0]
    if isinstance(key, ValueKey) and key.part == Part.KV:
        return values[ValueKey(key.node)][1:]
    return values[key]


class LostLocal(RuntimeError):
    """A task's input that should be in its worker's memory is not: the worker process that made it
    is gone (a restarted actor starts empty). The driver re-runs the lost producers (executor.py)."""


@dataclass(frozen=True)
class WireTensor:
    """A CPU tensor as it travels through Ray's object store: its bytes as a flat uint8 numpy array,
    its dtype and shape. Ray stores numpy arrays out of band and a reader on the same node gets a
    read-only view of the object store's memory (no copy, no unpickling of the data); a torch tensor
    would be pickled through its storage and copied on both sides. Any dtype (bfloat16 has no
    numpy equivalent) travels as bytes."""

    data: np.ndarray
    dtype: str
    shape: tuple[int, ...]


def to_wire(value):
    """A task's value (tensor, tuple, list or dict of them) with every tensor as a WireTensor."""
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        return WireTensor(t.reshape(-1).view(torch.uint8).numpy(), str(t.dtype).removeprefix("torch."), tuple(t.shape))
    if isinstance(value, tuple):
        return tuple(to_wire(v) for v in value)
    if isinstance(value, list):
        return [to_wire(v) for v in value]
    if isinstance(value, dict):
        return {k: to_wire(v) for k, v in value.items()}
    return value


def from_wire(value, device: torch.device | None = None, copy: bool = False):
    """The inverse of to_wire. Without `copy`, CPU tensors are views of the received arrays (of the
    object store's memory: read-only, which no kernel here writes to); `copy` gives tensors that
    own their memory (what the driver hands out, so the object store can free its copy)."""
    if isinstance(value, WireTensor):
        with warnings.catch_warnings():  # torch warns that the array is read-only; nothing writes to it
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(value.data)
        t = t.view(getattr(torch, value.dtype)).reshape(value.shape)
        if device is not None and t.device != device:
            return t.to(device)
        return t.clone() if copy else t
    if isinstance(value, tuple):
        return tuple(from_wire(v, device, copy) for v in value)
    if isinstance(value, list):
        return [from_wire(v, device, copy) for v in value]
    if isinstance(value, dict):
        return {k: from_wire(v, device, copy) for k, v in value.items()}
    return value


class Worker:
    """One Ray actor: the model and the run's tokens, loaded once; `run` executes one call of tasks.

    `shared` holds the refs of the weights, the token ids and (from the first task on) the plan's
    tasks, put once in the object store by the driver and passed with every call: a restarted
    actor reloads them on its first task, with no help from the driver (and no constructor
    argument that a restart would depend on).

    Values this worker made and reads again stay in its own memory (`held`, by key, each with the
    number of its tasks still to read it), never serialised; only values another worker or the
    driver reads are returned through the object store (`Route`).
    """

    def __init__(self, index: int, config, graph_meta: dict, dtype: str, device: str, threads: int, oracle,
                 keep_kv: bool = False):
        torch.set_num_threads(max(1, threads))
        self.index, self.config, self.graph_meta, self.oracle = index, config, graph_meta, oracle
        self.dtype, self.device = getattr(torch, dtype), device
        self.keep_kv = keep_kv  # generation's prefill: keep every projection's keys and values (decode below)
        self.kv = None
        self.runner = None
        self.held: dict[Key, tuple] = {}  # key -> (value, indices of the tasks still to read it)
        self.tasks: list[Task] | None = None  # the plan's tasks, fetched on the first run
        self.generation = 0  # the driver's latest submission this process has seen
        self.where = {"host": socket.gethostname(), "pid": os.getpid(), "node": _node_id()}

    def load(self, shared: list) -> NodeRunner:
        if self.runner is None:
            import ray

            # shared[0]: the whole model's weights, or under the layers and grid placements one ref per
            # worker holding only its layers' (cluster/placement.py); a restarted actor reloads its own
            own = shared[0][self.index] if isinstance(shared[0], list) else shared[0]
            weights, tokens = ray.get([own, shared[1]])
            weights = from_wire(weights)  # read-only views of the store's memory: no kernel writes a weight
            # on a GPU worker Ray sets CUDA_VISIBLE_DEVICES to the GPUs it gave this actor
            model = Transformer(self.config, weights, dtype=self.dtype, device=self.device)
            # the run's oracle description, bound here: its counts are this process's (summary())
            block_size = self.graph_meta["spec"]["block_size"]
            bound = self.oracle.bind(block_size, self.config.heads)
            if self.keep_kv:  # a restarted process starts with none: the driver rebuilds (cluster/decode.py)
                from emulate.runtime.decode import KVCache

                self.kv = KVCache(self.config.layers, block_size)
            self.runner = NodeRunner(model, tokens, self.graph_meta, bound, self.kv)
        return self.runner

    def ping(self, shared: list) -> dict:
        runner = self.load(shared)
        return {"worker": self.index, **self.where, "threads": torch.get_num_threads(),
                "device": str(runner.model.device)}

    def memory(self) -> dict:
        """This process's peak RSS (VmHWM) and the bytes of the weights it loaded."""
        from emulate.runtime.memory import peak_rss_mb

        weights = 0 if self.runner is None else sum(tensor_bytes(w) for w in self.runner.model.w.values())
        return {"peak_rss_mb": round(peak_rss_mb(), 1), "weights_mb": round(weights / 2**20, 1)}

    def summary(self, shared: list) -> dict:
        """The bound oracle's summary in this process (contract.combine_summaries adds the workers' up)."""
        return self.load(shared).oracle.summary()

    def kv_inventory(self, shared: list) -> dict:
        """The keys and values this process keeps: (layer, block) -> tokens, and their bytes as held."""
        self.load(shared)
        return {"blocks": self.kv.inventory(), "bytes": self.kv.nbytes(), "pid": self.where["pid"]}

    def kv_clear(self, shared: list) -> None:
        """Drop every kept block (the driver is about to make them all again, cluster/decode.py)."""
        self.load(shared)
        self.kv.clear()

    def decode(self, shared: list, layer: int, append, q, pairs: list) -> tuple:
        """One decode step's calls on this worker's blocks of `layer` (emulate/runtime/decode.py, KVCache.attend):
        `append` (position, k, v) or None, the new token's keys and values when this worker holds the
        tail block; then the query q against each (block, pair call) of `pairs`, one call each.
        Returns (the partials as WireTensors, in the order of `pairs`; the calls' counts; the bytes
        of keys and values this process holds). A block that is not here, or not as long as the
        step reads, is LostLocal before anything changes: this process restarted since the prefill."""
        from emulate.runtime.contract import CallCounts
        from emulate.runtime.decode import KVLost

        runner = self.load(shared)
        held = dict(self.kv.filled[layer])
        if append is not None:
            block, row = divmod(append[0], self.kv.block_size)
            if held.get(block, 0) != row:
                raise LostLocal(f"worker {self.index} (pid {self.where['pid']}) holds {held.get(block, 0)} tokens of "
                                f"layer {layer} block {block}, not the {row} the new token follows")
            held[block] = row + 1
        short = [j for j, pair in pairs if held.get(j, 0) < pair.key_span[1] - pair.key_span[0]]
        if short:
            raise LostLocal(f"worker {self.index} (pid {self.where['pid']}) no longer holds layer {layer} block "
                            f"{short[0]} (of {len(short)} the step reads)")
        device = runner.model.device
        q = from_wire(q, device)
        if append is not None:
            self.kv.append(layer, append[0], from_wire(append[1], device, copy=True),
                           from_wire(append[2], device, copy=True))
        counts = CallCounts()
        try:
            with torch.no_grad():
                partials = self.kv.attend(layer, pairs, q, runner.model.scale, runner.oracle, counts)
        except KVLost as err:
            raise LostLocal(f"worker {self.index}: {err}") from None
        return to_wire(partials), counts, self.kv.nbytes()

    def holdings(self, generation: int, shared: list) -> dict:
        """Start submission `generation` (the driver's recovery): calls of earlier submissions are
        refused from now on. Returns the keys of the values it holds."""
        self.load(shared)
        self.generation = max(self.generation, generation)
        return list(self.held)

    def run(self, generation: int, call: tuple[tuple[int, Route], ...], shared: list, *args):
        """Run the tasks of one call of submission `generation` in order: (index in the plan, its
        route) each. A call of an earlier submission (Ray re-running a finished call to rebuild an
        output lost with a node) is refused before it touches anything: it would consume values the
        driver's later submission counts on. The plan's tasks
        are shared[2], fetched once (a task description pickled with every call would cost more
        than Ray's own dispatch). `args` are the tasks' shipped inputs (their reads not held, in
        order), then the driver's ordering markers (the figures of the calls that made the held
        inputs), which are not read.

        Returns every task's shipped writes (as WireTensors), in order, then the list of the
        tasks' figures.
        """
        if generation < self.generation:
            raise LostLocal(f"worker {self.index} refuses a call of submission {generation}: it runs submission "
                            f"{self.generation} now")
        self.generation = generation
        if self.tasks is None:
            import ray

            self.tasks = ray.get(shared[2])
        tasks = [(self.tasks[index], route) for index, route in call]
        # Every held input made before this call must be here before anything is consumed: a
        # restarted process has none of them, and a failed call must leave the others in place.
        made_here: set = set()
        for task, route in tasks:
            missing = [task.reads[at] for at in route.held
                       if task.reads[at] not in made_here and task.reads[at] not in self.held]
            if missing:
                raise LostLocal(f"worker {self.index} (pid {self.where['pid']}) no longer holds {len(missing)} "
                                f"input(s) of task {task.name}, e.g. {missing[0]}")
            made_here.update(task.writes[at] for at, _ in route.keep)
        runner = self.load(shared)
        arrived = iter(args)
        shipped, metas = [], []
        for task, route in tasks:
            out, meta = self._run(runner, task, route, arrived)
            shipped += out
            metas.append(meta)
        return (*shipped, metas) if shipped else metas

    def _run(self, runner: NodeRunner, task: Task, route: Route, arrived) -> tuple[list, dict]:
        start = time.time()
        device = runner.model.device
        held = set(route.held)
        inputs, arrived_bytes, held_bytes = [], 0, 0
        for at, key in enumerate(task.reads):
            if at in held:
                value = self.held[key][0]
                held_bytes += tensor_bytes(value)
            else:
                value = from_wire(next(arrived), device)
                arrived_bytes += tensor_bytes(value)
            inputs.append(value)
        before = runner.counts.copy()
        with torch.no_grad():
            out = run_task(runner, task, inputs)
        del inputs
        for at in route.held:  # the last local reader frees the value
            key = task.reads[at]
            waiting = self.held[key][1]
            waiting.discard(task.index)
            if not waiting:
                del self.held[key]
        for at, readers in route.keep:
            self.held[task.writes[at]] = (out[at], set(readers))
        shipped = [to_wire(out[at]) for at in route.ship]
        meta = {"task": task.index, "worker": self.index, "pid": self.where["pid"], "node": self.where["node"],
                "start": start, "end": time.time(), "bytes_in": arrived_bytes,
                "bytes_held": held_bytes, "bytes_out": sum(tensor_bytes(out[at]) for at in route.ship),
                "counts": runner.counts.since(before)}
        return shipped, meta


def _node_id() -> str | None:
    try:
        import ray

        if not ray.is_initialized():  # outside Ray (a test running the class in-process): start nothing
            return None
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - a runtime context without a node
        return None
