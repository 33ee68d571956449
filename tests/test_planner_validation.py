"""The planner's validation set (benchmarks/plan_validation.py) covers what docs/planner.md says it
does, and no row is a problem the planner's Ray constants were measured on (benchmarks/ray_overheads.py)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_rows_cover_patterns_sizes_and_executors():
    rows = load("plan_validation").ROWS
    assert len(rows) >= 12
    assert {p["attention"] for *_, p, _ in rows} == {"full", "causal", "sliding", "sink"}
    assert min(n for _, n, *_ in rows) == 4096 and max(n for _, n, *_ in rows) == 262144
    assert {ex for *_, ex in rows} == {"local", "local1", "ray1", "ray2"}


def test_no_row_is_a_problem_the_ray_constants_were_measured_on():
    rows = {(m, n, b, tuple(sorted(p.items()))) for m, n, b, p, _ in load("plan_validation").ROWS}
    measured = {(m, n, b, tuple(sorted(p.items()))) for m, n, b, p in load("ray_overheads").CASES}
    assert measured and not rows & measured
