"""The Ray executor against a real local Ray instance (one per test run) and the physical plan.

Plan tests run the plan in-process (no Ray) and must reproduce the local executor's bits;
executor tests run forwards through the public API (`emulate.run` / `emulate.stream` with
`executor=emulate.Ray(...)`) on one shared Ray instance with a fixed CPU count (session fixture).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import Watched, crash_mid_work, record_error

import emulate
from graphs.plan import CALL_TASKS, TaskKind, calls, make_plan, slice_size
from cluster.worker import run_task
from emulate import EmulateError
from emulate.runtime.verify import row_errors
from emulate.runtime.merge import TreeMerge, merge
from emulate.runtime.runner import NodeRunner

ROOT = Path(__file__).resolve().parents[1]
EMULATE = [sys.executable, "-m", "emulate.cli"]


def problem(name="tiny-llama", attention="auto", window=None, sinks=None, tokens=1024, block=128,
            dtype="float32") -> emulate.Problem:
    """One forward resolved by the API: the preset, `tokens` seeded random ids (seed 0) and the masks."""
    return emulate.prepare(name, random_tokens=tokens, block_size=block, attention=attention, window=window,
                           sinks=sinks, dtype=dtype)


def options(p: emulate.Problem, executor) -> dict:
    """The API keywords that run problem `p` on `executor`."""
    return dict(block_size=p.block_size, attention=list(p.patterns), dtype=p.dtype, seed=p.seed, executor=executor)


def run(p: emulate.Problem, executor="local", **kw) -> emulate.Run:
    return emulate.run(p.model, p.tokens, **options(p, executor), **kw)


def on_ray(workers: int, **kw) -> emulate.Ray:
    """The Ray executor with `workers` actors, stopping within two minutes if nothing progresses."""
    return emulate.Ray(workers=workers, stall_timeout=kw.pop("stall_timeout", 120.0), **kw)


def inline_plan(plan, runner):
    """Run a plan's tasks in order in this process: the plan's arithmetic without Ray."""
    values, hidden = {}, {}
    for t in plan.tasks:
        out = run_task(runner, t, [values[k] for k in t.reads])
        values.update(zip(t.writes, out))
        if t.head:
            hidden[t.block] = out[0]["hidden"]
    return torch.cat([hidden[b] for b in sorted(hidden)])


def node_runner(p: emulate.Problem, g) -> NodeRunner:
    return NodeRunner(p.model.transformer(p.dtype), torch.from_numpy(p.tokens), g.graph, emulate.KernelOracle())


# -- the plan, without Ray ----------------------------------------------------------------------

@pytest.mark.parametrize("n", list(range(1, 34)))
def test_tree_merge_streams_the_same_bits_as_merge(n):
    gen = torch.Generator().manual_seed(n)
    partials = [(torch.randn(2, 5, 4, generator=gen), torch.randn(2, 5, generator=gen) * 3) for _ in range(n)]
    partials[0][1][0, 0] = float("-inf")  # an empty row must stay harmless
    fold = TreeMerge()
    for p in partials:
        fold.push(p)
    got, want = fold.result(), merge(partials)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for pieces in (2, 3, 5):  # aligned slices merged on top give the same tree
        size = slice_size(n, pieces)
        tops = [merge(partials[a:a + size]) for a in range(0, n, size)]
        top = merge(tops)
        assert torch.equal(top[0], want[0]) and torch.equal(top[1], want[1])


@pytest.mark.parametrize("case", [
    dict(name="tiny-llama"),
    dict(name="tiny-mistral", attention="sliding", window=200),
    dict(name="tiny-llama", attention="sink", window=150, sinks=4),
    dict(name="tiny-bert"),
    dict(name="tiny-bert", attention="sampled"),
])
def test_plan_reproduces_local_bits_for_any_worker_count(case):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        p = problem(tokens=700, block=96, **case)
        local = run(p)
        g, want = local.graph, local.hidden
        runner = node_runner(p, g)
        for workers, split in ((1, False), (2, False), (3, False), (16, None), (3, True)):
            plan = make_plan(g, workers, split)
            assert torch.equal(inline_plan(plan, runner), want), (workers, split)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("tokens, block", [(1, 128), (97, 128), (131, 7), (5, 1)])
def test_plan_edge_sizes(tokens, block):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the local executor's call workers run one torch thread each
    try:
        p = problem(tokens=tokens, block=block)
        local = run(p)
        runner = node_runner(p, local.graph)
        for workers in (1, 2, 5):
            assert torch.equal(inline_plan(make_plan(local.graph, workers), runner), local.hidden), workers
    finally:
        torch.set_num_threads(threads)


def test_a_task_run_again_strikes_off_no_reader_still_to_come():
    """A recovery re-runs finished producers (here block 1's start and its layer-0 row) on a
    worker that still holds their other inputs (block 0's keys and values, read by every later
    row): the re-run must not count as another of those readers, or the value would be freed
    before the last row reads it. The worker runs in-process, one worker, the routes the driver
    sends."""
    from graphs.plan import routes
    from cluster.worker import Worker, from_wire

    torch.set_num_threads(1)
    p = problem(tokens=700, block=96)
    local = run(p)
    plan = make_plan(local.compact, 1)
    worker = Worker(0, p.model.config, {}, "float32", "cpu", 1, emulate.KernelOracle())
    worker.runner, worker.tasks = node_runner(p, local.graph), plan.tasks
    row = next(t for t in plan.tasks if t.kind == TaskKind.ROW and t.layer == 0 and t.block == 1)
    start = next(t for t in plan.tasks if t.kind == TaskKind.START and t.block == 1)
    hidden = {}

    def submit(chosen, generation, stop=None):
        route = routes(plan, chosen)
        for t in chosen[:stop]:
            out = worker.run(generation, ((t.index, route[t.index]),), None)
            if t.head:
                hidden[t.block] = from_wire(out[0], copy=True)["hidden"]

    submit(plan.tasks, 1, stop=row.index + 1)  # the run, up to the row, when the loss is found
    submit([start, row] + plan.tasks[row.index + 1:], 2)  # what _Dispatch.recover submits
    assert torch.equal(torch.cat([hidden[b] for b in sorted(hidden)]), local.hidden)


def test_plan_covers_the_graph_once_in_topological_order():
    g = emulate.compile("tiny-llama", 1000, block_size=128)
    for workers in (1, 3, 20):
        plan = make_plan(g, workers)
        seen, written = [], set()
        for t in plan.tasks:
            assert all(k in written for k in t.reads), t.name
            written.update(t.writes)
            seen += t.logical_nodes()
            assert 0 <= t.worker < workers
        assert sorted(seen) == sorted(g.nodes)
        if workers > g.graph["blocks"]:
            assert plan.split_blocks > 0 and any(t.kind == TaskKind.SLICE for t in plan.tasks)
    plan = make_plan(g, 2)
    share = plan.describe()["flops_share_per_worker"]
    assert max(share) < 0.6  # a causal layer's heavy late rows are balanced by cost, not by count


@pytest.mark.parametrize("attention, window", [("causal", None), ("sliding", 200)])
def test_calls_group_tasks_without_holding_work_back(attention, window):
    g = emulate.compile("tiny-llama", 1000, block_size=128, attention=attention, window=window)
    for workers, split in ((2, None), (3, None), (5, None), (3, True), (16, None)):
        plan = make_plan(g, workers, split)
        tasks = plan.tasks
        for chosen in (tasks, tasks[len(tasks) // 3:]):  # a whole run, and a recovery's re-run
            made_by = {key: t for t in chosen for key in t.writes}
            cut = calls(plan, chosen)
            assert sorted(t.index for c in cut for t in c) == [t.index for t in chosen]  # each task once
            assert all(len(c) <= CALL_TASKS and len({t.worker for t in c}) == 1 for c in cut)
            # in the order of their first tasks, each worker's calls in plan order: a call is submitted
            # after the calls that make its inputs
            assert [c[0].index for c in cut] == sorted(c[0].index for c in cut)
            for w in range(workers):
                mine = [t.index for c in cut for t in c if t.worker == w]
                assert mine == sorted(mine)
            ends = {c[-1].index for c in cut}
            for c in cut:
                first = c[0].index
                for t in c:
                    remote = [made_by[k] for k in t.reads if k in made_by and made_by[k].worker != t.worker]
                    # what a call reads from other workers is made before the call begins: no cycle
                    assert all(p.index < first for p in remote), (workers, t.name)
                    # a task that waits for no other worker shares no call with one that does
                    assert bool(remote) == any(made_by.get(k) and made_by[k].worker != c[0].worker
                                               for k in c[0].reads), (workers, t.name)
                    # the last producer a reader waits for on each other worker hands its value over at once
                    for w in {p.worker for p in remote}:
                        assert max(p.index for p in remote if p.worker == w) in ends, (workers, t.name)
            # any order of running ready calls finishes them all (the workers run them out of order)
            call_of = {t.index: k for k, c in enumerate(cut) for t in c}
            needs = [{call_of[made_by[key].index] for t in c for key in t.reads if key in made_by} - {k}
                     for k, c in enumerate(cut)]
            done: set[int] = set()
            while len(done) < len(cut):
                ready = [k for k in range(len(cut)) if k not in done and needs[k] <= done]
                assert ready, (workers, "calls wait on each other")
                done.add(ready[-1])
    causal = make_plan(emulate.compile("tiny-llama", 2048, block_size=128), 2)
    assert len(calls(causal, causal.tasks)) <= len(causal.tasks) / 3  # rows that feed the other worker share calls


# -- choosing the executor ----------------------------------------------------------------------

@pytest.mark.parametrize("keywords, message", [
    (dict(workers=2), "--workers is not an option of the local executor: add --executor ray"),
    (dict(executor="local", workers=2, stall_timeout=5.0), "are not options of the local executor"),
    (dict(executor=emulate.Local(), workers=2), r"workers goes inside emulate\.Ray"),
])
def test_a_ray_keyword_on_a_local_run_is_refused(keywords, message):
    with pytest.raises(EmulateError, match=message):
        emulate.run("tiny-llama", random_tokens=64, block_size=32, **keywords)


# -- the executor on a real Ray instance ------------------------------------------------------

@pytest.fixture(scope="module")
def causal_runs(ray_cluster):
    """One causal problem run on Ray with 1, 2 and 3 workers, and twice with 2."""
    p = problem(tokens=1024, block=128)
    runs = {k: run(p, on_ray(k)) for k in (1, 2, 3)}
    runs["again"] = run(p, on_ray(2))
    return p, runs


def test_ray_bits_equal_local_through_the_api(ray_cluster):
    """The same call, two executors: Ray's outputs are the local executor's, bit for bit."""
    local = emulate.run("tiny-llama", random_tokens=1024, block_size=128, executor=emulate.Local())
    on_ray = emulate.run("tiny-llama", random_tokens=1024, block_size=128, executor=emulate.Ray(workers=2))
    assert on_ray.stats["executor"] == "ray" and on_ray.stats["workers"] == 2
    assert local.stats["executor"] == "local"
    assert torch.equal(on_ray.hidden, local.hidden)
    assert torch.equal(on_ray.logprobs, local.logprobs)
    assert (on_ray.tokens == local.tokens).all()


def test_ray_matches_local_executor(causal_runs):
    p, runs = causal_runs
    want = run(p).hidden
    for workers in (1, 2, 3):
        _, rel = row_errors(runs[workers].hidden, want)
        record_error("tiny-llama, Ray executor, 1-3 workers", list(p.patterns), "local executor", torch.float32, rel)
        assert rel <= 1e-6


def test_ray_is_bit_identical_run_to_run_and_across_worker_counts(causal_runs):
    _, runs = causal_runs
    assert torch.equal(runs[2].hidden, runs["again"].hidden)
    assert torch.equal(runs[1].hidden, runs[2].hidden) and torch.equal(runs[2].hidden, runs[3].hidden)
    assert torch.equal(runs[1].logprobs, runs[3].logprobs)


def test_ray_reports_plan_and_measured_transfers(causal_runs):
    _, runs = causal_runs
    for workers in (1, 2, 3):
        s = runs[workers].stats
        assert s["executor"] == "ray"
        assert s["workers"] == workers and s["physical_tasks"] == len(make_plan(runs[workers].graph, workers).tasks)
        # only what another worker made goes through the object store into a task
        assert 0 <= s["bytes_transferred"] and "bytes_between_workers" not in s  # the same bytes: one key
        # every task reads at least one block-sized tensor, from its worker's memory or the object store
        assert s["bytes_transferred"] + s["bytes_held"] >= s["physical_tasks"] * 128 * 256 * 4
        # the object store holds the outputs (hidden and log-probabilities) and the values that cross
        outputs = runs[workers].hidden.numel() * 4 + runs[workers].logprobs.numel() * 4
        assert outputs <= s["bytes_returned"] <= outputs + s["bytes_transferred"]
        assert s["recoveries"] == 0 and s["tasks_rerun"] == 0
    assert runs[1].stats["bytes_transferred"] == 0  # one worker: every value stays in its memory
    assert runs[2].stats["bytes_transferred"] > 0


class DistributedCountingOracle:
    """A user's oracle for Ray: it pickles, binds in each worker, and its counts add up across them."""

    name = "counting"
    distributed = True

    def bind(self, block_size: int, heads: int):
        return _CountingKernel(emulate.KernelOracle().bind(block_size, heads))


class _CountingKernel:
    def __init__(self, kernel):
        self.kernel, self.calls, self.widest = kernel, 0, 0

    def attend(self, pair, q, k, v, scale):
        self.calls += 1
        self.widest = max(self.widest, q.shape[1], k.shape[1])
        return self.kernel.attend(pair, q, k, v, scale)

    def summary(self) -> dict:
        return {"oracle_pair_calls": self.calls, "max_oracle_keys": self.widest}


def test_a_user_s_oracle_runs_on_ray_workers_and_its_counts_add_up(ray_cluster):
    local = emulate.run("tiny-llama", random_tokens=1024, block_size=128)
    on_ray = emulate.run("tiny-llama", random_tokens=1024, block_size=128, workers=2, executor="ray",
                         oracle=DistributedCountingOracle())
    s = on_ray.stats
    assert torch.equal(on_ray.hidden, local.hidden) and s["oracle"] == "counting"
    assert s["oracle_pair_calls"] == s["attention_calls"] == local.stats["attention_calls"]
    assert s["max_oracle_keys"] == s["max_call_tokens"] == 128


def test_ray_counts_the_calls_its_workers_ran(causal_runs):
    p, runs = causal_runs
    compiled = runs[1].compact.counts()
    for workers in (1, 2, 3):
        s = runs[workers].stats
        assert s["attention_calls_per_layer"] == compiled["attention_calls_per_layer"]
        assert s["small_calls"] == compiled["small_calls"] and s["max_call_tokens"] == 128


def test_ray_splits_rows_when_blocks_are_fewer_than_workers(ray_cluster):
    p = problem(tokens=300, block=128)  # 3 blocks, 4 workers
    one = run(p, on_ray(1))
    four = run(p, on_ray(4))
    assert four.stats["plan"]["split_rows"] > 0
    assert torch.equal(one.hidden, four.hidden)


def test_ray_float64_meets_the_contract(ray_cluster):
    p = problem("tiny-mistral", "sliding", 200, tokens=1000, block=128, dtype="float64")
    got = run(p, on_ray(2), verify=True)
    assert got.hidden.dtype == torch.float64
    s = got.stats
    record_error("tiny-mistral, Ray executor, 2 workers", list(p.patterns), "reference", torch.float64,
                 s["max_rel_err"])
    assert s["tolerance"] == 1e-10 and s["verified"] and s["max_rel_err"] <= 1e-10


def test_cli_joins_a_cluster_and_writes_a_trace(ray_cluster, tmp_path):
    trace = tmp_path / "trace.json"
    env = dict(os.environ, RAY_ADDRESS="")
    cmd = EMULATE + ["run", "--executor", "ray", "--address", ray_cluster, "--workers", "2", "--random-tokens", "1024",
                     "-M", "128", "--attention", "sliding", "--window", "200", "--verify", "--json", "--trace", str(trace)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    s = json.loads(done.stdout)
    assert s["executor"] == "ray" and s["workers"] == 2 and s["max_rel_err"] <= 2e-5
    assert s["physical_tasks"] == s["blocks"] * (s["layers"] + 1) and s["bytes_transferred"] > 0
    assert s["ray_cluster"].startswith("joined")
    events = json.loads(trace.read_text())["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    tracks = {e["tid"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert tracks == {0, 1} and {e["tid"] for e in slices} <= tracks
    assert len(slices) == s["physical_tasks"]
    nodes = [n for e in slices for n in e["args"]["nodes"]]
    assert len(nodes) == len(set(nodes)) == s["graph_nodes"]
    assert not list(tmp_path.glob("*.tmp"))


def test_cli_private_instance_starts_and_stops(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(EMULATE + ["run", "--executor", "ray", "--workers", "1", "--random-tokens", "512", "-M", "128",
                                     "--json"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    s = json.loads(done.stdout)
    assert s["ray_cluster"].startswith("private local instance") and s["workers"] == 1
    assert "dashboard" not in done.stderr.lower()
    assert "emulate: starting a private Ray instance ..." in done.stderr.splitlines()


# -- faults -----------------------------------------------------------------------------------

def test_killing_a_worker_mid_run_gives_the_same_bits(ray_cluster, causal_runs, tmp_path):
    """SIGKILL the last worker's process in the middle of its own tasks (conftest.py, CrashOnce): Ray
    restarts it, the driver re-runs what it held, and the bits are the same."""
    p, runs = causal_runs
    marker = tmp_path / "killed"
    watched = Watched(on_ray(2))  # the default placement, sequence; the last worker holds the heavy late rows
    stream = emulate.stream(p.model, p.tokens, **options(p, watched), oracle=crash_mid_work(p, marker, 1))
    hidden = [out.hidden for _, out in stream]
    assert int(marker.read_text()) == watched.execution.figures["ray_workers"][1]["pid"]
    assert torch.equal(torch.cat(hidden), runs[2].hidden)
    assert stream.stats["worker_processes"] > 2  # the restarted process really ran tasks
    # its residuals and queries were held only in its memory: the driver re-ran their producers
    assert stream.stats["recoveries"] >= 1 and stream.stats["tasks_rerun"] > 0


def test_values_held_only_by_a_killed_worker_are_recomputed(ray_cluster):
    """One worker holds every intermediate value in its own memory (none goes through the object
    store); SIGKILL it once its first call has finished: the restarted process has none of them, so
    the driver re-runs their producers from the embeddings on, and the bits are the same."""
    p = problem(tokens=4096, block=256)
    want = run(p).hidden
    watched = Watched(on_ray(1))
    killed = []

    def kill_once(stage, done, total):
        if stage == "forward" and not killed:
            killed.append(watched.execution.figures["ray_workers"][0]["pid"])
            os.kill(killed[0], signal.SIGKILL)

    stream = emulate.stream(p.model, p.tokens, **options(p, watched), progress=kill_once)
    hidden = torch.cat([out.hidden for _, out in stream])
    s = stream.stats
    assert killed and torch.equal(hidden, want)
    assert s["bytes_transferred"] == 0 and s["worker_processes"] == 2
    assert s["recoveries"] >= 1 and s["tasks_rerun"] > 0  # the embeddings it held were made again


def test_all_workers_gone_fails_fast_with_a_clear_message(ray_cluster):
    import ray

    p = problem(tokens=4096, block=256)
    watched = Watched(on_ray(2))
    killed = []

    def kill_all(stage, done, total):  # once the first call finished: most of the work is still to do
        if stage == "forward" and not killed:
            for w in watched.execution.figures["ray_workers"]:
                ray.kill(ray.get_actor(w["name"], namespace="emulate"), no_restart=True)
            killed.append(time.monotonic())

    with pytest.raises(EmulateError, match="died|dead"):
        for _ in emulate.stream(p.model, p.tokens, **options(p, watched), progress=kill_all):
            pass
    assert killed and time.monotonic() - killed[0] < 60


# -- bad input --------------------------------------------------------------------------------

def test_more_workers_or_gpus_than_the_cluster_has(ray_cluster):
    p = problem(tokens=256, block=128)
    with pytest.raises(EmulateError, match=r"room for 4 .*4 CPU"):
        run(p, on_ray(9))
    with pytest.raises(EmulateError, match=r"room for 0 .*GPU|room for 0"):
        emulate.run(p.model, p.tokens, **options(p, on_ray(1, gpus_per_worker=1.0)), device="cuda")


@pytest.mark.parametrize("argv, message", [
    (["run", "--executor", "ray", "--address", "127.0.0.1:1"], "no Ray cluster reachable at 127.0.0.1:1"),
    (["run", "--executor", "ray", "--address", "http://127.0.0.1:8265"], "job server"),
    (["run", "--executor", "ray", "--workers", "0"], "workers must be"),
    (["submit", "--address", "http://127.0.0.1:1", "--", "run"], "cannot reach the Ray job server"),
    (["submit", "--", "graph"], "usage: emulate submit"),
])
def test_bad_ray_input_is_one_clear_line(argv, message, tmp_path):
    env = dict(os.environ, RAY_AUTH_TOKEN="x" * 32)
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(EMULATE + argv + ["--random-tokens", "64"] * (argv[0] == "run"), capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert message in lines[-1] and lines[-1].startswith("emulate: error:"), done.stderr
    assert "Traceback" not in done.stderr


def test_submit_without_a_token_is_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")}
    env["HOME"] = str(tmp_path)
    done = subprocess.run(EMULATE + ["submit", "--", "run"], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "no Ray authentication token" in done.stderr
