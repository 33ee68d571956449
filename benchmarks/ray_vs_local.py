"""forward_s of the local executor against the Ray executor with 1 and 2 workers, from one run each.

Every row is a real `emulate run --json` in a fresh process, one after the other on this
machine: the local executor (torch's own thread count), then Ray with a private local instance
and K workers of one CPU (one torch thread) each. forward_s excludes Ray's start-up and the
workers' weight loading, which the summary reports as ray_setup_s.

    .venv/bin/python benchmarks/ray_vs_local.py            # N = 65536 sliding, N = 16384 causal
    .venv/bin/python benchmarks/ray_vs_local.py --quick    # small sizes, to check the script
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CASES = [
    ("tiny-mistral", 65536, 1024, ["--attention", "sliding", "--window", "512"]),
    ("tiny-llama", 16384, 1024, ["--attention", "causal"]),
]
QUICK = [("tiny-mistral", 4096, 256, ["--attention", "sliding", "--window", "128"]),
         ("tiny-llama", 2048, 256, ["--attention", "causal"])]
# (name, options, torch threads of the local process: None keeps torch's default, one per core)
EXECUTORS = [("local", [], None), ("local, 1 thread", [], 1),
             ("ray, 1 worker", ["--executor", "ray", "--workers", "1"], None),
             ("ray, 2 workers", ["--executor", "ray", "--workers", "2"], None)]


def command(model: str, tokens: int, block: int, pattern: list[str], executor: list[str]) -> list[str]:
    return [sys.executable, "-m", "emulate.cli", "run", "--model", model, "--random-tokens", str(tokens),
            "--block-size", str(block), *pattern, *executor, "--json"]


def run(cmd: list[str], threads: int | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private instance, not a joined one
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    cases = QUICK if parser.parse_args().quick else CASES
    print(f"{os.cpu_count()} CPUs; float32; forward_s from one run each; ratio = forward_s / local forward_s; "
          "load = 1-minute load average before the run (other work on the machine skews the figures)\n")
    print("| model | N | M | attention | executor | forward_s | ratio to local | ray_setup_s | physical tasks "
          "| bytes transferred | bytes between workers | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for model, tokens, block, pattern in cases:
        base = None
        for name, executor, threads in EXECUTORS:
            load = os.getloadavg()[0]
            s = run(command(model, tokens, block, pattern, executor), threads)
            base = base or s["forward_s"]
            attention = s["attention"] + (f" r={s['window']}" if s["window"] else "")
            print(f"| {model} | {tokens} | {block} | {attention} | {name} | {s['forward_s']:.2f} | "
                  f"{s['forward_s'] / base:.2f} | {s.get('ray_setup_s', '-')} | {s.get('physical_tasks', '-')} | "
                  f"{_mb(s.get('bytes_transferred'))} | {_mb(s.get('bytes_between_workers'))} | {load:.1f} |", flush=True)
    print("\ncommands:")
    for model, tokens, block, pattern in cases:
        for _, executor, threads in EXECUTORS:
            prefix = f"OMP_NUM_THREADS={threads} " if threads else ""
            print(f"  {prefix}emulate " + " ".join(command(model, tokens, block, pattern, executor)[3:]))


def _mb(n) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


if __name__ == "__main__":
    main()
