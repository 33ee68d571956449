"""The pictures from the command line and from Python: graph, pair coverage, schedules and progress."""
from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET

import matplotlib.image as mpimg
import pytest

import emulate
from emulate.cli import main


def picture(path):
    pixels = mpimg.imread(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.std() > 0.01, path
    return pixels


@pytest.mark.parametrize("suffix", ["svg", "png", "html", "dot", "json"])
def test_graph_writes_each_format_from_its_suffix(tmp_path, capsys, suffix):
    out = tmp_path / f"g.{suffix}"
    assert main(["graph", "--random-tokens", "1024", "-M", "256", "-o", str(out)]) == 0
    assert capsys.readouterr().err.startswith(f"wrote {out}: 92 nodes")
    if suffix == "svg":
        nodes = [e for e in ET.parse(out).iter() if e.get("class", "").startswith("node")]
        assert len(nodes) == 92
    elif suffix == "png":
        picture(out)
    elif suffix == "json":
        assert len(json.loads(out.read_text())["nodes"]) == 92
    elif suffix == "dot":  # a digraph with every node and edge, positions pinned
        text = out.read_text()
        assert "digraph emulate {" in text and text.rstrip().endswith("}")
        assert len(re.findall(r'^\s+"[^"]+" \[pos=', text, re.MULTILINE)) == 92 and text.count(" -> ") == 152
    else:
        assert "http://" not in out.read_text().replace("http://www.w3.org", "")


def test_large_graphs_collapse_and_narrow(tmp_path, capsys):
    assert main(["graph", "--random-tokens", "16384", "-M", "256", "-o", str(tmp_path / "big.svg")]) == 0
    assert "collapsed to one box per layer and kind" in capsys.readouterr().err
    assert main(["graph", "--random-tokens", "16384", "-M", "256", "--layers", "1:2", "--blocks", "0:4",
                 "-o", str(tmp_path / "part.svg")]) == 0
    err = capsys.readouterr().err
    assert "collapsed" not in err and int(err.split(": ")[1].split()[0]) < 40


def test_coverage_and_comparison(tmp_path, capsys):
    assert main(["graph", "--random-tokens", "4096", "-M", "256", "--attention", "sliding", "--window", "300",
                 "--coverage", str(tmp_path / "one.png")]) == 0
    assert "45 pair calls in layer 0 (bound 48)" in capsys.readouterr().err
    picture(tmp_path / "one.png")
    assert main(["graph", "--random-tokens", "4096", "-M", "256", "--coverage", str(tmp_path / "all.png"),
                 "--compare", "full,causal,sliding,sink,sampled"]) == 0
    err = capsys.readouterr().err
    for part in ("full 256 pair calls (bound 256)", "causal 136 pair calls (bound 136)", "sampled 16 pair calls"):
        assert part in err
    picture(tmp_path / "all.png")


def test_a_local_trace_draws_one_bar_per_node(tmp_path, capsys):
    trace = tmp_path / "t.json"
    assert main(["run", "--random-tokens", "1024", "-M", "256", "--trace", str(trace), "--json", "--quiet"]) == 0
    stats = json.loads(capsys.readouterr().out)
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    assert len(events) == stats["graph_nodes"] and stats["trace"] == str(trace)
    for suffix in ("png", "html"):
        assert main(["trace", str(trace), "-o", str(tmp_path / f"gantt.{suffix}")]) == 0
        tracks = len({e["tid"] for e in events})  # one per call worker that ran a node
        assert f"{stats['graph_nodes']} tasks on {tracks} worker(s)" in capsys.readouterr().err
    picture(tmp_path / "gantt.png")
    summary = emulate.draw_trace(str(trace), str(tmp_path / "again.svg"))
    assert summary["bars"] == stats["graph_nodes"] and 0 < summary["utilisation"][0] <= 1


@pytest.mark.parametrize("args, message", [
    (["graph", "--random-tokens", "64", "-o", "x.gif"], "drawing format"),
    (["graph", "--random-tokens", "64", "--format", "png"], "give -o FILE"),
    (["graph", "--random-tokens", "64", "--compare", "full", "-o", "x.svg"], "--compare draws with --coverage"),
    (["graph", "--random-tokens", "64", "--coverage", "c.png", "--compare", "diagonal"], "--compare takes"),
    (["graph", "--random-tokens", "64", "--coverage", "c.gif"], ""),
    (["graph", "--random-tokens", "64", "--layers", "9:12", "-o", "x.svg"], ""),
    (["graph", "--random-tokens", "64", "--blocks", "a:b", "-o", "x.svg"], ""),
    (["trace", "missing.json", "-o", "g.png"], ""),
    (["trace", "notatrace.json", "-o", "g.png"], ""),
])
def test_bad_picture_requests_are_one_line_and_write_nothing(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notatrace.json").write_text(json.dumps({"nodes": []}))
    before = set(os.listdir(tmp_path))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("emulate: error:") and message in err
    assert set(os.listdir(tmp_path)) == before


def test_pictures_from_python(tmp_path):
    g = emulate.compile("tiny-llama", tokens=1024, block_size=256)
    d = emulate.draw(g, tmp_path / "g.png")
    assert d.nodes == 92 and d.format == "png"
    s = emulate.draw_coverage(g, tmp_path / "c.png")
    assert s["calls"] == 10 and s["bound"] == 10
    with pytest.raises(emulate.EmulateError):
        emulate.draw(g, tmp_path / "g.bmp")
