"""Attention coverage: which (query block, key block) pairs one layer of a graph computes.

`draw_coverage` draws the B x B grid of one layer, read off the graph's attend nodes (nothing is
recomputed), each computed pair shaded by its mask; `draw_comparison` puts several such grids side
by side, the picture of O((N/M)^2) pair calls (full, causal) against O(N/M) (sliding, sink,
sampled). The title of each carries the count and the theorem's bound (Pattern.calls_bound).

Figures are drawn with matplotlib's object API (no pyplot, no global backend switch) and written
atomically by graphs.pictures.draw.write_file (a temporary file beside the target, mode 0666 less the
umask, os.replace); errors are graphs.pictures.draw.DrawError, one line. graphs/pictures/gantt.py shares the suffix
check and the figure writer here. Imports neither torch, ray nor emulate.
"""
from __future__ import annotations

import io
import os
from math import ceil
from pathlib import Path

import networkx as nx
import numpy as np

from graphs.pictures.draw import DrawError, check_target, write_file
from graphs.kinds import MaskKind, NodeKind, PatternKind
from graphs.nodes import scan_nodes
from graphs.patterns import Pattern

FIGURE_SUFFIXES = (".png", ".svg")

# grid codes: what draw_coverage returns per (query block, key block) cell
EMPTY, NONE, CAUSAL, EXPLICIT, SAMPLE = 0, 1, 2, 3, 4
CODES = {MaskKind.NONE: NONE, MaskKind.CAUSAL: CAUSAL, MaskKind.EXPLICIT: EXPLICIT, MaskKind.SAMPLE: SAMPLE}
COLOURS = {EMPTY: "#f2f2f2", NONE: "#4c72b0", CAUSAL: "#dd8452", EXPLICIT: "#55a868", SAMPLE: "#8172b3"}
LABELS = {
    NONE: "whole pair visible (mask none)",
    CAUSAL: "aligned diagonal (mask causal)",
    EXPLICIT: "partly visible (explicit mask)",
    SAMPLE: "one sampled call: M keys drawn from these blocks",
}
GRID_LINES_UP_TO = 64  # blocks: cell borders drawn up to this B, beyond it they would be a grey wash
ROW_BOXES_UP_TO = 256  # blocks: sampled calls drawn as one bar per row up to this B, as shaded cells beyond


# -- writing ------------------------------------------------------------------------------------

def figure_format(path, suffixes: tuple[str, ...] = FIGURE_SUFFIXES) -> str:
    """The format named by `path`'s suffix ('png', 'svg', ...), refused unless in `suffixes`.

    Also refuses, before anything is drawn, a target in a missing directory or one that exists
    and is not a regular file (graphs.pictures.draw.check_target).
    """
    suffix = Path(path).suffix.lower()
    if suffix not in suffixes:
        given = f"suffix {suffix!r}" if suffix else "no suffix"
        raise DrawError(f"cannot draw {os.fspath(path)}: {given}; use {', '.join(suffixes)}")
    folder = Path(os.path.abspath(path)).parent
    if not folder.is_dir():
        raise DrawError(f"cannot write {os.fspath(path)}: directory {folder} does not exist")
    check_target(path)
    return suffix[1:]


def save_figure(fig, path) -> None:
    """Write a matplotlib Figure to `path` (PNG or SVG by suffix), atomically (graphs.pictures.draw.write_file)."""
    fmt = figure_format(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=110, facecolor="white", bbox_inches="tight", pad_inches=0.12)
    write_file(path, buf.getvalue())


def new_figure(width: float, height: float):
    from matplotlib.figure import Figure  # lazy: importing graphs stays light

    return Figure(figsize=(width, height), layout="compressed")


# -- the grid -----------------------------------------------------------------------------------

def coverage(g: nx.DiGraph, layer: int = 0) -> dict:
    """The pair grid of `layer`, read off the graph's attend nodes, and its figures.

    Returns grid (B x B int8 array of codes, rows query blocks, columns key blocks: 0 not computed,
    1 mask none, 2 causal, 3 explicit, 4 a source block of a sampled call), calls (attend nodes
    of the layer), bound (Pattern.calls_bound), pattern (its description), kind, tokens (N),
    block_size (M), blocks (B), cells (shaded cells) and by_mask (attend nodes per mask).
    """
    spec = g.graph.get("spec")
    if not isinstance(spec, dict) or "patterns" not in spec or "blocks" not in g.graph:
        raise DrawError("not a compiled emulate graph (no spec with attention patterns)")
    layers = len(spec["patterns"])
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < layers:
        raise DrawError(f"layer {layer!r} out of range: the graph has {layers} layer(s), 0..{layers - 1}")
    pattern = Pattern(**spec["patterns"][layer])
    B, M, N = g.graph["blocks"], spec["block_size"], spec["tokens"]
    grid = np.zeros((B, B), dtype=np.int8)
    calls, by_mask = 0, {}
    for _, node in scan_nodes(g):  # not Node.of: the grid of a big graph skips most of the nodes it scans
        if node.layer != layer or node.kind != NodeKind.ATTEND:  # the layer first: it rules out most
            continue
        calls += 1
        mask = MaskKind(node.mask)
        by_mask[str(mask)] = by_mask.get(str(mask), 0) + 1
        if mask == MaskKind.SAMPLE:
            grid[node.block, list(node.key_blocks)] = SAMPLE
        else:
            grid[node.block, node.key_block] = CODES[mask]
    return {"grid": grid, "calls": calls, "bound": pattern.calls_bound(B, M), "pattern": str(pattern.describe()),
            "kind": str(pattern.kind), "tokens": N, "block_size": M, "blocks": B, "layer": layer,
            "cells": int((grid != EMPTY).sum()), "by_mask": by_mask, "_pattern": pattern,
            "_edges": [s for s, _ in g.graph["block_spans"]] + [N]}


def _calls_text(c: dict) -> str:
    what = "calls" if c["kind"] == PatternKind.SAMPLED else "pair calls"
    return f"{c['calls']} {what} (bound {c['bound']})"


def _draw_grid(ax, c: dict, labels: bool = True) -> None:
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import MaxNLocator

    grid, B = c["grid"], c["blocks"]
    cmap = ListedColormap([COLOURS[k] for k in (EMPTY, NONE, CAUSAL, EXPLICIT, SAMPLE)])
    sampled = c["kind"] == PatternKind.SAMPLED
    # a sampled layer is one call per query block: drawn as one bar per row over its key blocks,
    # not as shaded cells, which would read as B x B calls
    bars = sampled and B <= ROW_BOXES_UP_TO
    # past a few hundred blocks a cell is under a pixel: resample the colours (not the codes), so a
    # thin band of pairs stays visible instead of being skipped by nearest-neighbour sampling
    ax.imshow(np.where(grid == SAMPLE, EMPTY, grid) if bars else grid, cmap=cmap, vmin=-0.5, vmax=4.5,
              interpolation="nearest" if B <= GRID_LINES_UP_TO else "antialiased", interpolation_stage="rgba",
              aspect="equal")
    if B <= GRID_LINES_UP_TO:
        ax.set_xticks(np.arange(-0.5, B, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, B, 1), minor=True)
        ax.grid(which="minor", color="white", linewidth=0.8 if B <= 32 else 0.4)
        ax.tick_params(which="minor", length=0)
    if bars:
        height = 0.56
        for i in range(B):
            cols = np.flatnonzero(grid[i] == SAMPLE)
            if not cols.size:
                continue
            runs = np.split(cols, np.flatnonzero(np.diff(cols) > 1) + 1)  # contiguous source blocks
            if len(runs) > 1:
                ax.plot([cols[0], cols[-1]], [i, i], color=COLOURS[SAMPLE], linewidth=0.8, zorder=3)
            for run in runs:
                ax.add_patch(Rectangle((run[0] - 0.5, i - height / 2), len(run), height, facecolor=COLOURS[SAMPLE],
                                       edgecolor="none", zorder=3))
    _mask_edges(ax, c)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
    ax.set_xlim(-0.5, B - 0.5)
    ax.set_ylim(B - 0.5, -0.5)
    for side in ax.spines.values():
        side.set_color("#999999")
    if labels:
        ax.set_xlabel("key block j")
        ax.set_ylabel("query block i")


def _mask_edges(ax, c: dict) -> None:
    """The token-level edges of the pattern's mask (thin dashed lines), drawn in block coordinates.

    A token maps into its block's cell in proportion, so a ragged last block is drawn right.
    Only up to GRID_LINES_UP_TO blocks: beyond it the lines would hide the cells.
    """
    p: Pattern = c["_pattern"]
    if not _shows_edges(c):
        return
    N, edges = c["tokens"], np.asarray(c["_edges"], dtype=float)
    at = lambda t: np.interp(t, edges, np.arange(len(edges)) - 0.5)  # noqa: E731
    style = dict(color="#333333", linewidth=0.8, linestyle=(0, (3, 2)), zorder=4)
    ax.plot(at([0, N]), at([0, N]), **style)  # k = q
    if p.window is not None and p.window < N:  # k = q - r + 1, for queries q >= r - 1
        q = np.unique(np.concatenate([edges, edges + p.window - 1]))
        q = q[(q >= p.window - 1) & (q <= N)]
        ax.plot(at(q - p.window + 1), at(q), **style)
    if p.kind == PatternKind.SINK and p.sinks < N:  # k = s, for queries q >= s
        ax.plot(at([p.sinks, p.sinks]), at([p.sinks, N]), **style)


def _shows_edges(c: dict) -> bool:
    return c["_pattern"].causal and c["blocks"] <= GRID_LINES_UP_TO


def _legend_handles(codes, edges: bool) -> list:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=COLOURS[k], edgecolor="#999999", label=LABELS[k]) for k in (NONE, CAUSAL, EXPLICIT, SAMPLE)
               if k in codes]
    handles.append(Patch(facecolor=COLOURS[EMPTY], edgecolor="#999999", label="not computed"))
    if edges:
        handles.append(Line2D([], [], color="#333333", linewidth=0.8, linestyle=(0, (3, 2)),
                              label="edge of the token mask"))
    return handles


def _cell_inches(B: int) -> float:
    return 5.2 if B <= 48 else 6.5


def draw_coverage(g: nx.DiGraph, path, layer: int = 0) -> dict:
    """Draw the (query block, key block) pairs `layer` of `g` computes to `path` (.png or .svg).

    Returns coverage(g, layer) without its private keys: grid (B x B mask codes), calls, bound,
    pattern, kind, tokens, block_size, blocks, layer, cells, by_mask.
    """
    figure_format(path)
    c = coverage(g, layer)
    side = _cell_inches(c["blocks"])
    fig = new_figure(side + 0.6, side + 1.3)
    ax = fig.add_subplot()
    _draw_grid(ax, c)
    layers = len(g.graph["spec"]["patterns"])
    where = f"layer {layer} of {layers}: " if layers > 1 else ""
    ax.set_title(f"{c['pattern']}, N = {c['tokens']}, M = {c['block_size']}: {_calls_text(c)}\n"
                 f"{where}{c['blocks']} x {c['blocks']} blocks"
                 + (" (a cell is under a pixel: colours blended)" if c["blocks"] > 512 else ""), fontsize=11)
    handles = _legend_handles(set(np.unique(c["grid"]).tolist()), _shows_edges(c))
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=9, frameon=False)
    save_figure(fig, path)
    return _public(c)


def draw_comparison(graphs_by_name: dict[str, nx.DiGraph], path, layer: int = 0) -> dict[str, dict]:
    """Draw one coverage grid per graph side by side (same N and M), counts in each panel's title.

    Returns {name: coverage summary} as draw_coverage does, in the order given.
    """
    figure_format(path)
    if not graphs_by_name:
        raise DrawError("nothing to compare: no graphs given")
    cs = {name: coverage(g, layer) for name, g in graphs_by_name.items()}
    shape = {(c["tokens"], c["block_size"]) for c in cs.values()}
    n = len(cs)
    B = max(c["blocks"] for c in cs.values())
    panel = 3.3 if B <= 48 else 4.2
    cols = min(n, 5)
    rows = ceil(n / cols)
    fig = new_figure(panel * cols + 0.4, (panel + 0.3) * rows + 1.15)
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, (name, c) in enumerate(cs.items()):
        ax = axes[k // cols][k % cols]
        _draw_grid(ax, c, labels=False)
        head = c["pattern"] if c["pattern"].startswith(name) else f"{name}: {c['pattern']}"
        if len(shape) > 1:
            head += f"\nN = {c['tokens']}, M = {c['block_size']}"
        ax.set_title(f"{head}\n{_calls_text(c)}", fontsize=10)
        if k % cols == 0:
            ax.set_ylabel("query block i")
        ax.set_xlabel("key block j")
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].set_visible(False)
    if len(shape) == 1:
        (N, M), = shape
        growth = {"O((N/M)^2)": [], "O(N/M)": []}
        for c in cs.values():
            kind = c["kind"]
            group = growth["O((N/M)^2)" if kind in ("full", "causal") else "O(N/M)"]
            if kind not in group:
                group.append(kind)
        grows = "; ".join(f"{', '.join(kinds)}: {order}" for order, kinds in growth.items() if kinds)
        fig.suptitle(f"Attention calls per layer, N = {N} tokens, M = {M} ({B} blocks)\n{grows} calls", fontsize=11)
    codes = set().union(*(np.unique(c["grid"]).tolist() for c in cs.values()))
    handles = _legend_handles(codes, any(_shows_edges(c) for c in cs.values()))
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=9, frameon=False)
    save_figure(fig, path)
    return {name: _public(c) for name, c in cs.items()}


def _public(c: dict) -> dict:
    return {k: v for k, v in c.items() if not k.startswith("_")}
