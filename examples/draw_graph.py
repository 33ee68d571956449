"""Draw the logical task graph of a small forward as a PNG: one row per stage, one column per block.

The graph is `emulate.compile`'s, for a small model of --layers layers (4 heads of 16, width 64):
compiling reads only the model's shape, so the model carries no weights.

    .venv/bin/python examples/draw_graph.py --attention sliding --window 96 -o graph.png
"""
import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import emulate  # noqa: E402
from graphs import Pattern  # noqa: E402
from graphs.export import COLOURS  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", type=int, default=512)
ap.add_argument("--block-size", type=int, default=64)
ap.add_argument("--layers", type=int, default=2)
ap.add_argument("--attention", default="causal")
ap.add_argument("--window", type=int)
ap.add_argument("--sinks", type=int)
ap.add_argument("-o", "--output", default="graph.png")
args = ap.parse_args()

pattern = Pattern(args.attention, window=args.window, sinks=args.sinks)
# a model of the drawing's shape, encoder or decoder as the mask asks (sampled attention needs an encoder)
shape = emulate.ModelConfig(name="drawing", family="llama", vocab=256, width=64, layers=args.layers, heads=4,
                            kv_heads=4, head_dim=16, mlp_width=128, causal=pattern.causal)
g = emulate.compile(emulate.Model(shape, weights={}), tokens=args.tokens, block_size=args.block_size, attention=pattern)
stage = {"embed": 4, "project": 1, "attend": 2, "merge": 3, "mix": 4, "head": 1}  # rows within a layer
pos = {}
for n, a in g.nodes(data=True):
    y = -(4 * a["layer"] + stage[a["kind"]])  # embed (layer -1) on top, head just below the last mix
    x = a["block"] + (0.6 * (a.get("key_block", 0) + 1) / (g.graph["blocks"] + 1) - 0.3 if a["kind"] == "attend" else 0)
    pos[n] = (x, y)
fig, ax = plt.subplots(figsize=(max(6, g.graph["blocks"] * 0.9), 2 + args.layers * 2.2))
for u, v in g.edges():
    ax.plot(*zip(pos[u], pos[v]), color="#b0bec5", lw=0.4, zorder=1)
for kind, colour in COLOURS.items():
    pts = [pos[n] for n, a in g.nodes(data=True) if a["kind"] == kind]
    if pts:
        ax.scatter(*zip(*pts), s=30, color=colour, edgecolors="#37474f", linewidths=0.5, label=kind, zorder=2)
ax.set_xlabel("query block")
ax.set_yticks([])
ax.set_title(f"{pattern.describe()}: N={args.tokens}, M={args.block_size}, {args.layers} layers, "
             f"{sum(1 for _, a in g.nodes(data=True) if a['kind'] == 'attend')} pair calls")
ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), fontsize=8, ncol=6, frameon=False)
fig.tight_layout()
fig.savefig(args.output, dpi=120)
print(f"wrote {args.output}")
