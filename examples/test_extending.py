"""Your own oracle and your own executor, plugged in: registered by name, run from Python and the CLI.

    pytest examples/test_extending.py

An oracle is anything with `name` and `bind(block_size, heads)`; what `bind` returns runs each pair
call (`attend`) and reports its own figures (`summary`). An executor is anything with `name` and
`start(job, progress)`, returning an emulate.Execution of the head values in block order. Both are
registered by name exactly as the built-ins are (docs/extending.md).
"""
from __future__ import annotations

import json

import pytest
import torch

import emulate
from emulate.cli import main


class CountingOracle:
    """Counts its pair calls and the widest key block it saw, and lets the kernel compute them."""

    name = "counting"
    concurrent = False  # its counters are plain Python state: the local executor calls it in turn

    def __init__(self):
        self.bound = []  # what each forward bound, to read its counts afterwards

    def bind(self, block_size: int, heads: int):
        self.bound.append(_Counting(emulate.KernelOracle().bind(block_size, heads)))
        return self.bound[-1]


class _Counting:
    def __init__(self, kernel):
        self.kernel, self.calls, self.widest = kernel, 0, 0

    def attend(self, pair, q, k, v, scale):
        self.calls += 1
        self.widest = max(self.widest, q.shape[1], k.shape[1])
        return self.kernel.attend(pair, q, k, v, scale)

    def summary(self) -> dict:
        return {"oracle_pair_calls": self.calls, "oracle_widest": self.widest}


class LastReadyFirst:
    """Runs the graph in-process, always taking the node that became ready last (a stack, not a queue):
    a topological order unlike the local executor's, so its bits show that order never matters."""

    name = "last-ready-first"

    def start(self, job: emulate.Job, progress=None) -> emulate.Execution:
        nodes = dict(job.compact.iter_nodes())
        runner = emulate.NodeRunner(job.model.transformer(job.dtype, job.device), job.tokens,
                                    job.compact.graph_attrs(), job.oracle.bind(job.compact.spec.block_size,
                                                                               job.compact.spec.heads))
        figures: dict = {}

        def heads():
            readers = {n: [] for n in nodes}
            for n, node in nodes.items():
                for src in dict.fromkeys(node.inputs):
                    readers[src].append(n)
            waiting = {n: len(dict.fromkeys(node.inputs)) for n, node in nodes.items()}
            ready = [n for n, w in waiting.items() if w == 0]
            values, outputs = {}, {}
            with torch.no_grad():
                while ready:
                    n = ready.pop()
                    node = nodes[n]
                    value = runner.run(node, [values[src] for src in node.inputs])
                    if node.kind == "head":
                        outputs[node.block] = value
                    values[n] = value
                    for r in readers[n]:
                        waiting[r] -= 1
                        if waiting[r] == 0:
                            ready.append(r)
            figures.update(runner.oracle.summary())
            for block in sorted(outputs):
                yield block, outputs[block]

        return emulate.Execution(heads(), figures, runner.counts)


@pytest.fixture(autouse=True)
def registered():
    emulate.register_oracle("counting", CountingOracle, replace=True)
    emulate.register_executor("last-ready-first", LastReadyFirst, replace=True)
    yield
    from emulate.runtime.registry import EXECUTORS, ORACLES

    ORACLES.unregister("counting")
    EXECUTORS.unregister("last-ready-first")


PROBLEM = dict(random_tokens=300, block_size=64, dtype="float64", seed=3)


@pytest.mark.parametrize("attention", [dict(attention="causal"), dict(attention="sliding", window=90)])
def test_my_oracle_and_executor_give_the_kernel_s_bits(attention):
    torch.set_num_threads(1)  # the same matmul splits on both sides
    mine = emulate.run("tiny-llama", **PROBLEM, **attention, oracle="counting", executor="last-ready-first",
                       verify=True)
    kernel = emulate.run("tiny-llama", **PROBLEM, **attention, threads=1)
    assert torch.equal(mine.hidden, kernel.hidden) and torch.equal(mine.logprobs, kernel.logprobs)
    s = mine.stats
    assert s["verified"] and s["oracle"] == "counting" and s["executor"] == "last-ready-first"
    assert s["oracle_pair_calls"] == s["attention_calls"] == kernel.stats["attention_calls"]
    assert s["oracle_widest"] == s["max_call_tokens"] <= PROBLEM["block_size"]


def test_objects_need_no_registration():
    run = emulate.run("tiny-llama", **PROBLEM, oracle=CountingOracle(), executor=LastReadyFirst())
    assert run.stats["oracle_pair_calls"] == run.stats["attention_calls"] > 0


def test_my_oracle_and_executor_from_the_command_line(capsys):
    code = main(["run", "--model", "tiny-llama", "--random-tokens", "300", "-M", "64", "--dtype", "float64",
                 "--oracle", "counting", "--executor", "last-ready-first", "--verify", "--json", "--quiet"])
    s = json.loads(capsys.readouterr().out)
    assert code == 0 and s["verified"] and s["oracle"] == "counting" and s["executor"] == "last-ready-first"
    assert s["oracle_pair_calls"] == s["attention_calls"]


def test_my_oracle_inside_a_transformers_model():
    transformers = pytest.importorskip("transformers")
    import emulate.hf

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(1))
    oracle = CountingOracle()
    emulate.hf.register(block_size=32, oracle=oracle)
    model.set_attn_implementation("emulate")
    with torch.no_grad():
        got = model(ids, use_cache=False).logits
        model.set_attn_implementation("sdpa")
        want = model(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    counted = emulate.hf.counts()
    assert sum(b.calls for b in oracle.bound) == counted["attention_calls"] > 0
    assert max(b.widest for b in oracle.bound) == counted["max_call_tokens"] <= 32
