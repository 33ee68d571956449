"""The planner's cost model: the devices and hardware it prices, with the written source of every
constant, and what one task and one value cost (`task_seconds`, `value_bytes`).

    task time  = max(matmul FLOPs / F_mm + attention FLOPs / F_att, bytes / memory bandwidth)
                 + logical calls x call overhead (all of it x a contention factor for CPU workers
                 sharing one machine's cores) + the per-call cost of Ray, for a task that starts
                 a Ray call (the executor runs up to 8 tasks of one worker in one call)
    transfer   = link latency + bytes / link bandwidth, for a value read on a worker other than the
                 one that made it (priced by emulate/planner/simulation.py, which queues the transfers)

A task's FLOPs and bytes are the logical graph's own node prices (graphs/costs.py), summed over the
physical task (graphs/plan.py). A worker of G GPUs is one device with G times the FLOP/s, bandwidth
and memory (tensor parallel inside the worker, its communication not priced). This machine's CPU
is measured rather than looked up (emulate/planner/calibrate.py); docs/planner.md states the
assumptions and compares the model with a published run.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace

GB = 1e9


@dataclass(frozen=True)
class Calibration:
    """When, under what load and under which settings this machine's CPU was measured
    (emulate/planner/calibrate.py); printed with every plan on the cpu device."""

    when: float  # seconds since the epoch, when the measurement began
    load: float  # the 1-minute load average then (os.getloadavg)
    load_after: float  # ... and when it ended (the measurement's own threads count in it)
    cores: int  # cores the measuring process might use (its CPU affinity)
    torch: str  # torch.__version__
    torch_threads: int  # torch's thread setting of the measuring process (OMP_NUM_THREADS or the cores)
    call_threads: int = 1  # threads each measured call ran on: the executors' calls on a CPU run on one
    seconds: float = 0.0  # how long the measurement took

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.when))
        return (f"calibrated {when} at load average {self.load:.2f} on {self.cores} cores, torch {self.torch}, "
                f"calls on {self.call_threads} thread (torch's setting {self.torch_threads})")


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
    # calibrated CPUs: the measured rates of the masked kernels ("causal", "explicit": the tiled calls
    # of windows and sinks), by FLOPs of the scores the kernel computes per call (the whole block, or
    # an explicit pair's tiles: graphs.patterns.kernel_entries); None: an attend call costs its
    # visible entries at the attention rate (flash kernels skip masked tiles)
    masked_attention: dict | None = None
    # calibrated CPUs: how much longer the same work takes on each of k one-thread workers computing
    # at once than on one alone, for k = 1, 2, ... up to the cores (shared caches, memory bandwidth,
    # other work on the machine); None: workers never slow each other (one device each)
    contention: tuple | None = None
    calibration: Calibration | None = None  # calibrated CPUs: when and how

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
    # the local executor: P call workers of one process, no links, one queue (emulate/planner/simulation.py)
    shared: bool = False

    @property
    def link_bytes_per_s(self) -> float:
        return self.link_gbps * 1e9 / 8


def _interpolate(table: dict, x: float) -> float:
    """A measured rate at call size x: log-linear between the measured sizes, flat beyond them.
    (Device.rate reads the tables here; emulate/planner/calibrate.py, which measures them, builds on
    this module, so the reading stays on this side.)"""
    pts = sorted((float(k), float(v)) for k, v in table.items())
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            f = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + f * (y1 - y0)
    return pts[-1][1]


def with_device(hw: Hardware, **changes) -> Hardware:
    """The same hardware with some fields changed (Hardware is frozen)."""
    return replace(hw, **changes)


def value_bytes(key, spec, spans) -> int:
    """Bytes of one value a task reads or writes (graphs.plan's ValueKey or SliceKey)."""
    from graphs.plan import Part, SliceKey

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
    if t.attend_flops and dev.masked_attention is not None:
        from graphs.compact import MASKS

        per_call = sum(t.attend_blocks) / max(1, t.pairs)
        for mask, flops in zip(MASKS, t.attend_blocks):
            if flops:  # a sample's call is an unmasked one over the gathered keys
                table = dev.masked_attention.get(mask.value) or dev.attention_flops
                compute += flops / (g * _interpolate(table, per_call))
    elif t.attend_flops:
        compute += t.attend_flops / (g * dev.rate(hw.dtype, "attention", t.attend_flops / max(1, t.pairs)))
    memory = t.bytes / (g * dev.bandwidth)
    per_call = hw.task_overhead_s + hw.service_s if starts_call else 0.0
    return (max(compute, memory) + t.calls * dev.call_overhead_s) * hw.slowdown + per_call
