"""The local executor's call workers: independent nodes run side by side, with the one-thread run's bits.

Each worker runs one node at a time on one torch thread (emulate/runtime/local.py, run_parallel); a
node's value depends on its inputs alone and every merge order is fixed by the graph, so any
number of workers gives exactly the sequential run's hidden states and log-probabilities.
"""
from __future__ import annotations

import json
import threading
import tracemalloc
import weakref

import numpy as np
import pytest
import torch

import emulate
from emulate.runtime.local import run_local, run_parallel
from emulate.runtime.runner import NodeRunner
from graphs import CompactGraph, ForwardSpec, Pattern, schedule

TOKENS = np.random.default_rng(1).integers(0, 1024, size=1000)


def workers_alive() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("emulate-local-")]


@pytest.fixture(scope="module")
def models():
    return {name: emulate.load(name) for name in ("tiny-llama", "tiny-mistral", "tiny-bert")}


CASES = [
    ("tiny-llama", "causal", 64, 1000),
    ("tiny-llama", "causal", 64, 963),  # a ragged last block
    ("tiny-mistral", Pattern("sliding", window=100), 64, 1000),
    ("tiny-llama", Pattern("sink", window=90, sinks=5), 32, 700),
    ("tiny-bert", "full", 64, 500),
    ("tiny-bert", "sampled", 64, 500),
    ("tiny-llama", [Pattern("causal"), Pattern("sliding", window=64), Pattern("sink", window=40, sinks=3),
                    Pattern("causal")], 32, 611),
]


@pytest.mark.parametrize("name, attention, block_size, n", CASES,
                         ids=["causal", "ragged", "sliding", "sink", "full", "sampled", "mixed"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_workers_give_the_one_thread_bits(models, name, attention, block_size, n, dtype):
    model = models[name]
    tokens = TOKENS[:n] % model.config.vocab
    one = emulate.run(model, tokens, block_size=block_size, attention=attention, dtype=dtype, threads=1)
    assert one.stats["threads"] == [1]
    for workers in (2, 3):
        many = emulate.run(model, tokens, block_size=block_size, attention=attention, dtype=dtype, threads=workers)
        assert many.stats["threads"] == [workers]
        assert torch.equal(one.hidden, many.hidden)
        if one.logprobs is not None:
            assert torch.equal(one.logprobs, many.logprobs)
    assert not workers_alive()


def test_run_parallel_yields_blocks_in_order_and_counts_every_node(models):
    model = models["tiny-llama"]
    run = emulate.run(model, TOKENS[:300], block_size=32, threads=1)
    g = run.graph
    runner = NodeRunner(model.transformer(torch.float32), torch.from_numpy(TOKENS[:300]), g.graph,
                        emulate.KernelOracle())
    seen, records = [], []
    from emulate.runtime.threads import ThreadPolicy

    with torch.no_grad(), ThreadPolicy(1):  # the one-thread run (more intra-op threads may round differently)
        sequential = list(run_local(schedule(g), runner))
    blocks = list(run_parallel(schedule(g), runner, 3, seen.append, records, look_ahead=8))
    assert [b for b, _ in blocks] == list(range(g.graph["blocks"])) == [b for b, _ in sequential]
    for (_, a), (_, b) in zip(sequential, blocks):
        assert torch.equal(a["hidden"], b["hidden"]) and torch.equal(a["logprob_next"], b["logprob_next"])
    assert seen == list(range(1, g.number_of_nodes() + 1))
    assert sorted(r["task"] for r in records) == list(range(g.number_of_nodes()))
    assert {r["worker"] for r in records} <= {0, 1, 2}
    by_task = {r["task"]: r for r in records}
    for r in records:  # every node starts after its inputs ended
        assert all(by_task[d]["end"] <= r["start"] for d in r["deps"])


def test_the_trace_has_one_track_per_worker(models, tmp_path):
    path = tmp_path / "trace.json"
    run = emulate.run(models["tiny-llama"], TOKENS[:400], block_size=32, threads=2, trace=str(path))
    events = json.loads(path.read_text())["traceEvents"]
    tracks = {e["tid"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    slices = [e for e in events if e["ph"] == "X"]
    assert tracks == {0, 1} and {e["tid"] for e in slices} <= tracks
    assert len(slices) == run.graph.number_of_nodes()


class Live:
    """Bytes of node values (all but the heads') alive at once, through weak references; the peak."""

    def __init__(self):
        self.lock = threading.Lock()
        self.now = self.peak = self.total = 0

    def watch(self, value) -> None:
        tensors = [value] if isinstance(value, torch.Tensor) else [t for t in value if isinstance(t, torch.Tensor)]
        for t in tensors:
            size = t.untyped_storage().nbytes()
            with self.lock:
                self.now += size
                self.total += size
                self.peak = max(self.peak, self.now)
            weakref.finalize(t, self.free, size)

    def free(self, size: int) -> None:
        with self.lock:
            self.now -= size


@pytest.mark.parametrize("attention, n", [(Pattern("sliding", window=1024), 65536), ("causal", 8192)],
                         ids=["sliding-65536", "causal-8192"])
def test_workers_hold_about_the_sequential_live_set(models, monkeypatch, attention, n):
    """A wavefront stays O(window x layers) and a causal layer O(N) with workers as without."""
    original = NodeRunner.run
    live = Live()

    def run(self, a, inputs):
        value = original(self, a, inputs)
        if not isinstance(value, dict):
            live.watch(value)
        return value

    monkeypatch.setattr(NodeRunner, "run", run)
    tokens = np.resize(TOKENS, n)
    peaks = {}
    for threads in (1, 2):
        live.now = live.peak = live.total = 0
        s = emulate.stream(models["tiny-mistral"], tokens, block_size=256, attention=attention, threads=threads)
        for _ in s:
            pass
        peaks[threads] = live.peak
    assert peaks[2] <= 1.5 * peaks[1], peaks
    if attention != "causal":  # the wavefront holds a few blocks per layer, not the run's values
        assert peaks[1] < live.total / 50, (peaks, live.total)


class Token:
    """A node's stand-in value, counted while alive."""

    alive = 0
    peak = 0

    def __init__(self):
        Token.alive += 1
        Token.peak = max(Token.peak, Token.alive)

    def __del__(self):
        Token.alive -= 1


class TokenRunner:
    def run(self, a, inputs):
        assert all(isinstance(v, Token) for v in inputs)
        return Token()


@pytest.mark.parametrize("workers", [1, 3])
def test_the_executor_s_bookkeeping_does_not_grow_with_n_on_a_windowed_graph(workers):
    """The executor reads the compact schedule as it goes: the values alive at once stay the same
    from 16 to 256 blocks, and its own memory grows by the schedule's small per-block tables alone
    (about 1.2 KB a block, measured; a block of M = 2048 token ids is 16 KB). Values stand in for
    the calls here."""
    peaks = {}
    for blocks in (16, 256):
        spec = ForwardSpec(tokens=blocks * 64, block_size=64, patterns=(Pattern("sink", window=40, sinks=2),) * 3,
                           heads=2, kv_heads=1, head_dim=4, width=8, mlp_width=8, vocab=16)
        c = CompactGraph.build(spec)
        Token.alive = Token.peak = 0
        tracemalloc.start()
        try:
            run = run_local if workers == 1 else lambda *a: run_parallel(*a, workers=workers, look_ahead=16)
            got = [b for b, _ in run(c.schedule(), TokenRunner())]
            traced = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert got == list(range(blocks)) and Token.alive == 0
        peaks[blocks] = (Token.peak, traced)
    (values_16, bytes_16), (values_256, bytes_256) = peaks[16], peaks[256]
    assert values_256 == values_16 if workers == 1 else values_256 <= values_16 + 16, peaks
    assert (bytes_256 - bytes_16) / 240 < 2048, peaks


def test_an_error_in_a_worker_stops_the_run_and_leaves_no_thread(models, monkeypatch):
    original = NodeRunner.run
    calls = []

    def run(self, a, inputs):
        calls.append(threading.current_thread().name)
        if len(calls) == 40:
            raise RuntimeError("node failed")
        return original(self, a, inputs)

    monkeypatch.setattr(NodeRunner, "run", run)
    with pytest.raises(RuntimeError, match="node failed"):
        emulate.run(models["tiny-llama"], TOKENS, block_size=32, threads=2)
    assert not workers_alive()
    assert len(calls) < 50 and all(c.startswith("emulate-local-") for c in calls)


def test_an_interrupt_in_the_caller_stops_the_workers(models):
    seen = []

    def progress(stage, done, total):
        if stage == "forward":
            seen.append(done)
            if done == 30:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        emulate.run(models["tiny-llama"], TOKENS, block_size=32, threads=2, progress=progress)
    assert not workers_alive() and seen[-1] == 30


def test_closing_a_stream_early_stops_the_workers(models):
    s = emulate.stream(models["tiny-llama"], TOKENS, block_size=32, threads=2)
    it = iter(s)
    block, out = next(it)
    assert block == 0 and workers_alive()
    it.close()
    assert not workers_alive()


def test_the_paper_oracle_runs_in_turn(models):
    run = emulate.run(models["tiny-llama"], TOKENS[:64], block_size=16, threads=2, oracle="paper")
    assert run.stats["threads"] == [2] and run.stats["oracle_invocations"] > 0
