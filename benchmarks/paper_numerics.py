"""Where the paper's constructions stop being exact: error against score scale, dtype and oracle.

The presets' query weights are multiplied by a factor f, so every attention score grows by f. Each
cell is one emulated forward on the same graph (N = 256, M = 64, 4 layers, 8 heads), its max_rel_err
against the monolithic reference of the same scaled model. Oracles:
    kernel        block attention returning (output, lse): the production path
    paper         Lemma 3.1 / Claim B.6 / Thm 3.5 / 5.1 / Sec. 5 literally: A = p / (1 - p)
    paper-stable  the same calls, the A call's scores shifted by a norm bound (p <= 1/2)
    paper-rawexp  paper, with the small transformer's softmax computed as raw exp sums (Def 2.1)
`max score` and `max lse` are read off the reference: the largest scaled score q.k/sqrt(d) and the
largest log A = log sum_j exp(score) over all layers, heads and rows.

    .venv/bin/python benchmarks/paper_numerics.py [--factors 1,2,4,8,16] [--tokens 256] [--block 64]
"""
from __future__ import annotations

import argparse
import math

import torch

import emulate
from emulate.models.reference import reference_attention

CASES = [  # (pattern label, preset, attention, window, sinks)
    ("full", "tiny-bert", "full", None, None),
    ("causal", "tiny-llama", "causal", None, None),
    ("sliding r=48", "tiny-llama", "sliding", 48, None),
    ("sink s=4 r=48", "tiny-llama", "sink", 48, 4),
]
ORACLES = {"kernel": "kernel", "paper": emulate.PaperOracle(), "paper-stable": emulate.PaperOracle(stable=True),
           "paper-rawexp": emulate.PaperOracle(literal_exp=True)}


def scaled_weights(weights: dict, layers: int, factor: float) -> dict:
    """Every score q.k grows by `factor`: scale each layer's query projection (weight and bias)."""
    w = dict(weights)
    for layer in range(layers):
        for name in (f"layers.{layer}.q.weight", f"layers.{layer}.q.bias"):
            if name in w:
                w[name] = w[name] * factor
    return w


def score_stats(model, tokens, patterns) -> tuple[float, float]:
    """(max scaled score, max log A) over layers, heads and rows of the monolithic forward."""
    pos = torch.arange(tokens.shape[0])
    x = model.embed(tokens, pos)
    top_score, top_lse = -math.inf, -math.inf
    for layer, pattern in enumerate(patterns):
        q, k, v = model.project(layer, x, pos)
        k_full = k.repeat_interleave(q.shape[0] // k.shape[0], 0)
        s = (q @ k_full.transpose(-1, -2)) * model.scale
        seen = torch.from_numpy(pattern.visible(pos.numpy(), pos.numpy()))
        s = s.masked_fill(~seen, -math.inf)
        top_score = max(top_score, float(s.max()))
        top_lse = max(top_lse, float(torch.logsumexp(s, -1).max()))
        x = model.mix(layer, x, reference_attention(q, k, v, model.scale, pattern))
    return top_score, top_lse


def run_case(model: emulate.Model, tokens, block, patterns, dtype, oracle) -> float:
    """One emulated forward's max_rel_err against the monolithic forward of the same model (verify)."""
    run = emulate.run(model, tokens, block_size=block, attention=list(patterns), dtype=dtype, oracle=oracle,
                      verify=True, collect=False)
    return run.stats["max_rel_err"]


def fmt(err: float) -> str:
    return "nan" if math.isnan(err) else ("inf" if math.isinf(err) else f"{err:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--factors", default="1,2,4,8,16")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--cases", default=",".join(c[0].split()[0] for c in CASES))
    args = ap.parse_args()
    torch.set_num_threads(1)
    factors = [float(f) for f in args.factors.split(",")]
    wanted = set(args.cases.split(","))
    print(f"N = {args.tokens}, M = {args.block}; max_rel_err against the monolithic reference of the same scaled model\n")
    print("| pattern | f | max score | max lse | dtype | " + " | ".join(ORACLES) + " |")
    print("| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in ORACLES) + " |")
    for label, name, attention, window, sinks in CASES:
        if label.split()[0] not in wanted:
            continue
        base = emulate.load(name)
        # the seeded random ids of `emulate run --random-tokens N` and the mask of each layer
        problem = emulate.prepare(base, random_tokens=args.tokens, attention=attention, window=window, sinks=sinks)
        tokens, patterns = torch.from_numpy(problem.tokens), problem.patterns
        for f in factors:
            model = emulate.Model(base.config, scaled_weights(base.weights, base.config.layers, f))
            with torch.no_grad():
                top_score, top_lse = score_stats(model.transformer(torch.float64), tokens, patterns)
            for dtype in ("float64", "float32"):
                errs = [run_case(model, tokens, args.block, patterns, dtype, o) for o in ORACLES.values()]
                print(f"| {label} | {f:g} | {top_score:.1f} | {top_lse:.1f} | {dtype} | "
                      + " | ".join(fmt(e) for e in errs) + " |", flush=True)


if __name__ == "__main__":
    main()
