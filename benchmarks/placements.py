"""The Ray executor's placements side by side: forward_s against the local run, bytes between workers
and each worker's weights and peak RSS, for sequence and layers on 2 workers and sequence, layers and
grid 2x2 on 4, each run checked against the local executor's bits.

Every run is one `emulate.run` in a fresh (spawned) process, its figures
the run's own stats: forward_s (Ray's start and the weights' loading excluded), bytes_transferred,
worker_weights_mb and worker_peak_rss_mb (each worker process's VmHWM). Workers get half a CPU each
(one torch thread) so 4 fit a 2-core machine; the 1-minute load average before each run is printed
beside it, since other work on the machine moves forward_s. At P = 2 the grid is 2x1 (the default
for 2, cluster/placement.py `default_grid`), laid out exactly as layers, or 1x2, exactly as
sequence: the same plan, so it is not run again.

    .venv/bin/python benchmarks/placements.py            # the cases of docs/cluster.md
    .venv/bin/python benchmarks/placements.py --quick    # small sizes, to check the script
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ray_vs_local import (  # the sibling script's command line and child process
    command,
    in_fresh_process,
)

# (model, tokens or None for the default text, M, attention keywords)
CASES = [
    ("tiny-llama", 65536, 1024, {"attention": "sliding", "window": 512}),
    ("tiny-llama", 16384, 1024, {"attention": "causal"}),
    ("smollm2-135m", None, 512, {}),
]
QUICK = [("tiny-llama", 4096, 256, {"attention": "sliding", "window": 128}),
         ("tiny-llama", 2048, 256, {"attention": "causal"})]
LAYOUTS = [(2, "sequence", None), (2, "layers", None), (4, "sequence", None), (4, "layers", None), (4, "grid", "2x2")]


def forward_case(model: str, tokens: int | None, block: int, pattern: dict, ray: dict | None) -> dict:
    """One run's stats; with the hidden states' digest, to compare the bits across processes."""
    import hashlib

    import emulate
    from emulate.inputs import default_text

    executor = "local" if ray is None else emulate.Ray(**ray)
    source = {"random_tokens": tokens} if tokens else {"text": default_text()}
    result = emulate.run(model, **source, block_size=block, **pattern, executor=executor)
    stats = dict(result.stats)
    stats["hidden_sha256"] = hashlib.sha256(result.hidden.contiguous().numpy().tobytes()).hexdigest()
    stats["tokens"] = int(result.hidden.shape[0])
    return stats


def run(model: str, tokens: int | None, block: int, pattern: dict, ray: dict | None) -> dict:
    """forward_case(...) in a fresh process that starts its own private Ray instance."""
    status, value = in_fresh_process(forward_case, model, tokens, block, pattern, ray)
    if status != "ok":
        raise SystemExit(f"failed: {command(model, tokens, block, pattern, ray, None)}\n{value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    cases = QUICK if args.quick else CASES
    print(f"{os.cpu_count()} CPUs; float32; one run each; ratio = forward_s / the local run's; load = 1-minute load "
          "average before the run\n")
    print("| model | N | M | attention | workers, placement | forward_s | ratio to local | bytes between workers "
          "| weights per worker (MB) | peak RSS per worker (MB) | same bits | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    commands = []
    for model, tokens, block, pattern in cases:
        load = os.getloadavg()[0]
        base = run(model, tokens, block, pattern, None)
        attention = base["attention"] + (f" r={base['window']}" if base.get("window") else "")
        print(f"| {model} | {base['tokens']} | {block} | {attention} | local | {base['forward_s']:.2f} | 1 | - | - | - "
              f"| - | {load:.1f} |", flush=True)
        commands.append(command(model, tokens, block, pattern, None, None))
        for workers, placement, grid in LAYOUTS:
            ray = {"workers": workers, "cpus_per_worker": 0.5, "placement": placement}
            if grid:
                ray["grid"] = grid
            load = os.getloadavg()[0]
            s = run(model, tokens, block, pattern, ray)
            name = f"{workers}, {placement}" + (f" {s['grid']}" if s.get("grid") else "")
            print(f"| {model} | {base['tokens']} | {block} | {attention} | {name} | {s['forward_s']:.2f} | "
                  f"{s['forward_s'] / base['forward_s']:.2f} | {s['bytes_transferred'] / 2**20:.1f} MiB | "
                  f"{', '.join(f'{w:.0f}' for w in s['worker_weights_mb'])} | "
                  f"{', '.join(f'{w:.0f}' for w in s['worker_peak_rss_mb'])} | "
                  f"{'yes' if s['hidden_sha256'] == base['hidden_sha256'] else 'NO'} | {load:.1f} |", flush=True)
            commands.append(command(model, tokens, block, pattern, ray, None))
    print("\ncommands (no --random-tokens: the default text):")
    for c in commands:
        print("  " + c.replace("--random-tokens None ", ""))


if __name__ == "__main__":
    main()
