"""The summary's call counts are counted where the calls ran (emulate/runtime/runner.py), not copied
from the compiled graph: they equal the graph's for a faithful executor, and a run whose executed calls
differ from the graph's, or whose call saw more than M tokens, is refused."""
from __future__ import annotations

import pytest
import torch

import emulate
from emulate.runtime.local import run_local
from emulate.runtime.runner import NodeRunner
from graphs import MaskKind

PATTERNS = [dict(attention="causal"), dict(attention="sliding", window=70), dict(attention="sink", window=50, sinks=3)]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("threads", [1, 2])
def test_counted_calls_equal_the_graph_s(pattern, threads):
    run = emulate.run("tiny-llama", random_tokens=333, block_size=48, threads=threads, **pattern)
    compiled = emulate.compile("tiny-llama", 333, block_size=48, compact=True, **pattern).counts()
    s = run.stats
    for key in ("attention_calls", "attention_calls_per_layer", "small_calls", "max_call_tokens"):
        assert s[key] == compiled[key], key


def test_the_paper_oracle_s_calls_are_counted_too():
    s = emulate.run("tiny-llama", random_tokens=100, block_size=32, oracle="paper-stable", dtype="float64").stats
    assert s["attention_calls"] == emulate.compile("tiny-llama", 100, block_size=32, compact=True).counts()[
        "attention_calls"]
    assert s["max_call_tokens"] == 32


class Unfaithful:
    """Runs the compact schedule in-process through a runner that misbehaves once (`twist`)."""

    name = "unfaithful"

    def __init__(self, twist):
        self.twist = twist

    def start(self, job, progress=None):
        spec = job.compact.spec
        runner = self.twist(job.model.transformer(job.dtype, job.device), job.tokens, job.compact.graph_attrs(),
                            job.oracle.bind(spec.block_size, spec.heads))
        return emulate.Execution(run_local(job.compact.schedule(), runner), {}, runner.counts)


class RepeatsAPairCall(NodeRunner):
    """Calls the oracle twice for the first attend node: a pair call the graph does not plan."""

    done = False

    def attend(self, node, inputs):
        if not self.done:
            self.done = True
            super().attend(node, inputs)
        return super().attend(node, inputs)


class WidensAPairCall(NodeRunner):
    """Hands the oracle key block 0 twice over in one call (2M keys) for the first unmasked pair."""

    done = False

    def attend(self, node, inputs):
        if not self.done and node.key_block == 0 and node.mask == MaskKind.NONE:
            self.done = True
            q, k, v = inputs[1]
            inputs = [inputs[0], (q, torch.cat([k, k], dim=1), torch.cat([v, v], dim=1))]
        return super().attend(node, inputs)


def test_a_pair_call_the_graph_does_not_plan_is_caught():
    with pytest.raises(emulate.EmulateError, match="layer 0: 11 pair calls ran, 10 planned"):
        emulate.run("tiny-llama", random_tokens=200, block_size=64, attention="causal",
                    executor=Unfaithful(RepeatsAPairCall))


def test_a_call_wider_than_m_is_caught():
    with pytest.raises(emulate.EmulateError, match="more than M = 64"):
        emulate.run("tiny-llama", random_tokens=200, block_size=64, attention="causal",
                    executor=Unfaithful(WidensAPairCall))


def test_the_faithful_runner_passes_the_same_check():
    run = emulate.run("tiny-llama", random_tokens=200, block_size=64, attention="causal",
                      executor=Unfaithful(NodeRunner))
    assert run.stats["executor"] == "unfaithful" and run.stats["small_calls"] == run.stats["graph_nodes"]


class Recording:
    """An oracle that records every pair call it answers (layer, query rows, keys) and lets the kernel
    compute it: an account of what ran kept apart from the runner's counters."""

    name = "recording"
    concurrent = False

    def __init__(self):
        self.calls: list[tuple[int, int, int]] = []

    def bind(self, block_size: int, heads: int):
        self.kernel = emulate.KernelOracle().bind(block_size, heads)
        return self

    def attend(self, pair, q, k, v, scale):
        self.calls.append((pair.layer, q.shape[1], k.shape[1]))
        return self.kernel.attend(pair, q, k, v, scale)

    def summary(self) -> dict:
        return {}


@pytest.mark.parametrize("model,pattern", [("tiny-llama", {"attention": "sliding", "window": 70}),
                                           ("tiny-bert", {"attention": "sampled"})])
def test_the_summary_counts_what_the_oracle_answered(model, pattern):
    oracle = Recording()
    s = emulate.run(model, random_tokens=150, block_size=32, oracle=oracle, **pattern).stats
    per_layer = [sum(1 for layer, _, _ in oracle.calls if layer == at) for at in range(s["layers"])]
    assert s["attention_calls_per_layer"] == per_layer and s["attention_calls"] == len(oracle.calls) > 0
    assert s["max_call_tokens"] == max(max(rows, keys) for _, rows, keys in oracle.calls) == 32


def test_counts_from_many_threads_lose_nothing():
    """The local executor's call workers count side by side: every call is counted, per layer too
    (an unguarded read-modify-write of per_layer lost a quarter of them here)."""
    import sys
    import threading

    from emulate.runtime.contract import CallCounts

    counts = CallCounts()

    def work():
        for _ in range(20000):
            counts.call(3, 0, attention=True)

    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as CPython allows, as a loaded machine does
    try:
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(before)
    assert counts.small_calls == counts.attention_calls == counts.per_layer[0] == 80000
