"""The planner: how long a forward would take on P workers, before anything runs.

The logical graph is compiled in compact form (graphs/compact.py), grouped into physical tasks and
placed exactly as the Ray executor does it (cluster/plan.py, `make_plan`, which reads the compact
form), then `simulate` runs a discrete-event list scheduler over those tasks with a cost model:

    task time  = max(matmul FLOPs / F_mm + attention FLOPs / F_att, bytes / memory bandwidth)
                 + logical calls x call overhead (all of it x a contention factor for CPU workers
                 sharing one machine's cores) + the per-call cost of Ray, for a task that starts
                 a Ray call (the executor runs up to 8 tasks of one worker in one call)
    transfer   = link latency + bytes / link bandwidth, for a value read on a worker other than the
                 one that made it; once per worker (the value then stays in its object store), and
                 one at a time per worker (its inbound link is a queue)

Each worker runs one task at a time: among the tasks placed on it whose inputs have arrived, the
first in plan order (the order Ray is handed them). A worker of G GPUs is one device with G times
the FLOP/s, bandwidth and memory (tensor parallel inside the worker, its communication not
priced). Memory per worker: the weights (split over its G GPUs) plus every value alive on it
(made there or fetched, until its last reader has run) plus the running task's MLP intermediate.

docs/planner.md states the assumptions and compares the model with a published run.
"""
from __future__ import annotations

import heapq
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from emulate.threads import cores as usable_cores
from emulate.config import EmulateError, ModelConfig

GB = 1e9


@dataclass(frozen=True)
class Device:
    """One accelerator (or this machine's CPU) as the cost model sees it.

    flops: peak dense FLOP/s per dtype ("bf16", "fp32"); bandwidth: memory bytes/s; memory: bytes;
    efficiency: the fraction of peak a block-sized call reaches (GEMM and flash attention alike);
    call_overhead_s: per logical call (kernel launches, Python dispatch). A calibrated CPU gives
    measured rates instead (attention_flops, and matmul rates by call size) and efficiency 1.
    """

    name: str
    flops: dict
    bandwidth: float
    memory: float
    efficiency: float
    call_overhead_s: float
    source: str = ""
    attention_flops: dict | None = None  # measured rates (fp32) by FLOPs per call, calibrated CPUs only
    matmul_flops: dict | None = None
    # calibrated CPUs: an attend call costs the scores its kernel computes (the whole block, or an
    # explicit pair's tiles: graphs.patterns.kernel_entries) times this factor per mask (none, causal,
    # explicit, sample); None: its visible entries only (flash kernels skip masked tiles)
    mask_factor: tuple | None = None
    # calibrated CPUs: how much longer the same work takes on each of k one-thread workers computing
    # at once than on one alone, for k = 1, 2, ... up to the cores (shared caches, memory bandwidth,
    # other work on the machine); None: workers never slow each other (one device each)
    contention: tuple | None = None

    def slowdown(self, busy: int) -> float:
        """The contention factor with `busy` workers computing at once (1.0 when not measured)."""
        if not self.contention or busy <= 1:
            return 1.0
        return float(self.contention[min(busy, len(self.contention)) - 1])

    def rate(self, dtype: str, kind: str = "matmul", per_call: float | None = None) -> float:
        table = self.attention_flops if kind == "attention" else self.matmul_flops
        if table and per_call:
            return _interpolate(table, per_call)
        return self.flops[dtype] * self.efficiency


# Vendor datasheets: NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB: 312 TFLOP/s dense BF16,
# 19.5 TFLOP/s FP32, 2,039 GB/s HBM2e); NVIDIA H100 datasheet (SXM5: 989 TFLOP/s dense BF16 -- the
# 1,979 figure is with sparsity -- 67 TFLOP/s FP32, 3.35 TB/s HBM3, 80 GB); NVIDIA H200 datasheet
# (SXM: 989 TFLOP/s dense BF16, 67 TFLOP/s FP32, 4.8 TB/s HBM3e, 141 GB).
# EFFICIENCY: block-sized GEMMs and flash attention at M in the thousands reach roughly 60-75% of
# dense peak on these parts (FlashAttention-2/3 papers report 50-75% forward); 0.7 is assumed.
EFFICIENCY = 0.7
GPU_CALL_OVERHEAD_S = 20e-6  # a logical call is a few kernel launches of ~5 us each
DEVICES = {
    "a100": Device("a100", {"bf16": 312e12, "fp32": 19.5e12}, 2.039e12, 80 * GB, EFFICIENCY, GPU_CALL_OVERHEAD_S,
                   "NVIDIA A100 SXM4 80GB datasheet"),
    "h100": Device("h100", {"bf16": 989e12, "fp32": 67e12}, 3.35e12, 80 * GB, EFFICIENCY, GPU_CALL_OVERHEAD_S,
                   "NVIDIA H100 SXM5 datasheet"),
    "h200": Device("h200", {"bf16": 989e12, "fp32": 67e12}, 4.8e12, 141 * GB, EFFICIENCY, GPU_CALL_OVERHEAD_S,
                   "NVIDIA H200 SXM datasheet"),
}
GPU_LINK_GBPS = 400.0  # one 400 Gb/s NIC per GPU (InfiniBand NDR / RoCE), the usual H100 cluster
GPU_LINK_LATENCY_S = 10e-6
GPU_TASK_OVERHEAD_S = 1e-3  # Ray's cost per task (docs/design.md)
CPU_LINK_GBPS = 40.0  # Ray's object store between processes of one machine: a copy and a pickle
CPU_LINK_LATENCY_S = 200e-6
# Measured with benchmarks/ray_overheads.py (one worker, N = 8192 causal and 16384 sliding, 80
# tasks each): a worker spends 1.9 to 2.6 ms per task outside it (Ray's dispatch of the next call,
# the returns), and the driver and Ray's processes spend 2.2 to 3.1 ms of CPU per task.
CPU_TASK_OVERHEAD_S = 2e-3  # a Ray actor call: submit, schedule, fetch the inputs, return
CPU_SERVICE_S_PER_CALL = 2.5e-3  # CPU of the driver and Ray's services per task, on the workers' cores


@dataclass(frozen=True)
class Hardware:
    """P workers of one device kind: G devices each, one link each."""

    device: Device
    workers: int
    gpus_per_worker: int = 1
    link_gbps: float = GPU_LINK_GBPS
    link_latency_s: float = GPU_LINK_LATENCY_S
    task_overhead_s: float = GPU_TASK_OVERHEAD_S
    dtype: str = "bf16"
    # CPU workers on one machine: every task's own work takes this factor longer (P workers
    # computing at once on C cores: the calibrated contention at min(P, C), times P / C past C) ...
    slowdown: float = 1.0
    # ... and, once the workers fill every core, the driver's and Ray's CPU per task comes out of
    # their time: CPU_SERVICE_S_PER_CALL x P / C per task
    service_s: float = 0.0

    @property
    def link_bytes_per_s(self) -> float:
        return self.link_gbps * 1e9 / 8


@dataclass
class Prediction:
    """What `predict` returns: the schedule's figures and the inputs they were computed from."""

    predicted_s: float
    attention_calls: int
    physical_tasks: int
    bytes_moved: int
    peak_worker_memory_gb: float
    utilisation: float
    critical_path_s: float
    critical_path: list[str]
    worker_busy_s: list[float]
    weights_gb_per_worker: float
    fits: bool  # every worker's peak within its devices' memory
    inputs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        return {**out.pop("inputs"), **out}


# -- the schedule ---------------------------------------------------------------------------------

def value_bytes(key, spec, spans) -> int:
    """Bytes of one value a task reads or writes (cluster.plan's ValueKey or SliceKey)."""
    from cluster.plan import Part, SliceKey

    node = key.merge if isinstance(key, SliceKey) else key.node
    parts = node.split("/")
    kind, block = parts[-2], int(parts[-1])
    m = spans[block][1] - spans[block][0]
    b, H, Hkv, dh, d = spec.dtype_bytes, spec.heads, spec.kv_heads, spec.head_dim, spec.width
    if isinstance(key, SliceKey):
        return m * H * (dh + 1) * b
    if kind == "project":
        return m * H * dh * b if key.part == Part.Q else 2 * m * Hkv * dh * b
    if kind == "head":
        return m * (d + 1) * b
    return m * d * b


def task_seconds(t, hw: Hardware, starts_call: bool = True) -> float:
    """The cost model of one task on one worker (module docstring); the per-call costs (Ray's
    dispatch, the driver's and Ray's CPU) only for a task that starts a Ray call."""
    dev, g = hw.device, hw.gpus_per_worker
    other = t.flops - t.attend_flops
    other_calls = max(1, t.calls - t.pairs)
    compute = other / (g * dev.rate(hw.dtype, "matmul", other / other_calls))
    if t.attend_flops and dev.mask_factor:
        whole = sum(t.attend_blocks)
        rate = dev.rate(hw.dtype, "attention", whole / max(1, t.pairs))
        compute += sum(f * b for f, b in zip(dev.mask_factor, t.attend_blocks)) / (g * rate)
    elif t.attend_flops:
        compute += t.attend_flops / (g * dev.rate(hw.dtype, "attention", t.attend_flops / max(1, t.pairs)))
    memory = t.bytes / (g * dev.bandwidth)
    per_call = hw.task_overhead_s + hw.service_s if starts_call else 0.0
    return (max(compute, memory) + t.calls * dev.call_overhead_s) * hw.slowdown + per_call


@dataclass
class Schedule:
    makespan: float
    start: list[float]
    end: list[float]
    busy: list[float]
    bytes_moved: int
    peak_memory: list[float]
    critical_path_s: float
    critical_path: list[int]


def simulate(plan, spec, spans, hw: Hardware, weights_bytes: float = 0.0) -> Schedule:
    """Run `plan` (cluster.plan.Plan) on hw.workers simulated workers; see the module docstring."""
    from cluster.plan import calls

    tasks = plan.tasks
    n, P = len(tasks), plan.workers
    # the executor runs consecutive tasks of a worker in one Ray call (cluster.plan.calls)
    firsts = {c[0].index for c in calls(plan, tasks)}
    dur = [task_seconds(t, hw, t.index in firsts) for t in tasks]
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
    order = 0

    def push(at: float, kind: int, index: int):
        nonlocal order
        heapq.heappush(events, (at, order, kind, index))
        order += 1

    def try_start(w: int, now: float):
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
        w = tasks[i].worker
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
        busy[t.worker] += dur[t.index]

    # memory: values live from when they are made (or arrive) until their last reader ends
    last_read: dict = {}
    for t in tasks:
        for key in t.reads:
            last_read[key] = max(last_read.get(key, 0.0), end[t.index])
    for t in tasks:
        for key in t.writes:
            s = size(key)
            mem_events[t.worker].append((end[t.index], s))
            mem_events[t.worker].append((last_read.get(key, end[t.index]), -s))
        scratch = _scratch_bytes(t, spec, spans)
        mem_events[t.worker].append((start[t.index], scratch))
        mem_events[t.worker].append((end[t.index], -scratch))
    for (w, key), at in arrived.items():
        mem_events[w].append((max(at, last_read.get(key, at)), -size(key)))
    peak = []
    for ev in mem_events:
        level = top = 0.0
        for _, delta in sorted(ev, key=lambda e: (e[0], -e[1])):  # what arrives at an instant before what leaves
            level += delta
            top = max(top, level)
        peak.append(top + weights_bytes)

    # critical path: the longest chain of task times and transfers, with unbounded workers
    cp = [0.0] * n
    via = [-1] * n
    for t in tasks:
        best, arg = 0.0, -1
        for key in t.reads:
            p = producer[key]
            c = cp[p] + (lat + size(key) / bw if tasks[p].worker != t.worker else 0.0)
            if c > best:
                best, arg = c, p
        cp[t.index], via[t.index] = best + dur[t.index], arg
    last = max(range(n), key=cp.__getitem__) if n else -1
    path = []
    while last >= 0:
        path.append(last)
        last = via[last]
    return Schedule(makespan, start, end, busy, moved, peak, max(cp, default=0.0), path[::-1])


def _scratch_bytes(t, spec, spans) -> int:
    """The running task's transient: the MLP intermediate of its block (gate and up)."""
    m = spans[t.block][1] - spans[t.block][0]
    return 2 * m * spec.mlp_width * spec.dtype_bytes


# -- the library call ---------------------------------------------------------------------------------

def hardware(device: str = "cpu", workers: int = 1, gpus_per_worker: int = 1, link_gbps: float | None = None,
             calibrate: bool = False, executor: str = "ray") -> Hardware:
    """The Hardware of P workers of a named device ("cpu" is calibrated on this machine, cached)."""
    if device == "cpu":
        dev = cpu_device(recalibrate=calibrate)
        link, lat, over, dtype = CPU_LINK_GBPS, CPU_LINK_LATENCY_S, CPU_TASK_OVERHEAD_S, "fp32"
    elif device in DEVICES:
        dev = DEVICES[device]
        link, lat, over, dtype = GPU_LINK_GBPS * gpus_per_worker, GPU_LINK_LATENCY_S, GPU_TASK_OVERHEAD_S, "bf16"
    else:
        raise EmulateError(f"unknown device {device!r} (choose from cpu, {', '.join(DEVICES)})")
    slowdown, service = 1.0, 0.0
    if executor == "local":
        over = 0.0
    if device == "cpu":  # P workers share this machine's C cores with the driver and Ray's services
        cores = usable_cores()
        slowdown = dev.slowdown(min(workers, cores)) * max(1.0, workers / cores)
        service = CPU_SERVICE_S_PER_CALL * workers / cores if executor == "ray" and workers >= cores else 0.0
    return Hardware(dev, workers, gpus_per_worker, link if link_gbps is None else link_gbps, lat, over, dtype,
                    slowdown, service)


def predict(model=None, tokens: int = 4096, *, block_size: int = 256, attention="auto", window: int | None = None,
            sinks: int | None = None, workers: int = 1, device: str = "cpu", gpus_per_worker: int = 1,
            link_gbps: float | None = None, calibrate: bool = False, executor: str = "ray",
            hw: Hardware | None = None) -> Prediction:
    """Predict one forward's time on `workers` workers of `device` (nothing runs).

    model: a preset, a checkpoint directory, an emulate.Model or a published shape (llama3-8b, ...).
    The graph is priced in the device's dtype (bf16 on GPUs, float32 on the CPU). executor="local"
    predicts the in-process executor (one worker, no per-task cost). `hw` overrides the hardware.
    """
    from cluster.plan import make_plan
    from emulate.forward import resolve_patterns
    from emulate.shapes import parameters
    from graphs import CompactGraph, ForwardSpec, PatternError

    config = _config(model)
    for name, value, low in (("--tokens", tokens, 1), ("--block-size", block_size, 1), ("--workers", workers, 1),
                             ("--gpus-per-worker", gpus_per_worker, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise EmulateError(f"{name} must be an integer >= {low}, got {value!r}")
    if link_gbps is not None and not (math.isfinite(link_gbps) and link_gbps > 0):
        raise EmulateError(f"--link-gbps must be a finite number > 0, got {link_gbps}")
    if executor not in ("ray", "local"):
        raise EmulateError(f"executor must be ray or local, got {executor!r}")
    if executor == "local" and workers != 1:
        raise EmulateError("the local executor is one worker")
    if hw is None:
        hw = hardware(device, workers, gpus_per_worker, link_gbps, calibrate, executor)
    patterns = resolve_patterns(config, attention, window, sinks)
    if config.max_positions is not None and tokens > config.max_positions:
        raise EmulateError(f"{tokens} tokens exceed {config.name}'s {config.max_positions} learned positions")
    dtype_bytes = 2 if hw.dtype == "bf16" else 4
    try:
        spec = ForwardSpec(tokens=tokens, block_size=block_size, patterns=tuple(patterns), heads=config.heads,
                           kv_heads=config.kv_heads, head_dim=config.head_dim, width=config.width,
                           mlp_width=config.mlp_width, vocab=config.vocab if config.lm_head else 0,
                           dtype_bytes=dtype_bytes)
        graph = CompactGraph.build(spec)
    except PatternError as err:
        raise EmulateError(str(err)) from None
    plan = make_plan(graph, hw.workers, runnable=False)
    weights = parameters(config) * dtype_bytes
    sched = simulate(plan, spec, graph.spans, hw, weights)
    c = graph.counts()
    capacity = hw.device.memory * hw.gpus_per_worker
    names = [plan.tasks[i].name for i in sched.critical_path]
    return Prediction(
        predicted_s=sched.makespan, attention_calls=c["attention_calls"], physical_tasks=len(plan.tasks),
        bytes_moved=sched.bytes_moved, peak_worker_memory_gb=max(sched.peak_memory) / GB,
        utilisation=sum(sched.busy) / (hw.workers * sched.makespan) if sched.makespan else 0.0,
        critical_path_s=sched.critical_path_s, critical_path=names, worker_busy_s=sched.busy,
        weights_gb_per_worker=weights / GB, fits=max(sched.peak_memory) <= capacity,
        inputs={"model": config.name, "tokens": tokens, "block_size": block_size, "blocks": graph.blocks,
                "layers": config.layers, "attention": sorted({str(p.describe()) for p in patterns}),
                "workers": hw.workers, "device": hw.device.name, "gpus_per_worker": hw.gpus_per_worker,
                "link_gbps": hw.link_gbps, "dtype": hw.dtype, "executor": executor,
                "work_flops": c["work_flops"]})


def _config(model) -> ModelConfig:
    from emulate.api import IDS_MODEL, _shape_or_model
    from emulate.loaders import load

    # a plan is for a count of tokens, not a text: the default model of token ids
    return load(_shape_or_model(IDS_MODEL if model is None else model)).config


# -- calibrating this machine's CPU -----------------------------------------------------------------

def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "emulate" / "cpu-calibration.json"


def cpu_device(recalibrate: bool = False) -> Device:
    """This machine's CPU, measured once at torch's thread count and cached (cache_path())."""
    import torch

    threads = torch.get_num_threads()
    path = cache_path()
    data = {}
    if path.exists() and not recalibrate:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
    entry = data.get(str(threads))
    if entry is None or "contention" not in entry:  # none yet, or cached before contention was measured
        entry = calibrate_cpu() if entry is None else {**entry, "contention": _contention()}
        data[str(threads)] = entry
        try:
            from graphs.files import write_file

            path.parent.mkdir(parents=True, exist_ok=True)
            write_file(path, json.dumps(data, indent=1))
        except (OSError, ValueError):
            pass  # an unwritable cache costs a re-measurement next time, nothing else
    return Device("cpu", {"fp32": entry["matmul_flops"][-1][1], "bf16": entry["matmul_flops"][-1][1]},
                  entry["bandwidth"], entry["memory"], 1.0, entry["call_overhead_s"],
                  f"measured on this machine ({threads} thread(s), {entry['when']})",
                  attention_flops={f: r for f, r in entry["attention_flops"]},
                  matmul_flops={f: r for f, r in entry["matmul_flops"]}, mask_factor=tuple(entry["mask_factor"]),
                  contention=tuple(entry["contention"]))


def calibrate_cpu(budget_s: float = 8.0) -> dict:
    """Measure matmul and attention FLOP/s at block-call sizes, the per-call cost of a small
    attention call, and memory bandwidth; a few seconds in all."""
    import psutil
    import torch


    from emulate.kernels import attend
    from emulate.oracles import KernelOracle, PairCall
    from graphs import MaskKind, Pattern
    from graphs.patterns import kernel_entries

    per = budget_s / 12

    def timed(fn) -> float:
        fn()
        reps, t0 = 0, time.perf_counter()
        while True:
            fn()
            reps += 1
            spent = time.perf_counter() - t0
            if spent >= per or reps >= 200:
                return spent / reps

    g = torch.Generator().manual_seed(0)
    matmul = []
    for m, k, n in ((64, 256, 256), (256, 256, 512), (512, 1024, 1024), (1024, 2048, 2048)):
        a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
        matmul.append((2 * m * k * n, 2 * m * k * n / timed(lambda: a @ b)))
    attention = []
    for h, m, dh in ((8, 64, 32), (8, 256, 32), (8, 1024, 32), (16, 2048, 64)):
        q, k, v = (torch.randn(h, m, dh, generator=g) for _ in range(3))
        attention.append((4 * h * dh * m * m, 4 * h * dh * m * m / timed(lambda: attend(q, k, v, 0.1, MaskKind.NONE))))
    q, k, v = torch.randn(8, 512, 32, generator=g), torch.randn(2, 512, 32, generator=g), torch.randn(2, 512, 32, generator=g)
    window, pair = Pattern("sliding", window=512), ((512, 1024), (0, 512))
    plain = timed(lambda: attend(q, k, v, 0.1, MaskKind.NONE))
    # an explicit pair runs in tiles (emulate/kernels.py, attend_intervals); its factor is per score computed
    tiled = timed(lambda: KernelOracle().attend(PairCall(0, *pair, MaskKind.EXPLICIT, window), q, k, v, 0.1))
    computed = kernel_entries(window, MaskKind.EXPLICIT, *pair)
    factors = [1.0, timed(lambda: attend(q, k, v, 0.1, MaskKind.CAUSAL)) / plain, tiled / plain * 512 * 512 / computed,
               1.0]
    big = torch.empty(2**25)  # 128 MiB
    copy = timed(lambda: big.clone())
    return {"matmul_flops": matmul, "attention_flops": attention, "mask_factor": factors,
            "call_overhead_s": _call_overhead(matmul, attention), "contention": _contention(budget_s / 4),
            "bandwidth": 2 * big.numel() * 4 / copy, "memory": float(psutil.virtual_memory().total),
            "threads": torch.get_num_threads(), "when": time.strftime("%Y-%m-%d %H:%M")}


def _contention(budget_s: float = 2.0) -> list[float]:
    """[1.0, f_2, ..., f_C]: how much longer a block-sized matmul loop takes on each of k threads
    running it at once than on one thread alone, for k up to the cores this process may use (at
    most 8). Threads of one process, each on one torch thread (torch releases the GIL inside the
    kernel), share the cores as one-thread worker processes do: the factor holds what the machine
    gives k workers at once (shared caches and memory bandwidth, and any other work running then)."""
    import threading

    import torch

    cores = min(8, usable_cores())
    if cores < 2:
        return [1.0]
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 1024, generator=g), torch.randn(1024, 1024, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a @ b
        t0, reps = time.perf_counter(), 0
        while time.perf_counter() - t0 < 0.05:
            a @ b
            reps += 1
        reps = max(3, int(reps * budget_s / 0.05 / sum(range(1, cores + 1))))  # the budget over k = 1 .. C

        def loop(out: list):
            torch.set_num_threads(1)  # OpenMP's count is per thread: each loop is one worker of one thread
            start = time.perf_counter()
            for _ in range(reps):
                a @ b
            out.append(time.perf_counter() - start)

        per_k = []
        for k in range(1, cores + 1):
            times: list[float] = []
            threads = [threading.Thread(target=loop, args=(times,)) for _ in range(k)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            per_k.append(sum(times) / k)
    finally:
        torch.set_num_threads(before)
    return [1.0] + [max(1.0, t / per_k[0]) for t in per_k[1:]]


def _call_overhead(matmul, attention) -> float:
    """Seconds per logical call beyond its FLOPs: a forward of a model so narrow that the calls
    are all overhead (node dispatch, mask building, merges), run by the local executor."""
    import torch

    import emulate

    config = ModelConfig(name="probe", family="llama", vocab=64, width=16, layers=2, heads=2, kv_heads=1,
                         head_dim=8, mlp_width=32)
    gen = torch.Generator().manual_seed(0)
    from emulate.presets import weight_names

    weights = {name: torch.randn(shape, generator=gen, dtype=torch.float64) / shape[-1] ** 0.5
               for name, shape in weight_names(config).items()}
    model = emulate.Model(config, weights)
    # one call worker: the local executor's per-call cost, as the planner's one local worker pays it
    emulate.run(model, random_tokens=64, block_size=8, attention="causal", collect=False, threads=1)  # warm-up
    run = emulate.run(model, random_tokens=256, block_size=8, attention="causal", collect=False, threads=1)
    return run.stats["forward_s"] / run.stats["graph_nodes"]


def _interpolate(table: dict, x: float) -> float:
    """A measured rate at call size x: log-linear between the measured sizes, flat beyond them."""
    pts = sorted((float(k), float(v)) for k, v in table.items())
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            f = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + f * (y1 - y0)
    return pts[-1][1]


def with_device(hw: Hardware, **changes) -> Hardware:
    return replace(hw, **changes)


def plot_scaling(path, model, tokens: int, *, block_size: int, workers: int, device: str = "cpu",
                 gpus_per_worker: int = 1, link_gbps: float | None = None, window: int | None = None) -> dict:
    """Predicted time against workers (at N = tokens) and against N (at P = workers), for exact
    causal attention and a sliding window (O(N/M) calls; window M unless given). PNG or SVG."""
    from graphs.coverage import DrawError, figure_format, new_figure, save_figure

    try:
        figure_format(path)
    except DrawError as err:
        raise EmulateError(str(err)) from None
    r = block_size if window is None else window
    modes = {"causal (exact)": dict(attention="causal"), f"sliding r={r} (O(N/M))": dict(attention="sliding", window=r)}
    ps = sorted({1 << k for k in range(0, 8) if 1 << k <= max(16, 4 * workers)} | {workers})
    ns = sorted({n for n in (tokens >> k for k in range(6)) if n >= block_size} | {tokens})
    common = dict(block_size=block_size, device=device, gpus_per_worker=gpus_per_worker, link_gbps=link_gbps)
    hw_cache = {}

    def run(n, p, keywords):
        key = p
        if key not in hw_cache:
            hw_cache[key] = hardware(device, p, gpus_per_worker, link_gbps)
        return predict(model, n, workers=p, hw=hw_cache[key], **common, **keywords).predicted_s

    curves = {name: ([run(tokens, p, kw) for p in ps], [run(n, workers, kw) for n in ns]) for name, kw in modes.items()}
    fig = new_figure(10, 4)
    left, right = fig.subplots(1, 2)
    for name, (by_p, by_n) in curves.items():
        left.plot(ps, by_p, marker="o", label=name)
        right.plot(ns, by_n, marker="o", label=name)
    left.set(xscale="log", yscale="log", xlabel="workers P", ylabel="predicted forward (s)",
             title=f"N = {tokens}, M = {block_size}")
    right.set(xscale="log", yscale="log", xlabel="tokens N", ylabel="predicted forward (s)",
              title=f"P = {workers} x {gpus_per_worker} {device}")
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    try:
        save_figure(fig, path)
    except DrawError as err:
        raise EmulateError(str(err)) from None
    return {"workers": ps, "tokens": ns, "curves": curves}
