"""The planner: how long a forward would take on P workers, before anything runs (docs/planner.md).

    costs.py       the cost model: Device, Hardware, Calibration, the sourced constants, task_seconds, value_bytes
    deployment.py  tensor parallelism, fp8 feed-forward weights, and the memory fit of a worker
    calibrate.py   this machine's CPU, measured once and cached: cpu_device, calibrate_cpu
    placements.py  the sequence and layers placements, as the Ray executor places tasks and loads weights
    ring.py        the ring baseline: context parallelism with pass-KV ring attention, priced (predict_ring)
    simulation.py  the discrete-event simulation of a physical plan (graphs/plan.py): simulate -> Simulation
    prediction.py  the library calls: predict -> Prediction, predict_placements (side by side), and
                   hardware() from a device name
    decode.py      predict_decode -> DecodePrediction: generation's time per output token on a layout
    plot.py        plot_scaling: predicted time against workers and against N

This face re-exports the names the CLI (emulate/cli/plan.py), tests and benchmarks use; none of the
modules imports torch before a plan is made.
"""
from __future__ import annotations

from emulate.planner.calibrate import cache_path, calibrate_cpu, cpu_device
from emulate.planner.costs import (CPU_LINK_GBPS, CPU_LINK_LATENCY_S, CPU_SERVICE_S_PER_CALL, CPU_TASK_OVERHEAD_S, DEVICES,
                                   ATTENTION_FLOPS, GB, GEMM_EFFICIENCY, GPU_CALL_OVERHEAD_S, GPU_LINK_GBPS, GPU_LINK_LATENCY_S,
                                   GPU_TASK_OVERHEAD_S, Calibration, Device, Hardware, ring_allreduce_s,
                                   task_seconds, value_bytes, with_device)
from emulate.planner.decode import DecodePrediction, predict_decode
from emulate.planner.plot import plot_scaling
from emulate.planner.prediction import PlacementOutcome, Prediction, hardware, predict, predict_placements
from emulate.planner.ring import RingPrediction, predict_ring
from emulate.planner.simulation import Simulation, simulate

__all__ = ["ATTENTION_FLOPS", "CPU_LINK_GBPS", "CPU_LINK_LATENCY_S", "CPU_SERVICE_S_PER_CALL", "CPU_TASK_OVERHEAD_S", "DEVICES",
           "GB", "GEMM_EFFICIENCY", "GPU_CALL_OVERHEAD_S", "GPU_LINK_GBPS", "GPU_LINK_LATENCY_S", "GPU_TASK_OVERHEAD_S",
           "Calibration", "DecodePrediction", "Device", "Hardware", "PlacementOutcome", "Prediction", "Simulation", "cache_path", "calibrate_cpu", "cpu_device", "hardware",
           "plot_scaling", "predict", "predict_decode", "predict_placements", "predict_ring", "RingPrediction", "ring_allreduce_s", "simulate", "task_seconds", "value_bytes", "with_device"]
