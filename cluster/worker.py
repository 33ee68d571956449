"""A worker: holds the model once and runs physical tasks with the shared NodeRunner.

The class is plain Python; the executor wraps it with `ray.remote` and its resources, so the
same code runs a task in a test without a cluster.
"""
from __future__ import annotations

import os
import socket
import time

import torch

from cluster.plan import Key, Part, SliceKey, Task, ValueKey
from emulate.merge import TreeMerge, merge
from emulate.model import Transformer
from emulate.ops import NodeRunner
from emulate.oracles import KernelOracle


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
                values[key] = merge([values.pop(s) for s in sources])
            else:
                values[key] = fold.result()
            continue
        a = task.attrs[n]
        value = runner.run(a, [_lookup(values, src) for src in a["inputs"]])
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


class Worker:
    """One Ray actor: the model and the run's tokens, loaded once; `run` executes one task.

    `shared` holds the refs of the weights and the token ids, put once in the object store by the
    driver and passed with every call: a restarted actor reloads them on its first task, with no
    help from the driver (and no constructor argument that a restart would depend on).
    """

    def __init__(self, index: int, config, graph_meta: dict, dtype: str, device: str, threads: int):
        torch.set_num_threads(max(1, threads))
        self.index, self.config, self.graph_meta = index, config, graph_meta
        self.dtype, self.device = getattr(torch, dtype), device
        self.runner = None
        self.where = {"host": socket.gethostname(), "pid": os.getpid()}

    def load(self, shared: list) -> NodeRunner:
        if self.runner is None:
            import ray

            weights, tokens = ray.get(shared)
            # on a GPU worker Ray sets CUDA_VISIBLE_DEVICES to the GPUs it gave this actor
            model = Transformer(self.config, weights, dtype=self.dtype, device=self.device)
            self.runner = NodeRunner(model, tokens, self.graph_meta, KernelOracle())
        return self.runner

    def ping(self, shared: list) -> dict:
        runner = self.load(shared)
        return {"worker": self.index, **self.where, "threads": torch.get_num_threads(),
                "device": str(runner.model.device)}

    def run(self, task: Task, shared: list, *inputs):
        start = time.time()
        runner = self.load(shared)
        each = [tensor_bytes(v) for v in inputs]
        device = runner.model.device
        with torch.no_grad():
            out = run_task(runner, task, [_move(v, device) for v in inputs])
        if device.type != "cpu":
            # the object store holds host memory: results leave the GPU here
            out = [_move(v, torch.device("cpu")) for v in out]
        meta = {"task": task.index, "worker": self.index, "pid": self.where["pid"], "start": start,
                "end": time.time(), "bytes_in": sum(each), "bytes_each": each,
                "bytes_out": sum(tensor_bytes(v) for v in out)}
        return (*out, meta)


def _move(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device)
    if isinstance(value, tuple):
        return tuple(_move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value
