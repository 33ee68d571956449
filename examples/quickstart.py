"""Load a model, run a sink-attention (StreamingLLM) forward as a task graph of calls of at most M tokens,
and check it against the monolithic forward.

    .venv/bin/python examples/quickstart.py
"""
import emulate

model = emulate.load("tiny-llama")
run = emulate.run(model, random_tokens=3001, seed=0, block_size=256, attention="sink", window=700, sinks=4,
                  dtype="float64", verify=True)

s = run.stats
print(f"{s['attention_calls']} pair calls ({s['attention_calls_per_layer'][0]} per layer, bound "
      f"{s['attention_calls_bound'] // s['layers']}), depth {s['graph_depth']}, longest call {s['max_call_tokens']} tokens")
print(f"max_abs_err {s['max_abs_err']:.2e}, max_rel_err {s['max_rel_err']:.2e} (verified: {s['verified']})")
