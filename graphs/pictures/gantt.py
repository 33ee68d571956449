"""The executed schedule as a Gantt chart: one row per worker, one bar per task, the critical path marked.

Input: the events of a Chrome trace as emulate writes it (emulate/runtime/trace.py, read back with
emulate.runtime.trace.read_trace): complete ('X') events with name, cat (the task's kind), tid (the
worker), ts and dur (microseconds) and args (task: its index, deps: the tasks it read from),
plus the metadata ('M') events that name the process and the workers.

The critical path is the longest chain through the tasks' dependency DAG, by duration, when the
events carry deps; for a trace without them it is the chain read off the schedule itself: from the
task that ends last, back through the task that ended last before each one started.

PNG or SVG by matplotlib, or HTML: one small self-contained page (inline SVG, a hover title per
bar, no script, nothing fetched). Written atomically by graphs.pictures.draw.write_file. Imports neither
torch, ray nor emulate.
"""
from __future__ import annotations

import html
from collections import defaultdict
from pathlib import Path

import networkx as nx

from graphs.pictures.coverage import figure_format, new_figure, save_figure
from graphs.pictures.draw import DrawError, write_file

SUFFIXES = (".png", ".svg", ".html")
KIND_COLOURS = {  # the logical node kinds (local executor) and the Ray plan's task kinds
    "embed": "#8c8c8c", "project": "#dd8452", "attend": "#55a868", "merge": "#8172b3", "mix": "#4c72b0",
    "head": "#937860", "start": "#64b5cd", "row": "#4c72b0", "slice": "#55a868", "combine": "#dd8452",
}
OTHER_COLOURS = ["#da8bc3", "#ccb974", "#c44e52", "#64b5cd", "#8c8c8c", "#937860"]
KIND_ORDER = list(KIND_COLOURS)
CRITICAL = "#d62728"


# -- reading the events ---------------------------------------------------------------------------

def schedule(events) -> dict:
    """The schedule in `events` (a list of trace events, or a trace object with traceEvents).

    Returns tasks (one dict per 'X' event, time-ordered: name, kind, row, start, dur, end in
    seconds from the first start, task, deps, nodes), rows (worker tids in display order), names
    (tid -> label), process, makespan_s, busy_s (per row), critical (indices into tasks along the
    critical path, in order), critical_path_s and critical_path_from ('deps' or 'schedule').
    """
    if isinstance(events, dict):
        events = events.get("traceEvents")
    if not isinstance(events, list):
        raise DrawError("not a trace: expected a list of trace events")
    complete = [e for e in events if isinstance(e, dict) and e.get("ph") == "X"]
    if not complete:
        raise DrawError("the trace holds no complete ('X') events: nothing to draw")
    names, order, process = {}, {}, None
    for e in events:
        if not isinstance(e, dict) or e.get("ph") != "M":
            continue
        args = e.get("args") or {}
        if e.get("name") == "thread_name":
            names[e.get("tid")] = str(args.get("name"))
        elif e.get("name") == "thread_sort_index":
            order[e.get("tid")] = args.get("sort_index", 0)
        elif e.get("name") == "process_name":
            process = str(args.get("name"))
    try:
        t0 = min(float(e["ts"]) for e in complete)
        tasks = []
        for k, e in enumerate(complete):
            args = e.get("args") or {}
            start, dur = (float(e["ts"]) - t0) / 1e6, max(float(e["dur"]), 0.0) / 1e6
            tasks.append({"name": str(e.get("name", "?")), "kind": str(e.get("cat", "task")), "row": e["tid"],
                          "start": start, "dur": dur, "end": start + dur, "task": args.get("task", k),
                          "deps": args.get("deps"), "nodes": args.get("nodes") or []})
    except (KeyError, TypeError, ValueError) as err:
        raise DrawError(f"a complete trace event lacks a valid {err}: need name, tid, ts and dur") from None
    tasks.sort(key=lambda t: (t["start"], t["end"]))
    rows = sorted({t["row"] for t in tasks}, key=lambda r: (order.get(r, 0), str(r)))
    makespan = max(t["end"] for t in tasks)
    busy = {r: _union([(t["start"], t["end"]) for t in tasks if t["row"] == r]) for r in rows}
    critical, source = _critical_path(tasks)
    return {"tasks": tasks, "rows": rows, "names": {r: names.get(r, f"worker {r}") for r in rows},
            "process": process, "makespan_s": makespan, "busy_s": busy, "critical": critical,
            "critical_path_s": sum(tasks[k]["dur"] for k in critical), "critical_path_from": source}


def _union(spans: list[tuple[float, float]]) -> float:
    """Total length covered by the spans (a worker that overlaps tasks is not busier than 100%)."""
    total, reach = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > reach:
            total += b - max(a, reach)
            reach = b
    return total


def _critical_path(tasks: list[dict]) -> tuple[list[int], str]:
    """Indices into `tasks` of the longest chain by duration, and where the chain came from."""
    by_id = {t["task"]: k for k, t in enumerate(tasks)}
    if len(by_id) == len(tasks) and all(isinstance(t["deps"], list) for t in tasks):
        dag = nx.DiGraph()
        dag.add_nodes_from(range(len(tasks)))
        dag.add_edges_from((by_id[d], k) for k, t in enumerate(tasks) for d in t["deps"] if d in by_id)
        if nx.is_directed_acyclic_graph(dag):
            best, via = {}, {}
            for k in nx.topological_sort(dag):
                prev = max(dag.predecessors(k), key=lambda p: best[p], default=None)
                best[k] = tasks[k]["dur"] + (best[prev] if prev is not None else 0.0)
                via[k] = prev
            k = max(best, key=lambda n: (best[n], tasks[n]["end"]))
            path = []
            while k is not None:
                path.append(k)
                k = via[k]
            return path[::-1], "deps"
    # no dependencies recorded: walk the schedule back from the task that ends last
    ends = sorted(range(len(tasks)), key=lambda k: tasks[k]["end"])
    k = ends[-1]
    path, eps = [k], 1e-6
    while True:
        before = [j for j in ends if tasks[j]["end"] <= tasks[k]["start"] + eps and j != k and j not in path]
        if not before:
            break
        k = max(before, key=lambda j: (tasks[j]["end"], tasks[j]["row"] == tasks[path[-1]]["row"]))
        path.append(k)
    return path[::-1], "schedule"


def _colours(tasks: list[dict]) -> dict[str, str]:
    kinds = sorted({t["kind"] for t in tasks}, key=lambda k: (KIND_ORDER.index(k) if k in KIND_ORDER else 99, k))
    other = iter(OTHER_COLOURS * (1 + len(kinds) // len(OTHER_COLOURS)))
    return {k: KIND_COLOURS.get(k) or next(other) for k in kinds}


def _summary(s: dict) -> dict:
    makespan = s["makespan_s"]
    util = [round(s["busy_s"][r] / makespan, 4) if makespan > 0 else 0.0 for r in s["rows"]]
    kinds: dict[str, int] = defaultdict(int)
    for t in s["tasks"]:
        kinds[t["kind"]] += 1
    return {"bars": len(s["tasks"]), "workers": len(s["rows"]), "worker_names": [s["names"][r] for r in s["rows"]],
            "utilisation": util, "makespan_s": round(makespan, 6), "critical_path_s": round(s["critical_path_s"], 6),
            "critical_path_tasks": len(s["critical"]), "critical_path": [s["tasks"][k]["name"] for k in s["critical"]],
            "critical_path_from": s["critical_path_from"],
            "tasks_by_kind": dict(kinds)}


def _time_unit(makespan: float) -> tuple[str, float]:
    return ("ms", 1e3) if makespan < 2.0 else ("s", 1.0)


# -- drawing --------------------------------------------------------------------------------------

def draw_gantt(events, path) -> dict:
    """Draw the schedule in `events` to `path`: .png or .svg (matplotlib) or .html (inline SVG).

    Returns bars (tasks drawn), workers (rows), worker_names, utilisation (busy time / makespan
    per row, in row order), makespan_s, critical_path_s, critical_path_tasks, critical_path (the
    tasks' names, in order), critical_path_from
    ('deps': the longest chain by duration through the tasks' dependencies; 'schedule': read off
    the schedule when the trace has no deps) and tasks_by_kind.
    """
    fmt = figure_format(path, SUFFIXES)
    s = schedule(events)
    summary = _summary(s)
    if fmt == "html":
        write_file(path, _html(s, summary, Path(path).name))
    else:
        save_figure(_figure(s, summary), path)
    return summary


def _title(s: dict, summary: dict) -> str:
    who = s["process"] or "schedule"
    n, w = summary["bars"], summary["workers"]
    return (f"{who}: {n} task{'s' * (n != 1)} on {w} worker{'s' * (w != 1)}, makespan {summary['makespan_s']:.3f} s, "
            f"critical path {summary['critical_path_s']:.3f} s ({summary['critical_path_tasks']} tasks)")


def _figure(s: dict, summary: dict):
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    tasks, rows = s["tasks"], s["rows"]
    unit, scale = _time_unit(s["makespan_s"])
    colours = _colours(tasks)
    fig = new_figure(12, 1.7 + 0.55 * len(rows))
    ax = fig.add_subplot()
    y = {r: k for k, r in enumerate(rows)}
    dense = max(sum(1 for t in tasks if t["row"] == r) for r in rows)
    height = 0.62
    for kind, colour in colours.items():
        for r in rows:
            bars = [(t["start"] * scale, t["dur"] * scale) for t in tasks if t["kind"] == kind and t["row"] == r]
            if bars:
                # white borders separate bars of one kind; past ~150 bars a row they would wash the colours out
                ax.broken_barh(bars, (y[r] - height / 2, height), facecolors=colour,
                               edgecolor="white" if dense <= 150 else "none", linewidth=0.6)
    crit = [tasks[k] for k in s["critical"]]
    for t in crit:  # a red strip under each bar on the critical path
        ax.broken_barh([(t["start"] * scale, t["dur"] * scale)], (y[t["row"]] + height / 2 + 0.02, 0.1),
                       facecolors=CRITICAL, edgecolor="none")
    if len(crit) > 1:  # and the chain joining them, from each one's end to the next one's start
        xs, ys = [], []
        for t in crit:
            yy = y[t["row"]] + height / 2 + 0.07
            xs += [t["start"] * scale, t["end"] * scale]
            ys += [yy, yy]
        ax.plot(xs, ys, color=CRITICAL, linewidth=0.8, alpha=0.7)
    labels = [f"{s['names'][r]}\n{u:.0%} busy" for r, u in zip(rows, summary["utilisation"])]
    ax.set_yticks(range(len(rows)), labels, fontsize=9)
    ax.set_ylim(len(rows) - 0.5 + 0.05, -0.5)
    ax.set_xlim(0, s["makespan_s"] * scale * 1.005 or 1)
    ax.set_xlabel(f"time since the first task started ({unit})")
    ax.grid(axis="x", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_title(_title(s, summary), fontsize=10)
    handles = [Patch(facecolor=c, label=k) for k, c in colours.items()]
    handles.append(Line2D([], [], color=CRITICAL, linewidth=3, label="critical path"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 8), fontsize=9, frameon=False)
    return fig


def _html(s: dict, summary: dict, name: str) -> str:
    tasks, rows = s["tasks"], s["rows"]
    unit, scale = _time_unit(s["makespan_s"])
    colours = _colours(tasks)
    label_w, plot_w, row_h, top, axis_h = 260, 900, 34, 10, 34
    span = s["makespan_s"] or 1.0
    x = lambda t: label_w + plot_w * t / span  # noqa: E731
    height = top + row_h * len(rows) + axis_h
    on_path = set(s["critical"])
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + plot_w + 20}" height="{height}" '
           f'font-family="sans-serif" font-size="12">']
    for k, r in enumerate(rows):
        y0 = top + k * row_h
        if k % 2:
            out.append(f'<rect x="{label_w}" y="{y0}" width="{plot_w}" height="{row_h}" fill="#f7f7f7"/>')
        out.append(f'<text x="{label_w - 8}" y="{y0 + row_h / 2 - 2}" text-anchor="end">{html.escape(s["names"][r])}</text>')
        out.append(f'<text x="{label_w - 8}" y="{y0 + row_h / 2 + 12}" text-anchor="end" fill="#555">'
                   f'{summary["utilisation"][k]:.0%} busy</text>')
    ticks = _ticks(span * scale)
    for v in ticks:
        tx = x(v / scale)
        out.append(f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="{top}" y2="{top + row_h * len(rows)}" stroke="#ddd"/>')
        out.append(f'<text x="{tx:.1f}" y="{top + row_h * len(rows) + 16}" text-anchor="middle">{v:g}</text>')
    out.append(f'<text x="{label_w + plot_w / 2}" y="{height - 2}" text-anchor="middle">'
               f'time since the first task started ({unit})</text>')
    ry = {r: top + k * row_h for k, r in enumerate(rows)}
    for k, t in enumerate(tasks):
        x0, w = x(t["start"]), max(plot_w * t["dur"] / span, 0.5)
        nodes = ", ".join(map(str, t["nodes"][:12])) + (" ..." if len(t["nodes"]) > 12 else "")
        tip = (f"{t['name']} ({t['kind']})\nstart {t['start'] * scale:.3f} {unit}, {t['dur'] * 1e3:.3f} ms"
               + (f"\nnodes: {nodes}" if nodes else "") + ("\non the critical path" if k in on_path else ""))
        y0 = ry[t["row"]] + 5
        out.append(f'<rect class="bar" x="{x0:.2f}" y="{y0}" width="{w:.2f}" height="{row_h - 14}" '
                   f'fill="{colours[t["kind"]]}" stroke="#fff" stroke-width="0.4"><title>{html.escape(tip)}</title></rect>')
        if k in on_path:
            out.append(f'<rect x="{x0:.2f}" y="{y0 + row_h - 13}" width="{w:.2f}" height="4" fill="{CRITICAL}"/>')
    out.append("</svg>")
    legend = "".join(f'<span class="key"><i style="background:{c}"></i>{html.escape(k)}</span>'
                     for k, c in colours.items())
    legend += f'<span class="key"><i style="background:{CRITICAL};height:4px"></i>critical path</span>'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(name)}</title>
<style>
body {{ font-family: sans-serif; margin: 16px; color: #222; }}
h1 {{ font-size: 15px; font-weight: normal; }}
.key {{ margin-right: 16px; font-size: 12px; white-space: nowrap; }}
.key i {{ display: inline-block; width: 14px; height: 10px; margin-right: 5px; vertical-align: middle; }}
rect.bar:hover {{ stroke: #000; stroke-width: 1.5; }}
</style></head><body>
<h1>{html.escape(_title(s, summary))}</h1>
<p>{legend}</p>
{''.join(out)}
<p style="font-size:12px;color:#555">Hover a bar for its task. Critical path: {html.escape(_path_note(summary))}.</p>
</body></html>
"""


def _path_note(summary: dict) -> str:
    if summary["critical_path_from"] == "deps":
        return "the longest chain of tasks, by duration, through the tasks' recorded inputs"
    return "read off the schedule (the trace records no dependencies): back from the last task to end"


def _ticks(span: float) -> list[float]:
    """About six round tick values in [0, span]."""
    if span <= 0:
        return [0.0]
    raw = span / 6
    mag = 10 ** int(f"{raw:e}".split("e")[1])
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [round(k * step, 10) for k in range(int(span / step) + 1)]
