"""The compact graph: the networkx graph's counts, nodes and edges from one template per layer
pattern, and a 1M-token forward of a 32-layer model compiled and analysed in a few megabytes.
"""
from __future__ import annotations

import json
import time
import tracemalloc

import networkx as nx
import numpy as np
import pytest

import emulate
from emulate.cli import main
from graphs import (CompactGraph, ForwardSpec, Node, NodeKind, Pattern, build_graph, counts, execution_order, from_json,
                    to_json)
from graphs.export import write_json


def spec(tokens, block_size, patterns, vocab=64, seed=5):
    return ForwardSpec(tokens=tokens, block_size=block_size, patterns=tuple(patterns), heads=4, kv_heads=2,
                       head_dim=8, width=32, mlp_width=64, vocab=vocab, seed=seed)


def pattern_sets(N, M):
    r = max(1, M + M // 2)
    return {
        "full": [Pattern("full")] * 2,
        "causal": [Pattern("causal")] * 3,
        "sliding": [Pattern("sliding", window=r)] * 2,
        "short sliding": [Pattern("sliding", window=max(1, M // 3))] * 2,
        "sink": [Pattern("sink", window=r, sinks=2)] * 2,
        "sampled": [Pattern("sampled")] * 2,
        "mixed": [Pattern("causal"), Pattern("sliding", window=3), Pattern("sink", window=2 * M + 1, sinks=M + 1),
                  Pattern("causal")],
    }


# several N and M: a single block, ragged last blocks, M = 1, M > N, odd sizes
SIZES = [(1, 1), (5, 8), (7, 3), (16, 16), (64, 16), (100, 16), (130, 7), (97, 13), (33, 2)]


@pytest.mark.parametrize("N,M", SIZES)
def test_compact_counts_equal_the_networkx_counts(N, M):
    for name, patterns in pattern_sets(N, M).items():
        for vocab in (64, 0):
            c = CompactGraph.build(spec(N, M, patterns, vocab=vocab))
            g = build_graph(spec(N, M, patterns, vocab=vocab))
            assert c.counts() == counts(g), (name, vocab)
            assert c.work_bytes() == sum(a["bytes"] for _, a in g.nodes(data=True)), name


@pytest.mark.parametrize("N,M", [(5, 8), (100, 16), (130, 7), (33, 2)])
def test_iter_nodes_and_to_networkx_equal_the_networkx_graph(N, M):
    for name, patterns in pattern_sets(N, M).items():
        c = CompactGraph.build(spec(N, M, patterns))
        g = build_graph(spec(N, M, patterns))
        nodes = list(c.iter_nodes())
        assert [n for n, _ in nodes] == list(g.nodes), name  # the builder's order
        assert all(node == Node.of(g.nodes[n]) and node.attrs() == g.nodes[n] for n, node in nodes), name
        assert sorted(c.iter_edges()) == sorted(g.edges), name
        h = c.to_networkx()
        assert nx.utils.graphs_equal(h, g) and list(h.edges) == list(g.edges), name
        assert c.graph_attrs() == g.graph


@pytest.mark.parametrize("N,M", [(1, 1), (5, 8), (100, 16), (130, 7), (33, 2)])
def test_the_schedule_is_the_execution_order_with_each_node_s_readers(N, M):
    """What the local executor runs without the graph: execution_order's nodes (the wavefront for
    windowed graphs, layer by layer otherwise), each with its out-degree."""
    for name, patterns in pattern_sets(N, M).items():
        c = CompactGraph.build(spec(N, M, patterns))
        g = build_graph(spec(N, M, patterns))
        scheduled = list(c.schedule())
        assert [n for n, _, _ in scheduled] == execution_order(g), name
        assert all(node == Node.of(g.nodes[n]) and readers == g.out_degree(n) for n, node, readers in scheduled), name
        assert c.node_count() == g.number_of_nodes(), name


def test_a_ten_million_token_windowed_schedule_is_read_in_constant_memory():
    """The 10M-token sink run's schedule (5,120 blocks, 4 layers, 133,104 nodes) generated one node at a
    time: its memory is the templates', not the graph's."""
    s = ForwardSpec(tokens=10 * 2**20, block_size=2048, patterns=(Pattern("sink", window=1020, sinks=4),) * 4,
                    heads=8, kv_heads=2, head_dim=32, width=256, mlp_width=512, vocab=1024)
    tracemalloc.start()
    try:
        c = CompactGraph.build(s)
        count, attends = 0, 0
        for _, node, _ in c.schedule():
            count += 1
            attends += node.kind == NodeKind.ATTEND
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == c.node_count() and attends == c.counts()["attention_calls"] == 4 * (3 * 5120 - 3)
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_layers_with_one_pattern_share_one_template():
    patterns = [Pattern("causal"), Pattern("sliding", window=3)] * 4
    c = CompactGraph.build(spec(100, 16, patterns))
    assert len(c.templates) == 2 and c.layer_template == (0, 1) * 4
    assert c.template(6) is c.templates[0]


def test_streamed_json_loads_to_the_networkx_graph(tmp_path):
    for name, patterns in pattern_sets(70, 16).items():
        s = spec(70, 16, patterns)
        out = tmp_path / f"{name}.json"
        assert write_json(CompactGraph.build(s), out) == (build_graph(s).number_of_nodes(),
                                                          build_graph(s).number_of_edges())
        got, want = from_json(out.read_text()), from_json(to_json(build_graph(s)))
        assert nx.utils.graphs_equal(got, want), name
        assert json.loads(out.read_text()).keys() == json.loads(to_json(build_graph(s))).keys()


def test_a_failed_stream_leaves_nothing(tmp_path):
    class Broken(CompactGraph):
        def iter_nodes(self, on_layer=None):
            yield from list(super().iter_nodes())[:5]
            raise RuntimeError("disk gone")

    s = spec(70, 16, [Pattern("causal")])
    c = CompactGraph.build(s)
    broken = Broken(c.spec, c.spans, c.templates, c.layer_template)
    with pytest.raises(RuntimeError):
        write_json(broken, tmp_path / "g.json")
    assert list(tmp_path.iterdir()) == []


def test_a_million_token_32_layer_causal_graph_compiles_in_megabytes():
    """The issue's case: N = 2^20, M = 4096 (256 blocks), 32 causal layers: 1.05M attend nodes."""
    s = ForwardSpec(tokens=2**20, block_size=4096, patterns=(Pattern("causal"),) * 32, heads=32, kv_heads=8,
                    head_dim=128, width=4096, mlp_width=14336, vocab=128256, dtype_bytes=2)
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        g = CompactGraph.build(s)
        c = g.counts()
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert c["attention_calls"] == 32 * 256 * 257 // 2 == 1_052_672 == c["attention_calls_bound"]
    assert c["graph_nodes"] == 256 + 32 * (256 + 32_896 + 255 + 256) + 256
    assert c["graph_depth"] == 2 + 4 * 32
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.1f} MiB"  # measured ~6 MiB
    assert seconds < 10, seconds  # ~0.5 s measured on a busy 2-core machine


def test_compile_compact_from_the_api_and_a_shape():
    c = emulate.compile("tiny-llama", tokens=300, block_size=32, attention="causal", compact=True)
    assert isinstance(c, CompactGraph)
    assert c.counts() == counts(emulate.compile("tiny-llama", tokens=300, block_size=32, attention="causal"))
    big = emulate.compile("llama3-8b", tokens=2**20, block_size=4096, attention="causal", compact=True)
    assert big.layers == 32 and big.counts()["attention_calls"] == 1_052_672


def test_compile_only_paths_price_the_graph_not_a_run():
    from emulate.runtime.memory import estimate
    from emulate.models.shapes import shape_config

    config = shape_config("llama3-8b")
    patterns = [Pattern("causal")] * 32
    run = sum(estimate(config, 2**20, 4096, patterns, 2).values())
    compact = sum(estimate(config, 2**20, 4096, patterns, 2, run=False, graph="compact").values())
    assert compact < 2**30 < run


def test_graph_without_output_prints_counts_fast(capsys):
    t0 = time.perf_counter()
    assert main(["graph", "--shape", "llama3-8b", "--random-tokens", str(2**20), "-M", "4096", "--attention",
                 "causal", "--json"]) == 0
    assert time.perf_counter() - t0 < 30
    s = json.loads(capsys.readouterr().out)
    assert s["attention_calls"] == 1_052_672 and s["layers"] == 32 and s["graph_depth"] == 130
    assert main(["graph", "--random-tokens", "300", "-M", "32"]) == 0
    assert "attention" in capsys.readouterr().out


def test_graph_json_from_the_cli_is_streamed_and_reloads(capsys, tmp_path):
    out = tmp_path / "g.json"
    assert main(["graph", "--random-tokens", "200", "-M", "32", "--attention", "sliding", "--window", "40",
                 "-o", str(out)]) == 0
    g = from_json(out.read_text())
    want = emulate.compile("tiny-llama", random_tokens=200, block_size=32, attention="sliding", window=40)
    assert nx.utils.graphs_equal(g, want)
    capsys.readouterr()
    assert main(["graph", "--model", "tiny-llama", "--shape", "llama3-8b", "--random-tokens", "20"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("pattern", [Pattern("sliding", window=150), Pattern("sink", window=70, sinks=3),
                                     Pattern("sink", window=300, sinks=200)], ids=str)
def test_kernel_entries_are_each_tile_s_rows_times_its_box(pattern):
    """What the planner prices for an explicit pair: the tiles the kernel runs (emulate/runtime/kernels.py,
    attend_intervals), worked out here from the visibility matrix itself."""
    from graphs import MaskKind
    from graphs.patterns import TILE_ROWS, kernel_entries

    for q_span, k_span in (((300, 600), (300, 600)), ((300, 600), (0, 300)), ((600, 731), (300, 600))):
        visible = pattern.visible(np.arange(*q_span), np.arange(*k_span))
        want = 0
        for r0 in range(0, len(visible), TILE_ROWS):
            cols = np.flatnonzero(visible[r0:r0 + TILE_ROWS].any(axis=0))
            if len(cols):
                want += len(visible[r0:r0 + TILE_ROWS]) * (cols[-1] + 1 - cols[0])
        assert kernel_entries(pattern, MaskKind.EXPLICIT, q_span, k_span) == want, (q_span, k_span)
    assert kernel_entries(pattern, MaskKind.NONE, (0, 7), (0, 5)) == 35
