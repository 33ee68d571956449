"""forward_s of the local executor against the Ray executor with 1 and 2 workers, min and median of repeats.

Every run is one `emulate.run` in a fresh process (the `emulate run --json` listed at the end): the
local executor (torch's own thread count), then Ray with a private local instance and K workers of
one CPU (one torch thread) each. The executors run --repeats rounds, the order reversed every other
round, so a drift in the machine's load (or a first run's cold caches) does not fall on one row; each
row reports the min and median forward_s over its runs, and the ratios are of the medians.
forward_s is the run's own (run.stats): it excludes Ray's start-up and the workers' weight loading,
which the summary reports as ray_setup_s (that column and the task and byte columns are the last
round's).

    .venv/bin/python benchmarks/ray_vs_local.py            # N = 65536 sliding, N = 16384 causal
    .venv/bin/python benchmarks/ray_vs_local.py --quick    # small sizes, to check the script
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import traceback

CASES = [
    ("tiny-mistral", 65536, 1024, {"attention": "sliding", "window": 512}),
    ("tiny-llama", 16384, 1024, {"attention": "causal"}),
]
QUICK = [("tiny-mistral", 4096, 256, {"attention": "sliding", "window": 128}),
         ("tiny-llama", 2048, 256, {"attention": "causal"})]
# (name, emulate.Ray keywords or None for the local executor, threads of the local run, also the process's
# OMP_NUM_THREADS: None keeps the defaults, a call worker (of one torch thread) per core; the row a Ray
# row is compared with: the local run on as many cores as it has workers)
EXECUTORS = [("local", None, None, None), ("local, 1 thread", None, 1, None),
             ("ray, 1 worker", {"workers": 1}, None, "local, 1 thread"),
             ("ray, 2 workers", {"workers": 2}, None, "local")]


def forward(model: str, tokens: int, block: int, pattern: dict, ray: dict | None, threads: int | None = None) -> dict:
    """One forward through the API, as `emulate run --json` makes it; its stats."""
    import emulate

    executor = "local" if ray is None else emulate.Ray(**ray)
    local = {"threads": threads} if ray is None and threads is not None else {}
    run = emulate.run(model, random_tokens=tokens, block_size=block, **pattern, executor=executor, collect=False,
                      **local)
    return run.stats


def _child(conn, work, *args) -> None:
    try:
        conn.send(("ok", work(*args)))
    except BaseException:  # noqa: BLE001 - the parent reports it and stops
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


@contextlib.contextmanager
def _environment(threads: int | None):
    """The environment a fresh process starts with: a private Ray instance, not a joined one."""
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "OMP_NUM_THREADS")}
    os.environ.pop("RAY_ADDRESS", None)
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def in_fresh_process(work, *args, threads: int | None = None) -> tuple[str, object]:
    """("ok", work(*args)) or ("error", its traceback), from a fresh (spawned) Python process that
    starts with `threads` torch threads and its own private Ray instance (placements.py uses it too)."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(send, work, *args))
    with _environment(threads):
        child.start()
    send.close()
    try:
        status, value = receive.recv()
    except EOFError:  # it died without a word (killed, out of memory)
        status, value = "error", "the process ended without a result"
    child.join()
    if status != "ok" and child.exitcode:
        value += f"\n(exit code {child.exitcode})"
    return status, value


def run(model: str, tokens: int, block: int, pattern: dict, ray: dict | None, threads: int | None) -> dict:
    """forward(...) in a fresh process that starts with `threads` torch threads."""
    status, value = in_fresh_process(forward, model, tokens, block, pattern, ray, threads, threads=threads)
    if status != "ok":
        raise SystemExit(f"failed: {command(model, tokens, block, pattern, ray, threads)}\n{value}")
    return value


def command(model: str, tokens: int, block: int, pattern: dict, ray: dict | None, threads: int | None) -> str:
    """The `emulate run` command line of the same forward."""
    options = {"model": model, "random-tokens": tokens, "block-size": block, **pattern}
    if ray is not None:
        options.update({"executor": "ray", **{k.replace("_", "-"): v for k, v in ray.items()}})
    elif threads:
        options["threads"] = threads
    prefix = f"OMP_NUM_THREADS={threads} " if threads else ""
    return prefix + "emulate run " + " ".join(f"--{k} {v}" for k, v in options.items()) + " --json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the executors, alternating their order")
    args = parser.parse_args()
    cases = QUICK if args.quick else CASES
    print(f"{os.cpu_count()} CPUs; float32; forward_s: min and median of {args.repeats} runs each, the executors' "
          "order reversed every other round; ratio = median forward_s / the local run's median; "
          "vs same cores = a Ray row's median / the local run's on as many cores as it has workers; "
          "into tasks = bytes tasks received through the object store; out of tasks = bytes tasks put there "
          "(outputs and values read on another worker); "
          "load = 1-minute load average before each run, lowest to highest (other work skews the figures)\n")
    print("| model | N | M | attention | executor | forward_s min | median | ratio to local | vs same cores "
          "| ray_setup_s | physical tasks | object store: into tasks | out of tasks | bytes between workers | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for model, tokens, block, pattern in cases:
        times: dict[str, list[float]] = {name: [] for name, *_ in EXECUTORS}
        loads: dict[str, list[float]] = {name: [] for name, *_ in EXECUTORS}
        last: dict[str, dict] = {}
        for round_ in range(args.repeats):
            for name, ray, threads, _ in (EXECUTORS if round_ % 2 == 0 else EXECUTORS[::-1]):
                loads[name].append(os.getloadavg()[0])
                last[name] = run(model, tokens, block, pattern, ray, threads)
                times[name].append(last[name]["forward_s"])
        median = {name: statistics.median(t) for name, t in times.items()}
        base = median[EXECUTORS[0][0]]
        for name, _, _, against in EXECUTORS:
            s = last[name]
            same = f"{median[name] / median[against]:.2f}" if against else "-"
            attention = s["attention"] + (f" r={s['window']}" if s["window"] else "")
            print(f"| {model} | {tokens} | {block} | {attention} | {name} | {min(times[name]):.2f} | {median[name]:.2f} | "
                  f"{median[name] / base:.2f} | {same} | {s.get('ray_setup_s', '-')} | {s.get('physical_tasks', '-')} | "
                  f"{_mb(s.get('bytes_transferred'))} | {_mb(s.get('bytes_returned'))} | "
                  f"{_mb(s.get('bytes_transferred'))} | {min(loads[name]):.1f} to {max(loads[name]):.1f} |", flush=True)
    print("\ncommands:")
    for model, tokens, block, pattern in cases:
        for _, ray, threads, _ in EXECUTORS:
            print("  " + command(model, tokens, block, pattern, ray, threads))


def _mb(n) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


if __name__ == "__main__":
    main()
