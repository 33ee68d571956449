"""`emulate.stream` on the local executor: memory follows the live set, never an N x N matrix.

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
import emulate
from emulate.runtime.memory import peak_rss_mb
from emulate.models.presets import PRESETS, weight_names

N, M, r = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
# a narrow one-layer llama: the block structure of tiny-llama at a width that runs in seconds
config = dataclasses.replace(PRESETS["tiny-llama"], name="narrow-llama", vocab=256, width=64, layers=1, heads=2,
                             kv_heads=1, head_dim=32, mlp_width=128, windows=(None,))
gen = torch.Generator().manual_seed(0)
weights = {k: torch.randn(s, generator=gen, dtype=torch.float64) / s[-1] ** 0.5 for k, s in weight_names(config).items()}
model = emulate.Model(config, weights)
model.transformer(torch.float32)  # built (and kept by the Model) before `before`, as the weights are
tokens = torch.randint(0, config.vocab, (N,), generator=gen)
stream = emulate.stream(model, tokens, block_size=M, attention="sliding", window=r)  # compiles the graph
before = peak_rss_mb()
t0 = time.perf_counter()
rows, finite, blocks = 0, True, []
for block, out in stream:
    blocks.append(block)
    rows += out.hidden.shape[0]
    finite = finite and bool(torch.isfinite(out.hidden).all()) and bool(torch.isfinite(out.logprobs).all())
peak = peak_rss_mb()
print(json.dumps({"rows": rows, "finite": finite, "in_order": blocks == list(range(len(blocks))),
                  "before_mb": before, "peak_mb": peak, "forward_s": time.perf_counter() - t0,
                  "nodes": stream.graph.number_of_nodes(), "max_call_tokens": stream.stats["max_call_tokens"]}))
"""


def run_child(*args: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True,
                         timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def at_32k() -> dict:
    """One child forward at N = 32768, M = 512, r = 128, shared by the tests below."""
    return run_child(N, 512, 128)


def test_sliding_forward_at_32k_tokens_never_holds_an_n_by_n_matrix(at_32k):
    stats = at_32k
    assert stats["rows"] == N and stats["finite"] and stats["in_order"] and stats["max_call_tokens"] <= 512
    # the whole process, weights, torch and all, stays under a tenth of one N x N float32 matrix
    assert stats["peak_mb"] < NxN_FLOAT32_MB / 10, stats
    # and the forward itself adds little over what the process held before it started
    assert stats["peak_mb"] - stats["before_mb"] < NxN_FLOAT32_MB / 20, stats


def test_stream_memory_does_not_grow_with_n(at_32k):
    """Four times the tokens, the same live set: a sliding forward's added memory is flat in N.

    The forward's added memory is peak - before (the graph is compiled and the weights built before
    `before`): a window of blocks' live values plus torch's first-use buffers, the same at any N
    (about 16-18 MiB at both sizes here, run to run). Memory that grows with N would make it grow
    4x from 8192 to 32768 tokens if linear, 16x if quadratic. The bound, 1.5x the small run's
    figure plus 4 MiB, leaves about 10 MiB over the measured flat figure (the spread between runs
    is about 2 MiB) yet fails a stream that merely kept every BlockOutput (measured: 22 MiB added
    at 8192, 45 at 32768), and by far one that kept the graph's values or anything N x N.
    """
    small, large = run_child(N // 4, 512, 128), at_32k
    assert small["rows"] == N // 4 and small["finite"] and small["in_order"]
    added_small = small["peak_mb"] - small["before_mb"]
    added_large = large["peak_mb"] - large["before_mb"]
    assert added_large < 1.5 * added_small + 4, (small, large)


@pytest.mark.slow
def test_cli_reports_a_small_peak_for_a_32k_sliding_run():
    """The preset model through the CLI (about a minute here): the summary's peak_rss_mb stays small."""
    out = subprocess.run([str(Path(sys.executable).with_name("emulate")), "run", "--random-tokens", str(N),
                          "--attention", "sliding", "--window", "128", "--block-size", "512", "--json"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["tokens"] == N and summary["max_call_tokens"] <= 512
    assert summary["peak_rss_mb"] < NxN_FLOAT32_MB / 5
