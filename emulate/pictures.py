"""The pictures, one call each from Python: the task graph, the pairs a layer computes, a schedule.

The drawing itself lives in graphs/pictures/ (draw.py and html.py for the graph, coverage.py for the pair
grid, gantt.py for schedules), which knows nothing of torch; this module turns a model and a problem
into graphs, and the drawing's refusals into EmulateError, as the rest of the API does.
"""
from __future__ import annotations

import dataclasses

import networkx as nx

from emulate.errors import EmulateError


def draw(graph: nx.DiGraph, path, format: str | None = None, layers=None, blocks=None):
    """The logical graph as svg, png, html, dot or json (format from the suffix when None).

    layers / blocks: (start, stop) or "A:B" to draw part of it; past a few hundred nodes the
    picture collapses to one box per layer and kind. Returns graphs.pictures.draw.Drawing.
    """
    from graphs.pictures.draw import DrawError, render

    try:
        return render(graph, path, format=format, layers=layers, blocks=blocks)
    except DrawError as err:
        raise EmulateError(str(err)) from None


def draw_coverage(graph: nx.DiGraph, path, layer: int = 0) -> dict:
    """The B x B grid of (query block, key block) pairs `layer` computes, shaded by mask (.png, .svg)."""
    from graphs.pictures.coverage import DrawError, draw_coverage as coverage

    try:
        return coverage(graph, path, layer=layer)
    except DrawError as err:
        raise EmulateError(str(err)) from None


def draw_comparison(model, patterns: list[str], path, window: int | None = None, sinks: int | None = None,
                    **problem) -> dict[str, dict]:
    """Several patterns' pair grids side by side for one N and M (graphs only, nothing runs).

    window defaults to M and sinks to 4 for the patterns that take them; full and sampled attention on
    a causal model are drawn for its bidirectional twin (the grid depends on the mask alone).
    """
    from emulate.api import compile
    from emulate.problem import DEFAULT_BLOCK
    from emulate.models.loaders import Model, load
    from graphs import PATTERNS
    from graphs.pictures.coverage import DrawError, draw_comparison as comparison

    unknown = [p for p in patterns if p not in PATTERNS]
    if unknown or not patterns:
        raise EmulateError(f"--compare takes patterns of {', '.join(PATTERNS)}; got {', '.join(unknown) or 'none'}")
    base = load("tiny-llama" if model is None else model)
    twin = Model(dataclasses.replace(base.config, causal=False, lm_head=False), base.weights, base.tokenizer)
    block = problem.get("block_size", DEFAULT_BLOCK)
    graphs = {}
    for name in patterns:
        keywords = dict(problem, attention=name)
        if name in ("sliding", "sink"):
            keywords["window"] = block if window is None else window
        if name == "sink":
            keywords["sinks"] = 4 if sinks is None else sinks
        graphs[name] = compile(twin if name == "sampled" and base.config.causal else base, **keywords)
    try:
        return comparison(graphs, path)
    except DrawError as err:
        raise EmulateError(str(err)) from None


def draw_trace(trace_path, path) -> dict:
    """A schedule recorded with --trace (trace=) as a Gantt chart: .png, .svg or .html."""
    from emulate.runtime.trace import read_trace
    from graphs.pictures.coverage import DrawError
    from graphs.pictures.gantt import draw_gantt

    events = read_trace(trace_path)
    try:
        return draw_gantt(events, path)
    except DrawError as err:
        raise EmulateError(str(err)) from None
