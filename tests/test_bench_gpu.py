"""benchmarks/bench_gpu.py (`make bench-gpu`) on a machine without a GPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"


def bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device: bench-gpu would run")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_0():
    out = bench()
    assert out.returncode == 0
    assert out.stdout == ""
    line = f"bench-gpu: skipped: torch {torch.__version__} sees no CUDA device on this machine"
    assert out.stderr.splitlines() == [line]


def test_the_script_runs_its_table_on_cpu():
    """--device cpu: the same code path at a small size, so the GPU run does not find the script's own bugs."""
    out = bench("--device", "cpu", "--tokens", "512", "--block-size", "128", "--window", "128")
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 512 |")]
    assert len(rows) == 2 and all(row.endswith("| yes |") for row in rows)
    assert "goal: emulate's forward <= 1.15x the monolithic SDPA forward at 131072 tokens, exact causal: " \
           "not measured" in out.stdout
