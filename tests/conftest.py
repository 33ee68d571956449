"""Shared fixtures: seeded presets, and helpers that run a forward both ways."""
from __future__ import annotations

import pytest
import torch

from emulate.executor import run_local
from emulate.forward import Collected, compile_forward, new_model, row_errors
from emulate.ops import NodeRunner
from emulate.presets import preset
from emulate.reference import reference_forward

torch.set_num_threads(2)


def emulate_and_reference(config, weights, tokens, block_size, patterns, dtype, seed=0):
    """(emulated outputs, reference outputs, graph) for one forward on the local executor."""
    model = new_model(config, weights, dtype, "cpu")
    g = compile_forward(config, tokens.shape[0], block_size, patterns, dtype, seed)
    got = Collected()
    for _, value in run_local(g, NodeRunner(model, tokens, g.graph)):
        got.add(value)
    with torch.no_grad():
        ref = reference_forward(model, tokens, patterns)
    return got.result(), ref, g


# the worst max_rel_err per (model, pattern, compared with, dtype), printed after the run: the README's error table
MEASURED: dict[tuple[str, str, str, str], float] = {}


def record_error(model: str, patterns, against: str, dtype: torch.dtype, rel: float) -> None:
    """Keep the worst error a test measured; `patterns` is one Pattern or a list (one per layer)."""
    kinds = sorted({p.kind for p in (patterns if isinstance(patterns, (list, tuple)) else [patterns])})
    key = (model, " + ".join(kinds), against, str(dtype).removeprefix("torch."))
    MEASURED[key] = max(MEASURED.get(key, 0.0), rel)


def pytest_terminal_summary(terminalreporter):
    if not MEASURED:
        return
    terminalreporter.section("max_rel_err measured by these tests (worst case over sizes and variants)")
    terminalreporter.write_line("| model | attention | compared with | float32 | float64 |")
    terminalreporter.write_line("| --- | --- | --- | --- | --- |")
    cell = lambda err: "" if err is None else f"{err:.1e}" if err else "0"  # noqa: E731
    for row in sorted({k[:3] for k in MEASURED}):
        cells = [cell(MEASURED.get((*row, d))) for d in ("float32", "float64")]
        terminalreporter.write_line(f"| {' | '.join(row)} | {' | '.join(cells)} |")


@pytest.fixture(scope="session")
def presets():
    return {name: preset(name) for name in ("tiny-llama", "tiny-mistral", "tiny-bert")}


__all__ = ["emulate_and_reference", "record_error", "row_errors"]
