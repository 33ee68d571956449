"""Attention calls per pattern, counted by `emulate run` itself, beside the DESIGN.md bound.

Each row is a real, verified run of the CLI (`emulate run --json --verify`); the counts are the
nodes the executor ran, and max_rel_err is that run's error against the monolithic forward.

    .venv/bin/python benchmarks/call_counts.py
"""
from __future__ import annotations

import contextlib
import io
import json

from emulate.cli import main as emulate

RUNS = [
    ("tiny-bert", "full", []),
    ("tiny-llama", "causal", []),
    ("tiny-llama", "sliding", ["--window", "512"]),
    ("tiny-llama", "sink", ["--window", "512", "--sinks", "4"]),
    ("tiny-bert", "sampled", []),
]


def run(model: str, attention: str, extra: list[str], tokens: int, block: int) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = emulate(["run", "--model", model, "--attention", attention, *extra, "--random-tokens", str(tokens),
                        "--block-size", str(block), "--verify", "--json"])
    if code:
        raise SystemExit(f"emulate run failed for {model} {attention}")
    return json.loads(out.getvalue())


def main() -> None:
    block = 256
    print(f"M = {block}, 4 layers, float32; calls summed over layers / per layer\n")
    print("| pattern | N | B | attention calls per layer | DESIGN.md bound per layer | graph depth | max_rel_err |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for model, attention, extra in RUNS:
        for tokens in (2048, 4096, 8192):
            s = run(model, attention, extra, tokens, block)
            per_layer = s["attention_calls_per_layer"][0]
            bound = s["attention_calls_bound"] // s["layers"]
            name = attention + (f" r={s['window']}" if s["window"] else "") + (f" s={s['sinks']}" if s["sinks"] else "")
            print(f"| {name} | {tokens} | {s['blocks']} | {per_layer} | {bound} | {s['graph_depth']} | "
                  f"{s['max_rel_err']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
