"""One self-contained HTML page for a drawn graph: inline SVG, inline CSS and JS, nothing fetched.

The SVG is laid out from the same Layout as the Graphviz and matplotlib pictures (graphs.pictures.draw).
Each drawn node is `<g class="node" data-kind=... data-layer=...>`, each edge
`<path class="edge" data-src=... data-dst=...>` (indices of the nodes). The script adds pan (drag),
zoom (wheel, around the pointer), node details on hover, a filter by kind (the legend's checkboxes)
and by layer (a select; a link may preset both: page.html#layer=2&kinds=attend,merge), a "fit"
button (or the 0 key), and sets `document.body.dataset.nodes` to the number of drawn nodes and
`dataset.visible` to the number the filter shows.
"""
from __future__ import annotations

import json
from collections import Counter
from html import escape

from graphs.export import COLOURS

KIND_ORDER = ("embed", "project", "attend", "merge", "mix", "head")

_CSS = """
* { box-sizing: border-box; }
html, body { margin: 0; height: 100%; font: 13px "DejaVu Sans", "Helvetica Neue", Arial, sans-serif; color: #263238; }
body { display: flex; flex-direction: column; overflow: hidden; background: #fff; }
header { padding: 8px 12px 6px; border-bottom: 1px solid #cfd8dc; background: #f5f7f8; flex: none; }
h1 { font-size: 15px; margin: 0 0 2px; }
.sub { color: #546e7a; font-size: 12px; margin-bottom: 6px; }
.controls { display: flex; flex-wrap: wrap; gap: 6px 14px; align-items: center; }
.kinds { display: flex; flex-wrap: wrap; gap: 4px; }
.kinds label { display: inline-flex; align-items: center; gap: 4px; padding: 2px 7px 2px 4px; border: 1px solid #90a4ae;
  border-radius: 4px; cursor: pointer; user-select: none; }
.kinds input { margin: 0; }
button { font: inherit; padding: 2px 10px; }
#count { font-weight: bold; }
.hint { color: #78909c; font-size: 12px; }
#graph { flex: auto; width: 100%; min-height: 0; cursor: grab; background: #fff; touch-action: none; }
#graph.dragging { cursor: grabbing; }
.frame rect { fill: #fafafa; stroke: #b0bec5; stroke-width: 0.8; }
.frame text { font-size: 9px; fill: #37474f; }
.edge { fill: none; stroke: #78909c; stroke-width: 0.8; }
.edge.residual { stroke: #9e9e9e; stroke-dasharray: 4 3; }
.edge.hot { stroke: #d84315; stroke-width: 1.8; stroke-dasharray: none; }
.node rect { stroke: #607d8b; stroke-width: 0.8; }
.node text { font-size: 9px; fill: #212121; pointer-events: none; }
.node:hover rect, .node.hot rect { stroke: #d84315; stroke-width: 2; }
#details { position: fixed; z-index: 2; background: #fffffff2; border: 1px solid #90a4ae; border-radius: 4px;
  padding: 6px 9px; font-size: 12px; box-shadow: 0 2px 6px #0003; pointer-events: none; max-width: 360px; }
#details table { border-collapse: collapse; }
#details td { padding: 1px 6px 1px 0; vertical-align: top; }
#details td:first-child { color: #607d8b; }
"""

_JS = r"""
(function () {
  "use strict";
  var svg = document.getElementById("graph");
  var nodes = Array.prototype.slice.call(svg.querySelectorAll("g.node"));
  var edges = Array.prototype.slice.call(svg.querySelectorAll("path.edge"));
  var frames = Array.prototype.slice.call(svg.querySelectorAll("g.frame"));
  var boxes = Array.prototype.slice.call(document.querySelectorAll("input[data-kind]"));
  var layerSelect = document.getElementById("layer");
  var count = document.getElementById("count");
  var details = document.getElementById("details");
  var full = svg.getAttribute("viewBox").split(/[ ,]+/).map(Number);
  var vb = full.slice();
  var incident = nodes.map(function () { return []; });
  edges.forEach(function (e) {
    incident[+e.getAttribute("data-src")].push(e);
    incident[+e.getAttribute("data-dst")].push(e);
  });

  function apply() { svg.setAttribute("viewBox", vb.join(" ")); }
  function toSvg(ev) {
    var m = svg.getScreenCTM();
    if (!m) { return { x: 0, y: 0 }; }
    var p = svg.createSVGPoint();
    p.x = ev.clientX; p.y = ev.clientY;
    return p.matrixTransform(m.inverse());
  }
  function fit(rect) { vb = rect.slice(); apply(); }

  svg.addEventListener("wheel", function (ev) {
    ev.preventDefault();
    var p = toSvg(ev);
    var k = Math.pow(1.0015, ev.deltaMode === 1 ? ev.deltaY * 30 : ev.deltaY);
    k = Math.max(0.2, Math.min(5, k));
    vb = [p.x - (p.x - vb[0]) * k, p.y - (p.y - vb[1]) * k, vb[2] * k, vb[3] * k];
    apply();
  }, { passive: false });

  var drag = null;
  svg.addEventListener("pointerdown", function (ev) {
    if (ev.button !== 0) { return; }
    drag = toSvg(ev);
    svg.classList.add("dragging");
    if (svg.setPointerCapture) { svg.setPointerCapture(ev.pointerId); }
  });
  svg.addEventListener("pointermove", function (ev) {
    if (!drag) { return; }
    var p = toSvg(ev);
    vb[0] -= p.x - drag.x; vb[1] -= p.y - drag.y;
    apply();
  });
  function endDrag() { drag = null; svg.classList.remove("dragging"); }
  svg.addEventListener("pointerup", endDrag);
  svg.addEventListener("pointercancel", endDrag);

  function show(node, ev) {
    var info = JSON.parse(node.getAttribute("data-info"));
    var rows = Object.keys(info).map(function (k) {
      var td1 = document.createElement("td"), td2 = document.createElement("td"), tr = document.createElement("tr");
      td1.textContent = k; td2.textContent = info[k]; tr.appendChild(td1); tr.appendChild(td2); return tr;
    });
    var table = document.createElement("table");
    rows.forEach(function (r) { table.appendChild(r); });
    details.replaceChildren(table);
    details.hidden = false;
    place(ev);
  }
  function place(ev) {
    var w = details.offsetWidth, h = details.offsetHeight;
    var x = ev.clientX + 14, y = ev.clientY + 14;
    if (x + w > window.innerWidth - 4) { x = ev.clientX - w - 14; }
    if (y + h > window.innerHeight - 4) { y = ev.clientY - h - 14; }
    details.style.left = Math.max(4, x) + "px"; details.style.top = Math.max(4, y) + "px";
  }
  nodes.forEach(function (n, i) {
    n.addEventListener("pointerenter", function (ev) {
      n.classList.add("hot");
      incident[i].forEach(function (e) { e.classList.add("hot"); e.parentNode.appendChild(e); });
      show(n, ev);
    });
    n.addEventListener("pointermove", place);
    n.addEventListener("pointerleave", function () {
      n.classList.remove("hot");
      incident[i].forEach(function (e) { e.classList.remove("hot"); });
      details.hidden = true;
    });
  });

  function frameRect(f) {
    var r = f.querySelector("rect");
    return [+r.getAttribute("x"), +r.getAttribute("y"), +r.getAttribute("width"), +r.getAttribute("height")];
  }
  function refilter(refit) {
    var kinds = {};
    boxes.forEach(function (b) { if (b.checked) { kinds[b.getAttribute("data-kind")] = true; } });
    var layer = layerSelect.value;
    var visible = nodes.map(function (n) {
      return !!kinds[n.getAttribute("data-kind")] && (layer === "all" || n.getAttribute("data-layer") === layer);
    });
    var shown = 0;
    nodes.forEach(function (n, i) { n.style.display = visible[i] ? "" : "none"; if (visible[i]) { shown++; } });
    edges.forEach(function (e) {
      e.style.display = visible[+e.getAttribute("data-src")] && visible[+e.getAttribute("data-dst")] ? "" : "none";
    });
    var box = null;
    frames.forEach(function (f) {
      var on = layer === "all" || f.getAttribute("data-layer") === layer;
      f.style.display = on ? "" : "none";
      if (on) {
        var r = frameRect(f);
        box = box ? [Math.min(box[0], r[0]), Math.min(box[1], r[1]),
                     Math.max(box[0] + box[2], r[0] + r[2]), Math.max(box[1] + box[3], r[1] + r[3])]
                  : [r[0], r[1], r[0] + r[2], r[1] + r[3]];
      }
    });
    document.body.dataset.visible = String(shown);
    count.textContent = shown === nodes.length ? nodes.length + " nodes" : shown + " of " + nodes.length + " nodes shown";
    if (refit) { fit(layer === "all" || !box ? full : [box[0] - 10, box[1] - 10, box[2] - box[0] + 20, box[3] - box[1] + 20]); }
  }
  boxes.forEach(function (b) { b.addEventListener("change", function () { refilter(false); }); });
  layerSelect.addEventListener("change", function () { refilter(true); });
  document.getElementById("fit").addEventListener("click", function () { refilter(true); });
  document.addEventListener("keydown", function (ev) { if (ev.key === "0" || ev.key === "Home") { refilter(true); } });

  function readable() {
    // the whole graph when it fits at a legible scale; else its top left, legible (pan from there;
    // "fit" shows it all)
    var cw = svg.clientWidth, ch = svg.clientHeight;
    if (!cw || !ch) { return full.slice(); }
    if (Math.min(cw / full[2], ch / full[3]) >= 0.75) { return full.slice(); }
    var s = Math.min(1.6, Math.max(cw / full[2], 1));
    var x = cw / s >= full[2] ? full[0] + full[2] / 2 - cw / s / 2 : full[0];
    return [x, full[1], cw / s, ch / s];
  }

  // a link can carry the filter: page.html#layer=2&kinds=attend,merge
  var hash = {};
  (window.location.hash || "").replace(/^#/, "").split("&").forEach(function (kv) {
    var i = kv.indexOf("=");
    if (i > 0) { hash[decodeURIComponent(kv.slice(0, i))] = decodeURIComponent(kv.slice(i + 1)); }
  });
  if (hash.kinds !== undefined) {
    var want = hash.kinds.split(",");
    boxes.forEach(function (b) { b.checked = want.indexOf(b.getAttribute("data-kind")) >= 0; });
  }
  var byLayer = hash.layer !== undefined && Array.prototype.some.call(layerSelect.options, function (o) { return o.value === hash.layer; });
  if (byLayer) { layerSelect.value = hash.layer; }
  refilter(byLayer);
  if (!byLayer) { fit(readable()); }
  document.body.dataset.nodes = String(nodes.length);
})();
"""


def _f(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def _path(points) -> str:
    (x0, y0), rest = points[0], points[1:]
    out = [f"M{_f(x0)},{_f(y0)}"]
    for k in range(0, len(rest), 3):
        seg = rest[k:k + 3]
        out.append("C" + " ".join(f"{_f(x)},{_f(y)}" for x, y in seg))
    return "".join(out)


def to_html(lay) -> str:
    """The page for a graphs.pictures.draw.Layout: a string, ready to write."""
    kinds = Counter(b.kind for b in lay.boxes)
    top = min([f.y0 for f in lay.frames] + [b.top for b in lay.boxes] + [lay.height]) - 8
    view = f"{_f(0)} {_f(top)} {_f(lay.width)} {_f(lay.height - top)}"

    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{escape(lay.title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>", "<header>",
             f"<h1>{escape(lay.title)}</h1>", f'<div class="sub">{escape(lay.subtitle)}</div>', '<div class="controls">',
             '<div class="kinds" title="show or hide a kind">']
    for k in KIND_ORDER:
        if kinds[k]:
            parts.append(f'<label style="background:{COLOURS[k]}"><input type="checkbox" data-kind="{k}" checked>'
                         f"{k} ({kinds[k]})</label>")
    parts.append("</div>")
    parts.append('<label>layer <select id="layer"><option value="all">all layers</option>')
    for layer, name in sorted(lay.layer_names.items()):
        parts.append(f'<option value="{layer}">{escape(name)}</option>')
    parts.append("</select></label>")
    parts.append('<button id="fit" type="button">fit</button>')
    parts.append(f'<span id="count">{len(lay.boxes)} nodes</span>')
    parts.append('<span class="hint">drag to pan · wheel to zoom · hover a node for details · '
                 'dashed edges are residual</span>')
    parts.append("</div>")
    parts.append("</header>")

    parts.append(f'<svg id="graph" viewBox="{view}" preserveAspectRatio="xMidYMin meet" role="img" '
                 f'aria-label="{escape(lay.title)}">')
    parts.append('<defs><marker id="arrow" viewBox="0 0 8 6" refX="8" refY="3" markerWidth="8" markerHeight="6" '
                 'markerUnits="userSpaceOnUse" orient="auto"><path d="M0,0L8,3L0,6z" fill="#78909c"/></marker>'
                 '<marker id="arrow-residual" viewBox="0 0 8 6" refX="8" refY="3" markerWidth="8" markerHeight="6" '
                 'markerUnits="userSpaceOnUse" orient="auto"><path d="M0,0L8,3L0,6z" fill="#9e9e9e"/></marker></defs>')
    parts.append('<g class="frames">')
    for f in lay.frames:
        parts.append(f'<g class="frame" data-layer="{f.layer}"><rect x="{_f(f.x0)}" y="{_f(f.y0)}" '
                     f'width="{_f(f.x1 - f.x0)}" height="{_f(f.y1 - f.y0)}" rx="6"/>'
                     f'<text>{"".join(_tspans(f.x0 + 8, f.y0 + 14, f.lines or [f.label]))}</text></g>')
    parts.append("</g>")
    parts.append('<g class="edges">')
    for link in lay.links:
        s, t = lay.boxes[link.src], lay.boxes[link.dst]
        cls = "edge residual" if link.residual else "edge"
        marker = "arrow-residual" if link.residual else "arrow"
        width = f' style="stroke-width:{min(0.8 + 0.5 * _log10(link.count), 3):.2f}"' if link.count > 1 else ""
        tip = f"{s.id} → {t.id}" + (f" ({link.count} edges)" if link.count > 1 else "")
        parts.append(f'<path class="{cls}" data-src="{link.src}" data-dst="{link.dst}" d="{_path(link.points)}" '
                     f'marker-end="url(#{marker})"{width}><title>{escape(tip)}</title></path>')
    parts.append("</g>")
    parts.append('<g class="nodes">')
    lh = 11.0
    for k, b in enumerate(lay.boxes):
        info = escape(json.dumps(b.info, ensure_ascii=False), quote=True)
        key = b.info.get("key block", "")
        mask = b.info.get("mask", "")
        parts.append(f'<g class="node" data-index="{k}" data-id="{escape(b.id)}" data-kind="{b.kind}" data-layer="{b.layer}" '
                     f'data-block="{escape(b.info.get("block", b.info.get("blocks", "")))}" data-key-block="{escape(key)}" '
                     f'data-mask="{escape(mask)}" data-info="{info}">')
        parts.append(f'<rect x="{_f(b.left)}" y="{_f(b.top)}" width="{_f(b.w)}" height="{_f(b.h)}" rx="4" '
                     f'fill="{COLOURS[b.kind]}"/>')
        y0 = b.y - (len(b.lines) - 1) * lh / 2
        spans = "".join(f'<tspan x="{_f(b.x)}" y="{_f(y0 + i * lh)}">{escape(line)}</tspan>' for i, line in enumerate(b.lines))
        parts.append(f'<text text-anchor="middle" dominant-baseline="central">{spans}</text></g>')
    parts.append("</g>")
    parts.append("</svg>")
    parts.append('<div id="details" hidden></div>')
    parts.append(f"<script>{_JS}</script>")
    parts.append("</body>")
    parts.append("</html>")
    return "\n".join(parts) + "\n"


def _tspans(x: float, y: float, lines) -> list[str]:
    return [f'<tspan x="{_f(x)}" y="{_f(y + i * 11)}">{escape(line)}</tspan>' for i, line in enumerate(lines)]


def _log10(x: float) -> float:
    import math

    return math.log10(x)
