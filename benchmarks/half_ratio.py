"""How the 16-bit contract's error ratio (docs/numerics.md) spreads over seeds, for a correct run and a broken merge.

For each model, dtype and seed the float64 and the same-dtype monolithic forwards are run once
(`emulate.run(..., verify=True)`, M = 64, their tensors kept from `compare_half`); then the
emulated forward is run again at each M and each merge:

    correct    the float32 merge the package ships (emulate/runtime/merge.py)
    rounded    each partial rounded to the run's dtype before it merges (a merge that adds in 16 bits)
    bf16       each partial rounded to bfloat16 before it merges (a bfloat16 merge inside a float16 run)

and four candidate ratios are formed against the monolithic 16-bit forward's error: the max over rows
of the per-row relative error, the mean and the root-mean-square over rows of it, and the norm-wise
relative error ||Y - T||_F / ||T||_F (`emulate/runtime/verify.py`). Prints, per model, dtype, M and
merge, the min / median / max of each ratio over the seeds, then the same pooled per merge with the
share of runs whose ratio is above HALF_RATIO (a failed verify); every figure is measured in this run.
tiny-mistral's window (512) is longer than the default 300 ids: give it --tokens 700 to see it slide.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/half_ratio.py --seeds 20
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/half_ratio.py --seeds 5 --models mistral --dtypes bfloat16
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import emulate
from emulate.runtime import loop, runner
from emulate.runtime.merge import merge
from emulate.runtime.verify import HALF_RATIO

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
ATTENTION = importlib.import_module("emulate.hf.attention")  # emulate.hf re-exports a function of that name
HF_FAMILIES = ("llama", "mistral", "qwen2")
STATISTICS = ("max", "mean", "rms", "normwise")


def row_relative(hidden: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    diff = hidden.double() - reference.double()
    return diff.norm(dim=1) / reference.double().norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)


def errors(hidden: torch.Tensor, reference: torch.Tensor) -> dict:
    rel = row_relative(hidden, reference)
    diff = hidden.double() - reference.double()
    return {"max": float(rel.max()), "mean": float(rel.mean()), "rms": float(rel.square().mean().sqrt()),
            "normwise": float(diff.norm() / reference.double().norm())}


def references(model, backend: str, dtype: str, seed: int, tokens: int):
    """(float64 hidden, same-dtype hidden) of the monolithic forwards, kept from the verify of one run."""
    kept = {}
    real = loop.compare_half

    def keep(hidden, logprobs, exact_hidden, exact_logprobs, same_hidden, same_logprobs, ratio=None):
        kept["exact"], kept["same"] = exact_hidden.clone(), same_hidden.clone()
        return real(hidden, logprobs, exact_hidden, exact_logprobs, same_hidden, same_logprobs, ratio)

    loop.compare_half = keep
    try:
        emulate.run(model, random_tokens=tokens, seed=seed, block_size=64, backend=backend, dtype=dtype, verify=True)
    finally:
        loop.compare_half = real
    return kept["exact"], kept["same"]


def emulated(model, backend: str, dtype: str, seed: int, tokens: int, block_size: int, rounding) -> torch.Tensor:
    """The emulated forward's hidden states, its partials rounded to `rounding` before they merge (None: not)."""
    target = ATTENTION if backend == "transformers" else runner

    def rounded_merge(partials):
        return merge([(o.to(rounding), lse.to(rounding)) for o, lse in partials])

    real = target.merge
    if rounding is not None:
        target.merge = rounded_merge
    try:
        return emulate.run(model, random_tokens=tokens, seed=seed, block_size=block_size, backend=backend,
                           dtype=dtype).hidden
    finally:
        target.merge = real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    ap.add_argument("--models", nargs="+", default=[*HF_FAMILIES, "tiny-llama", "tiny-mistral"],
                    help="tests/hf_models.py families (transformers backend) or graph presets")
    args = ap.parse_args()
    from hf_models import checkpoint

    tmp = tempfile.mkdtemp(prefix="half-ratio-")
    rows = {}  # (model, dtype, M, merge) -> statistic -> [ratio per seed]
    for name in args.models:
        model, backend = (str(checkpoint(name, Path(tmp))[1]), "transformers") if name in HF_FAMILIES \
            else (name, "graph")
        for dtype in args.dtypes:
            half = getattr(torch, dtype)
            merges = {"correct": None, "rounded": half}
            if half == torch.float16:
                merges["bf16"] = torch.bfloat16
            for seed in range(args.seeds):
                exact, same = references(model, backend, dtype, seed, args.tokens)
                base = errors(same, exact)
                for m in args.block_sizes:
                    for label, rounding in merges.items():
                        got = errors(emulated(model, backend, dtype, seed, args.tokens, m, rounding), exact)
                        cell = rows.setdefault((name, dtype, m, label), {s: [] for s in STATISTICS})
                        for s in STATISTICS:
                            cell[s].append(got[s] / base[s])
            print(f"# {name} {dtype} done", file=sys.stderr, flush=True)

    def spread(values):
        return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"

    print(f"ratio to the monolithic 16-bit forward's error, min / median / max over {args.seeds} seeds, "
          f"{args.tokens} random ids\n")
    print("| model | dtype | M | merge | " + " | ".join(STATISTICS) + " |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in STATISTICS) + " |")
    for (name, dtype, m, label), cell in rows.items():
        print(f"| {name} | {dtype} | {m} | {label} | " + " | ".join(spread(cell[s]) for s in STATISTICS) + " |")
    print("\npooled over the models, per dtype, M and merge\n")
    print("| dtype | M | merge | runs | " + " | ".join(STATISTICS) + f" | above {HALF_RATIO:g}: "
          + ", ".join(STATISTICS) + " |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in STATISTICS) + " | --- |")
    pooled = {}
    for (name, dtype, m, label), cell in rows.items():
        p = pooled.setdefault((dtype, m, label), {s: [] for s in STATISTICS})
        for s in STATISTICS:
            p[s] += cell[s]
    for (dtype, m, label), cell in sorted(pooled.items()):
        above = ", ".join(f"{sum(r > HALF_RATIO for r in cell[s]) / len(cell[s]):.0%}" for s in STATISTICS)
        print(f"| {dtype} | {m} | {label} | {len(cell['max'])} | " + " | ".join(spread(cell[s]) for s in STATISTICS)
              + f" | {above} |")


if __name__ == "__main__":
    main()
