"""Pictures of a run: the attention coverage grid of a layer and the Gantt chart of a traced schedule.

Coverage grids are read off compiled graphs (no forward runs); the Gantt chart is drawn from a
real local run with tracing, a real two-worker Ray run (in a subprocess, so its private Ray
instance stops with it) and a synthetic trace whose critical path and utilisation are known.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import emulate
from emulate.runtime.trace import TraceError, read_trace, write_trace
from graphs import Pattern
from graphs.pictures.coverage import CAUSAL, CODES, EMPTY, EXPLICIT, NONE, SAMPLE, DrawError, draw_comparison, draw_coverage
from graphs.pictures.gantt import draw_gantt

ROOT = Path(__file__).resolve().parents[1]


def decoded(path: Path) -> np.ndarray:
    """The PNG at `path` as an RGB(A) array, checked to be a sensible, non-blank picture."""
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    h, w = img.shape[:2]
    assert 300 <= w <= 4000 and 150 <= h <= 4000, (w, h)
    rgb = img[..., :3].reshape(-1, 3)
    assert rgb.std() > 0.05 and len(np.unique((rgb * 255).astype(np.uint8), axis=0)) > 8
    return img


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def compiled(pattern: str, tokens=2048, block=256):
    model = "tiny-bert" if pattern in ("full", "sampled") else "tiny-llama"
    extra = {"sliding": dict(window=300), "sink": dict(window=300, sinks=64)}.get(pattern, {})
    return emulate.compile(model, tokens=tokens, block_size=block, attention=pattern, **extra)


@pytest.fixture(scope="module")
def five():
    return {p: compiled(p) for p in ("full", "causal", "sliding", "sink", "sampled")}


# -- coverage ---------------------------------------------------------------------------------------

def test_coverage_draws_the_graphs_pairs(tmp_path):
    g = emulate.compile("tiny-llama", tokens=4096, block_size=256, attention="sliding", window=300)
    out = tmp_path / "cov.png"
    s = draw_coverage(g, out)
    decoded(out)
    attends = {(a["block"], a["key_block"]): a["mask"] for _, a in g.nodes(data=True)
               if a["kind"] == "attend" and a["layer"] == 0}
    grid = s["grid"]
    assert grid.shape == (16, 16) and s["blocks"] == 16 and s["tokens"] == 4096 and s["block_size"] == 256
    assert s["calls"] == s["cells"] == len(attends) == int((grid != EMPTY).sum())
    assert {tuple(map(int, ij)) for ij in zip(*np.nonzero(grid))} == set(attends)
    assert all(grid[i, j] == CODES[m] for (i, j), m in attends.items())
    assert s["bound"] == Pattern("sliding", window=300).calls_bound(16, 256) == 48  # (ceil(300/256) + 1) * B
    assert s["pattern"] == "sliding(r=300)" and s["by_mask"] == {"causal": 16, "explicit": len(attends) - 16}
    assert (out.stat().st_mode & 0o777) == 0o666 & ~umask()
    assert [p.name for p in tmp_path.iterdir()] == ["cov.png"]


@pytest.mark.parametrize("pattern", ["full", "causal", "sliding", "sink", "sampled"])
def test_coverage_grid_matches_every_pattern(five, pattern, tmp_path):
    g = five[pattern]
    s = draw_coverage(g, tmp_path / "c.svg", layer=1)
    assert (tmp_path / "c.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    attends = [a for _, a in g.nodes(data=True) if a["kind"] == "attend" and a["layer"] == 1]
    spec = g.graph["spec"]
    assert s["calls"] == len(attends) and s["layer"] == 1
    assert s["bound"] == Pattern(**spec["patterns"][1]).calls_bound(g.graph["blocks"], spec["block_size"])
    assert s["calls"] <= s["bound"]
    grid = s["grid"]
    if pattern == "sampled":  # one call per query block, shaded over the blocks its keys come from
        assert set(np.unique(grid)) <= {EMPTY, SAMPLE}
        assert s["calls"] == g.graph["blocks"]
        for a in attends:
            assert list(np.flatnonzero(grid[a["block"]])) == list(a["key_blocks"])
    else:
        assert s["cells"] == s["calls"]
        assert {(a["block"], a["key_block"]) for a in attends} == {tuple(map(int, ij)) for ij in zip(*np.nonzero(grid))}
    if pattern == "full":
        assert (grid == NONE).all()
    if pattern == "causal":
        assert (np.diag(grid) == CAUSAL).all() and (np.triu(grid, 1) == EMPTY).all()
    if pattern in ("sliding", "sink"):
        assert (grid == EXPLICIT).any()


def test_comparison_of_five_patterns(five, tmp_path):
    out = tmp_path / "compare.png"
    got = draw_comparison(five, out)
    img = decoded(out)
    assert img.shape[1] > 2.5 * img.shape[0]  # side by side
    assert list(got) == list(five)
    calls = {k: v["calls"] for k, v in got.items()}
    B = five["full"].graph["blocks"]
    assert calls["full"] == B * B and calls["causal"] == B * (B + 1) // 2 and calls["sampled"] == B
    assert calls["sliding"] < calls["causal"] and calls["sink"] < calls["causal"]


def test_drawing_refuses_bad_requests(five, tmp_path):
    g = five["causal"]
    for bad, match in [(tmp_path / "c.jpg", "suffix '.jpg'"), (tmp_path / "c", "no suffix"),
                       (tmp_path / "missing" / "c.png", "does not exist")]:
        with pytest.raises(DrawError, match=match) as err:
            draw_coverage(g, bad)
        assert "\n" not in str(err.value) and isinstance(err.value, ValueError)
    (tmp_path / "d.png").mkdir()
    with pytest.raises(DrawError, match="is a directory"):
        draw_coverage(g, tmp_path / "d.png")
    (tmp_path / "d.png").rmdir()
    with pytest.raises(DrawError, match="layer 9 out of range"):
        draw_coverage(g, tmp_path / "c.png", layer=9)
    with pytest.raises(DrawError, match="nothing to compare"):
        draw_comparison({}, tmp_path / "c.png")
    with pytest.raises(DrawError, match="suffix '.pdf'"):
        draw_gantt([], tmp_path / "g.pdf")
    with pytest.raises(DrawError, match="no complete"):
        draw_gantt([{"ph": "M", "name": "thread_name", "tid": 0, "args": {"name": "w"}}], tmp_path / "g.png")
    assert list(tmp_path.iterdir()) == []


def test_draw_error_is_the_graph_drawings():
    import graphs.pictures.draw

    assert DrawError is graphs.pictures.draw.DrawError and issubclass(DrawError, ValueError)


def test_graphs_drawing_modules_import_neither_torch_nor_emulate():
    code = ("import sys, graphs.pictures.coverage, graphs.pictures.gantt; "
            "bad = [m for m in ('torch', 'ray', 'emulate', 'matplotlib') if m in sys.modules]; print(bad)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # matplotlib too is loaded only when something is drawn


# -- traces and the Gantt chart -------------------------------------------------------------------

def test_local_run_writes_a_trace_and_its_gantt_chart(tmp_path):
    path = tmp_path / "local.json"
    ex = emulate.Local(trace=str(path), threads=2)  # two call workers: one track each
    assert emulate.stream("tiny-llama", random_tokens=64, block_size=32, executor=ex).executor is ex
    run = emulate.run("tiny-llama", random_tokens=1024, block_size=256, executor=ex)
    assert run.stats["executor"] == "local" and run.stats["trace"] == str(path)
    events = read_trace(path)
    slices = [e for e in events if e["ph"] == "X"]
    g = run.graph
    assert len(slices) == g.number_of_nodes()
    assert sorted(n for e in slices for n in e["args"]["nodes"]) == sorted(g.nodes)
    index = {e["args"]["nodes"][0]: e["args"]["task"] for e in slices}
    for e in slices:  # deps are the node's inputs, as task indices, each run before it
        node = e["args"]["nodes"][0]
        assert e["cat"] == g.nodes[node]["kind"] and e["tid"] in (0, 1)
        assert e["args"]["deps"] == sorted({index[src] for src in g.nodes[node]["inputs"]})
        assert all(d < e["args"]["task"] for d in e["args"]["deps"])
    assert (path.stat().st_mode & 0o777) == 0o666 & ~umask()

    out = tmp_path / "local.png"
    s = draw_gantt(events, out)
    decoded(out)
    tracks = {e["tid"] for e in slices}
    assert s["bars"] == len(slices) and s["workers"] == len(tracks) == len(s["utilisation"]) and tracks <= {0, 1}
    assert all(0 < u <= 1 for u in s["utilisation"]) and s["critical_path_from"] == "deps"
    layers = len(g.graph["spec"]["patterns"])
    path = s["critical_path"]  # a chain of the graph: embed, (project, attend, [merge,] mix) per layer, head
    assert len(path) == s["critical_path_tasks"] and 2 + 3 * layers <= len(path) <= 2 + 4 * layers
    assert g.nodes[path[0]]["kind"] == "embed" and g.nodes[path[-1]]["kind"] == "head"
    assert all(g.has_edge(a, b) for a, b in zip(path, path[1:]))
    assert 0 < s["critical_path_s"] <= s["makespan_s"]
    html = tmp_path / "local.html"
    assert draw_gantt(events, html) == s
    page = html.read_text()
    assert page.count('<rect class="bar"') == len(slices) and "<title>" in page and "<script" not in page
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_local_executor_refuses_a_bad_trace_path_before_any_work(tmp_path):
    with pytest.raises(emulate.EmulateError, match="output directory .* does not exist"):
        emulate.run("tiny-llama", random_tokens=64, block_size=32,
                    executor=emulate.Local(trace=str(tmp_path / "no" / "t.json")))
    assert emulate.Local().trace is None


def synthetic_trace(path: Path, deps: bool = True) -> None:
    """Two workers: a (0-1 s) -> c (1-3 s) on worker 0, b (0-2 s) on worker 1, d (3-4 s) after c and b."""
    rows = [("a", 0, 0.0, 1.0, []), ("b", 1, 0.0, 2.0, []), ("c", 0, 1.0, 3.0, [0]), ("d", 1, 3.0, 4.0, [2, 1])]
    records = [{"task": k, "name": n, "kind": "row" if k > 1 else "start", "worker": w, "start": 100 + s,
                "end": 100 + e, "nodes": [f"node {n}"], "pid": 7, **({"deps": d} if deps else {})}
               for k, (n, w, s, e, d) in enumerate(rows)]
    workers = [{"worker": w, "host": "here", "pid": 7 + w} for w in (0, 1)]
    write_trace(str(path), records, workers, 100.0)


@pytest.mark.parametrize("deps", [True, False])
def test_gantt_of_a_synthetic_two_worker_trace(tmp_path, deps):
    trace = tmp_path / "t.json"
    synthetic_trace(trace, deps)
    events = read_trace(trace)
    s = draw_gantt(events, tmp_path / "t.png")
    decoded(tmp_path / "t.png")
    assert s["bars"] == 4 and s["workers"] == 2
    assert s["worker_names"] == ["worker 0 (here, pid 7)", "worker 1 (here, pid 8)"]
    assert s["utilisation"] == [0.75, 0.75] and s["makespan_s"] == 4.0
    assert s["critical_path_s"] == 4.0 and s["critical_path"] == ["a", "c", "d"]
    assert s["critical_path_from"] == ("deps" if deps else "schedule")
    assert s["tasks_by_kind"] == {"start": 2, "row": 2}
    assert draw_gantt(events, tmp_path / "t.svg") == s


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")
def test_ray_run_trace_has_dependencies_and_draws(tmp_path):
    trace = tmp_path / "ray.json"
    code = ("import json, emulate; r = emulate.run('tiny-llama', random_tokens=1024, block_size=256, "
            f"executor=emulate.Ray(workers=2, trace={str(trace)!r}, stall_timeout=60)); "
            "print(json.dumps({k: r.stats[k] for k in ('physical_tasks', 'graph_nodes', 'workers')}))")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    events = read_trace(trace)
    slices = [e for e in events if e["ph"] == "X"]
    assert len(slices) == stats["physical_tasks"]
    assert len({n for e in slices for n in e["args"]["nodes"]}) == stats["graph_nodes"]
    tasks = {e["args"]["task"] for e in slices}
    assert all(set(e["args"]["deps"]) <= tasks and e["args"]["task"] not in e["args"]["deps"] for e in slices)
    s = draw_gantt(events, tmp_path / "ray.png")
    decoded(tmp_path / "ray.png")
    assert s["bars"] == len(slices) and s["workers"] == stats["workers"] == 2
    assert all(0 < u <= 1 for u in s["utilisation"]) and s["critical_path_from"] == "deps"
    assert 0 < s["critical_path_s"] <= s["makespan_s"]


@pytest.mark.parametrize("content, match", [
    ("", "the file is empty"),
    ("{not json", "not JSON"),
    ('{"events": []}', "not a Chrome trace"),
    ('"text"', "not a Chrome trace"),
    ('{"traceEvents": []}', "no complete"),
    ('[{"ph": "M", "name": "thread_name", "tid": 0}]', "no complete"),
    ('[{"ph": "X", "name": "a", "tid": 0, "ts": 0}]', "no valid dur"),
    ('[{"ph": "X", "name": "a", "tid": 0, "ts": 0, "dur": -1}]', "negative duration"),
])
def test_read_trace_refuses_bad_files_in_one_line(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(TraceError, match=match) as err:
        read_trace(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert isinstance(err.value, ValueError) and isinstance(err.value, emulate.EmulateError)


def test_read_trace_refuses_missing_and_binary_files(tmp_path):
    with pytest.raises(TraceError, match="no such file"):
        read_trace(tmp_path / "none.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(TraceError, match="not a text file"):
        read_trace(tmp_path / "bin.json")
    with pytest.raises(TraceError, match="directory"):
        read_trace(tmp_path)
