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

from emulate.executor import run_local
from emulate.forward import Collected, compile_forward, new_model, resolve_patterns, row_errors
from emulate.io import random_tokens
from emulate.ops import NodeRunner
from emulate.paper.oracle import PaperOracle
from emulate.presets import preset
from emulate.reference import reference_attention, reference_forward

CASES = [  # (pattern label, preset, attention, window, sinks)
    ("full", "tiny-bert", "full", None, None),
    ("causal", "tiny-llama", "causal", None, None),
    ("sliding r=48", "tiny-llama", "sliding", 48, None),
    ("sink s=4 r=48", "tiny-llama", "sink", 48, 4),
]
ORACLES = ("kernel", "paper", "paper-stable", "paper-rawexp")


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


def run_case(config, weights, tokens, block, patterns, dtype, oracle_kind):
    model = new_model(config, weights, dtype, "cpu")
    g = compile_forward(config, tokens.shape[0], block, patterns, dtype)
    oracle = None
    if oracle_kind != "kernel":
        oracle = PaperOracle(block, stable=oracle_kind == "paper-stable", literal_exp=oracle_kind == "paper-rawexp")
    got = Collected()
    for _, value in run_local(g, NodeRunner(model, tokens, g.graph, oracle=oracle)):
        got.add(value)
    with torch.no_grad():
        ref = reference_forward(model, tokens, patterns)
    return row_errors(got.result()["hidden"], ref["hidden"])[1]


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
        config, weights = preset(name)
        tokens = torch.from_numpy(random_tokens(args.tokens, config.vocab, 0).astype("int64"))
        patterns = resolve_patterns(config, attention, window, sinks)
        for f in factors:
            w = scaled_weights(weights, config.layers, f)
            with torch.no_grad():
                top_score, top_lse = score_stats(new_model(config, w, torch.float64, "cpu"), tokens, patterns)
            for dtype in (torch.float64, torch.float32):
                errs = [run_case(config, w, tokens, args.block, patterns, dtype, o) for o in ORACLES]
                print(f"| {label} | {f:g} | {top_score:.1f} | {top_lse:.1f} | {str(dtype)[6:]} | "
                      + " | ".join(fmt(e) for e in errs) + " |", flush=True)


if __name__ == "__main__":
    main()
