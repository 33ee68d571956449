"""The planner's cost model: the devices and hardware it prices, with the written source of every
constant, and what one task and one value cost (`task_seconds`, `value_bytes`).

    task time  = max(matmul FLOPs / F_mm + attention FLOPs / F_att, bytes / memory bandwidth)
                 + logical calls x call overhead (all of it x a contention factor for CPU workers
                 sharing one machine's cores) + the per-call cost of Ray, for a task that starts
                 a Ray call (the executor runs up to 8 tasks of one worker in one call); on the
                 local executor's call workers the calls' Python (the per-call cost measured with
                 that many workers) is a serial part the simulation runs one task at a time (one
                 GIL), and only the kernels take the contention factor (`task_parts`)
    transfer   = link latency + bytes / link bandwidth, for a value read on a worker other than the
                 one that made it (priced by emulate/planner/simulation.py, which queues the transfers)

A task's FLOPs and bytes are the logical graph's own node prices (graphs/costs.py), summed over the
physical task (graphs/plan.py). A worker of G GPUs is one device with G times the FLOP/s, bandwidth
and memory, plus the ring all-reduces tensor parallelism costs inside it (`ring_allreduce_s`, sized
by emulate/planner/deployment.py); fp8 feed-forward weights run that share of the GEMMs at the fp8
rate. On the H100 and H200 an attend call runs at FlashAttention-3's published rate for its length
and mask (`gpu_attention_s`). This machine's CPU
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
    # cores' worth of CPU other processes used in the second before the measurement began (all the
    # machine's busy time less this process's own, emulate/planner/calibrate.py `_others_cores`): a
    # busy neighbour shows here at once, where the 1-minute load average lags behind it
    others_cores: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.when))
        return (f"calibrated {when} at load average {self.load:.2f} on {self.cores} cores (other processes using "
                f"{self.others_cores:.1f}), torch {self.torch}, calls on {self.call_threads} thread (torch's setting "
                f"{self.torch_threads})")


@dataclass(frozen=True)
class Device:
    """One accelerator (or this machine's CPU) as the cost model sees it.

    flops: peak dense FLOP/s per dtype ("bf16", "fp8", "fp32"); bandwidth: memory bytes/s; memory: bytes;
    efficiency: the fraction of peak a GEMM reaches (attention has its own rate, attention_rate);
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
    attention_rate: dict | None = None  # GPUs: flash attention's published FLOP/s by dtype
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
    # calibrated CPUs: the same for k one-thread worker *processes* at the niceness Ray gives its
    # workers (emulate/planner/calibrate.py, RAY_WORKER_NICENESS), against one thread of this process
    # alone: at that niceness a worker yields its core to any process of normal priority, so next to
    # a busy neighbour k workers share the cores it leaves (None: `contention` stands for it)
    worker_contention: tuple | None = None
    calibration: Calibration | None = None  # calibrated CPUs: when and how
    # calibrated CPUs: wall seconds per logical call of a run of the local executor on k call workers,
    # k = 1, 2, ..., measured on a probe whose calls are all overhead (emulate/planner/calibrate.py):
    # the Python of a call holds the GIL, so k workers' overheads run one at a time
    serial_call_s: tuple | None = None
    # ... and the same while the call workers run kernels beside each other and whatever else runs
    # on the machine (fitted on a probe forward whose calls are mostly kernels): what the simulation
    # charges; never below serial_call_s
    loaded_call_s: tuple | None = None
    # GPUs: the attention kernel's published FLOP/s by the call's sequence length, per mask ("none",
    # "causal"); None: the flat attention_rate
    attention_by_length: dict | None = None
    # calibrated CPUs: the executor's merge of partials (emulate/runtime/merge.py), FLOP/s as
    # graphs/costs.py counts a merge's FLOPs, by the FLOPs of one pairwise merge; None: the GEMM rate
    merge_flops: dict | None = None
    # calibrated CPUs: the executor's position-wise nodes (project, mix: emulate/models/block.py), FLOP/s
    # by the tokens of a call (M) and its FLOPs, elementwise work included ({M: {FLOPs: FLOP/s}});
    # None: the GEMM rate
    node_flops: dict | None = None
    # calibrated CPUs: the bytes/s at which one token's linear (torch's F.linear of a [1, in] row, one
    # thread) reads a weight matrix no earlier call left in the caches, by the matrix's bytes: what a
    # decode step's weights and cached keys cost, each read once a step and never written (where
    # `bandwidth` is a copy's reads and writes); None (GPUs): `bandwidth`, the datasheet's read figure
    read_rates: dict | None = None
    # calibrated CPUs: the kernel probe's forward on one call worker (a calibration problem, never a
    # validation row) measured over the simulation's figure with the rest as calibrated: how far the
    # model misses a forward it was not fitted to, printed beside predictions, never applied
    probe_miss: float | None = None

    def reads_per_s(self, nbytes: float) -> float:
        """Bytes/s at which memory is only read, `nbytes` a piece (a decode step's weight matrix, a
        layer's cached keys): the measured rate for that size, log-linear between, where measured."""
        return _interpolate(self.read_rates, max(nbytes, 1.0)) if self.read_rates else self.bandwidth

    def attention_at(self, mask: str, tokens: int) -> float:
        """Flash attention's FLOP/s for a call of `tokens` keys with `mask` ("none", or anything masked):
        log-linear between the published lengths, the last beyond them."""
        curve = self.attention_by_length["none" if mask == "none" else "causal"]
        return _interpolate(curve, max(tokens, 1))

    def node_rate(self, tokens: int, flops: float) -> float:
        """The position-wise nodes' FLOP/s for a call of `tokens` rows and `flops` FLOPs: at each
        measured M by FLOPs per row (which stands for the block's width), then log-linear between
        the Ms, the nearest beyond them. Keyed by M as well because one FLOP count is a wide block's
        short call or a narrow block's long one, and the narrow long call runs slower (more of its
        time in elementwise passes over M x width; benchmarks/calibration_coverage.py); read per row
        so that between two Ms a block is compared with blocks of its own width."""
        per_row = flops / max(tokens, 1)
        by_tokens = {m: _interpolate({f / m: r for f, r in table.items()}, per_row)
                     for m, table in self.node_flops.items()}
        return _interpolate(by_tokens, max(tokens, 1))

    def serial_call(self, workers: int) -> float | None:
        """Seconds of GIL-held Python per logical call with `workers` call workers (None: not measured)."""
        table = self.loaded_call_s or self.serial_call_s
        if not table:
            return None
        return float(table[min(workers, len(table)) - 1])

    def slowdown(self, busy: int, processes: bool = False) -> float:
        """The contention factor with `busy` workers computing at once (1.0 when not measured):
        threads of one process (the local executor's call workers), or with `processes` Ray's
        one-thread worker processes (worker_contention where measured)."""
        table = (self.worker_contention or self.contention) if processes else self.contention
        if not table or (busy <= 1 and not processes):
            return 1.0
        return float(table[max(1, min(busy, len(table))) - 1])

    def rate(self, dtype: str, kind: str = "matmul", per_call: float | None = None) -> float:
        table = self.attention_flops if kind == "attention" else self.matmul_flops
        if table and per_call:
            return _interpolate(table, per_call)
        if kind == "attention" and self.attention_rate and dtype in self.attention_rate:
            return self.attention_rate[dtype]
        return self.flops[dtype] * self.efficiency


# Every constant below has its source beside it; docs/planner.md ("Where every constant comes
# from") lists them again. None is taken from a figure the planner is validated against.
#
# Peaks, NVIDIA datasheets: A100 SXM4 80GB (312 TFLOP/s dense BF16, 19.5 FP32, 2,039 GB/s HBM2e,
# NVLink 600 GB/s); H100 SXM5 (989 TFLOP/s dense BF16 -- 1,979 is with sparsity --, 1,979 dense
# FP8, 67 FP32, 3.35 TB/s HBM3, 80 GB, NVLink 900 GB/s); H200 SXM (the H100's compute and NVLink,
# 4.8 TB/s HBM3e, 141 GB). NVLink's figure is both directions together: a ring all-reduce moves
# data one way per step, so half of it is the bandwidth each step sees.
#
# GEMM efficiency: measured maximum achievable BF16 matmul FLOP/s over peak, from the "Maximum
# Achievable Matmul FLOPS comparison table" of S. Bekman, Machine Learning Engineering
# (github.com/stas00/ml-engineering, compute/accelerator/README.md, mamf-finder.py): H100 SXM
# 792.1 of 989 TFLOP/s (80.1%, CUDA 12.1), A100 SXM 267.9 of 312 (85.9%). H200: the H100's (same
# compute die and clocks). FP8 GEMMs are taken at the same fraction of the FP8 peak (no published
# FP8 MAMF figure was found; an assumption, stated in docs/planner.md).
GEMM_EFFICIENCY = {"a100": 267.9 / 312, "h100": 792.1 / 989, "h200": 792.1 / 989}
# Attention throughput, forward, BF16/FP16, long sequences, as the FlashAttention papers report:
# FlashAttention-3 (Shah et al., arXiv 2407.08608, abstract) up to 740 TFLOP/s on H100 (75% of
# peak; head dim 256); FlashAttention-2 (Dao, arXiv 2307.08691, abstract) 50-73% of peak on A100,
# the top of that range for long-sequence forward: 0.73 x 312. H200: the H100's (FA3 is Hopper's
# kernel). The flat figure serves where no curve by call length is known (the A100).
ATTENTION_FLOPS = {"a100": 0.73 * 312e12, "h100": 740e12, "h200": 740e12}
# ... and by the call's sequence length and mask, at head dim 128 (every Llama-3 shape): FlashAttention-3's
# Figure 5 (arXiv 2407.08608, "Attention forward speed, head dim 128 (H100 80GB SXM5)", BF16, batch x
# sequence length = 16k tokens, 16 heads of 128), FA3's bars at 512, 1k, 2k, 4k, 8k and 16k tokens:
# without the causal mask 467, 565, 625, 638, 646, 648 TFLOP/s; with it 292, 423, 521, 579, 602, 616
# (a causal call's FLOPs are its visible half, as the planner counts them). A call longer than 16k runs
# at the 16k rate; a window's or sink's masked call at the causal rate (the diagonal tiles' masking
# is what slows a causal call). H200: the H100's (same compute die and clocks).
_FA3_HD128 = {"none": {512: 467e12, 1024: 565e12, 2048: 625e12, 4096: 638e12, 8192: 646e12, 16384: 648e12},
              "causal": {512: 292e12, 1024: 423e12, 2048: 521e12, 4096: 579e12, 8192: 602e12, 16384: 616e12}}
ATTENTION_BY_LENGTH = {"h100": _FA3_HD128, "h200": _FA3_HD128}
# FP8 GEMMs: DeepGEMM (github.com/deepseek-ai/DeepGEMM, README, News 2025.04.18) reaches "up to 1550
# TFLOPS" of FP8 on the H800, whose SXM5 compute die and FP8 peak (1,979 dense) are the H100's:
# 78.3% of the FP8 peak, the best published FP8 GEMM rate found (a best case, as MAMF is for bf16).
FP8_GEMM_FLOPS = {"h100": 1550e12, "h200": 1550e12}
# A logical call's fixed cost on a GPU: a few kernel launches. Assumed (about 5 us a launch, four
# launches a call); no measurement on a GPU backs it yet (docs/planner.md says so).
GPU_CALL_OVERHEAD_S = 20e-6
NVLINK_BYTES_PER_S = {"a100": 600e9 / 2, "h100": 900e9 / 2, "h200": 900e9 / 2}  # datasheets, one direction
# PCIe between GPUs of one worker without NVLink: PCIe 4.0 x16 (A100) 32 GB/s and 5.0 x16 (H100,
# H200) 64 GB/s per direction, the PCI-SIG figures the NVIDIA datasheets quote (64 and 128 GB/s both ways)
PCIE_BYTES_PER_S = {"a100": 32e9, "h100": 64e9, "h200": 64e9}


def _gpu(name: str, peaks: dict, bandwidth: float, memory_gb: float, source: str) -> Device:
    return Device(name, peaks, bandwidth, memory_gb * GB, GEMM_EFFICIENCY[name], GPU_CALL_OVERHEAD_S, source,
                  attention_rate={"bf16": ATTENTION_FLOPS[name]}, attention_by_length=ATTENTION_BY_LENGTH.get(name))


DEVICES = {
    "a100": _gpu("a100", {"bf16": 312e12, "fp32": 19.5e12}, 2.039e12, 80, "NVIDIA A100 SXM4 80GB datasheet"),
    "h100": _gpu("h100", {"bf16": 989e12, "fp8": 1979e12, "fp32": 67e12}, 3.35e12, 80, "NVIDIA H100 SXM5 datasheet"),
    "h200": _gpu("h200", {"bf16": 989e12, "fp8": 1979e12, "fp32": 67e12}, 4.8e12, 141, "NVIDIA H200 SXM datasheet"),
}
# One 400 Gb/s NIC per GPU: the Llama 3 paper (arXiv 2407.21783, section 3.3.1) describes Meta's
# H100 clusters with 400 Gb/s RoCE or InfiniBand between GPUs. Latency 10 us: assumed (an RDMA
# message's order of magnitude); it weighs a few microseconds per transfer.
GPU_LINK_GBPS = 400.0
GPU_LINK_LATENCY_S = 10e-6
# Ray's cost per task with GPUs: assumed half of what benchmarks/ray_overheads.py measured per call
# on this project's CPU workers (2 ms, where the worker's own CPU also runs Ray's side of the call).
GPU_TASK_OVERHEAD_S = 1e-3
# Ray's object store between processes of one machine: a copy and a pickle. Assumed; on this
# project's validation rows values are small (M x width floats) and these weigh under 1%.
CPU_LINK_GBPS = 40.0
CPU_LINK_LATENCY_S = 200e-6
# Measured with benchmarks/ray_overheads.py (one worker, N = 8192 causal and 16384 sliding, 80
# tasks each; problems that are not validation rows, benchmarks/plan_validation.py): a worker spends
# 1.9 to 2.6 ms per call outside it (Ray's dispatch of the next call, the returns), and the driver
# and Ray's processes spend 2.2 to 3.1 ms of CPU per call.
CPU_TASK_OVERHEAD_S = 2e-3  # a Ray actor call: submit, schedule, fetch the inputs, return
CPU_SERVICE_S_PER_CALL = 2.5e-3  # CPU of the driver and Ray's services per task, on the workers' cores


def cpu_sharing(dev: Device, workers: int, ray: bool, cores: int) -> tuple[float, float]:
    """(slowdown, service_s) of P workers sharing this machine's C cores (Hardware's fields): the
    kernels measured with min(P, C) workers at once (Ray's as processes at its workers' niceness,
    the local executor's as threads), times P / C past the cores; and for Ray the driver's and its
    services' CPU per task, out of the workers' time once they fill the cores other processes leave
    them (F = C less the cores others used when the CPU was calibrated): CPU_SERVICE_S_PER_CALL x
    P / F, phased in over the last core (none while a whole free core is left over)."""
    slowdown = dev.slowdown(min(workers, cores), processes=ray) * max(1.0, workers / cores)
    if not ray:
        return slowdown, 0.0
    others = dev.calibration.others_cores if dev.calibration else 0.0
    free = max(1.0, cores - others)
    return slowdown, CPU_SERVICE_S_PER_CALL * workers / free * min(1.0, max(0.0, workers + 1 - free))


def ring_allreduce_s(nbytes: float, parties: int, bytes_per_s: float) -> float:
    """A ring all-reduce of `nbytes` over `parties` GPUs: each sends and receives 2 (p - 1) / p of
    the bytes, one direction of each link at a time (Patarasuk and Yuan, J. Parallel Distrib.
    Comput. 69(2), 2009, the bandwidth-optimal all-reduce NCCL's ring implements)."""
    if parties <= 1:
        return 0.0
    return 2 * (parties - 1) / parties * nbytes / bytes_per_s


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
    # ... and, once the workers fill the cores other processes leave them (F = C less the cores
    # others used at calibration), the driver's and Ray's CPU per task comes out of their time:
    # CPU_SERVICE_S_PER_CALL x P / F per task (`cpu_sharing`)
    service_s: float = 0.0
    # the local executor: P call workers of one process, no links, one queue (emulate/planner/simulation.py)
    shared: bool = False
    # tensor parallel inside a worker of G GPUs: each layer of each block ends its attention and
    # its MLP with an all-reduce of the block's activations (m x width values) over this link
    tp_bytes_per_s: float = 0.0
    # the share of a task's non-attention FLOPs that are the feed-forward's, run at ffn_speedup x the
    # GEMM rate (fp8 feed-forward weights: the fp8 peak over the bf16 one); and the bytes of one
    # token-layer's all-reduced activations (2 all-reduces x width x the activation dtype's bytes),
    # over the FLOPs of one token-layer's GEMMs: turns a task's GEMM FLOPs into its all-reduced bytes
    ffn_share: float = 0.0
    ffn_speedup: float = 1.0
    allreduce_bytes_per_flop: float = 0.0
    # the forward's M: on GPUs with a published attention curve the keys of a pair call, which sets
    # the flash kernel's rate (Device.attention_at; 0: the flat rate); on calibrated CPUs the rows of
    # a position-wise call, which with its FLOPs sets the nodes' rate (Device.node_rate)
    call_tokens: int = 0
    # a grouped-query model on the CPU: before a masked call (causal, or a window's tiles) the kernel
    # repeats the keys and values to every query head (emulate/runtime/kernels.py, attend), a copy
    # moving kv_repeat_bytes (read and written) per key the call holds at the calibrated copy
    # bandwidth (which counts a copy's reads and writes), which the calibration's
    # kernels (a KV head per query head) do not make; score_flops: the FLOPs of one (query, key)
    # score over all heads (4 x heads x head_dim), to count a call's keys from its FLOPs
    kv_repeat_bytes: float = 0.0
    score_flops: float = 0.0

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


def gpu_attention_s(visible: float, blocks, dev: Device, tokens: int) -> float:
    """Seconds of a task's attend calls on one GPU at flash attention's rate for calls of `tokens`
    keys (Device.attention_at): the unmasked (and sampled) calls' FLOPs at the unmasked rate, the
    rest of the visible FLOPs (causal diagonals, windows, sinks) at the causal one. `blocks`: the
    kernel FLOPs by mask (graphs.compact.MASKS order)."""
    from graphs.compact import MASKS

    unmasked = sum(f for mask, f in zip(MASKS, blocks) if mask.value in ("none", "sample"))
    masked = max(0.0, visible - unmasked)
    return unmasked / dev.attention_at("none", tokens) + masked / dev.attention_at("causal", tokens)


def repeated_keys(mask: str, entries: float, calls: int) -> float:
    """Keys a grouped-query model's masked calls repeat to every query head (emulate/runtime/kernels.py):
    a causal call its whole square block (sqrt of its scores), a window's tiled call each tile's box
    of keys (its scores over the tile's TILE_ROWS rows, graphs/patterns.py, kernel_entries). A tile
    that sees the whole of its box runs unmasked and copies nothing (a window longer than the block,
    the sinks' own calls): there the count is an upper bound."""
    from graphs.patterns import TILE_ROWS

    if mask == "causal":
        return calls * math.sqrt(entries / max(1, calls))
    return entries / TILE_ROWS


def task_seconds(t, hw: Hardware, starts_call: bool = True) -> float:
    """The cost model of one task on one worker (module docstring); the per-call costs (Ray's
    dispatch, the driver's and Ray's CPU) only for a task that starts a Ray call."""
    serial, parallel = task_parts(t, hw, starts_call)
    return serial + parallel


def task_parts(t, hw: Hardware, starts_call: bool = True) -> tuple[float, float]:
    """(serial, parallel) seconds of one task: `serial` is the Python of its logical calls where the
    local executor's call workers share one GIL (hw.shared on a CPU whose per-call cost was measured
    with that many workers, Device.serial_call_s): the simulation runs it one task at a time across
    the workers; `parallel` is the rest, the kernels (x the contention factor) and any Ray cost."""
    dev, g = hw.device, hw.gpus_per_worker
    other = t.flops - t.attend_flops
    merging = 0.0  # the merges at their own measured rate: elementwise passes, far below a GEMM's
    if dev.merge_flops and t.merge_pairs:
        other -= t.merge_flops
        merging = t.merge_flops / (g * _interpolate(dev.merge_flops, t.merge_flops / t.merge_pairs))
    other_calls = max(1, t.calls - t.pairs)
    gemm = (dev.node_rate(hw.call_tokens, other / other_calls) if dev.node_flops
            else dev.rate(hw.dtype, "matmul", other / other_calls))
    compute = merging + other * (1 - hw.ffn_share + hw.ffn_share / hw.ffn_speedup) / (g * gemm)
    if t.attend_flops and dev.masked_attention is not None:
        from graphs.compact import MASKS

        for mask, flops, count in zip(MASKS, t.attend_blocks, t.attend_counts):
            if flops:  # a sample's call is an unmasked one over the gathered keys
                table = dev.masked_attention.get(mask.value) or dev.attention_flops
                # each mask's calls at their own mean size: a window's few-key sink call beside a
                # whole causal block is not priced at the block's rate
                compute += flops / (g * _interpolate(table, flops / max(1, count)))
                if hw.kv_repeat_bytes and mask.value in ("causal", "explicit"):
                    compute += repeated_keys(mask.value, flops / hw.score_flops, count) * hw.kv_repeat_bytes / (
                        g * dev.bandwidth)
    elif t.attend_flops and dev.attention_by_length and hw.call_tokens:
        compute += gpu_attention_s(t.attend_flops, t.attend_blocks, dev, hw.call_tokens) / g
    elif t.attend_flops:
        compute += t.attend_flops / (g * dev.rate(hw.dtype, "attention", t.attend_flops / max(1, t.pairs)))
    memory = t.bytes / (g * dev.bandwidth)
    per_call = hw.task_overhead_s + hw.service_s if starts_call else 0.0
    allreduce = 0.0
    if g > 1 and hw.tp_bytes_per_s:  # not overlapped with compute: the next GEMM needs the sum
        allreduce = ring_allreduce_s(other * hw.allreduce_bytes_per_flop, g, hw.tp_bytes_per_s)
    serial = dev.serial_call(hw.workers) if hw.shared else None
    if serial is not None:  # measured under k workers already: no contention factor on top
        return t.calls * serial, (max(compute, memory) + allreduce) * hw.slowdown + per_call
    return 0.0, (max(compute, memory) + allreduce + t.calls * dev.call_overhead_s) * hw.slowdown + per_call
