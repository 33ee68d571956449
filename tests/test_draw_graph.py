"""Pictures of the logical graph, checked as a viewer would see them.

SVG parses and holds one shape per drawn node; PNG decodes to a sensible, non-blank image; DOT reads
back through networkx; large graphs collapse, narrow, or are refused with a one-line message naming
the option; the matplotlib fallback draws valid files; the HTML page loads nothing from the network,
and a real headless browser runs its script (node count) and paints it (non-blank screenshot).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from html.parser import HTMLParser

import numpy as np
import pytest
from matplotlib.image import imread

import emulate
from graphs import ForwardSpec, Pattern, build_graph, from_json
from graphs.pictures import draw
from graphs.export import COLOURS

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def small():
    """tiny-llama, 1024 tokens in blocks of 256: 4 blocks x 4 layers, 92 nodes."""
    return emulate.compile("tiny-llama", tokens=1024, block_size=256)


@pytest.fixture(scope="module")
def sliding():
    return emulate.compile("tiny-llama", tokens=2048, block_size=256, attention="sliding", window=512)


@pytest.fixture(scope="module")
def big():
    """16384 tokens at M=256: 64 blocks, 9212 nodes, drawn collapsed."""
    return emulate.compile("tiny-llama", tokens=16384, block_size=256)


def svg_nodes(path):
    """(class, title) of every Graphviz node group in an SVG file."""
    root = ET.parse(path).getroot()
    out = []
    for grp in root.iter(f"{SVG}g"):
        classes = grp.get("class", "").split()
        if "node" in classes:
            out.append((classes, grp.find(f"{SVG}title").text))
    return root, out


def assert_picture(path, min_side=300):
    """A PNG a person can look at: decodes, is neither tiny nor huge, and is not one flat colour."""
    img = imread(path)
    h, w = img.shape[:2]
    assert min_side <= w <= 10000 and min_side <= h <= 10000, (w, h)
    rgb = img[..., :3].astype(float)
    assert rgb.std() > 0.05, "blank image"
    # the node colours are there: a fair share of the pixels is neither white nor grey
    sat = rgb.max(axis=-1) - rgb.min(axis=-1)
    assert (sat > 0.08).mean() > 0.02, "no coloured nodes"
    return img


def has_colour(img, hex_colour, tol=0.03, share=0.002):
    want = np.array([int(hex_colour[k:k + 2], 16) / 255 for k in (1, 3, 5)])
    close = np.all(np.abs(img[..., :3].astype(float) - want) < tol, axis=-1)
    return close.mean() > share


# --------------------------------------------------------------------------------------------
# formats


def test_svg_has_one_shape_per_node(small, tmp_path):
    path = tmp_path / "g.svg"
    drawn = draw.render(small, path)
    assert (drawn.format, drawn.view, drawn.nodes) == ("svg", "full", small.number_of_nodes())
    root, nodes = svg_nodes(path)
    assert sorted(t for _, t in nodes) == sorted(small.nodes)
    assert Counter(c[1] for c, _ in nodes) == Counter(str(a["kind"]) for _, a in small.nodes(data=True))
    edges = [g for g in root.iter(f"{SVG}g") if g.get("class") == "edge"]
    assert len(edges) == small.number_of_edges()
    text = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert "attend 3×2" in text and "causal mask" in text and "unmasked" in text  # pair and mask
    assert "layer 3" in text and "embed" in text and "head" in text  # one frame per layer row
    assert all(k in text for k in COLOURS)  # the legend


def test_png_decodes_and_is_not_blank(small, tmp_path):
    path = tmp_path / "g.png"
    assert draw.render(small, path).engine in ("graphviz", "matplotlib")
    img = assert_picture(path)
    assert img.shape[0] > img.shape[1]  # 4 blocks across, 4 layers down: taller than wide
    for kind in ("project", "attend", "merge", "mix"):
        assert has_colour(img, COLOURS[kind]), kind


def test_dot_round_trips_through_networkx(small, tmp_path):
    pytest.importorskip("pygraphviz")
    from networkx.drawing.nx_agraph import read_dot

    path = tmp_path / "g.dot"
    draw.render(small, path)
    back = read_dot(path)
    assert set(back.nodes) == set(small.nodes)
    assert set(back.edges()) == set(small.edges())
    assert all("pos" in a for _, a in back.nodes(data=True))


def test_json_is_the_graph_loss_free(small, tmp_path):
    path = tmp_path / "g.json"
    drawn = draw.render(small, path)
    assert drawn.view == "data"
    back = from_json(path.read_text())
    assert set(back.nodes) == set(small.nodes) and set(back.edges) == set(small.edges)
    assert back.nodes["L2/attend/3/1"] == small.nodes["L2/attend/3/1"]


def test_sliding_window_graph(sliding, tmp_path):
    path = tmp_path / "s.svg"
    drawn = draw.render(sliding, path)
    assert drawn.view == "full"
    _, nodes = svg_nodes(path)
    assert len(nodes) == sliding.number_of_nodes()
    text = path.read_text()
    assert "explicit mask" in text and "window 512" in text


def test_format_from_suffix_or_argument(small, tmp_path):
    assert draw.drawing_format("a/b.SVG") == "svg" and draw.drawing_format("x.gv") == "dot"
    assert draw.render(small, tmp_path / "picture", format="dot").format == "dot"
    for bad in (lambda: draw.render(small, tmp_path / "g.pdf"), lambda: draw.render(small, tmp_path / "g"),
                lambda: draw.render(small, tmp_path / "g.svg", format="gif")):
        with pytest.raises(draw.DrawError) as err:
            bad()
        assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
        assert "svg" in str(err.value)
    assert not (tmp_path / "g.pdf").exists()


# --------------------------------------------------------------------------------------------
# large graphs: collapse, narrow, refuse


def test_big_graph_collapses_per_layer_and_kind(big, tmp_path):
    path = tmp_path / "big.svg"
    drawn = draw.render(big, path)
    groups = Counter((a["layer"], str(a["kind"])) for _, a in big.nodes(data=True))
    assert drawn.view == "collapsed" and drawn.nodes == len(groups) == 18
    root, nodes = svg_nodes(path)
    assert len(nodes) == len(groups)
    text = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert f"{groups[(3, 'attend')]} calls" in text and "2079 partials" in text
    assert "--layers A:B" in text  # the picture says how to see each call
    assert_picture(draw.render(big, tmp_path / "big.png").path)


def test_narrowing_draws_each_call(big, tmp_path):
    path = tmp_path / "part.svg"
    drawn = draw.render(big, path, layers=(1, 3), blocks=(0, 6))
    want = {n for n, a in big.nodes(data=True) if 1 <= a["layer"] < 3 and a["block"] < 6}
    assert drawn.view == "full" and drawn.nodes == len(want)
    assert {t for _, t in svg_nodes(path)[1]} == want
    # embed goes with layer 0, head with the last layer
    L = len(big.graph["spec"]["patterns"])
    first = draw.select(big, layers=(0, 1), blocks=(0, 4))
    last = draw.select(big, layers=(L - 1, None), blocks=(0, 4))
    assert {a["layer"] for _, a in first.nodes(data=True)} == {-1, 0}
    assert {a["layer"] for _, a in last.nodes(data=True)} == {L - 1, L}
    assert {a["layer"] for _, a in draw.select(big, layers=(L, L + 1)).nodes(data=True)} == {L}
    # a narrowed graph still too large collapses what is left
    assert draw.render(big, tmp_path / "layer.svg", layers=(2, 3)).view == "collapsed"


def test_bad_ranges_name_the_option(big, tmp_path):
    for kwargs, option in ((dict(layers=(3, 3)), "--layers"), (dict(layers=(7, 9)), "--layers"),
                           (dict(blocks=(64, 70)), "--blocks"), (dict(blocks="x"), "--blocks")):
        with pytest.raises(draw.DrawError, match=option) as err:
            draw.render(big, tmp_path / "x.svg", **kwargs)
        assert "\n" not in str(err.value)
    assert not (tmp_path / "x.svg").exists()


def test_too_large_even_collapsed_is_refused(tmp_path):
    causal = Pattern("causal")
    spec = ForwardSpec(tokens=512, block_size=256, patterns=(causal,) * 600, heads=2, kv_heads=2, head_dim=4,
                       width=8, mlp_width=16, vocab=16)
    g = build_graph(spec)  # 4804 nodes, 2402 boxes even collapsed
    target = tmp_path / "huge.png"
    with pytest.raises(draw.DrawError) as err:
        draw.render(g, target)
    message = str(err.value)
    assert "\n" not in message and "--layers A:B" in message and "--blocks A:B" in message
    assert not target.exists() and os.listdir(tmp_path) == []
    assert draw.render(g, target, layers=(0, 100)).view == "collapsed"  # the option it names works
    assert draw.render(g, target, layers=(0, 50)).view == "full"


# --------------------------------------------------------------------------------------------
# the matplotlib fallback


def test_matplotlib_fallback_png_and_svg(small, tmp_path, monkeypatch):
    monkeypatch.setattr(draw, "_have_pygraphviz", lambda: False)  # as if `import pygraphviz` failed
    png = draw.render(small, tmp_path / "m.png")
    assert png.engine == "matplotlib"
    img = assert_picture(png.path)
    assert has_colour(img, COLOURS["attend"])
    svg = draw.render(small, tmp_path / "m.svg", engine="matplotlib")
    root = ET.parse(svg.path).getroot()
    ids = [g.get("id") for g in root.iter(f"{SVG}g") if (g.get("id") or "").startswith("node-")]
    assert len(ids) == small.number_of_nodes()
    assert "attend 3×2" in ET.tostring(root, encoding="unicode")


def test_graphviz_engine_without_pygraphviz_says_so(small, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pygraphviz", None)  # import fails
    with pytest.raises(draw.DrawError, match="pygraphviz"):
        draw.render(small, tmp_path / "g.svg", engine="graphviz")
    assert draw.render(small, tmp_path / "g.svg").engine == "matplotlib"


# --------------------------------------------------------------------------------------------
# files


def test_targets_that_are_not_regular_files_are_refused(small, tmp_path):
    folder = tmp_path / "dir.svg"
    folder.mkdir()
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for target, what in ((folder, "directory"), (fifo, "FIFO")):
        with pytest.raises(draw.DrawError, match=what):
            draw.render(small, target)
    assert folder.is_dir() and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    with pytest.raises(draw.DrawError, match="does not exist"):
        draw.write_file(tmp_path / "missing" / "g.svg", "x")


def test_a_symlink_writes_the_file_it_points_to(small, tmp_path):
    real = tmp_path / "real.svg"
    real.write_text("old")
    link = tmp_path / "link.svg"
    link.symlink_to(real)
    draw.render(small, link)
    assert link.is_symlink() and real.read_text().startswith("<?xml")


def test_files_are_replaced_atomically_with_the_mode_open_would_give(small, tmp_path):
    target = tmp_path / "g.html"
    target.write_text("old")
    os.chmod(target, 0o600)
    old = os.umask(0o027)
    try:
        draw.render(small, target)  # an existing file keeps its mode
        draw.render(small, tmp_path / "new.html")  # a new one gets 0666 less the umask
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "new.html").st_mode) == 0o640
    assert target.read_text().startswith("<!DOCTYPE html>")
    assert sorted(os.listdir(tmp_path)) == ["g.html", "new.html"]  # no temporary file left behind


def test_graphs_does_not_import_emulate_torch_or_ray():
    code = ("import sys, graphs.pictures.draw, graphs.pictures.html; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'emulate', 'torch', 'ray'}); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --------------------------------------------------------------------------------------------
# HTML


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_html_is_self_contained(small, tmp_path):
    path = tmp_path / "g.html"
    draw.render(small, path)
    text = path.read_text()
    assert "http://" not in text and "https://" not in text and "//cdn" not in text
    page = _Page()
    page.feed(text)
    for tag, attrs in page.tags:
        assert "src" not in attrs, (tag, attrs)  # every script and picture is inline
        assert tag not in ("link", "iframe", "img", "object", "embed")
        assert not (attrs.get("href") or "#").lstrip().startswith(("http", "//")), attrs
    nodes = [a for t, a in page.tags if t == "g" and "node" in (a.get("class") or "").split()]
    assert len(nodes) == small.number_of_nodes()
    assert {a["data-id"] for a in nodes} == set(small.nodes)
    attend = next(a for a in nodes if a["data-id"] == "L1/attend/2/0")
    info = json.loads(attend["data-info"])
    assert (info["kind"], info["layer"], info["block"], info["key block"], info["mask"]) == ("attend", "1", "2", "0", "none")
    assert {"tokens", "FLOPs", "bytes"} <= set(info)
    assert sum(1 for t, _ in page.tags if t == "script") == 1
    # filters: a checkbox per kind, a layer select with every layer row
    assert {a["data-kind"] for t, a in page.tags if t == "input"} == set(COLOURS)
    assert len([a for t, a in page.tags if t == "option"]) == 1 + 6  # all, embed, 4 layers, head


def _browser():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _chromium(args, profile, timeout=90):
    exe = _browser()
    if exe is None:
        pytest.skip("no chromium: install Debian's `chromium` package (apt-get install chromium) to run the browser check")
    cmd = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_html_runs_in_a_headless_browser(small, tmp_path):
    path = tmp_path / "g.html"
    draw.render(small, path)
    profile = tmp_path / "profile"
    out = _chromium(["--dump-dom", path.as_uri()], profile)
    assert out.returncode == 0, out.stderr[-2000:]
    body = re.search(r"<body[^>]*>", out.stdout).group(0)
    assert re.search(r'data-nodes="(\d+)"', body).group(1) == str(small.number_of_nodes())  # the script ran
    assert re.search(r'data-visible="(\d+)"', body).group(1) == str(small.number_of_nodes())
    # the filter, preset through the link: layer 2's attend and merge nodes only
    out = _chromium(["--dump-dom", path.as_uri() + "#layer=2&kinds=attend,merge"], profile)
    want = sum(1 for _, a in small.nodes(data=True) if a["layer"] == 2 and a["kind"] in ("attend", "merge"))
    assert re.search(r'data-visible="(\d+)"', out.stdout).group(1) == str(want)

    shot = tmp_path / "shot.png"
    out = _chromium([f"--screenshot={shot}", "--window-size=1200,800", "--hide-scrollbars", path.as_uri()], profile)
    assert shot.exists(), out.stderr[-2000:]
    img = assert_picture(shot)
    assert img.shape[:2] == (800, 1200)
    assert has_colour(img, COLOURS["attend"]) and has_colour(img, COLOURS["project"])  # the graph, not only the header
