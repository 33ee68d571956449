"""The planner's library call: `predict`, one forward's time on P workers of a named device, nothing
run. It compiles the logical graph in compact form (graphs/compact.py), groups and places it as the
Ray executor does (graphs/plan.py, `make_plan`), prices and schedules it (emulate/planner/costs.py,
emulate/planner/simulation.py) and returns a `Prediction`. `hardware` turns a device name into the
cost model's Hardware: a datasheet GPU, or this machine's CPU, measured (emulate/planner/calibrate.py)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from emulate.errors import EmulateError
from emulate.models.config import ModelConfig
from emulate.planner.calibrate import cpu_device
from emulate.planner.costs import (
    CPU_LINK_GBPS,
    CPU_LINK_LATENCY_S,
    CPU_TASK_OVERHEAD_S,
    DEVICES,
    GB,
    GPU_LINK_GBPS,
    GPU_LINK_LATENCY_S,
    GPU_TASK_OVERHEAD_S,
    Hardware,
    cpu_sharing,
)
from emulate.planner.simulation import forward_spec, simulate


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
    weights_gb_per_worker: float  # the most any worker holds
    fits: bool  # every worker's peak within its devices' memory
    worker_memory_gb: list[float] = field(default_factory=list)  # each worker's peak, weights included
    worker_weights_gb: list[float] = field(default_factory=list)  # each worker's weights (layers: its range's)
    inputs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        return {**out.pop("inputs"), **out}


def hardware(device: str = "cpu", workers: int = 1, gpus_per_worker: int = 1, link_gbps: float | None = None,
             recalibrate: bool = False, executor: str = "ray", threads=None, *, calibrate: bool | None = None) -> Hardware:
    """The Hardware of P workers of a named device ("cpu" is calibrated on this machine, cached;
    recalibrate: measured again, as `emulate plan --recalibrate`; `calibrate` is its old name).
    executor="local" on the cpu: the local executor's call workers as a run with `threads` would
    have them (emulate/runtime/threads.py, worker_count: None is torch's setting), sharing one process."""
    from emulate.runtime.threads import (  # they import torch: only a plan needs it
        cores as usable_cores,
    )
    from emulate.runtime.threads import worker_count

    recalibrate = _renamed(recalibrate, calibrate, "hardware")
    if device == "cpu":
        dev = cpu_device(recalibrate=recalibrate)
        link, lat, over, dtype = CPU_LINK_GBPS, CPU_LINK_LATENCY_S, CPU_TASK_OVERHEAD_S, "fp32"
    elif device in DEVICES:
        dev = DEVICES[device]
        link, lat, over, dtype = GPU_LINK_GBPS * gpus_per_worker, GPU_LINK_LATENCY_S, GPU_TASK_OVERHEAD_S, "bf16"
    else:
        raise EmulateError(f"unknown device {device!r} (choose from cpu, {', '.join(DEVICES)})")
    slowdown, service, shared = 1.0, 0.0, False
    if executor == "local":
        over = 0.0
        if device == "cpu":
            workers, shared = worker_count(threads), True
    if device == "cpu":  # P workers share this machine's C cores with the driver, Ray's services and others
        slowdown, service = cpu_sharing(dev, workers, executor == "ray", usable_cores())
    return Hardware(dev, workers, gpus_per_worker, link if link_gbps is None else link_gbps, lat, over, dtype,
                    slowdown, service, shared=shared)


def predict(model=None, tokens: int = 4096, *, block_size: int = 256, attention="auto", window: int | None = None,
            sinks: int | None = None, workers: int = 1, device: str = "cpu", gpus_per_worker: int = 1,
            link_gbps: float | None = None, recalibrate: bool = False, executor: str = "ray", threads=None,
            weight_dtype: str = "bf16", tp_link: str = "nvlink", allow_overcommit: bool = False,
            placement: str = "sequence", grid: str | None = None, hw: Hardware | None = None,
            calibrate: bool | None = None) -> Prediction:
    """Predict one forward's time on `workers` workers of `device` (nothing runs).

    model: a preset, a checkpoint directory, an emulate.Model or a published shape (llama3-8b, ...).
    The graph is priced in the device's dtype (bf16 on GPUs, float32 on the CPU). executor="local"
    predicts the in-process executor (no per-task cost; on the cpu its call workers as `threads`
    gives them, emulate/runtime/threads.py). weight_dtype "fp8-ffn": the feed-forward weights in fp8;
    tp_link: the GPUs of a worker all-reduce over "nvlink" or "pcie" (emulate/planner/deployment.py).
    placement: "sequence" (every worker holds the model and runs its run of query blocks),
    "layers" (each worker owns a range of layers and holds only their weights) or "grid" (a row of
    workers per range of layers, splitting its blocks; `grid` "2x2", default the executor's), as the
    Ray executor places them (emulate/planner/placements.py); `predict_placements` compares them.
    A layout whose peak does not fit a worker's memory is refused (EmulateError, naming what would
    fit) unless allow_overcommit. `hw` overrides the hardware. recalibrate: measure this machine's
    CPU again (`emulate plan --recalibrate`; `calibrate`, its old name, still works with a DeprecationWarning).
    """
    from emulate.planner.placements import placement_of

    chosen = placement_of(placement)
    recalibrate = _renamed(recalibrate, calibrate, "predict")
    forward = _Forward(model, tokens, block_size, attention, window, sinks, workers, device, gpus_per_worker,
                       link_gbps, recalibrate, executor, threads, weight_dtype, tp_link, hw, grid)
    return forward.predict(chosen, allow_overcommit)[0]


def _renamed(recalibrate: bool, calibrate: bool | None, function: str) -> bool:
    """`calibrate=`, the keyword's old name, still read (with a DeprecationWarning) so that callers
    written against it keep working; the name is `recalibrate`, as the CLI's flag."""
    if calibrate is None:
        return recalibrate
    import warnings

    warnings.warn(f"{function}(calibrate=...) is renamed recalibrate=..., as `emulate plan --recalibrate`",
                  DeprecationWarning, stacklevel=3)
    return bool(calibrate) or recalibrate


@dataclass
class PlacementOutcome:
    """One placement of `predict_placements`: its prediction (None where the placement cannot lay
    out this forward, e.g. more workers than layers), and the line saying why it does not fit or
    cannot be laid out (None when it fits)."""

    placement: str
    prediction: Prediction | None
    refusal: str | None

    def to_dict(self) -> dict:
        return {"placement": self.placement, "refusal": self.refusal,
                **(self.prediction.to_dict() if self.prediction else {})}


def predict_placements(model=None, tokens: int = 4096, *, placement: str = "all", block_size: int = 256,
                       attention="auto", window: int | None = None, sinks: int | None = None, workers: int = 1,
                       device: str = "cpu", gpus_per_worker: int = 1, link_gbps: float | None = None,
                       recalibrate: bool = False, executor: str = "ray", threads=None, weight_dtype: str = "bf16",
                       tp_link: str = "nvlink", grid: str | None = None, hw: Hardware | None = None,
                       calibrate: bool | None = None) -> list[PlacementOutcome]:
    """`predict` under each placement ("all", or one name), side by side: the graph is compiled and
    the hardware measured once. Every placement is predicted whether or not it fits, with the
    refusal `predict` would give beside it."""
    from emulate.planner.placements import placements_of

    chosen = placements_of(placement)
    recalibrate = _renamed(recalibrate, calibrate, "predict_placements")
    forward = _Forward(model, tokens, block_size, attention, window, sinks, workers, device, gpus_per_worker,
                       link_gbps, recalibrate, executor, threads, weight_dtype, tp_link, hw, grid)
    out = []
    for p in chosen:
        try:
            prediction, refusal = forward.predict(p, allow_overcommit=True)
        except EmulateError as err:  # this placement cannot lay the forward out on these workers
            out.append(PlacementOutcome(p.value, None, str(err)))
            continue
        out.append(PlacementOutcome(p.value, prediction, refusal))
    return out


class _Forward:
    """One forward on one cluster, checked, compiled and priced once; `predict` places, simulates
    and checks the fit of each placement over it."""

    def __init__(self, model, tokens, block_size, attention, window, sinks, workers, device, gpus_per_worker,
                 link_gbps, calibrate, executor, threads, weight_dtype, tp_link, hw, grid=None):
        from emulate.problem import resolve_patterns
        from graphs import CompactGraph, PatternError

        config = _config(model)
        for name, value, low in (("--tokens", tokens, 1), ("--block-size", block_size, 1), ("--workers", workers, 1),
                                 ("--gpus-per-worker", gpus_per_worker, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise EmulateError(f"{name} must be an integer >= {low}, got {value!r}")
        if link_gbps is not None and not (math.isfinite(link_gbps) and link_gbps > 0):
            raise EmulateError(f"--link-gbps must be a finite number > 0, got {link_gbps}")
        from emulate.runtime.threads import check_threads

        check_threads(threads)
        if executor not in ("ray", "local"):
            raise EmulateError(f"executor must be ray or local, got {executor!r}")
        if executor == "local" and workers != 1:
            raise EmulateError("the local executor is one worker")
        patterns = resolve_patterns(config, attention, window, sinks)
        check_plan_size(config, patterns, tokens, block_size, workers)  # before the CPU is measured or anything built
        if hw is None:
            hw = hardware(device, workers, gpus_per_worker, link_gbps, calibrate, executor, threads)
        if config.max_positions is not None and tokens > config.max_positions:
            raise EmulateError(f"{tokens} tokens exceed {config.name}'s {config.max_positions} learned positions")
        dtype_bytes = 2 if hw.dtype == "bf16" else 4
        from dataclasses import replace

        from emulate.planner.deployment import deployment, weights_bytes

        hw = replace(hw, **deployment(config, device, hw.device, hw.gpus_per_worker, weight_dtype, tp_link, dtype_bytes),
                     call_tokens=block_size)
        try:
            spec = forward_spec(config, tokens, block_size, patterns, dtype_bytes)
            graph = CompactGraph.build(spec)
        except PatternError as err:
            raise EmulateError(str(err)) from None
        self.config, self.patterns, self.spec, self.graph, self.hw = config, patterns, spec, graph, hw
        self.tokens, self.block_size, self.dtype_bytes = tokens, block_size, dtype_bytes
        self.executor, self.weight_dtype, self.tp_link = executor, weight_dtype, tp_link
        self.weights = weights_bytes(config, weight_dtype, dtype_bytes)
        self.fp8 = weights_bytes(config, "fp8-ffn", dtype_bytes) if "fp8" in hw.device.flops else None
        self.grid = grid  # the grid placement's shape (None: the executor's default_grid)

    def predict(self, placement, allow_overcommit: bool) -> tuple[Prediction, str | None]:
        """The prediction under `placement`, and the line refusing it when it does not fit (raised
        unless allow_overcommit)."""
        from emulate.planner.deployment import fit_refusal
        from emulate.planner.placements import layout, placed_plan, worker_weights

        config, hw, dtype_bytes = self.config, self.hw, self.dtype_bytes
        workers = 1 if hw.shared else hw.workers
        held = worker_weights(config, placement, workers, self.weights, dtype_bytes, self.weight_dtype, self.grid)
        fp8 = None
        if self.fp8 is not None:
            fp8 = worker_weights(config, placement, workers, self.fp8, dtype_bytes, "fp8-ffn", self.grid)
        for peaks in (held, None):  # the weights alone, before the schedule; then with the values alive
            if peaks is None:
                plan = placed_plan(self.graph, placement, config, workers, self.grid)
                sim = simulate(plan, self.spec, self.graph.spans, hw, held[0] if hw.shared else held)
                peaks = sim.peak_memory
            w = max(range(len(peaks)), key=peaks.__getitem__)  # the fullest worker names what would fit
            refusal = fit_refusal(peaks[w], held[w], fp8[w] if fp8 else None, hw.device, hw.gpus_per_worker,
                                  placement.value)
            if refusal and not allow_overcommit:
                raise EmulateError(refusal)
        c = self.graph.counts()
        capacity = hw.device.memory * hw.gpus_per_worker
        names = [plan.tasks[i].name for i in sim.critical_path]
        prediction = Prediction(
            predicted_s=sim.makespan, attention_calls=c["attention_calls"], physical_tasks=len(plan.tasks),
            bytes_moved=sim.bytes_moved, peak_worker_memory_gb=max(sim.peak_memory) / GB,
            utilisation=sum(sim.busy) / (hw.workers * sim.makespan) if sim.makespan else 0.0,
            critical_path_s=sim.critical_path_s, critical_path=names, worker_busy_s=sim.busy,
            weights_gb_per_worker=max(held) / GB, fits=max(sim.peak_memory) <= capacity,
            worker_memory_gb=[m / GB for m in sim.peak_memory], worker_weights_gb=[b / GB for b in held],
            inputs={"model": config.name, "tokens": self.tokens, "block_size": self.block_size,
                    "blocks": self.graph.blocks, "layers": config.layers,
                    "attention": sorted({str(p.describe()) for p in self.patterns}), "placement": placement.value,
                    "grid": str(layout(config, placement, workers, self.grid).grid)
                    if placement == placement.GRID else None,
                    "workers": hw.workers, "device": hw.device.name, "gpus_per_worker": hw.gpus_per_worker,
                    "link_gbps": hw.link_gbps, "dtype": hw.dtype, "weight_dtype": self.weight_dtype,
                    "tp_link": self.tp_link if hw.gpus_per_worker > 1 else None, "executor": self.executor,
                    "call_workers": hw.workers if hw.shared else None, "work_flops": c["work_flops"],
                    "logical_calls": sum(t.calls for t in plan.tasks),
                    "calibration": hw.device.calibration.to_dict() if hw.device.calibration else None})
        return prediction, refusal


# A counted plan (graphs/plan.py, runnable=False) holds, per physical task, its reads and writes and,
# per pair call, the key it reads; the simulation one list per worker. Measured on a 2-core machine:
# `emulate plan --tokens 4000000 -M 256 --attention sliding --window 256` (78,125 tasks) against
# --tokens 1000000 (19,535): 4.5 KB and 360 us per task; `--tokens 65536 -M 64` (5,120 tasks,
# 2.1M pair calls): about 100 B and 15 us per call.
PLAN_TASK_BYTES = 5120
PLAN_CALL_BYTES = 128
PLAN_WORKER_BYTES = 512
# What a plan can reasonably simulate: at the rates above, 10^6 tasks or 10^7 pair calls take
# minutes; past them the answer is a larger M (or a windowed mask), not a longer wait.
MAX_PLAN_TASKS = 10**6
MAX_PLAN_CALLS = 10**7
MAX_PLAN_WORKERS = 10**6


def plan_size(config: ModelConfig, patterns, tokens: int, block_size: int, workers: int) -> dict[str, int]:
    """The physical tasks and pair calls of a counted plan, from the shapes alone (graphs/plan.py,
    make_plan): a start task per block, a row per block and layer, and when blocks are fewer than
    workers each row's pairs cut into slices (at most one per pair, about 2P + B per layer) and a
    combine per row."""
    blocks = math.ceil(tokens / block_size)
    calls = [p.calls_bound(blocks, block_size) for p in patterns]
    tasks = blocks * (len(patterns) + 1)
    if blocks < workers:
        tasks += sum(min(c, 2 * workers + blocks) for c in calls)
    return {"blocks": blocks, "tasks": tasks, "calls": sum(calls)}


def check_plan_size(config: ModelConfig, patterns, tokens: int, block_size: int, workers: int) -> None:
    """Refuse in one line, before anything is built, a plan past what can be simulated or held."""
    from emulate.runtime.memory import COMPACT_PAIR_BYTES, check_fits

    if workers > MAX_PLAN_WORKERS:
        raise EmulateError(f"--workers {workers}: a plan simulates at most {MAX_PLAN_WORKERS:,} workers")
    size = plan_size(config, patterns, tokens, block_size, workers)
    if size["tasks"] > MAX_PLAN_TASKS:
        raise EmulateError(f"N = {tokens} at M = {block_size} is {size['blocks']:,} blocks and about {size['tasks']:,} "
                           f"tasks over {len(patterns)} layers, more than a plan simulates ({MAX_PLAN_TASKS:,}); raise -M")
    if size["calls"] > MAX_PLAN_CALLS:
        raise EmulateError(f"N = {tokens} at M = {block_size} is {size['blocks']:,} blocks and {size['calls']:,} pair "
                           f"calls over {len(patterns)} layers, more than a plan simulates ({MAX_PLAN_CALLS:,}); "
                           "raise -M or choose a windowed --attention")
    templates = {p: p.calls_bound(size["blocks"], block_size) for p in patterns}
    check_fits({"graph": COMPACT_PAIR_BYTES * (sum(templates.values()) + size["blocks"]),
                "plan": PLAN_TASK_BYTES * size["tasks"] + PLAN_CALL_BYTES * size["calls"],
                "workers": PLAN_WORKER_BYTES * workers}, what="this plan")


def _config(model) -> ModelConfig:
    from emulate.models.loaders import load
    from emulate.problem import IDS_MODEL
    from emulate.problem import shape_or_model as _shape_or_model

    # a plan is for a count of tokens, not a text: the default model of token ids
    return load(_shape_or_model(IDS_MODEL if model is None else model)).config
