"""Placements of the Ray executor (cluster/placement.py): `layers` gives each worker a contiguous
range of layers and only their weights, with the bits of the local executor.

The plan tests run the placed plan in this process with one runner per worker, each built from
that worker's weights alone (a task needing another's weight would fail with a KeyError); the
executor tests run real Ray (one module-scoped instance) against the local executor, bit for bit.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from test_hardening import emulate_child, one_error_line

import emulate
from cluster.placement import (
    Placement,
    layer_ranges,
    owned_weights,
    pipeline_order,
    place_by_layers,
    worker_need,
)
from cluster.worker import run_task
from emulate.errors import EmulateError
from emulate.models.block import Transformer
from emulate.runtime.runner import NodeRunner
from graphs.plan import make_plan


def problem(name="tiny-llama", tokens=600, block=64, dtype="float32", **kw) -> emulate.Problem:
    return emulate.prepare(name, random_tokens=tokens, block_size=block, dtype=dtype, **kw)


def local(p: emulate.Problem) -> emulate.Run:
    return emulate.run(p.model, p.tokens, block_size=p.block_size, attention=list(p.patterns), dtype=p.dtype)


def test_layer_ranges_are_contiguous_and_cover_every_layer():
    assert layer_ranges(30, 3) == [range(10), range(10, 20), range(20, 30)]
    assert layer_ranges(4, 3) == [range(2), range(2, 3), range(3, 4)]
    with pytest.raises(EmulateError, match="5 workers for 4 layers"):
        layer_ranges(4, 5)


@pytest.mark.parametrize("name,dtype", [("tiny-llama", "float32"), ("tiny-mistral", "float64"),
                                        ("tiny-bert", "float32")])
def test_each_worker_runs_its_tasks_from_its_own_weights_alone(name, dtype):
    p = problem(name, dtype=dtype)
    config, weights = p.model.config, p.model.weights
    ranges = layer_ranges(config.layers, 3)
    plan = make_plan(p.compact_graph(), 3)
    place_by_layers(plan, ranges)
    meta = p.compact_graph().graph_attrs()
    runners = []
    for r in ranges:
        own = owned_weights(weights, config.layers, r)
        assert len(own) < len(weights)
        model = Transformer(config, {n: weights[n] for n in own}, dtype=p.dtype)
        runners.append(NodeRunner(model, torch.from_numpy(p.tokens), meta, emulate.KernelOracle()))
    values, hidden = {}, {}
    for k, t in enumerate(plan.tasks):
        assert t.index == k and all(key in values for key in t.reads)  # still a topological order
        assert t.layer in ranges[t.worker] or (t.layer == -1 and t.worker == 0)
        with torch.no_grad():
            out = run_task(runners[t.worker], t, [values[key] for key in t.reads])
        values.update(zip(t.writes, out))
        if t.head:
            hidden[t.block] = out[-1]["hidden"]
    want = local(p).hidden
    assert torch.equal(torch.cat([hidden[b] for b in sorted(hidden)]), want)


def test_the_pipeline_order_runs_a_causal_model_block_by_block():
    p = problem(tokens=512, block=64)
    plan = make_plan(p.compact_graph(), 2)
    pipeline_order(plan)
    rows = [(t.block, t.layer) for t in plan.tasks]
    assert rows == sorted(rows)  # causal: block i's every layer before block i + 1's


def test_a_worker_needs_less_under_layers_and_the_refusal_names_what_fits():
    p = problem()
    config = p.model.config
    shapes = {n: tuple(w.shape) for n, w in p.model.weights.items()}
    seq = worker_need(Placement.SEQUENCE, config, shapes, 600, 2, 4)
    lay = worker_need(Placement.LAYERS, config, shapes, 600, 2, 4)
    assert lay.weights < 0.75 * seq.weights
    limit = (seq.total + lay.total) // 2
    assert lay.total <= limit < seq.total
    r = emulate_child("run", "--model", "tiny-llama", "--random-tokens", "600", "-M", "64", "--executor", "ray",
                      "--workers", "2", "--worker-memory", limit)
    line = one_error_line(r.stderr)
    assert r.returncode == 2 and f"--worker-memory {limit} is too small for sequence on 2 workers" in line \
        and "--placement layers fits" in line, line
    r = emulate_child("run", "--model", "tiny-llama", "--random-tokens", "600", "-M", "64", "--executor", "ray",
                      "--workers", "2", "--placement", "layers", "--worker-memory", lay.total - 1)
    assert r.returncode == 2 and "no placement fits" in one_error_line(r.stderr)
    r = emulate_child("run", "--model", "tiny-llama", "--random-tokens", "64", "--placement", "layers")
    assert r.returncode == 2 and "--placement is not an option of the local executor" in one_error_line(r.stderr)


@pytest.mark.parametrize("name,dtype,workers", [("tiny-llama", "float32", 2), ("tiny-mistral", "float64", 3),
                                                ("tiny-llama", "bfloat16", 2)])
def test_layers_on_ray_give_the_local_bits(ray_cluster, tmp_path, name, dtype, workers):
    p = problem(name, tokens=700, block=64, dtype=dtype)
    want = local(p)
    trace = tmp_path / "trace.json"
    got = emulate.run(p.model, p.tokens, block_size=p.block_size, attention=list(p.patterns), dtype=p.dtype,
                      executor=emulate.Ray(workers=workers, placement="layers", stall_timeout=120, trace=str(trace)))
    s = got.stats
    assert torch.equal(got.hidden, want.hidden) and torch.equal(got.logprobs, want.logprobs)
    assert s["placement"] == "layers" and s["worker_layers"] == [[r.start, r.stop] for r in
                                                                 layer_ranges(p.model.config.layers, workers)]
    total = sum(w.numel() * p.dtype.itemsize for w in p.model.weights.values()) / 2**20
    # each worker loaded its layers' weights, not the model's; together about the model once
    assert max(s["worker_weights_mb"]) < 0.75 * total and sum(s["worker_weights_mb"]) < 1.2 * total, s
    assert s["bytes_transferred"] > 0 and json.dumps(s)
    # the Gantt chart's colours are the layer ranges, one per worker's track
    ranges = layer_ranges(p.model.config.layers, workers)
    slices = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    assert {(e["tid"], e["cat"]) for e in slices} == {(w, f"layers {r.start}-{r.stop - 1}") for w, r in enumerate(ranges)}
    drawn = emulate.draw_trace(str(trace), str(tmp_path / "gantt.svg"))
    assert set(drawn["tasks_by_kind"]) == {f"layers {r.start}-{r.stop - 1}" for r in ranges}


@pytest.mark.slow
def test_a_killed_worker_reloads_its_own_layers_and_the_bits_are_the_same(ray_cluster):
    """SIGKILL the last worker (the last layers and the head) half way: its restarted process loads
    its own range's weights again, the driver re-runs what it held, and the outputs are the local bits."""
    import signal

    from conftest import Watched

    p = problem(tokens=1024, block=128)
    want = local(p).hidden
    watched = Watched(emulate.Ray(workers=2, placement="layers", stall_timeout=120))
    killed = []

    def kill_once(stage, done, total):
        if stage == "forward" and not killed and done >= total // 2:
            killed.append(watched.execution.figures["ray_workers"][-1]["pid"])
            os.kill(killed[0], signal.SIGKILL)

    stream = emulate.stream(p.model, p.tokens, block_size=p.block_size, attention=list(p.patterns), dtype=p.dtype,
                            executor=watched, progress=kill_once)
    hidden = torch.cat([out.hidden for _, out in stream])
    s = stream.stats
    assert killed and torch.equal(hidden, want)
    assert s["worker_processes"] > 2 and s["recoveries"] >= 1
    assert s["worker_weights_mb"][1] < 0.75 * sum(w.numel() * 4 for w in p.model.weights.values()) / 2**20
