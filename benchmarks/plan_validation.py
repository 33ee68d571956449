"""The planner's predictions against measured forwards on this machine: a markdown table and a
predicted-against-measured scatter.

Each row is one real `emulate.run` beside `emulate.planner.predict` for the same model, N, M,
pattern, executor, workers and threads, on the calibrated cpu device, at default settings (no
thread variables set): the local executor with its default call workers (torch's thread count, one
per core) and with one (`threads=1`), and Ray with 1 and 2 workers of one CPU. forward_s is the
run's own (it excludes Ray's start and the workers' weight loading), the median of --repeat
forwards (3 by default: one slow forward on a shared machine is not the row's figure; every one is
printed). The load average is printed before every row. Goal: every row within 20%, the median within 10%.

The rows validate; nothing here calibrates. What the planner's constants were measured on is
disjoint from them (tests/test_planner_validation.py checks it): the CPU calibration runs the
executor's kernels on synthetic tensors (rates by call size; the contention of k call workers on a
mix of them, as threads and as worker processes at Ray's niceness), forwards of a 16-wide probe
model, N = 64 and 256 at M = 8 (PROBE_FORWARDS), and of a 128-wide one, N = 8192 at M = 512
(KERNEL_PROBE), on 1 to C call workers (emulate/planner/calibrate.py); Ray's per-call constants come from
benchmarks/ray_overheads.py's own problems (tiny-llama 8192/512 causal, tiny-mistral 16384/1024
sliding 512). No constant was fitted to a row.

    .venv/bin/python benchmarks/plan_validation.py                        # every row; 2 to 3 minutes on 2 cores
    .venv/bin/python benchmarks/plan_validation.py --rows 1,2,8 --no-ray  # a few local rows
    .venv/bin/python benchmarks/plan_validation.py --recalibrate --plot validation.png
    .venv/bin/python benchmarks/plan_validation.py --recalibrate --neighbour  # one busy process throughout

--neighbour starts one CPU-bound process (a Python busy loop in a child) before anything is
measured, runs the calibration (--recalibrate, into this run's own cache) and every row beside it,
and kills it at the end, on an error or an interrupt alike: the plan is calibrated under the same
condition it is validated under. The calibration of a --neighbour run goes to its own cache
($XDG_CACHE_HOME/emulate-neighbour), never over the quiet one.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time

C, S, W = {"attention": "causal"}, "sliding", "sink"
ROWS = [  # model, N, M, pattern, executor: "local" (default call workers), "local1" (threads=1), "ray1", "ray2"
    ("tiny-bert", 4096, 512, {"attention": "full"}, "local"),
    ("tiny-llama", 4096, 256, C, "local"),
    ("tiny-llama", 16384, 1024, C, "local"),
    ("tiny-llama", 32768, 1024, {"attention": S, "window": 1024}, "local"),
    ("tiny-mistral", 16384, 512, {"attention": W, "window": 512, "sinks": 4}, "local"),
    ("tiny-mistral", 65536, 2048, {"attention": S, "window": 512}, "local"),
    ("tiny-mistral", 262144, 2048, {"attention": S, "window": 512}, "local"),
    ("tiny-llama", 12288, 768, C, "local1"),
    ("tiny-mistral", 32768, 1024, {"attention": W, "window": 1024, "sinks": 4}, "local1"),
    ("tiny-bert", 4096, 1024, {"attention": "full"}, "local1"),
    ("tiny-llama", 16384, 1024, C, "ray1"),
    ("tiny-mistral", 32768, 2048, {"attention": S, "window": 1024}, "ray1"),
    ("tiny-llama", 16384, 1024, C, "ray2"),
    ("tiny-mistral", 65536, 2048, {"attention": W, "window": 1024, "sinks": 4}, "ray2"),
]


def settings(executor: str) -> tuple[dict, dict]:
    """(emulate.run keywords, predict keywords) of an executor column."""
    if executor.startswith("ray"):
        import emulate

        workers = int(executor[3:])
        return {"executor": emulate.Ray(workers=workers, cpus_per_worker=1)}, {"executor": "ray", "workers": workers}
    threads = 1 if executor == "local1" else None
    return {"executor": "local", "threads": threads}, {"executor": "local", "threads": threads}


def name(pattern: dict) -> str:
    return pattern["attention"] + (f" r={pattern['window']}" if "window" in pattern else "") + \
        (f" s={pattern['sinks']}" if "sinks" in pattern else "")


@contextlib.contextmanager
def neighbour(on: bool):
    """One CPU-bound child process (a busy loop) while the block runs, when `on`; killed and reaped
    when it ends however it ends (an interrupt included: SIGTERM is turned into SystemExit here),
    and ending by itself should this process be killed outright."""
    if not on:
        yield None
        return
    # the loop also ends by itself once this process is gone (a SIGKILL leaves no finally to run)
    loop = "import os\nparent = os.getppid()\nwhile os.getppid() == parent: pass"
    busy = subprocess.Popen([sys.executable, "-c", loop], stdin=subprocess.DEVNULL)
    old = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        time.sleep(1.0)  # the child is spinning before anything is measured
        yield busy
    finally:
        busy.kill()
        busy.wait()
        signal.signal(signal.SIGTERM, old)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=None, help="1-based row numbers to run, comma separated (default all)")
    ap.add_argument("--no-ray", action="store_true", help="local rows only")
    ap.add_argument("--recalibrate", action="store_true", help="measure the CPU again before predicting")
    ap.add_argument("--plot", default=None, metavar="FILE.png", help="write the predicted-against-measured scatter")
    ap.add_argument("--repeat", type=int, default=3, metavar="K",
                    help="forwards measured per row; the row is their median (default 3)")
    ap.add_argument("--neighbour", action="store_true",
                    help="one CPU-bound process runs throughout, calibration included (implies --recalibrate)")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error(f"--repeat must be at least 1, got {args.repeat}")
    if args.neighbour:  # its own calibration cache: the quiet one stays as it was
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        os.environ["XDG_CACHE_HOME"] = os.path.join(base, "emulate-neighbour")
        args.recalibrate = True
    with neighbour(args.neighbour) as busy:
        if busy is not None:
            print(f"neighbour: one busy loop, pid {busy.pid}, throughout", flush=True)
        validate(args)


def validate(args) -> None:
    import emulate
    from emulate.planner import cpu_device, predict
    from emulate.planner.plot import plot_validation

    chosen = range(1, len(ROWS) + 1) if args.rows is None else [int(k) for k in args.rows.split(",")]
    cases = [(k, *ROWS[k - 1]) for k in chosen if not (args.no_ray and ROWS[k - 1][4].startswith("ray"))]
    t0 = time.perf_counter()
    device = cpu_device(recalibrate=args.recalibrate)
    print(f"cpu: {device.source}; k workers at once each take "
          f"{', '.join(f'x{f:.2f}' for f in device.contention)} on the kernels as threads, "
          f"{', '.join(f'x{f:.2f}' for f in device.worker_contention)} as Ray's worker processes; the local "
          f"executor's calls {', '.join(f'{c * 1e6:.0f}' for c in device.serial_call_s)} us each of Python, "
          f"{', '.join(f'{c * 1e6:.0f}' for c in device.loaded_call_s)} beside kernels (k = 1, 2, ...); the kernel "
          f"probe on one call worker measured x{device.probe_miss:.2f} of its simulation", flush=True)
    emulate.run("tiny-llama", random_tokens=1024, block_size=256, attention="causal", collect=False)  # warm-up
    rows = []
    for k, model, tokens, block, pattern, executor in cases:
        run_kw, plan_kw = settings(executor)
        p = predict(model, tokens, block_size=block, device="cpu", **plan_kw, **pattern)
        load = os.getloadavg()[0]
        runs = [emulate.run(model, random_tokens=tokens, block_size=block, collect=False, **pattern,
                            **run_kw).stats["forward_s"] for _ in range(args.repeat)]
        got = statistics.median(runs)
        rows.append((k, model, tokens, block, name(pattern), executor, p.predicted_s, got, load))
        print(f"  row {k} {model} {tokens} {block} {name(pattern)} {executor}: predicted {p.predicted_s:.3f} s, "
              f"measured {got:.3f} s (median of {', '.join(f'{r:.3f}' for r in runs)}), load {load:.2f} before",
              flush=True)
    print()
    print(f"| # | model | N | M | attention | executor | predicted_s | measured forward_s (median of {args.repeat}) "
          "| predicted / measured "
          "| load before |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for k, model, n, m, pat, ex, pred, got, load in rows:
        print(f"| {k} | {model} | {n} | {m} | {pat} | {ex} | {pred:.3f} | {got:.3f} | {pred / got:.2f} | {load:.2f} |")
    errors = [abs(pred / got - 1) for *_, pred, got, _ in rows]
    print(f"\n{sum(e <= 0.2 for e in errors)} of {len(rows)} within 20%; median error {statistics.median(errors):.0%}; "
          f"{time.perf_counter() - t0:.0f} s in all; load average {os.getloadavg()[0]:.2f} after"
          + ("; one busy neighbour throughout" if args.neighbour else ""))
    if args.plot:
        plot_validation(args.plot, [(f"{r[0]}", r[6], r[7]) for r in rows],
                        f"emulate plan against emulate.run, {len(rows)} rows, load {rows[0][8]:.1f} at the first")
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
