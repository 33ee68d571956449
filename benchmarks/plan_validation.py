"""The planner's predictions against measured forwards on this machine: a markdown table.

Each row is one real `emulate.run` (the local executor, then Ray with 1 and 2 workers of one CPU
each) beside `emulate.planner.predict` for the same model, N, M, pattern, executor and workers,
on the calibrated cpu device. Everything runs with one torch thread (as Ray's workers do), so the
calibration, the local runs and the workers see the same per-core rates. forward_s is the run's
own (it excludes Ray's start and the workers' weight loading). Target: within 30%.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/plan_validation.py            # ~4 minutes
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/plan_validation.py --no-ray   # local rows only
    .venv/bin/python benchmarks/plan_validation.py --calibrate                  # measure the CPU again first
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

LOCAL = [
    ("tiny-llama", 4096, 256, {"attention": "causal"}),
    ("tiny-llama", 8192, 512, {"attention": "causal"}),
    ("tiny-llama", 16384, 1024, {"attention": "sliding", "window": 1024}),
    ("tiny-mistral", 16384, 512, {"attention": "sink", "window": 512, "sinks": 4}),
    ("tiny-bert", 4096, 512, {"attention": "full"}),
]
RAY = [
    ("tiny-llama", 8192, 512, {"attention": "causal"}, 1),
    ("tiny-llama", 8192, 512, {"attention": "causal"}, 2),
    ("tiny-llama", 16384, 1024, {"attention": "sliding", "window": 1024}, 2),
]


def measure(model, tokens, block, pattern, workers=None) -> float:
    import emulate

    executor = "local" if workers is None else emulate.Ray(workers=workers, cpus_per_worker=1)
    run = emulate.run(model, random_tokens=tokens, block_size=block, **pattern, executor=executor, collect=False)
    return run.stats["forward_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-ray", action="store_true", help="local rows only")
    ap.add_argument("--calibrate", action="store_true", help="measure the CPU again before predicting")
    args = ap.parse_args()
    import torch

    from emulate.planner import cpu_device, predict

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    device = cpu_device(recalibrate=args.calibrate)
    print(f"cpu: {device.source}; call overhead {device.call_overhead_s * 1e6:.0f} us, bandwidth "
          f"{device.bandwidth / 1e9:.1f} GB/s, largest matmul {max(device.matmul_flops.values()) / 1e9:.1f} GFLOP/s, "
          f"largest attention {max(device.attention_flops.values()) / 1e9:.1f} GFLOP/s; k workers at once each "
          f"take {', '.join(f'x{f:.2f}' for f in device.contention)} (k = 1, 2, ...)", flush=True)
    measure("tiny-llama", 1024, 256, {"attention": "causal"})  # warm-up: kernels, allocator
    rows = []
    cases = [(*c, None) for c in LOCAL] + ([] if args.no_ray else RAY)
    for model, tokens, block, pattern, workers in cases:
        executor = "local" if workers is None else "ray"
        p = predict(model, tokens, block_size=block, workers=workers or 1, device="cpu", executor=executor, **pattern)
        got = measure(model, tokens, block, pattern, workers)
        name = pattern["attention"] + (f" r={pattern['window']}" if "window" in pattern else "") + \
            (f" s={pattern['sinks']}" if "sinks" in pattern else "")
        rows.append((model, tokens, block, name, executor if workers is None else f"ray x{workers}",
                     p.predicted_s, got))
        print(f"  {rows[-1][:5]}: predicted {p.predicted_s:.3f} s, measured {got:.3f} s", flush=True)
    print()
    print("| model | N | M | attention | executor | predicted_s | measured forward_s | predicted / measured |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for model, n, m, name, ex, pred, got in rows:
        print(f"| {model} | {n} | {m} | {name} | {ex} | {pred:.3f} | {got:.3f} | {pred / got:.2f} |")
    within = sum(abs(pred / got - 1) <= 0.3 for *_, pred, got in rows)
    print(f"\n{within} of {len(rows)} within 30%; {time.perf_counter() - t0:.0f} s in all; load average "
          f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
