"""Compile a causal forward into a task graph, run it in-process, and check it against the monolithic pass.

    .venv/bin/python examples/quickstart.py
"""
import torch

from emulate.executor import run_local
from emulate.forward import Collected, compile_forward, new_model, resolve_patterns, row_errors
from emulate.ops import NodeRunner
from emulate.presets import preset
from emulate.reference import reference_forward
from graphs import counts

config, weights = preset("tiny-llama")
model = new_model(config, weights, torch.float64, "cpu")
tokens = torch.randint(0, config.vocab, (3001,), generator=torch.Generator().manual_seed(0))
patterns = resolve_patterns(config, "sink", window=700, sinks=4)  # StreamingLLM's mask, redefining T

graph = compile_forward(config, tokens.shape[0], 256, patterns, torch.float64)
c = counts(graph)
print(f"{c['attention_calls']} pair calls ({c['attention_calls_per_layer'][0]} per layer, bound "
      f"{c['attention_calls_bound'] // config.layers}), depth {c['graph_depth']}, longest call {c['max_call_tokens']} tokens")

got = Collected()
for block, value in run_local(graph, NodeRunner(model, tokens, graph.graph)):
    got.add(value)
ref = reference_forward(model, tokens, patterns)
print("max_abs_err %.2e, max_rel_err %.2e" % row_errors(got.result()["hidden"], ref["hidden"]))
