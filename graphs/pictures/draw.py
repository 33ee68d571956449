"""Draw a logical graph: SVG, PNG, DOT, JSON or a self-contained interactive HTML page.

One layout serves every picture: blocks across (x), layers down (y), one frame per layer, nodes
coloured by kind (export.COLOURS) with a legend. Within a layer the rows are project, the attend
pairs of each query block stacked under it (so a causal layer reads as the triangle of its mask),
merge, mix. Inputs of an attend pair arrive on a bus left of its column, partials leave on a bus
right of it, and residual edges (embed -> mix, mix -> mix) are dashed on their own bus, so no edge
runs under a node it does not touch.

SVG and PNG are drawn by Graphviz in-process (pygraphviz, `nop2`: the positions and edge splines
computed here are pinned, Graphviz only paints); where pygraphviz is missing, or with
engine="matplotlib", matplotlib paints the same layout. HTML is drawn by graphs.pictures.html from the same
layout. DOT is the pinned Graphviz source (`neato -n2 -Tsvg` reproduces the picture; plain `dot`
lays it out again). JSON is the selected subgraph, loss-free (export.to_json; graphs.from_json
reloads it) and never collapsed: it is data, not a picture.

Selecting (`layers`, `blocks`: half-open (start, stop) ranges, None for an open end, or the
command line's "A:B" / "A:" / ":B" strings):
  layers   the layer rows start <= l < stop of 0..L-1. The embed row (layer -1) is kept when layer 0
           is in range and the head row (layer L) when layer L-1 is: each goes with the layer it
           feeds or reads. Naming -1 or L in the range keeps them too (layers=(L, L+1): heads only).
  blocks   the nodes whose query block is in range; an attend pair (i, j) is kept when i is, and its
           edge from a key block j outside the range is not drawn (the title says so).
Large pictures stay legible: past `max_nodes` drawn nodes the picture collapses to one box per
layer and kind with its counts ("layer 3: 16 project, 136 attend, 15 merge, 16 mix"); past
`max_boxes` boxes even collapsed it is refused with a DrawError naming --layers / --blocks.

Every file is written atomically (a temporary file beside the target, then os.replace), mode
0666 & ~umask, and an existing target that is not a regular file is refused before drawing.
"""
from __future__ import annotations

import math
import os
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import networkx as nx

from graphs.export import COLOURS, to_json
from graphs.files import OutputError, output_target
from graphs.files import write_file as files_write
from graphs.kinds import NodeKind
from graphs.nodes import Node, NodeAttrs, scan_nodes

FORMATS = ("svg", "png", "dot", "json", "html")
SUFFIXES = {".svg": "svg", ".png": "png", ".dot": "dot", ".gv": "dot", ".json": "json", ".html": "html", ".htm": "html"}
ENGINES = ("graphviz", "matplotlib")
MAX_NODES = 500  # past this many drawn nodes the picture collapses to one box per layer and kind
MAX_BOXES = 2000  # past this many boxes even collapsed, render refuses and names the narrowing options
MASK_LABELS = {"none": "unmasked", "causal": "causal mask", "explicit": "explicit mask", "sample": "sampled keys"}
KIND_ORDER = ("embed", "project", "attend", "merge", "mix", "head")
LEGEND_EDGES = "edges: solid = data, dashed = residual"
FONT = "DejaVu Sans"
FONT_SIZE = 9.0
EDGE_COLOUR = "#78909c"
RESIDUAL_COLOUR = "#9e9e9e"
FRAME_COLOUR = "#b0bec5"
FRAME_FILL = "#fafafa"
PNG_DPI = 110
PNG_MAX_PIXELS = 9000  # the longer side of a PNG: the dpi drops for larger pictures
ARROW = 6.0  # arrowhead length, points

# geometry of the full view, in points (1/72 in), y down
NODE_W, NODE_H = 86.0, 30.0
COL_GAP = 50.0  # between columns: the left bus (inputs), the right bus (partials), the residual bus
ROW = NODE_H + 14.0
PROJECT_GAP = 26.0  # below the project row: the attend inputs cross here
FRAME_PAD = 30.0
FRAME_TOP = 12.0  # frame border to the first row
GUTTER_PAD = 16.0  # the frame's left gutter holds its label: widest line + this
LINE = 11.0  # a line of 9 pt text
LAYER_GAP = 24.0
HEADER = 64.0
MARGIN = 12.0
# geometry of the collapsed view
BOX_W, BOX_H = 150.0, 46.0
BOX_GAP = 54.0
BOX_ROW_GAP = 56.0


class DrawError(ValueError):
    """A drawing that cannot be made as asked: the message is one line, fit for a command line."""


@dataclass
class Box:
    """One drawn node: a call of the graph, or in the collapsed view all calls of a layer and kind."""

    id: str
    kind: str
    layer: int
    x: float  # centre
    y: float
    w: float
    h: float
    lines: list[str]
    info: dict[str, str]  # the details a viewer shows on hover, in order

    @property
    def left(self):
        return self.x - self.w / 2

    @property
    def right(self):
        return self.x + self.w / 2

    @property
    def top(self):
        return self.y - self.h / 2

    @property
    def bottom(self):
        return self.y + self.h / 2


@dataclass
class Link:
    """One drawn edge: a cubic Bezier spline (3n + 1 points) from its source to its target's border."""

    src: int  # index into Layout.boxes
    dst: int
    points: list[tuple[float, float]]
    residual: bool = False
    count: int = 1  # collapsed view: how many edges of the graph it stands for


@dataclass
class Frame:
    """The frame of one layer row (embed and head rows included)."""

    layer: int
    x0: float
    y0: float
    x1: float
    y1: float
    label: str  # one line: the layer select of the HTML page, tooltips
    lines: list[str] = field(default_factory=list)  # drawn in the frame's left gutter, top down


@dataclass
class Layout:
    """Everything a picture shows, in points with y down; every renderer paints exactly this."""

    width: float
    height: float
    title: str
    subtitle: str
    collapsed: bool
    boxes: list[Box] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    frames: list[Frame] = field(default_factory=list)
    layer_names: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Drawing:
    """What render wrote."""

    path: str
    format: str
    view: str  # "full", "collapsed" or "data" (json)
    nodes: int  # nodes drawn (boxes in the collapsed view; graph nodes written for json)
    edges: int
    engine: str | None  # who painted svg/png; None for dot, json and html


# --------------------------------------------------------------------------------------------
# public entry point


def render(g: nx.DiGraph, path, format: str | None = None, layers=None, blocks=None, max_nodes: int = MAX_NODES,
           *, max_boxes: int = MAX_BOXES, engine: str | None = None) -> Drawing:
    """Draw `g` (or the part `layers` / `blocks` select) to `path`; the format follows the suffix when None.

    engine: None (Graphviz where pygraphviz imports, else matplotlib), "graphviz" or "matplotlib";
    it paints svg and png only. Raises DrawError for an unknown format, an empty or malformed
    selection, a picture too large even collapsed, or a target that is not a regular file.
    """
    path = os.fspath(path)
    fmt = drawing_format(path, format)
    if engine is not None and engine not in ENGINES:
        raise DrawError(f"unknown drawing engine {engine!r} (choose from {', '.join(ENGINES)})")
    check_target(path)
    sel = select(g, layers=layers, blocks=blocks)
    if fmt == "json":
        write_file(path, to_json(sel))
        return Drawing(path, fmt, "data", sel.number_of_nodes(), sel.number_of_edges(), None)
    lay = layout(sel, max_nodes=max_nodes, max_boxes=max_boxes)
    used = None
    if fmt == "dot":
        data = to_pinned_dot(lay)
    elif fmt == "html":
        from graphs.pictures.html import to_html

        data = to_html(lay)
    else:
        used = engine or ("graphviz" if _have_pygraphviz() else "matplotlib")
        data = _paint_graphviz(lay, fmt) if used == "graphviz" else _paint_matplotlib(lay, fmt)
    write_file(path, data)
    return Drawing(path, fmt, "collapsed" if lay.collapsed else "full", len(lay.boxes), len(lay.links), used)


def drawing_format(path, format: str | None = None) -> str:
    """The format `render` will write: `format` when given, else the one the suffix names."""
    if format is not None:
        fmt = str(format).lower().lstrip(".")
        if fmt not in FORMATS:
            raise DrawError(f"unknown drawing format {format!r} (choose from {', '.join(FORMATS)})")
        return fmt
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in SUFFIXES:
        what = f"suffix {suffix!r}" if suffix else "no suffix"
        raise DrawError(f"cannot tell the drawing format of {os.fspath(path)!r} ({what}): "
                        f"use .svg, .png, .dot, .json or .html, or name the format")
    return SUFFIXES[suffix]


# --------------------------------------------------------------------------------------------
# selection


def _range(value, name: str, low: int, high: int) -> tuple[int, int]:
    """(start, stop) clipped to [low, high); None (or an empty side of "A:B") is an open end.

    Raises DrawError naming --name.
    """
    if value is None:
        return low, high
    try:
        if isinstance(value, str):
            start, stop = (part.strip() or None for part in value.split(":"))
        else:
            start, stop = value
        start = low if start is None else int(start)
        stop = high if stop is None else int(stop)
    except (TypeError, ValueError):
        raise DrawError(f"--{name} wants a range START:STOP, got {value!r}") from None
    if start >= stop:
        raise DrawError(f"--{name} {start}:{stop} is empty (START must be below STOP)")
    return max(start, low), min(stop, high)


def select(g: nx.DiGraph, layers=None, blocks=None) -> nx.DiGraph:
    """The subgraph the ranges select (module docstring); g itself when both are None."""
    if layers is None and blocks is None:
        return g
    L = len(g.graph["spec"]["patterns"])
    B = g.graph["blocks"]
    l0, l1 = _range(layers, "layers", -1, L + 1)
    b0, b1 = _range(blocks, "blocks", 0, B)
    if l0 >= l1:
        raise DrawError(f"--layers {layers[0]}:{layers[1]} selects no layer (the graph has layers 0:{L})")
    if b0 >= b1:
        raise DrawError(f"--blocks {blocks[0]}:{blocks[1]} selects no block (the graph has blocks 0:{B})")
    rows = set(range(l0, l1))
    if 0 in rows:
        rows.add(-1)
    if L - 1 in rows:
        rows.add(L)
    keep = [n for n, node in scan_nodes(g) if node.layer in rows and b0 <= node.block < b1]
    if not keep:
        raise DrawError(f"--layers {l0}:{l1} --blocks {b0}:{b1} selects no node")
    sel = g.subgraph(keep).copy()
    sel.graph["selection"] = {"layers": [l0, l1] if layers is not None else None,
                              "blocks": [b0, b1] if blocks is not None else None}
    return sel


# --------------------------------------------------------------------------------------------
# layout


def layout(sel: nx.DiGraph, max_nodes: int = MAX_NODES, max_boxes: int = MAX_BOXES) -> Layout:
    """The full view, or the collapsed one past max_nodes; DrawError past max_boxes collapsed."""
    n = sel.number_of_nodes()
    if n <= max_nodes:
        return _full_layout(sel)
    boxes = len({(node.layer, node.kind) for _, node in scan_nodes(sel)})
    if boxes > max_boxes:
        raise DrawError(f"graph too large to draw: {n} nodes, {boxes} boxes even collapsed (limit {max_boxes}); "
                        f"draw part of it with --layers A:B or --blocks A:B")
    return _collapsed_layout(sel, max_nodes)


def _pattern_name(p: dict) -> str:
    kind = str(p["kind"])
    extra = []
    if p.get("window") is not None:
        extra.append(f"window {p['window']}")
    if p.get("sinks") is not None:
        extra.append(f"{p['sinks']} sinks")
    return kind + (f" ({', '.join(extra)})" if extra else "")


def _layer_name(layer: int, L: int, patterns) -> str:
    if layer < 0:
        return "embed"
    if layer >= L:
        return "head"
    return f"layer {layer} · {_pattern_name(patterns[layer])}"


def _layer_lines(layer: int, L: int, patterns) -> list[str]:
    """The frame label, a word or two a line: it sits in the frame's left gutter, clear of every edge."""
    if layer < 0:
        return ["embed"]
    if layer >= L:
        return ["head"]
    p = patterns[layer]
    lines = [f"layer {layer}", str(p["kind"])]
    if p.get("window") is not None:
        lines.append(f"window {p['window']}")
    if p.get("sinks") is not None:
        lines.append(f"{p['sinks']} sinks")
    return lines


def _gutter(lines) -> float:
    return max(_text_width(t) for ls in lines for t in ls) + GUTTER_PAD


def _titles(sel: nx.DiGraph, drawn: str) -> tuple[str, str]:
    spec = sel.graph["spec"]
    pats = [_pattern_name(p) for p in spec["patterns"]]
    common = Counter(pats)
    pattern = pats[0] if len(common) == 1 else ", ".join(f"{k} ×{v}" for k, v in common.items())
    title = (f"{spec['tokens']} tokens, blocks of M={spec['block_size']} · {sel.graph['blocks']} blocks × "
             f"{len(spec['patterns'])} layers · {pattern}")
    chosen = sel.graph.get("selection") or {}
    parts = []
    if chosen.get("layers"):
        L = len(spec["patterns"])
        rows = {node.layer for _, node in scan_nodes(sel)}
        inner = [layer for layer in rows if 0 <= layer < L]
        names = [f"layers {min(inner)}:{max(inner) + 1}"] if inner else []
        names = (["embed"] if -1 in rows else []) + names + (["head"] if L in rows else [])
        parts.append(" + ".join(names))
    if chosen.get("blocks"):
        parts.append(f"blocks {chosen['blocks'][0]}:{chosen['blocks'][1]}")
    sub = drawn
    if parts:
        sub += f" · showing {', '.join(parts)} (inputs from outside not drawn)"
    return title, sub


def _node_info(n: str, node: Node) -> dict[str, str]:
    info = {"node": n, "kind": str(node.kind), "layer": str(node.layer), "block": str(node.block)}
    if node.kind == NodeKind.ATTEND:
        kb = node.key_block
        info["key block"] = "sample (τ)" if kb is not None and kb < 0 else str(kb)
        if kb is not None and kb < 0 and node.key_blocks is not None:
            info["key blocks"] = ", ".join(map(str, node.key_blocks))
        info["mask"] = str(node.mask)
    info["span"] = f"{node.span[0]}:{node.span[1]}"
    if node.key_span is not None:
        info["key span"] = f"{node.key_span[0]}:{node.key_span[1]}"
    info["tokens"] = str(node.tokens)
    info["FLOPs"] = _si(node.flops)
    info["bytes"] = _si(node.bytes, binary=True)
    info["inputs"] = str(len(node.inputs))
    return info


def _si(value: float, binary: bool = False) -> str:
    if binary:
        for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(value) < 1024 or unit == "TiB":
                return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
            value /= 1024
    for unit in ("", "k", "M", "G", "T", "P"):
        if abs(value) < 1000 or unit == "P":
            return f"{value:.0f}" if unit == "" else f"{value:.1f} {unit}"
        value /= 1000
    return str(value)


def _label(node: Node) -> list[str]:
    kind, i = str(node.kind), node.block
    if node.kind == NodeKind.ATTEND:
        kb = node.key_block
        j = "τ" if kb is not None and kb < 0 else str(kb)
        return [f"attend {i}×{j}", MASK_LABELS.get(str(node.mask), str(node.mask))]
    if node.kind == NodeKind.MERGE:
        return [f"merge {i}", f"{len(node.inputs)} partials"]
    if node.kind in (NodeKind.EMBED, NodeKind.HEAD):
        return [f"{kind} {i}", f"tokens {node.span[0]}:{node.span[1]}"]
    return [f"{kind} {i}"]


def _text_width(text: str, size: float = FONT_SIZE) -> float:
    """A generous estimate of DejaVu Sans text width, in points."""
    return 0.62 * size * len(text)


def _line(p, q):
    """A straight segment as one cubic Bezier."""
    return [p, (p[0] + (q[0] - p[0]) / 3, p[1] + (q[1] - p[1]) / 3), (p[0] + 2 * (q[0] - p[0]) / 3, p[1] + 2 * (q[1] - p[1]) / 3), q]


def _turn(p, q, vertical_first: bool):
    """A quarter bend from p to q: leaves vertically (or horizontally) and arrives the other way."""
    if vertical_first:
        return [p, (p[0], p[1] + (q[1] - p[1]) * 0.6), (q[0] - (q[0] - p[0]) * 0.6, q[1]), q]
    return [p, (p[0] + (q[0] - p[0]) * 0.6, p[1]), (q[0], q[1] - (q[1] - p[1]) * 0.6), q]


def _chain(*segments):
    """Join Bezier segments that share end points into one 3n + 1 point spline."""
    out = list(segments[0])
    for seg in segments[1:]:
        out.extend(seg[1:])
    return out


def _full_layout(sel: nx.DiGraph) -> Layout:
    spec = sel.graph["spec"]
    patterns = spec["patterns"]
    L = len(patterns)
    nodes = {n: Node.of(a) for n, a in sel.nodes(data=True)}
    blocks = sorted({node.block for node in nodes.values()})
    b_min = blocks[0] if blocks else 0
    ncols = (blocks[-1] - b_min + 1) if blocks else 1
    labels = {n: _label(node) for n, node in nodes.items()}
    w = max([NODE_W] + [_text_width(t) + 14 for ls in labels.values() for t in ls])
    col = w + COL_GAP

    # attend sub-rows: the pairs of query block i stacked in key-block order (the sample pair last)
    sub: dict[str, int] = {}
    per: dict[tuple[int, int], list[str]] = defaultdict(list)
    for n, node in nodes.items():
        if node.kind == NodeKind.ATTEND:
            per[(node.layer, node.block)].append(n)
    depth: dict[int, int] = defaultdict(int)
    for (layer, _), ns in per.items():
        ns.sort(key=lambda n: (nodes[n].key_block < 0, nodes[n].key_block))
        for k, n in enumerate(ns):
            sub[n] = k
        depth[layer] = max(depth[layer], len(ns))
    merges = {node.layer for node in nodes.values() if node.kind == NodeKind.MERGE}

    layer_rows = sorted({node.layer for node in nodes.values()})
    frame_lines = {layer: _layer_lines(layer, L, patterns) for layer in layer_rows}
    gutter = _gutter(frame_lines.values())

    def x_of(block):
        return MARGIN + gutter + FRAME_PAD + (block - b_min) * col + w / 2

    frames_width = gutter + 2 * FRAME_PAD + ncols * col - COL_GAP
    title, subtitle = _titles(sel, f"{len(nodes)} calls, {sel.number_of_edges()} edges")
    legend_width = sum(_text_width(k) + 28 for k in KIND_ORDER) + 150
    width = max(2 * MARGIN + frames_width, MARGIN * 2 + max(_text_width(title, 12), _text_width(subtitle, 9), legend_width))

    boxes: list[Box] = []
    index: dict[str, int] = {}
    frames: list[Frame] = []
    row_bottom: dict[int, float] = {}  # layer -> bottom of its project row (where attend inputs cross)
    y = HEADER
    for layer in layer_rows:
        if layer < 0:
            rows = ["embed"]
        elif layer >= L:
            rows = ["head"]
        else:
            rows = ["project"] + [("attend", k) for k in range(depth[layer])] + (["merge"] if layer in merges else []) + ["mix"]
        y0 = y
        y += FRAME_TOP
        centre = {}
        for r in rows:
            centre[r] = y + NODE_H / 2
            y += ROW + (PROJECT_GAP if r == "project" else 0)
        y_last = max(y - ROW - (PROJECT_GAP if rows[-1] == "project" else 0) + NODE_H, y0 + (len(frame_lines[layer]) + 1) * LINE)
        frames.append(Frame(layer, MARGIN, y0, MARGIN + frames_width, y_last + 12, _layer_name(layer, L, patterns),
                            frame_lines[layer]))
        if "project" in centre:
            row_bottom[layer] = centre["project"] + NODE_H / 2
        for n, node in sorted(nodes.items(), key=lambda nn: (nn[1].block, sub.get(nn[0], 0))):
            if node.layer != layer:
                continue
            r = ("attend", sub[n]) if node.kind == NodeKind.ATTEND else str(node.kind)
            index[n] = len(boxes)
            boxes.append(Box(n, str(node.kind), layer, x_of(node.block), centre[r], w, NODE_H, labels[n],
                             _node_info(n, node)))
        y = y_last + 12 + LAYER_GAP

    # which rows of each column hold a node: an edge that would pass one goes round on a bus
    column_rows: dict[float, list[float]] = defaultdict(list)
    for b in boxes:
        column_rows[b.x].append(b.y)

    def blocked(s: Box, t: Box) -> bool:
        return s.x != t.x or any(s.y < yy < t.y for yy in column_rows[t.x])

    links = []
    for u, v in sel.edges():
        s, t = boxes[index[u]], boxes[index[v]]
        residual = s.kind in ("embed", "mix") and t.kind == "mix"
        if not blocked(s, t):
            pts = _line((s.x, s.bottom), (t.x, t.top))
        elif residual:
            bus = s.right + 20
            pts = _chain(_turn((s.right - 12, s.bottom), (bus, s.bottom + 12), True),
                         _line((bus, s.bottom + 12), (bus, t.y - 10)),
                         _turn((bus, t.y - 10), (t.right, t.y), True))
        elif t.kind == "attend":
            # down from the source into the gap below the project row, across to the left bus of the
            # target's column, down the bus and in from the left
            cross = row_bottom.get(t.layer, s.bottom) + 6 + 4 * (round((s.x - x_of(b_min)) / col) % 4)
            bus = t.left - 12
            start = (s.x - w / 4, s.bottom) if s.x == t.x else (s.x, s.bottom)
            d = 6 if bus > start[0] else -6
            pts = _chain(_turn(start, (start[0] + d, cross), True),
                         _line((start[0] + d, cross), (bus - d, cross)),
                         _turn((bus - d, cross), (bus, cross + 6), False),
                         _line((bus, cross + 6), (bus, t.y - 8)),
                         _turn((bus, t.y - 8), (t.left, t.y), True))
        elif s.kind == "attend":
            # partials leave on the right bus and drop into the merge (or mix) from above right
            bus = s.right + 10
            end = (t.right - 14, t.top)
            pts = _chain(_turn((s.right, s.y), (bus, s.y + 8), False),
                         _line((bus, s.y + 8), (bus, t.top - 10)),
                         _turn((bus, t.top - 10), end, True))
        else:
            pts = _s_curve((s.x, s.bottom), (t.x, t.top))
        links.append(Link(index[u], index[v], pts, residual))
    height = (frames[-1].y1 if frames else HEADER) + MARGIN
    names = {f.layer: f.label for f in frames}
    return Layout(width, height, title, subtitle, False, boxes, links, frames, names)


def _s_curve(p, q):
    dy = (q[1] - p[1]) * 0.5
    return [p, (p[0], p[1] + dy), (q[0], q[1] - dy), q]


def _collapsed_layout(sel: nx.DiGraph, max_nodes: int) -> Layout:
    spec = sel.graph["spec"]
    patterns = spec["patterns"]
    L = len(patterns)
    # the nodes of each box, read by field name (NodeAttrs) rather than typed: this view is for graphs
    # past max_nodes, where Node.of on every node would cost more than the layout; each node's box is
    # kept for its edges
    group: dict[tuple[int, str], list[NodeAttrs]] = defaultdict(list)
    box_of: dict[str, tuple[int, str]] = {}
    for n, a in sel.nodes(data=True):
        node = NodeAttrs(a)
        box = box_of[n] = (node.layer, str(node.kind))
        group[box].append(node)
    column = {"embed": 0, "project": 0, "attend": 1, "merge": 2, "mix": 3, "head": 3}
    layer_rows = sorted({k[0] for k in group})
    frame_lines = {}
    for layer in layer_rows:
        kinds = [k for k in KIND_ORDER if (layer, k) in group]
        calls = sum(len(group[(layer, k)]) for k in kinds)
        frame_lines[layer] = _layer_lines(layer, L, patterns) + [f"{calls} calls"]
    gutter = _gutter(frame_lines.values())
    frames_width = gutter + 2 * FRAME_PAD + 4 * BOX_W + 3 * BOX_GAP
    n_nodes = sel.number_of_nodes()
    title, subtitle = _titles(sel, f"{n_nodes} calls in {len(group)} boxes: more than {max_nodes} nodes, so one box "
                                   f"per layer and kind (--layers A:B or --blocks A:B show each call)")
    legend_width = sum(_text_width(k) + 28 for k in KIND_ORDER) + 150
    width = max(2 * MARGIN + frames_width, 2 * MARGIN + max(_text_width(title, 12), _text_width(subtitle, 9), legend_width))

    boxes: list[Box] = []
    index: dict[tuple[int, str], int] = {}
    frames: list[Frame] = []
    y = HEADER
    for layer in layer_rows:
        kinds = [k for k in KIND_ORDER if (layer, k) in group]
        counts = ", ".join(f"{len(group[(layer, k)])} {k}" for k in kinds)
        label = f"{_layer_name(layer, L, patterns)}: {counts}"
        y0 = y
        cy = y + 26 + BOX_H / 2
        for k in kinds:
            ns = group[(layer, k)]
            lines = [k, f"{len(ns)} call{'s' if len(ns) != 1 else ''}"]
            info = {"kind": k, "layer": str(layer), "calls": str(len(ns)),
                    "blocks": f"{min(node.block for node in ns)}:{max(node.block for node in ns) + 1}"}
            if k == NodeKind.ATTEND:
                masks = Counter(str(node.mask) for node in ns)
                lines.append(", ".join(f"{c} {MASK_LABELS.get(m, m).removesuffix(' mask')}"
                                       for m, c in sorted(masks.items(), key=lambda mc: -mc[1])))
                info["masks"] = ", ".join(f"{c} {m}" for m, c in masks.items())
            elif k == NodeKind.MERGE:
                parts = sum(len(node.inputs) for node in ns)
                lines.append(f"{parts} partials")
            info["tokens (max)"] = str(max(node.tokens for node in ns))
            info["FLOPs"] = _si(sum(node.flops for node in ns))
            info["bytes"] = _si(sum(node.bytes for node in ns), binary=True)
            x = MARGIN + gutter + FRAME_PAD + column[k] * (BOX_W + BOX_GAP) + BOX_W / 2
            index[(layer, k)] = len(boxes)
            boxes.append(Box(f"L{layer}/{k}" if 0 <= layer < L else k, k, layer, x, cy, BOX_W, BOX_H, lines, info))
        y1 = max(cy + BOX_H / 2 + 26, y0 + (len(frame_lines[layer]) + 1) * LINE)
        frames.append(Frame(layer, MARGIN, y0, MARGIN + frames_width, y1, label, frame_lines[layer]))
        y = y1 + BOX_ROW_GAP

    agg: Counter = Counter()
    for u, v in sel.edges():
        agg[(index[box_of[u]], index[box_of[v]])] += 1
    links = []
    for (i, j), count in agg.items():
        s, t = boxes[i], boxes[j]
        residual = s.kind in ("embed", "mix") and t.kind == "mix"
        if s.layer == t.layer:
            if abs(t.x - s.x) <= BOX_W + BOX_GAP + 1:
                pts = _line((s.right, s.y), (t.left, t.y))
            else:  # attend -> mix past the merge: an arc above the row
                arc = s.top - 20
                pts = [(s.x + s.w / 4, s.top), (s.x + s.w / 4, arc), (t.x - t.w / 4, arc), (t.x - t.w / 4, t.top)]
        elif residual:
            start = (s.x + s.w / 4, s.bottom)
            end = (t.x + t.w / 4, t.top)
            pts = _line(start, end) if start[0] == end[0] else _s_curve(start, end)
        elif s.x != t.x:
            pts = _s_curve((s.x - s.w / 4 if s.kind == "mix" else s.x, s.bottom), (t.x, t.top))
        else:
            pts = _line((s.x, s.bottom), (t.x, t.top))
        links.append(Link(i, j, pts, residual, count))
    height = (frames[-1].y1 if frames else HEADER) + MARGIN
    return Layout(width, height, title, subtitle, True, boxes, links, frames,
                  {layer: _layer_name(layer, L, patterns) for layer in layer_rows})


# --------------------------------------------------------------------------------------------
# Graphviz


def _q(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _html_escape(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _shorten(points, by: float):
    """The spline without its last `by` points of length along the end tangent: room for the arrowhead."""
    pts = list(points)
    (x2, y2), (x3, y3) = pts[-2], pts[-1]
    dx, dy = x3 - x2, y3 - y2
    d = math.hypot(dx, dy)
    if d < 1e-9:
        (x2, y2) = pts[-3]
        dx, dy = x3 - x2, y3 - y2
        d = math.hypot(dx, dy) or 1.0
    ux, uy = dx / d, dy / d
    pts[-1] = (x3 - ux * by, y3 - uy * by)
    if d < by * 1.5:
        pts[-2] = (x3 - ux * by * 1.5, y3 - uy * by * 1.5)
    return pts


def _tooltip(b: Box) -> str:
    return "\n".join(f"{k}: {v}" for k, v in b.info.items())


def to_pinned_dot(lay: Layout) -> str:
    """Graphviz source with every position and spline pinned (draw with `neato -n2` / prog='nop2')."""
    H = lay.height

    def pt(x, y):
        return f"{x:.2f},{H - y:.2f}"

    legend = "".join(f'<td bgcolor="{COLOURS[k]}" border="1" sides="ltrb" color="#607d8b">&nbsp;{k}&nbsp;</td>' for k in KIND_ORDER)
    legend += f'<td>&nbsp;&nbsp;{LEGEND_EDGES}</td>'
    label = (f'<<table border="0" cellspacing="3" cellpadding="2">'
             f'<tr><td colspan="7" align="left"><font point-size="12"><b>{_html_escape(lay.title)}</b></font></td></tr>'
             f'<tr><td colspan="7" align="left"><font point-size="9" color="#455a64">{_html_escape(lay.subtitle)}</font></td></tr>'
             f'<tr>{legend}</tr></table>>')
    out = [
        "// emulate logical graph; positions and splines are pinned: render with `neato -n2 -Tsvg FILE`",
        "// (plain `dot` ignores them and lays the graph out again).",
        "digraph emulate {",
        f'  graph [bb="0,0,{lay.width:.2f},{H:.2f}", fontname="{FONT}", fontsize=9, labelloc=t, labeljust=l, '
        f'outputorder=edgesfirst, splines=true, pad=0.1, label={label}];',
        f'  node [shape=box, style="rounded,filled", fixedsize=true, fontname="{FONT}", fontsize={FONT_SIZE:g}, '
        f'color="#607d8b", penwidth=0.8];',
        f'  edge [color="{EDGE_COLOUR}", arrowsize=0.6, penwidth=0.8];',
    ]
    members: dict[int, list[int]] = defaultdict(list)
    for k, b in enumerate(lay.boxes):
        members[b.layer].append(k)
    for f in lay.frames:
        out.append(f'  subgraph "cluster_{f.layer}" {{')
        text = "".join(_q(ln)[1:-1] + "\\l" for ln in (f.lines or [f.label]))
        out.append(f'    graph [bb="{f.x0:.2f},{H - f.y1:.2f},{f.x1:.2f},{H - f.y0:.2f}", label="{text}", '
                   f'labeljust=l, labelloc=t, color="{FRAME_COLOUR}", style="rounded,filled", fillcolor="{FRAME_FILL}", fontsize=9];')
        for k in members[f.layer]:
            out.append("    " + _dot_node(lay.boxes[k], pt))
        out.append("  }")
    framed = {f.layer for f in lay.frames}
    for layer, ks in members.items():
        if layer not in framed:
            out.extend("  " + _dot_node(lay.boxes[k], pt) for k in ks)
    for link in lay.links:
        s, t = lay.boxes[link.src], lay.boxes[link.dst]
        pts = _shorten(link.points, ARROW)
        pos = f"e,{pt(*link.points[-1])} " + " ".join(pt(x, y) for x, y in pts)
        extra = f', style=dashed, color="{RESIDUAL_COLOUR}"' if link.residual else ""
        if link.count > 1:
            extra += f", penwidth={min(0.8 + 0.5 * math.log10(link.count), 3):.2f}"
        tip = f"{s.id} → {t.id}" + (f" ({link.count} edges)" if link.count > 1 else "")
        out.append(f'  {_q(s.id)} -> {_q(t.id)} [pos="{pos}", tooltip={_q(tip)}{extra}];')
    out.append("}")
    return "\n".join(out) + "\n"


def _dot_node(b: Box, pt) -> str:
    return (f'{_q(b.id)} [pos="{pt(b.x, b.y)}", width={b.w / 72:.3f}, height={b.h / 72:.3f}, '
            f'label={_q(chr(10).join(b.lines))}, fillcolor="{COLOURS[b.kind]}", class="{b.kind}", tooltip={_q(_tooltip(b))}];')


def _have_pygraphviz() -> bool:
    try:
        import pygraphviz  # noqa: F401
    except ImportError:
        return False
    return True


def _png_dpi(lay: Layout) -> float:
    longest = max(lay.width, lay.height + 60) / 72
    return max(24.0, min(PNG_DPI, PNG_MAX_PIXELS / longest))


def _paint_graphviz(lay: Layout, fmt: str) -> bytes:
    try:
        import pygraphviz
    except ImportError as e:
        raise DrawError(f"engine 'graphviz' needs pygraphviz ({e}); install it or use engine='matplotlib'") from None
    a = pygraphviz.AGraph(string=to_pinned_dot(lay))
    if fmt == "png":
        a.graph_attr["dpi"] = f"{_png_dpi(lay):.0f}"
    with _quiet_fontconfig():
        data = a.draw(format=fmt, prog="nop2")
    if not data:
        raise DrawError(f"Graphviz drew an empty {fmt}")
    return data


class _quiet_fontconfig:
    """Drop the fontconfig warnings the bundled Graphviz prints to fd 2 about newer system configs."""

    def __enter__(self):
        try:
            self.saved = os.dup(2)
            self.tmp = tempfile.TemporaryFile()
            os.dup2(self.tmp.fileno(), 2)
        except OSError:
            self.saved = None
        return self

    def __exit__(self, *exc):
        if self.saved is None:
            return False
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.tmp.seek(0)
        text = self.tmp.read().decode(errors="replace")
        self.tmp.close()
        keep = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("Fontconfig warning")]
        if keep:
            os.write(2, ("\n".join(keep) + "\n").encode())
        return False


# --------------------------------------------------------------------------------------------
# matplotlib


def _paint_matplotlib(lay: Layout, fmt: str) -> bytes:
    """The same layout painted by matplotlib (Agg, no pyplot): the fallback without pygraphviz."""
    import io

    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
    from matplotlib.path import Path

    W, H = lay.width, lay.height
    with matplotlib.rc_context({"svg.fonttype": "none", "font.family": "DejaVu Sans", "svg.hashsalt": "emulate"}):
        fig = Figure(figsize=(W / 72, H / 72), dpi=72)
        FigureCanvasAgg(fig)
        ax = fig.add_axes((0, 0, 1, 1))
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
        ax.set_axis_off()
        ax.text(MARGIN, 16, lay.title, fontsize=12, fontweight="bold", va="center", ha="left")
        ax.text(MARGIN, 32, lay.subtitle, fontsize=9, color="#455a64", va="center", ha="left")
        x = MARGIN
        for k in KIND_ORDER:
            tw = _text_width(k) + 10
            ax.add_patch(FancyBboxPatch((x, 41), tw, 14, boxstyle="square,pad=0", facecolor=COLOURS[k], edgecolor="#607d8b", lw=0.8))
            ax.text(x + tw / 2, 48, k, fontsize=9, ha="center", va="center")
            x += tw + 4
        ax.text(x + 8, 48, LEGEND_EDGES, fontsize=9, ha="left", va="center")
        for f in lay.frames:
            ax.add_patch(FancyBboxPatch((f.x0, f.y0), f.x1 - f.x0, f.y1 - f.y0, boxstyle="round,pad=0,rounding_size=6",
                                        facecolor=FRAME_FILL, edgecolor=FRAME_COLOUR, lw=0.8, zorder=0))
            ax.text(f.x0 + 8, f.y0 + 6, "\n".join(f.lines or [f.label]), fontsize=9, ha="left", va="top", zorder=1, linespacing=1.2)
        for link in lay.links:
            codes = [Path.MOVETO] + [Path.CURVE4] * (len(link.points) - 1)
            lw = 0.8 + (min(0.5 * math.log10(link.count), 2.2) if link.count > 1 else 0)
            arrow = FancyArrowPatch(path=Path(link.points, codes), arrowstyle="-|>,head_length=4,head_width=2",
                                    color=RESIDUAL_COLOUR if link.residual else EDGE_COLOUR, lw=lw,
                                    linestyle="--" if link.residual else "-", shrinkA=0, shrinkB=0, zorder=2)
            ax.add_patch(arrow)
        for k, b in enumerate(lay.boxes):
            patch = FancyBboxPatch((b.left, b.top), b.w, b.h, boxstyle="round,pad=0,rounding_size=4",
                                   facecolor=COLOURS[b.kind], edgecolor="#607d8b", lw=0.8, zorder=3)
            patch.set_gid(f"node-{k}")
            ax.add_patch(patch)
            ax.text(b.x, b.y, "\n".join(b.lines), fontsize=FONT_SIZE, ha="center", va="center", zorder=4, linespacing=1.15)
        buf = io.BytesIO()
        dpi = _png_dpi(lay) if fmt == "png" else 72
        fig.savefig(buf, format=fmt, dpi=dpi, facecolor="white")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# files


def check_target(path) -> None:
    """Refuse (DrawError) a target that must not be written (graphs/files.py, output_target)."""
    try:
        output_target(path)
    except OutputError as err:
        raise DrawError(str(err)) from None


def write_file(path, data: bytes | str) -> None:
    """Write `data` to `path` atomically (graphs/files.py), refusals as DrawError."""
    try:
        files_write(path, data)
    except OutputError as err:
        raise DrawError(str(err)) from None
