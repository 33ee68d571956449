"""What a Ray task costs beyond its own work on this machine: the planner's Ray constants, measured.

One forward per row (a private local Ray instance, K workers of one CPU each). From the workers'
own task timings and the processes' CPU times while the forward runs:

- gap per call: (K x forward_s - the workers' busy seconds) / Ray calls, the wall time a worker
  is not inside a task (Ray's dispatch of the next call, its inputs and outputs, waits for
  inputs); with one worker nothing waits for inputs: CPU_TASK_OVERHEAD_S in emulate/planner/costs.py;
- service CPU per call: CPU seconds of the driver and Ray's own processes (raylet, GCS, agents)
  during the forward, per Ray call: the share of the cores they take from the workers when the
  workers fill every core; CPU_SERVICE_S_PER_CALL in emulate/planner/costs.py.

A Ray call runs up to 8 consecutive tasks of one worker (graphs.plan.calls).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ray_overheads.py            # ~1 minute
"""
from __future__ import annotations

import os
import time

CASES = [("tiny-llama", 8192, 512, {"attention": "causal"}),
         ("tiny-mistral", 16384, 1024, {"attention": "sliding", "window": 512})]


def _cpu_by_pid() -> dict[int, float]:
    """CPU seconds so far of this process and each of its descendants (a private instance's processes)."""
    import psutil

    me = psutil.Process()
    out: dict[int, float] = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        out[p.pid] = t.user + t.system
    return out


def measure(model: str, tokens: int, block: int, pattern: dict, workers: int) -> dict:
    import emulate

    marks: dict = {}

    def progress(stage, done, total):
        if stage == "forward" and not marks:  # the first task finished: the forward is running
            marks["cpu"], marks["t"] = _cpu_by_pid(), time.perf_counter()

    run = emulate.run(model, random_tokens=tokens, block_size=block, **pattern, collect=False, progress=progress,
                      executor=emulate.Ray(workers=workers, cpus_per_worker=1))
    after, wall = _cpu_by_pid(), time.perf_counter() - marks["t"]
    s = run.stats
    worker_pids = {w["pid"] for w in s["ray_workers"]}
    services = sum(cpu - marks["cpu"].get(pid, 0.0) for pid, cpu in after.items() if pid not in worker_pids)
    n = s["ray_calls"]
    return {"forward_s": s["forward_s"], "tasks": s["physical_tasks"], "calls": n,
            "gap_per_call_ms": 1e3 * (workers * s["forward_s"] - sum(s["worker_busy_s"])) / n,
            "service_cpu_per_call_ms": 1e3 * services / n, "service_cores": services / wall}


def main() -> None:
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} before\n")
    print("| model | N | M | attention | workers | forward_s | tasks | Ray calls | gap per call (ms) "
          "| service CPU per call (ms) | service cores |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for model, tokens, block, pattern in CASES:
        for workers in (1, 2):
            r = measure(model, tokens, block, pattern, workers)
            name = pattern["attention"] + (f" r={pattern['window']}" if "window" in pattern else "")
            print(f"| {model} | {tokens} | {block} | {name} | {workers} | {r['forward_s']:.2f} | {r['tasks']} | {r['calls']} | "
                  f"{r['gap_per_call_ms']:.1f} | {r['service_cpu_per_call_ms']:.1f} | {r['service_cores']:.2f} |",
                  flush=True)
    print(f"\nload average {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
