"""Where the CPU calibration's rates may not hold for a run: kernels on warm tensors against cold
ones, and position-wise nodes of other shapes than the calibration's against the rate the planner
reads off its table. Both on one torch thread, each the fastest of repeated calls, as the
calibration measures (emulate/planner/calibrate.py).

1. Warm against cold: the calibration calls each kernel on the same tensors, which stay in the
   caches; a run's calls read keys and values other calls have made since. Here each kernel runs
   on one set of tensors (warm) and round a ring of 64 sets, tens of MB (cold): a window's tiled
   pair, a causal and an unmasked block call (8 query heads over 2 KV heads) and a GEMM.
2. Nodes by shape: the executor's project and mix nodes (emulate/models/block.py) of synthetic
   Llama blocks at widths 128 to 512 and M = 256 to 2048, timed as the calibration times its own
   (`_node_rates`), their FLOP/s measured against the
   calibrated table's rate at the same M and FLOPs per call (Device.node_rate; the table's own
   shapes are NODE_SHAPES at NODE_TOKENS, so width 256 is one it did not measure). Reads the cached
   calibration (`emulate plan` makes one).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/calibration_coverage.py      # about a minute
"""
from __future__ import annotations

import argparse


def warm_against_cold(per: float) -> None:
    import torch

    from emulate.planner.calibrate import _fastest
    from emulate.runtime.contract import PairCall
    from emulate.runtime.kernels import attend
    from emulate.runtime.oracles import KernelOracle
    from graphs import MaskKind, Pattern
    from graphs.patterns import pair_mask

    g = torch.Generator().manual_seed(0)
    oracle = KernelOracle()

    def per_call(fn, sets) -> float:  # the calibration's own timer, over the whole ring of sets
        return _fastest(lambda: [fn(*s) for s in sets], per) / len(sets)

    def qkv(m):
        return (torch.randn(8, m, 32, generator=g), torch.randn(2, m, 32, generator=g), torch.randn(2, m, 32, generator=g))

    window = Pattern("sliding", window=512)
    span = (2048, 4096)
    pair = PairCall(0, span, span, pair_mask(window, span, span).kind, window)
    cases = [
        ("window pair, M 2048, r 512", lambda: qkv(2048), lambda q, k, v: oracle.attend(pair, q, k, v, 0.1)),
        ("causal block, M 1024", lambda: qkv(1024), lambda q, k, v: attend(q, k, v, 0.1, MaskKind.CAUSAL)),
        ("unmasked block, M 1024", lambda: qkv(1024), lambda q, k, v: attend(q, k, v, 0.1, MaskKind.NONE)),
        ("GEMM 2048 x 256 x 1024", lambda: (torch.randn(2048, 256, generator=g), torch.randn(256, 1024, generator=g)),
         lambda a, b: a @ b),
    ]
    print("| kernel | warm ms | cold ms | cold / warm |\n| --- | --- | --- | --- |")
    for name, make, fn in cases:
        warm, cold = per_call(fn, [make()] * 16), per_call(fn, [make() for _ in range(64)])
        print(f"| {name} | {warm * 1e3:.2f} | {cold * 1e3:.2f} | {cold / warm:.2f} |", flush=True)


# widths 128 and 512 are the calibration's own (NODE_SHAPES), 256 one it did not measure
COVERAGE_SHAPES = ((128, 4, 2, 256), (256, 8, 2, 512), (512, 16, 4, 1024))
COVERAGE_TOKENS = (256, 1024, 2048)


def nodes_by_shape(per: float) -> None:
    import itertools

    import torch

    from emulate.planner import cpu_device
    from emulate.planner.calibrate import _node_rates

    device = cpu_device()
    g = torch.Generator().manual_seed(0)
    print("\n| width | M | FLOPs per call | measured GFLOP/s | calibrated table's GFLOP/s | measured / table |")
    print("| --- | --- | --- | --- | --- | --- |")
    measured = _node_rates(g, per, COVERAGE_SHAPES, COVERAGE_TOKENS)  # timed as the calibration times its own
    for (shape, _), (m, flops, rate) in zip(itertools.product(COVERAGE_SHAPES, COVERAGE_TOKENS), measured):
        cal = device.node_rate(m, flops)
        print(f"| {shape[0]} | {m} | {flops:.3g} | {rate / 1e9:.1f} | {cal / 1e9:.1f} | {rate / cal:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="measuring time per case (default 1)")
    args = ap.parse_args()
    if not args.seconds > 0:  # NaN too
        ap.error(f"--seconds must be a number > 0, got {args.seconds}")
    import torch

    torch.set_num_threads(1)
    warm_against_cold(args.seconds)
    nodes_by_shape(args.seconds / 2)


if __name__ == "__main__":
    main()
