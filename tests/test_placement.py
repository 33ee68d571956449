"""Placements of the Ray executor (cluster/placement.py): `layers` gives each worker a contiguous
range of layers and only their weights, `grid` a row of workers per range splitting its blocks, and
`auto` the planner's fastest that fits (cluster/auto_placement.py), with the bits of the local executor.

The plan tests run the placed plan in this process with one runner per worker, each built from
that worker's weights alone (a task needing another's weight would fail with a KeyError); the
executor tests run real Ray (one module-scoped instance) against the local executor, bit for bit.
"""
from __future__ import annotations

import json

import pytest
import torch
from test_hardening import emulate_child, one_error_line

import emulate
from cluster.placement import (
    Grid,
    Placement,
    default_grid,
    grid_of,
    layer_ranges,
    layout_of,
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


def test_the_default_grid_is_the_squarest_with_more_rows_and_a_given_one_is_checked():
    assert [str(default_grid(p, 32)) for p in (1, 2, 3, 4, 6, 8, 9, 12)] == \
        ["1x1", "2x1", "3x1", "2x2", "3x2", "4x2", "3x3", "4x3"]
    assert str(default_grid(8, 3)) == "2x4" and str(default_grid(5, 4)) == "1x5"  # rows past the layers
    assert grid_of("2x3", 6, 4) == Grid(2, 3)
    with pytest.raises(EmulateError, match="--grid 2x2 is 4 workers, but the run has 3"):
        grid_of("2x2", 3, 4)
    with pytest.raises(EmulateError, match="each of 5 rows .* the model has 4 layers"):
        grid_of("5x1", 5, 4)
    with pytest.raises(EmulateError, match="--grid must be P_LAYERSxP_SEQUENCE"):
        grid_of("2by2", 4, 4)
    with pytest.raises(EmulateError, match="--grid is the shape of --placement grid"):
        layout_of(Placement.LAYERS, 4, 4, "2x2")


@pytest.mark.parametrize("name,dtype,grid,mask,dealt", [
    ("tiny-llama", "float32", "2x2", {}, True),  # causal
    ("tiny-mistral", "float64", "2x3", {}, True),  # its window of 512 reaches back over all 600 tokens
    ("tiny-llama", "float32", "3x2", {"attention": "sliding", "window": 128}, False)])
def test_each_grid_worker_runs_its_rows_blocks_from_its_ranges_weights_alone(name, dtype, grid, mask, dealt):
    """A grid's worker (row r, column c) runs only tasks of row r's layers, from row r's weights alone,
    and the columns of a row share its blocks (dealt out in turn where rows read back over most
    blocks, contiguous runs under a narrow window); the outputs are the local bits."""
    p = problem(name, dtype=dtype, **mask)
    config, weights = p.model.config, p.model.weights
    g = grid_of(grid, Grid(*map(int, grid.split("x"))).workers, config.layers)
    layout = layout_of(Placement.GRID, g.workers, config.layers, grid)
    plan = make_plan(p.compact_graph(), layout.plan_workers)
    layout.place(plan)
    meta = p.compact_graph().graph_attrs()
    runners = []
    for names in layout.owned(weights):
        model = Transformer(config, {n: weights[n] for n in names}, dtype=p.dtype)
        runners.append(NodeRunner(model, torch.from_numpy(p.tokens), meta, emulate.KernelOracle()))
    values, hidden = {}, {}
    for k, t in enumerate(plan.tasks):
        assert t.index == k and all(key in values for key in t.reads)
        assert t.layer in layout.ranges[t.worker] or (t.layer == -1 and t.worker < g.sequence)
        with torch.no_grad():
            out = run_task(runners[t.worker], t, [values[key] for key in t.reads])
        values.update(zip(t.writes, out))
        if t.head:
            hidden[t.block] = out[-1]["hidden"]
    for row in range(g.layers):  # every worker of a row runs some of its blocks, none another row's layers
        assert all(any(t.worker == row * g.sequence + c for t in plan.tasks) for c in range(g.sequence))
    columns = [t.worker % g.sequence for t in sorted(plan.tasks, key=lambda t: t.block) if t.layer == 0]
    if dealt:  # blocks dealt out to the columns in turn, so the pipeline never waits a whole row
        assert columns == [b % g.sequence for b in range(len(columns))]
    else:  # contiguous runs, a window's neighbours on one worker
        assert columns == sorted(columns) and len(set(columns)) == g.sequence
    assert torch.equal(torch.cat([hidden[b] for b in sorted(hidden)]), local(p).hidden)


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


@pytest.mark.parametrize("name,dtype,workers,placement,grid", [
    ("tiny-llama", "float32", 2, "layers", None), ("tiny-mistral", "float64", 3, "layers", None),
    ("tiny-llama", "bfloat16", 2, "layers", None), ("tiny-llama", "float32", 4, "grid", "2x2"),
    ("tiny-mistral", "float64", 4, "grid", None)])
def test_layers_and_grid_on_ray_give_the_local_bits(ray_cluster, tmp_path, name, dtype, workers, placement, grid):
    p = problem(name, tokens=700, block=64, dtype=dtype)
    want = local(p)
    trace = tmp_path / "trace.json"
    got = emulate.run(p.model, p.tokens, block_size=p.block_size, attention=list(p.patterns), dtype=p.dtype,
                      executor=emulate.Ray(workers=workers, cpus_per_worker=0.5, placement=placement, grid=grid,
                                           stall_timeout=120, trace=str(trace)))
    s = got.stats
    assert torch.equal(got.hidden, want.hidden) and torch.equal(got.logprobs, want.logprobs)
    layout = layout_of(Placement(placement), workers, p.model.config.layers, grid)
    assert s["placement"] == placement and s["worker_layers"] == [[r.start, r.stop] for r in layout.ranges]
    assert s.get("grid") == (str(layout.grid) if placement == "grid" else None)
    total = sum(w.numel() * p.dtype.itemsize for w in p.model.weights.values()) / 2**20
    rows = layout.grid.layers
    # each worker loaded its range's weights, not the model's; each row together about the model once
    assert max(s["worker_weights_mb"]) < 0.75 * total and sum(s["worker_weights_mb"]) < 1.2 * total * workers / rows, s
    assert s["bytes_transferred"] > 0 and json.dumps(s)
    # the Gantt chart's colours are the layer ranges, one per row of workers
    slices = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    assert {(e["tid"], e["cat"]) for e in slices} == {(w, f"layers {r.start}-{r.stop - 1}")
                                                       for w, r in enumerate(layout.ranges)}
    drawn = emulate.draw_trace(str(trace), str(tmp_path / "gantt.svg"))
    assert set(drawn["tasks_by_kind"]) == {f"layers {r.start}-{r.stop - 1}" for r in layout.ranges}
    if placement == "grid":  # a row's workers split its blocks: each runs fewer than the row's
        tasks = s["plan"]["tasks_per_worker"]
        for row in range(rows):
            mine = tasks[row * layout.grid.sequence:(row + 1) * layout.grid.sequence]
            assert all(0 < n < sum(mine) for n in mine), tasks


def test_auto_picks_the_planners_fastest_that_fits_and_says_so(ray_cluster, capfd):
    """Under a --worker-memory that sequence does not fit, auto picks a placement that does, the
    planner's fastest among those, says so in one line on stderr, and gives the local bits."""
    from emulate.planner import predict_placements

    p = problem(tokens=600, block=64)
    config = p.model.config
    shapes = {n: tuple(w.shape) for n, w in p.model.weights.items()}
    seq = worker_need(Placement.SEQUENCE, config, shapes, 600, 2, 4)
    lay = worker_need(Placement.LAYERS, config, shapes, 600, 2, 4)
    limit = (seq.total + lay.total) // 2
    outcomes = predict_placements(p.model, 600, block_size=64, attention=list(p.patterns), workers=2, device="cpu")
    times = {o.placement: o.prediction.predicted_s for o in outcomes}
    fitting = {"layers": times["layers"], "grid": times["grid"]}  # grid 2x1: the layers layout
    fastest = min(fitting, key=fitting.get)
    capfd.readouterr()
    got = emulate.run(p.model, p.tokens, block_size=64, attention=list(p.patterns),
                      executor=emulate.Ray(workers=2, cpus_per_worker=0.5, placement="auto", worker_memory=limit,
                                           stall_timeout=120))
    lines = [line for line in capfd.readouterr().err.splitlines() if "--placement auto" in line]
    assert torch.equal(got.hidden, local(p).hidden)
    s = got.stats
    assert s["placement"] == fastest == "layers" and s["placement_auto"]["fits"] == ["grid", "layers"]
    assert len(lines) == 1 and "chose layers on 2 workers" in lines[0] and "sequence" in lines[0] \
        and f"over --worker-memory {limit}" in lines[0], lines
    assert s["placement_auto"]["predicted_s"] == pytest.approx(times, rel=1e-9)  # the planner's own figures
    # without a cap every placement fits, and the choice is the planner's fastest of all three
    free = emulate.run(p.model, p.tokens, block_size=64, attention=list(p.patterns),
                       executor=emulate.Ray(workers=2, cpus_per_worker=0.5, placement="auto", stall_timeout=120))
    assert free.stats["placement"] == min(times, key=times.get) and torch.equal(free.hidden, local(p).hidden)


@pytest.mark.parametrize("args,says", [
    (("--workers", "3", "--placement", "grid", "--grid", "2x2"), "--grid 2x2 is 4 workers, but the run has 3"),
    (("--workers", "5", "--placement", "grid", "--grid", "5x1"), "each of 5 rows"),
    (("--workers", "2", "--grid", "2x1"), "--grid is the shape of --placement grid"),
    (("--workers", "4", "--placement", "grid", "--grid", "2-2"), "--grid must be P_LAYERSxP_SEQUENCE"),
    (("--workers", "2", "--placement", "auto", "--worker-memory", "1000"), "no placement fits on 2 workers")])
def test_grid_and_auto_bad_input_is_one_line(tmp_path, args, says):
    r = emulate_child("run", "--model", "tiny-llama", "--random-tokens", "200", "-M", "64", "--executor", "ray", *args,
                      cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == "" and says in one_error_line(r.stderr), r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("placement,grid,workers,victim", [("sequence", None, 2, 1), ("layers", None, 2, 1),
                                                            ("grid", "2x2", 4, 2)])
def test_a_killed_worker_reloads_its_own_weights_and_the_bits_are_the_same(ray_cluster, tmp_path, placement, grid,
                                                                           workers, victim):
    """SIGKILL a worker in the middle of its own tasks (conftest.py, CrashOnce): under sequence the
    last (the last blocks), under layers the last (the last layers and the head), under grid 2x2 the
    first of the last row (the last layers of every other block). By then it has run some and holds
    their keys and values, so its restarted process loads its own range's weights again (the whole
    model under sequence), the driver re-runs what it held, and the outputs are the local bits."""
    from conftest import Watched, crash_mid_work

    p = problem(tokens=1024, block=128)
    want = local(p).hidden
    marker = tmp_path / "killed"
    watched = Watched(emulate.Ray(workers=workers, cpus_per_worker=0.5, placement=placement, grid=grid,
                                  stall_timeout=120))
    stream = emulate.stream(p.model, p.tokens, block_size=p.block_size, attention=list(p.patterns), dtype=p.dtype,
                            executor=watched, oracle=crash_mid_work(p, marker, victim, placement, workers, grid))
    hidden = torch.cat([out.hidden for _, out in stream])
    s = stream.stats
    assert int(marker.read_text()) == watched.execution.figures["ray_workers"][victim]["pid"]
    assert torch.equal(hidden, want)
    assert s["worker_processes"] > workers and s["recoveries"] >= 1
    total = sum(w.numel() * 4 for w in p.model.weights.values()) / 2**20
    if placement == "sequence":
        assert s["worker_weights_mb"][victim] == pytest.approx(total, rel=0.01)
    else:
        assert s["worker_weights_mb"][victim] < 0.75 * total
