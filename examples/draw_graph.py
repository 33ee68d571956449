"""Draw a forward's logical task graph, the pairs it computes, and compare masks, from Python.

    .venv/bin/python examples/draw_graph.py          # writes graph.svg, graph.html, pairs.png, compare.png

The same pictures as `emulate graph -o graph.svg` and `emulate graph --coverage pairs.png`.
"""
import emulate

graph = emulate.compile("tiny-llama", tokens=2048, block_size=256, attention="sliding", window=300)
print(emulate.draw(graph, "graph.svg"))       # blocks across, layers down, one node per small call
print(emulate.draw(graph, "graph.html"))      # the same, with pan, zoom, hover and filters
print(emulate.draw_coverage(graph, "pairs.png")["calls"], "pair calls in layer 0")
counts = emulate.draw_comparison("tiny-llama", ["full", "causal", "sliding", "sink"], "compare.png",
                                 tokens=4096, block_size=256)
print({name: s["calls"] for name, s in counts.items()})
