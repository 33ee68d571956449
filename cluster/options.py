"""The Ray executor's description: what a run asks of Ray, checked before Ray is imported.

Registered as "ray" (emulate/runtime/registry.py, a lazily resolved entry), so naming it imports
this module alone; `start` imports Ray and the executor (cluster/executor.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from emulate.errors import EmulateError
from emulate.runtime.contract import Execution, Job, Progress, capability


@dataclass(frozen=True)
class Ray:
    """The Ray executor (cluster/executor.py): worker actors that load the weights once.

    address: join a running cluster ("auto" or HOST:PORT; default $RAY_ADDRESS, else a private
    local instance, stopped at the end). workers: actors (default: as many as the cluster fits).
    cpus_per_worker: CPUs per actor, also its torch threads. gpus_per_worker: with device "cuda".
    trace: write the schedule as Chrome trace-event JSON. stall_timeout: stop with an error when no
    task finishes for that many seconds. max_restarts: per actor, then the run stops.
    start_timeout: seconds for the workers to be placed.
    placement: "sequence" (every worker loads the whole model and runs every layer for its run of
    query blocks), "layers" (each worker owns a contiguous range of layers and loads only their
    weights; blocks flow through the workers as a pipeline), "grid" (P_layers x P_sequence: a row of
    workers per range of layers, the row's workers splitting the query blocks) or "auto" (the
    placement the planner predicts fastest among those that fit, named in one line on stderr):
    cluster/placement.py, cluster/auto_placement.py. grid: the grid's shape, "2x2" (P_layers x
    P_sequence; default: cluster/placement.py `default_grid`).
    worker_memory: bytes one worker may hold; a placement whose workers would need more is
    refused in one line naming a placement that fits (cluster/placement.py, worker_need).
    """

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    trace: str | None = None
    stall_timeout: float = 600.0
    max_restarts: int = 3
    start_timeout: float = 120.0
    placement: str = "sequence"
    worker_memory: int | None = None
    grid: str | None = None

    name = "ray"
    in_process = False  # verify's reference runs on the driver's CPU
    graph_form = "plan"  # the physical plan lists every node with its attributes (memory.estimate prices it)
    keeps_kv = True  # each block's keys and values stay on the worker that projected them (cluster/decode.py)

    def __post_init__(self):
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise EmulateError(f"--workers must be an integer >= 1, got {self.workers!r}")
        for name, strict in (("--cpus-per-worker", True), ("--gpus-per-worker", False), ("--stall-timeout", True),
                             ("start_timeout", True)):
            value = getattr(self, name.lstrip("-").replace("-", "_"))
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or (value <= 0 if strict else value < 0):
                raise EmulateError(f"{name} must be a finite number {'>' if strict else '>='} 0, got {value!r}")
        from cluster.placement import AUTO, Placement, parse_grid, placement_of

        object.__setattr__(self, "placement", placement_of(self.placement, auto=True))
        if self.grid is not None:
            object.__setattr__(self, "grid", parse_grid(self.grid))
            if self.placement not in (Placement.GRID, AUTO):
                raise EmulateError(f"--grid is the shape of --placement grid (or auto), not of --placement "
                                   f"{self.placement}")
        if self.worker_memory is not None and (isinstance(self.worker_memory, bool) or not isinstance(
                self.worker_memory, int) or self.worker_memory < 1):
            raise EmulateError(f"--worker-memory must be an integer number of bytes >= 1, got {self.worker_memory!r}")
        if isinstance(self.max_restarts, bool) or not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise EmulateError(f"max_restarts must be an integer >= 0, got {self.max_restarts!r}")

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus_per_worker))

    def start(self, job: Job, progress: Progress | None = None) -> Execution:
        if not capability(job.oracle, "distributed"):
            raise EmulateError(f"oracle {job.oracle.name} runs on the local executor only: it does not say it may run "
                               "in several processes (distributed = True: it pickles, and its summary's numbers add up)")
        if job.device == "cuda" and self.gpus_per_worker == 0:
            raise EmulateError("device cuda with the Ray executor needs gpus_per_worker (--gpus-per-worker) > 0")
        if self.gpus_per_worker > 0 and job.device != "cuda":
            raise EmulateError("gpus_per_worker (--gpus-per-worker) needs device cuda")
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise EmulateError("the Ray executor needs Ray: pip install 'emulate[ray]'")
        from cluster.executor import start  # lazy: Ray is imported only when asked for

        return start(job, self, progress)
