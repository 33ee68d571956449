"""`make check-gpu`: the Ray executor on CUDA workers meets the numerics contract (DESIGN.md).

Runs `emulate run --executor ray --gpus-per-worker 1 --device cuda --verify` for a causal and a
sliding-window model in float32 (max_rel_err <= 2e-5) and float64 (<= 1e-10) against the
monolithic reference, and prints what it measured. Where torch sees no CUDA device it says so
and exits 0: there is nothing to check on such a machine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

TOLERANCE = {"float32": 2e-5, "float64": 1e-10}
CASES = [("tiny-llama", ["--attention", "causal"]), ("tiny-mistral", ["--attention", "sliding", "--window", "512"])]


def main() -> int:
    if not torch.cuda.is_available():
        print(f"check-gpu: skipped: torch {torch.__version__} sees no CUDA device on this machine", file=sys.stderr)
        return 0
    gpus = torch.cuda.device_count()
    workers = min(gpus, 2)
    print(f"check-gpu: {gpus} x {torch.cuda.get_device_name(0)}; Ray executor, {workers} worker(s) of 1 GPU\n")
    print("| model | attention | dtype | N | M | forward_s | max_rel_err | limit | ok |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    failed = 0
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for model, pattern in CASES:
        for dtype, limit in TOLERANCE.items():
            cmd = [sys.executable, "-m", "emulate.cli", "run", "--model", model, *pattern, "--random-tokens", "16384",
                   "--block-size", "1024", "--dtype", dtype, "--device", "cuda", "--executor", "ray",
                   "--gpus-per-worker", "1", "--workers", str(workers), "--verify", "--json"]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode:
                print(f"| {model} | {' '.join(pattern)} | {dtype} | - | - | - | - | {limit:g} | FAILED: "
                      f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode} |")
                failed += 1
                continue
            s = json.loads(done.stdout)
            ok = s["max_rel_err"] <= limit
            failed += not ok
            print(f"| {model} | {s['attention']} | {dtype} | {s['tokens']} | {s['block_size']} | {s['forward_s']:.3f} | "
                  f"{s['max_rel_err']:.2e} | {limit:g} | {'yes' if ok else 'NO'} |", flush=True)
    print(f"\ncheck-gpu: {'all within the contract' if not failed else f'{failed} case(s) outside the contract'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
