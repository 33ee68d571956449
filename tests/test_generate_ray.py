"""Generation on the Ray executor (cluster/decode.py) against the local executor, on the session's
Ray instance (tests/conftest.py): the same tokens and logits, the keys kept on the workers, a worker
killed mid-generation."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import emulate

ROOT = Path(__file__).resolve().parents[1]
EMULATE = [sys.executable, "-m", "emulate.cli"]
PROMPT = (np.arange(70) * 7) % 1024  # 70 tokens: at M = 16, four full blocks and a tail of 6
SHORT = {"max_new_tokens": 8, "block_size": 16, "dtype": "float64", "keep_logits": True}


def on_ray(placement="sequence", **kw) -> emulate.Ray:
    return emulate.Ray(workers=2, placement=placement, stall_timeout=120.0, **kw)


@pytest.mark.parametrize("model, placement", [("tiny-llama", "sequence"), ("tiny-llama", "layers"),
                                              ("tiny-mistral", "sequence")])
def test_greedy_tokens_and_logits_on_ray_are_the_local_executors_bit_for_bit(ray_cluster, model, placement):
    """The workers' pair calls read the very blocks the local run keeps (the prefill's bits are the
    same on every executor) and the driver merges their partials in block order as the local run
    does, so every logit is the same float64 number."""
    local = emulate.generate(model, PROMPT, **SHORT)
    ray = emulate.generate(model, PROMPT, executor=on_ray(placement), **SHORT)
    s = ray.stats
    assert ray.tokens == local.tokens
    assert torch.equal(ray.logits, local.logits)
    assert s["executor"] == "ray" and s["placement"] == placement and len(s["ray_workers"]) == 2
    assert s["kv_bytes"] == local.stats["kv_bytes"] == sum(s["kv_bytes_per_worker"])
    assert all(b > 0 for b in s["kv_bytes_per_worker"])  # each worker keeps the blocks it projected
    assert s["decode_attention_calls"] == local.stats["decode_attention_calls"] > 0  # counted on the workers
    assert s["max_call_tokens"] <= 16 and s["kv_rebuilds"] == 0


def test_grid_and_auto_placements_generate_the_local_tokens_through_the_keyword_api(ray_cluster):
    """emulate.generate takes the Ray options emulate.run takes (cpus_per_worker, placement, grid):
    on a 2x2 grid each worker keeps the blocks its row's layers projected, and the logits are the
    local run's; auto runs whichever placement the planner names."""
    local = emulate.generate("tiny-llama", PROMPT, **SHORT)
    for placement, grid in (("grid", "2x2"), ("auto", None)):
        g = emulate.generate("tiny-llama", PROMPT, executor="ray", address=ray_cluster, workers=4,
                             cpus_per_worker=0.5, placement=placement, grid=grid, stall_timeout=120.0, **SHORT)
        assert g.tokens == local.tokens and torch.equal(g.logits, local.logits), placement
        assert len(g.stats["kv_bytes_per_worker"]) == 4
        assert sum(g.stats["kv_bytes_per_worker"]) == local.stats["kv_bytes"]
        if placement == "grid":
            assert g.stats["placement"] == "grid" and all(b > 0 for b in g.stats["kv_bytes_per_worker"])


def test_seeded_sampling_draws_the_same_tokens_on_both_executors(ray_cluster):
    sampled = dict(SHORT, temperature=0.9, top_p=0.95, seed=11)
    local = emulate.generate("tiny-llama", PROMPT, **sampled)
    ray = emulate.generate("tiny-llama", PROMPT, executor=on_ray(), **sampled)
    assert ray.tokens == local.tokens and torch.equal(ray.logits, local.logits)
    assert local.tokens != emulate.generate("tiny-llama", PROMPT, **dict(sampled, seed=12)).tokens


def test_a_worker_killed_mid_generation_loses_its_blocks_and_the_tokens_go_on_the_same(ray_cluster):
    """SIGKILL a worker after the third token: Ray restarts it empty, its next call answers that
    the blocks are gone, the prefill runs again on the same workers and the steps so far are
    replayed; the tokens and every logit after are the uninterrupted run's."""
    options = dict(SHORT, max_new_tokens=10)
    local = emulate.generate("tiny-llama", PROMPT, **options)
    stream = emulate.generate_iter("tiny-llama", PROMPT, executor=on_ray(), **options)
    killed = []
    for token in stream:
        if token.index == 3 and not killed:
            killed.append(stream.partial.stats["ray_workers"][0]["pid"])
            os.kill(killed[0], signal.SIGKILL)
    g = stream.result
    assert killed and g.tokens == local.tokens and torch.equal(g.logits, local.logits)
    assert g.stats["kv_rebuilds"] == 1 and g.stats["decode_steps_replayed"] == 3
    assert g.stats["kv_bytes"] == local.stats["kv_bytes"] == sum(g.stats["kv_bytes_per_worker"])


class KillsAWorkerAtTheLastBlock:
    """The Ray executor, with worker 0 SIGKILLed as the prefill's last block comes out: every task
    has run, so nothing in the prefill makes the dead worker's keys again."""

    name = "ray"
    keeps_kv = True

    def __init__(self):
        self.ray, self.killed = on_ray(), []

    def start(self, job, progress=None):
        inner = self.ray.start(job, progress)

        def blocks():
            for block, out in inner:
                if block == job.compact.blocks - 1:
                    self.killed.append(inner.figures["ray_workers"][0]["pid"])
                    os.kill(self.killed[0], signal.SIGKILL)
                yield block, out
            outer.kv = inner.kv  # the workers' store, handed over once the prefill ended

        outer = emulate.Execution(blocks(), inner.figures, inner.counts)
        return outer


def test_blocks_lost_during_the_prefill_are_made_again_before_the_first_step(ray_cluster):
    prompt = (np.arange(200) * 7) % 1024
    local = emulate.generate("tiny-llama", prompt, **SHORT)
    executor = KillsAWorkerAtTheLastBlock()
    g = emulate.generate("tiny-llama", prompt, executor=executor, **SHORT)
    assert executor.killed and g.tokens == local.tokens and torch.equal(g.logits, local.logits)
    assert g.stats["kv_rebuilds"] == 1 and g.stats["decode_steps_replayed"] == 0
    assert g.stats["kv_bytes"] == local.stats["kv_bytes"]


def test_cli_generate_on_ray_reports_the_kv_bytes_each_worker_holds(ray_cluster, tmp_path):
    prompt = tmp_path / "prompt.npy"
    np.save(prompt, PROMPT.astype(np.int64))
    common = ["generate", "--model", "tiny-llama", "--input", str(prompt), "-M", "16", "--max-new-tokens", "6",
              "--dtype", "float64", "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_ADDRESS="")

    def child(*extra):
        done = subprocess.run(EMULATE + common + list(extra), check=False, capture_output=True, text=True, cwd=ROOT,
                              env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    ray = child("--executor", "ray", "--address", ray_cluster, "--workers", "2")
    local = child()
    assert ray["executor"] == "ray" and local["executor"] == "local"
    assert len(ray["kv_bytes_per_worker"]) == 2 and all(b > 0 for b in ray["kv_bytes_per_worker"])
    assert sum(ray["kv_bytes_per_worker"]) == ray["kv_bytes"] == local["kv_bytes"]
    assert ray["tokens"] == local["tokens"]


def test_ray_options_on_a_local_generation_are_one_line(tmp_path):
    done = subprocess.run(EMULATE + ["generate", "--model", "tiny-llama", "--text", "abc", "--workers", "2"],
                          check=False, capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("emulate: ") and "--executor ray" in lines[0]
