"""`make check-gpu`: the Ray executor on CUDA workers meets the numerics contract (docs/numerics.md).

Runs `emulate.run(..., device="cuda", executor=emulate.Ray(workers=K, gpus_per_worker=1),
verify=True)` (the `emulate run --executor ray --gpus-per-worker 1 --device cuda --verify` of the
CLI) for a causal and a sliding-window model in float32 (max_rel_err <= 2e-5) and float64
(<= 1e-10) against the monolithic reference, and prints what it measured. Where torch sees no CUDA
device it says so and exits 0: there is nothing to check on such a machine.
"""
from __future__ import annotations

import os
import sys

import torch

import emulate

TOLERANCE = {"float32": 2e-5, "float64": 1e-10}
CASES = [("tiny-llama", {"attention": "causal"}), ("tiny-mistral", {"attention": "sliding", "window": 512})]


def check(model: str, pattern: dict, dtype: str, workers: int, device: str = "cuda", gpus_per_worker: float = 1):
    """One verified forward on Ray workers of one GPU each; its stats."""
    executor = emulate.Ray(workers=workers, gpus_per_worker=gpus_per_worker)
    run = emulate.run(model, random_tokens=16384, block_size=1024, **pattern, dtype=dtype, device=device,
                      executor=executor, verify=True, collect=False)
    return run.stats


def label(pattern: dict) -> str:
    return " ".join(f"--{k} {v}" for k, v in pattern.items())


def last_line(err: BaseException) -> str:
    """The error's last non-empty line (Ray puts the cause of a task's failure at the end)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1]}" if lines else type(err).__name__


def main() -> int:
    if not torch.cuda.is_available():
        print(f"check-gpu: skipped: torch {torch.__version__} sees no CUDA device on this machine", file=sys.stderr)
        return 0
    gpus = torch.cuda.device_count()
    workers = min(gpus, 2)
    os.environ.pop("RAY_ADDRESS", None)  # a private instance, not a joined one
    print(f"check-gpu: {gpus} x {torch.cuda.get_device_name(0)}; Ray executor, {workers} worker(s) of 1 GPU\n")
    print("| model | attention | dtype | N | M | forward_s | max_rel_err | limit | ok |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    failed = 0
    for model, pattern in CASES:
        for dtype, limit in TOLERANCE.items():
            try:
                s = check(model, pattern, dtype, workers)
            except Exception as err:  # noqa: BLE001 - one failed case is reported, the others still run
                print(f"| {model} | {label(pattern)} | {dtype} | - | - | - | - | {limit:g} | FAILED: "
                      f"{last_line(err)} |", flush=True)
                failed += 1
                continue
            ok = s["max_rel_err"] <= limit  # NaN never passes
            failed += not ok
            print(f"| {model} | {s['attention']} | {dtype} | {s['tokens']} | {s['block_size']} | {s['forward_s']:.3f} | "
                  f"{s['max_rel_err']:.2e} | {limit:g} | {'yes' if ok else 'NO'} |", flush=True)
    print(f"\ncheck-gpu: {'all within the contract' if not failed else f'{failed} case(s) outside the contract'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
