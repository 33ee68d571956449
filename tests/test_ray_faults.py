"""Faults on a multi-node Ray cluster (ray.cluster_utils.Cluster: 3 nodes on this machine), and jobs.

Each scenario runs in a child process: a process joins one Ray cluster at a time, and the
session's shared instance (tests/test_ray.py) stays untouched. Forwards run through the public
API (`emulate.stream` with `executor=emulate.Ray(...)`).
"""
from __future__ import annotations

import json
import os
import subprocess
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMULATE = [sys.executable, "-m", "emulate.cli"]


def scenario(name: str, timeout: int = 420) -> dict:
    done = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_removing_a_worker_node_mid_run_gives_the_same_bits():
    result = scenario("node-kill")
    assert result["removed_node_hosted"] >= 1
    assert result["same_bits"], result
    assert result["worker_processes"] > result["workers"]
    assert result["recoveries"] >= 1  # the removed worker's held values were made again from lineage


@pytest.mark.slow
def test_cluster_gone_fails_within_bounded_time():
    result = scenario("all-nodes-gone")
    assert result["failed"] and result["seconds"] < 150, result
    assert "worker" in result["message"], result


@pytest.mark.slow
def test_four_jobs_at_once_on_one_cluster():
    """`emulate cluster up`, four `emulate submit` at once, each verified, then `emulate cluster down`."""
    state = tempfile.mkdtemp(prefix="emc-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    env = dict(os.environ, EMULATE_CLUSTER_DIR=state)
    env.pop("RAY_ADDRESS", None)
    try:  # `down` runs even when `up` fails part way: no node is left running
        up = subprocess.run(EMULATE + ["cluster", "up", "--worker-nodes", "2", "--cpus-per-node", "2", "--port", "6392",
                                       "--dashboard-port", "8292"], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=300)
        assert up.returncode == 0, up.stderr

        def submit(seed):
            return subprocess.run(EMULATE + ["submit", "--address", "http://127.0.0.1:8292", "--", "run",
                                             "--random-tokens", "1024", "-M", "128", "--seed", str(seed), "--workers", "1",
                                             "--verify", "--json"], capture_output=True, text=True, env=env, cwd=ROOT,
                                  timeout=600)

        with ThreadPoolExecutor(4) as pool:
            runs = list(pool.map(submit, range(4)))
        for r in runs:
            assert r.returncode == 0, r.stderr[-2000:]
            summary = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("{")))
            assert summary["executor"] == "ray" and summary["max_rel_err"] <= 2e-5
    finally:
        down = subprocess.run(EMULATE + ["cluster", "down"], capture_output=True, text=True, env=env, cwd=ROOT,
                              timeout=120)
        shutil.rmtree(state, ignore_errors=True)
        assert down.returncode == 0, down.stderr


# -- the scenarios, run in a child process --------------------------------------------------------

def _forward(executor, on_block=None):
    """One 2048-token causal forward through `emulate.stream` on `executor`: (hidden, stats)."""
    import torch

    import emulate

    stream = emulate.stream("tiny-llama", random_tokens=2048, block_size=128, executor=executor)
    hidden = []
    for b, out in stream:
        hidden.append(out.hidden)
        if on_block is not None:
            on_block(b)
    return torch.cat(hidden), stream.stats


def _node_kill() -> dict:
    import ray
    import torch
    from conftest import Watched
    from ray._private import state
    from ray.cluster_utils import Cluster

    import emulate

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace="emulate", log_to_driver=False)
        clean, _ = _forward(emulate.Ray(workers=2, stall_timeout=120.0))
        watched = Watched(emulate.Ray(workers=2, stall_timeout=120.0))
        removed = {"hosted": 0}

        def node_of(name: str) -> str:
            return state.actors(ray.get_actor(name, namespace="emulate")._actor_id.hex())["Address"]["NodeID"]

        def remove_a_node(block):
            if block != 0:
                return
            names = [w["name"] for w in watched.execution.figures["ray_workers"]]
            node_id = node_of(names[-1])  # the last worker holds the heavy late rows
            for node in workers:
                if node.node_id == node_id:
                    removed["hosted"] = sum(node_of(name) == node_id for name in names)
                    cluster.remove_node(node)

        faulty, stats = _forward(watched, remove_a_node)
        return {"same_bits": bool(torch.equal(clean, faulty)), "removed_node_hosted": removed["hosted"],
                "workers": stats["workers"], "worker_processes": stats["worker_processes"],
                "recoveries": stats["recoveries"], "tasks_rerun": stats["tasks_rerun"]}
    finally:
        ray.shutdown()
        cluster.shutdown()


def _all_nodes_gone() -> dict:
    import ray
    from ray.cluster_utils import Cluster

    import emulate

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace="emulate", log_to_driver=False)
        start = [0.0]

        def remove_all(block):
            if block == 0:
                start[0] = time.monotonic()
                for node in workers:
                    cluster.remove_node(node)

        try:
            _forward(emulate.Ray(workers=2, stall_timeout=60.0), remove_all)
        except emulate.EmulateError as err:
            return {"failed": True, "message": str(err), "seconds": time.monotonic() - start[0]}
        return {"failed": False, "message": "", "seconds": time.monotonic() - start[0]}
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":  # python tests/test_ray_faults.py SCENARIO: tests/ is on sys.path, so conftest imports
    out = {"node-kill": _node_kill, "all-nodes-gone": _all_nodes_gone}[sys.argv[1]]()
    print(json.dumps(out))
