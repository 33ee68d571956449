"""The local executor's memory follows the live set: it never holds an N x N matrix.

At N = 32768 an N x N float32 matrix is 4.3 GB (and one per head far more). The forward runs in a
child process so its peak RSS is its own: VmHWM, which exec resets, unlike ru_maxrss, which would
carry the test runner's own high-water mark into the child.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
N = 32768
NxN_FLOAT32_MB = N * N * 4 / 2**20  # 4096 MiB

CHILD = r"""
import dataclasses, json, sys, time
import torch
torch.set_num_threads(1)
from emulate.executor import run_local
from emulate.memory import peak_rss_mb
from emulate.forward import compile_forward, new_model, resolve_patterns
from emulate.ops import NodeRunner
from emulate.presets import PRESETS, weight_names

N, M, r = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
# a narrow one-layer llama: the block structure of tiny-llama at a width that runs in seconds
config = dataclasses.replace(PRESETS["tiny-llama"], name="narrow-llama", vocab=256, width=64, layers=1, heads=2,
                             kv_heads=1, head_dim=32, mlp_width=128, windows=(None,))
gen = torch.Generator().manual_seed(0)
weights = {k: torch.randn(s, generator=gen, dtype=torch.float64) / s[-1] ** 0.5 for k, s in weight_names(config).items()}
model = new_model(config, weights, torch.float32, "cpu")
tokens = torch.randint(0, config.vocab, (N,), generator=gen)
g = compile_forward(config, N, M, resolve_patterns(config, "sliding", window=r), torch.float32)
before = peak_rss_mb()
t0 = time.perf_counter()
rows, finite = 0, True
for block, value in run_local(g, NodeRunner(model, tokens, g.graph)):
    rows += value["hidden"].shape[0]
    finite = finite and bool(torch.isfinite(value["hidden"]).all())
peak = peak_rss_mb()
print(json.dumps({"rows": rows, "finite": finite, "before_mb": before, "peak_mb": peak,
                  "forward_s": time.perf_counter() - t0, "nodes": g.number_of_nodes()}))
"""


def run_child(*args: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True,
                         timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_sliding_forward_at_32k_tokens_never_holds_an_n_by_n_matrix():
    stats = run_child(N, 512, 128)
    assert stats["rows"] == N and stats["finite"]
    # the whole process, weights, torch and all, stays under a tenth of one N x N float32 matrix
    assert stats["peak_mb"] < NxN_FLOAT32_MB / 10, stats
    # and the forward itself adds little over what the process held before it started
    assert stats["peak_mb"] - stats["before_mb"] < NxN_FLOAT32_MB / 20, stats


@pytest.mark.slow
def test_cli_reports_a_small_peak_for_a_32k_sliding_run():
    """The preset model through the CLI (about a minute here): the summary's peak_rss_mb stays small."""
    out = subprocess.run([str(ROOT / ".venv/bin/emulate"), "run", "--random-tokens", str(N), "--attention", "sliding",
                          "--window", "128", "--block-size", "512", "--json"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["tokens"] == N and summary["max_call_tokens"] <= 512
    assert summary["peak_rss_mb"] < NxN_FLOAT32_MB / 5
