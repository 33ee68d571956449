"""The logical graph: which pairs exist, with which masks, and what the graph says about itself.

Pure graphs-package tests (no torch): every claim is checked against a brute-force N x N mask
built from Pattern.visible on small N.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import fields
from math import ceil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphs import (
    CompactGraph,
    ForwardSpec,
    Node,
    NodeKind,
    Pattern,
    PatternError,
    block_spans,
    build_graph,
    counts,
    depth,
    execution_order,
    from_json,
    key_blocks,
    last_uses,
    node_id,
    pair_mask,
    row_counts,
    sample_permutation,
    sampled_keys,
    to_dot,
    to_json,
)
from graphs.nodes import scan_nodes

PROPERTY = settings(max_examples=60, deadline=None)


def spec(tokens, block_size, pattern, layers=2, seed=0, vocab=64):
    patterns = pattern if isinstance(pattern, (list, tuple)) else [pattern] * layers
    return ForwardSpec(tokens=tokens, block_size=block_size, patterns=tuple(patterns), heads=4, kv_heads=2,
                       head_dim=8, width=32, mlp_width=64, vocab=vocab, seed=seed)


def attends(g, layer=None):
    return [a for _, a in g.nodes(data=True) if a["kind"] == "attend" and (layer is None or a["layer"] == layer)]


def brute_mask(pattern, span_q, span_k):
    return pattern.visible(np.arange(*span_q), np.arange(*span_k))


def brute_kind(pattern, span_q, span_k):
    """'none' when every entry is visible, 'causal' when the pair is the aligned lower triangle."""
    vis = brute_mask(pattern, span_q, span_k)
    if vis.all():
        return "none"
    if span_q == span_k and np.array_equal(vis, np.tri(vis.shape[0], dtype=bool)):
        return "causal"
    return "explicit"


def exact_patterns(r, s):
    return [Pattern("full"), Pattern("causal"), Pattern("sliding", window=r), Pattern("sink", window=r, sinks=s)]


sizes = st.integers(min_value=1, max_value=70)
block_sizes = st.integers(min_value=1, max_value=24)
windows = st.integers(min_value=1, max_value=90)


# -- pair counts per layer ------------------------------------------------------------------

@pytest.mark.parametrize("N,M", [(256, 16), (250, 16), (7, 1), (5, 8)])
def test_full_attention_has_every_pair(N, M):
    B = ceil(N / M)
    c = counts(build_graph(spec(N, M, Pattern("full"), layers=3)))
    assert c["attention_calls_per_layer"] == [B * B] * 3
    assert c["attention_calls"] == 3 * B * B == c["attention_calls_bound"]


@pytest.mark.parametrize("N,M", [(256, 16), (251, 16), (7, 1), (5, 8)])
def test_causal_attention_has_the_lower_triangle_of_pairs(N, M):
    B = ceil(N / M)
    c = counts(build_graph(spec(N, M, Pattern("causal"), layers=3)))
    assert c["attention_calls_per_layer"] == [B * (B + 1) // 2] * 3


@PROPERTY
@given(N=sizes, M=block_sizes, r=windows)
def test_sliding_window_pairs_are_linear_in_blocks(N, M, r):
    B = ceil(N / M)
    pattern = Pattern("sliding", window=r)
    per_layer = counts(build_graph(spec(N, M, pattern)))["attention_calls_per_layer"]
    for calls in per_layer:
        assert calls <= (ceil(r / M) + 1) * B
        assert calls <= pattern.calls_bound(B, M)
        assert calls <= B * (B + 1) // 2


@PROPERTY
@given(N=sizes, M=block_sizes, r=windows, s=windows)
def test_sink_pairs_add_at_most_the_sink_blocks(N, M, r, s):
    B = ceil(N / M)
    pattern = Pattern("sink", window=r, sinks=s)
    for calls in counts(build_graph(spec(N, M, pattern)))["attention_calls_per_layer"]:
        assert calls <= (ceil(r / M) + ceil(s / M) + 1) * B
        assert calls <= pattern.calls_bound(B, M)


def test_sink_within_one_block_meets_the_design_bound():
    # docs/design.md's table: with s <= M the sink pattern needs at most (ceil(r/M) + 2) B pair calls
    N, M, r, s = 1000, 32, 70, 4
    B = ceil(N / M)
    calls = counts(build_graph(spec(N, M, Pattern("sink", window=r, sinks=s))))["attention_calls_per_layer"]
    assert all(c <= (ceil(r / M) + 2) * B for c in calls)


def test_long_sliding_window_reaches_back_exactly_ceil_r_over_m_blocks():
    # an interior query block with r = 3M + 5 needs its own block and the ceil(r/M) = 4 before it
    N, M, r = 40 * 16, 16, 3 * 16 + 5
    g = build_graph(spec(N, M, Pattern("sliding", window=r), layers=1))
    js = sorted(a["key_block"] for a in attends(g) if a["block"] == 20)
    assert js == [16, 17, 18, 19, 20]


@PROPERTY
@given(N=sizes, M=block_sizes, seed=st.integers(0, 2**32 - 1))
def test_sampled_attention_makes_one_call_per_query_block(N, M, seed):
    g = build_graph(spec(N, M, Pattern("sampled"), layers=2, seed=seed, vocab=0))
    assert counts(g)["attention_calls_per_layer"] == [ceil(N / M)] * 2
    assert counts(g)["calls_by_kind"]["merge"] == 0


# -- coverage: every visible entry by exactly one non-empty pair ----------------------------

def assert_exact_cover(N, M, pattern):
    g = build_graph(spec(N, M, pattern, layers=1))
    cover = np.zeros((N, N), dtype=np.int64)
    for a in attends(g):
        (q0, q1), (k0, k1) = a["span"], a["key_span"]
        vis = brute_mask(pattern, (q0, q1), (k0, k1))
        assert vis.any(), f"emitted an empty pair {a['block']}x{a['key_block']}"
        cover[q0:q1, k0:k1] += vis
    expected = pattern.visible(np.arange(N), np.arange(N)).astype(np.int64)
    np.testing.assert_array_equal(cover, expected)


@PROPERTY
@given(N=sizes, M=block_sizes, r=windows, s=windows)
def test_pairs_cover_every_visible_entry_exactly_once(N, M, r, s):
    for pattern in exact_patterns(r, s):
        assert_exact_cover(N, M, pattern)


@pytest.mark.parametrize("N,M", [(1, 1), (1, 16), (2, 1), (13, 1), (97, 7), (101, 128), (64, 16)])
@pytest.mark.parametrize("r,s", [(1, 1), (3, 20), (16, 16), (17, 2), (200, 150)])
def test_odd_sizes_cover_exactly(N, M, r, s):
    for pattern in exact_patterns(r, s):
        assert_exact_cover(N, M, pattern)


def test_key_blocks_are_ascending_and_non_empty():
    spans = block_spans(100, 7)
    for pattern in exact_patterns(9, 11):
        for i in range(len(spans)):
            js = key_blocks(pattern, spans, i)
            assert js == sorted(set(js))
            assert all(brute_mask(pattern, spans[i], spans[j]).any() for j in js)


# -- pair masks and row counts --------------------------------------------------------------

@PROPERTY
@given(N=sizes, M=block_sizes, r=windows, s=windows)
def test_pair_mask_kind_and_visible_count_match_brute_force(N, M, r, s):
    spans = block_spans(N, M)
    for pattern in exact_patterns(r, s) + [Pattern("sampled")]:
        for sq in spans:
            for sk in spans:
                pm = pair_mask(pattern, sq, sk)
                vis = brute_mask(pattern, sq, sk)
                assert pm.visible == int(vis.sum())
                if vis.any():
                    assert pm.kind == brute_kind(pattern, sq, sk), (pattern, sq, sk)


def test_diagonal_block_inside_a_long_window_is_a_plain_causal_mask():
    # r >= M: the window never cuts into the diagonal block, so it is the aligned triangle
    for pattern in (Pattern("sliding", window=16), Pattern("sliding", window=40), Pattern("sink", window=16, sinks=2)):
        assert pair_mask(pattern, (32, 48), (32, 48)).kind == "causal"
    assert pair_mask(Pattern("sliding", window=15), (32, 48), (32, 48)).kind == "explicit"


@PROPERTY
@given(N=sizes, M=block_sizes, r=windows, s=windows)
def test_row_counts_match_brute_force(N, M, r, s):
    spans = block_spans(N, M)
    for pattern in exact_patterns(r, s):
        for sq in spans:
            for sk in spans:
                np.testing.assert_array_equal(row_counts(pattern, sq, sk), brute_mask(pattern, sq, sk).sum(axis=1))


def test_sink_never_counts_a_key_twice():
    # s > window start: the sink keys and the window overlap, and each key counts once
    pattern = Pattern("sink", window=4, sinks=10)
    counts_ = row_counts(pattern, (0, 30), (0, 30))
    expected = [q + 1 if q < 10 else 10 + min(4, q - 9) for q in range(30)]
    np.testing.assert_array_equal(counts_, expected)


# -- block spans and odd sizes --------------------------------------------------------------

@PROPERTY
@given(N=st.integers(1, 500), M=st.integers(1, 64))
def test_blocks_tile_the_tokens_with_one_ragged_tail(N, M):
    spans = block_spans(N, M)
    assert len(spans) == ceil(N / M)
    assert spans[0][0] == 0 and spans[-1][1] == N
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(e - s == M for s, e in spans[:-1]) and 1 <= spans[-1][1] - spans[-1][0] <= M


@pytest.mark.parametrize("N,M", [(251, 32), (5, 32), (1, 1), (1, 64), (9, 1), (100, 33)])
def test_no_call_sees_more_than_m_tokens(N, M):
    for pattern in exact_patterns(5, 3):
        c = counts(build_graph(spec(N, M, pattern)))
        assert c["max_call_tokens"] == min(N, M)


# -- sampled pattern (Thm 4.1) --------------------------------------------------------------

@PROPERTY
@given(N=st.integers(1, 300), M=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_sampled_key_sets_partition_the_tokens(N, M, seed):
    tau = sample_permutation(N, seed)
    np.testing.assert_array_equal(np.sort(tau), np.arange(N))
    keys = [sampled_keys(tau, span) for span in block_spans(N, M)]
    assert all(len(k) == e - s for k, (s, e) in zip(keys, block_spans(N, M)))
    np.testing.assert_array_equal(np.sort(np.concatenate(keys)), np.arange(N))


def test_sampled_graph_is_reproducible_from_its_seed():
    def key_sets(seed):
        g = build_graph(spec(500, 32, Pattern("sampled"), layers=1, seed=seed, vocab=0))
        tau = sample_permutation(500, g.graph["sample_seed"])
        return [(a["key_blocks"], sampled_keys(tau, a["span"]).tolist()) for a in attends(g)]

    assert key_sets(7) == key_sets(7)
    assert key_sets(7) != key_sets(8)
    # the sample is drawn with a fixed generator: the same seed gives the same bits on any machine
    assert sample_permutation(10, 0).tolist() == np.random.default_rng(0).permutation(10).tolist()


def test_sampled_call_reads_the_blocks_holding_its_keys():
    N, M = 300, 32
    g = build_graph(spec(N, M, Pattern("sampled"), layers=1, seed=3, vocab=0))
    tau = sample_permutation(N, 3)
    for n, a in g.nodes(data=True):
        if a["kind"] != "attend":
            continue
        owners = sorted({int(k) // M for k in sampled_keys(tau, a["span"])})
        assert a["key_blocks"] == owners and a["mask"] == "sample" and a["key_block"] == -1
        assert a["inputs"] == [node_id("project", 0, a["block"])] + [node_id("project", 0, j) for j in owners]


# -- graph structure: depth, edges, ordered inputs -------------------------------------------

@pytest.mark.parametrize("pattern,N,M,has_merge", [
    (Pattern("causal"), 100, 16, True), (Pattern("full"), 64, 16, True), (Pattern("causal"), 10, 16, False),
    (Pattern("sliding", window=1), 64, 16, False), (Pattern("sampled"), 64, 16, False),
])
def test_depth_is_four_nodes_per_layer_with_merges_three_without(pattern, N, M, has_merge):
    L = 3
    g = build_graph(spec(N, M, pattern, layers=L, vocab=0 if pattern.kind == "sampled" else 64))
    assert depth(g) == counts(g)["graph_depth"] == 2 + L * (4 if has_merge else 3)


def test_per_layer_patterns_compile_layer_by_layer():
    patterns = [Pattern("sliding", window=4), Pattern("causal"), Pattern("sliding", window=16)]
    g = build_graph(spec(64, 16, patterns))
    c = counts(g)
    assert c["attention_calls_per_layer"] == [4 + 3, 10, 4 + 3]
    # both windows reach back into the previous block, so every layer but for block 0 merges
    assert depth(g) == 2 + 3 * 4


def test_causal_edge_count():
    N, M, L = 80, 16, 2
    B = N // M
    g = build_graph(spec(N, M, Pattern("causal"), layers=L))
    pairs = B * (B + 1) // 2
    per_layer = B + (2 * pairs - B) + sum(i + 1 for i in range(1, B)) + 2 * B  # project, attend, merge, mix
    assert g.number_of_edges() == L * per_layer + B  # + head
    assert counts(g)["graph_edges"] == g.number_of_edges()
    assert counts(g)["graph_nodes"] == B + L * (B + pairs + (B - 1) + B) + B


def test_edges_are_exactly_the_declared_inputs():
    g = build_graph(spec(90, 16, Pattern("sink", window=20, sinks=3)))
    declared = {(src, n) for n, a in g.nodes(data=True) for src in a["inputs"]}
    assert declared == set(g.edges())


def test_inputs_are_ordered_by_node_kind():
    N, M, L = 70, 16, 2
    B = ceil(N / M)
    g = build_graph(spec(N, M, Pattern("causal"), layers=L))
    nodes = g.nodes
    for i in range(B):
        assert nodes[node_id("embed", None, i)]["inputs"] == []
        assert nodes[node_id("project", 0, i)]["inputs"] == [node_id("embed", None, i)]
        assert nodes[node_id("project", 1, i)]["inputs"] == [node_id("mix", 0, i)]
        for layer in range(L):
            for j in range(i + 1):
                assert nodes[node_id("attend", layer, i, j)]["inputs"] == [node_id("project", layer, i),
                                                                           node_id("project", layer, j)]
            partials = [node_id("attend", layer, i, j) for j in range(i + 1)]
            residual = node_id("embed", None, i) if layer == 0 else node_id("mix", layer - 1, i)
            if i == 0:
                assert node_id("merge", layer, i) not in nodes
                assert nodes[node_id("mix", layer, i)]["inputs"] == [residual, partials[0]]
            else:
                assert nodes[node_id("merge", layer, i)]["inputs"] == partials  # ascending key block
                assert nodes[node_id("mix", layer, i)]["inputs"] == [residual, node_id("merge", layer, i)]
        assert nodes[node_id("head", None, i)]["inputs"] == [node_id("mix", L - 1, i)]


def test_nodes_carry_their_kind_layer_block_and_price():
    g = build_graph(spec(70, 16, Pattern("sliding", window=20)))
    for n, a in g.nodes(data=True):
        assert a["kind"] in ("embed", "project", "attend", "merge", "mix", "head")
        assert {"layer", "block", "span", "tokens", "flops", "bytes", "inputs"} <= set(a)
        assert a["flops"] > 0 and a["bytes"] > 0 and 1 <= a["tokens"] <= 16
        if a["kind"] == "attend":
            assert a["mask"] in ("none", "causal", "explicit")
            assert a["flops"] == 4 * 4 * 8 * pair_mask(Pattern("sliding", window=20), a["span"], a["key_span"]).visible


@pytest.mark.parametrize("pattern,vocab", [(Pattern("causal"), 64), (Pattern("sliding", window=20), 64),
                                           (Pattern("sink", window=9, sinks=3), 64), (Pattern("sampled"), 0)])
def test_networkx_nodes_read_back_as_the_typed_nodes_the_compact_graph_made(pattern, vocab):
    """The node's schema lives in graphs.nodes.Node alone: a networkx node's data is Node.attrs(), Node.of
    gives back the node CompactGraph.iter_nodes made (also after JSON), and NodeAttrs (scan_nodes)
    reads the same fields, defaults included, without building it. vocab=0: the sampled pattern runs
    on an encoder."""
    s = spec(75, 16, pattern, vocab=vocab)
    g = build_graph(s)
    reloaded = from_json(to_json(g))
    made = list(CompactGraph.build(s).iter_nodes())
    assert [n for n, _ in made] == list(g.nodes)
    for n, node in made:
        assert Node.of(g.nodes[n]) == node and Node.of(reloaded.nodes[n]) == node
        assert node.attrs() == g.nodes[n] and Node.of(node.attrs()) == node and Node.of(node) is node
    assert [(n, Node.of({f.name: getattr(view, f.name) for f in fields(Node)})) for n, view in scan_nodes(g)] == made
    attends = [node for _, node in made if node.kind == NodeKind.ATTEND]  # the optional fields were read too
    assert attends and all((node.key_blocks is not None) == (pattern.kind == "sampled") for node in attends)


# -- serialisation ---------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", [Pattern("causal"), Pattern("sink", window=9, sinks=3), Pattern("sampled")])
def test_json_round_trip_keeps_nodes_edges_and_attributes(pattern):
    g = build_graph(spec(75, 16, pattern, vocab=0 if pattern.kind == "sampled" else 64))
    text = to_json(g)
    json.loads(text)  # plain JSON, nothing Python-specific
    h = from_json(text)
    assert dict(h.nodes(data=True)) == dict(g.nodes(data=True))
    assert set(h.edges()) == set(g.edges())
    assert h.graph == g.graph
    assert counts(h) == counts(g)


def parse_dot(text):
    """Node declarations and edges of the DOT that to_dot writes, checked line by line."""
    assert text.startswith("digraph ") and text.rstrip().endswith("}")
    assert text.count("{") == text.count("}")
    declared, edges = set(), []
    for line in text.splitlines()[1:-1]:
        line = line.strip()
        if m := re.fullmatch(r'"([^"]+)" -> "([^"]+)";', line):
            edges.append(m.groups())
        elif m := re.fullmatch(r'"([^"]+)" \[label="[^"]*", fillcolor="#[0-9a-f]{6}"\];', line):
            declared.add(m.group(1))
        else:
            assert re.fullmatch(r'(rankdir=\w+;|node \[.*\];|subgraph "cluster_-?\d+" \{.*|\})', line), line
    return declared, edges


def test_dot_declares_every_node_and_edge():
    g = build_graph(spec(60, 16, Pattern("sink", window=20, sinks=2), layers=2))
    text = to_dot(g)
    declared, edges = parse_dot(text)
    assert declared == set(g.nodes)
    assert set(edges) == set(g.edges()) and len(edges) == g.number_of_edges()
    assert all(u in declared and v in declared for u, v in edges)


def test_dot_is_accepted_by_graphviz():
    """Graphviz itself (the library bundled in the pygraphviz wheel) reads and lays out the export."""
    pygraphviz = pytest.importorskip("pygraphviz", reason="pygraphviz (which bundles Graphviz) is not installed")
    g = build_graph(spec(40, 16, Pattern("causal")))
    drawn = pygraphviz.AGraph(string=to_dot(g))
    drawn.layout(prog="dot")
    assert drawn.number_of_nodes() == g.number_of_nodes() and drawn.number_of_edges() == g.number_of_edges()
    assert drawn.draw(format="svg").startswith(b"<?xml")


# -- execution order and freeing -------------------------------------------------------------

@pytest.mark.parametrize("pattern", [Pattern("full"), Pattern("causal"), Pattern("sliding", window=20),
                                     Pattern("sink", window=20, sinks=17), Pattern("sampled")])
def test_execution_order_is_topological_and_frees_each_value_once(pattern):
    g = build_graph(spec(83, 16, pattern, layers=3, vocab=0 if pattern.kind == "sampled" else 64))
    order = execution_order(g)
    assert sorted(order) == sorted(g.nodes)
    position = {n: k for k, n in enumerate(order)}
    assert all(position[u] < position[v] for u, v in g.edges())
    freed = last_uses(g, order)
    times = Counter(v for vs in freed.values() for v in vs)
    assert set(times) == {n for n in g.nodes if g.out_degree(n)}  # heads are yielded, not freed
    assert set(times.values()) == {1}
    for n, vs in freed.items():
        for v in vs:
            assert position[n] == max(position[c] for c in g.successors(v))


def test_live_set_stays_small_in_a_sliding_layer():
    # with the order's tie-breaks a sliding layer keeps O(B) projections plus one block's partials
    N, M = 64 * 16, 16
    g = build_graph(spec(N, M, Pattern("sliding", window=20), layers=2))
    order = execution_order(g)
    freed = last_uses(g, order)
    live, peak_partials = set(), 0
    for n in order:
        live.add(n)
        for v in freed[n]:
            live.discard(v)
        peak_partials = max(peak_partials, sum(1 for v in live if g.nodes[v]["kind"] == "attend"))
    assert peak_partials <= ceil(20 / M) + 1


# -- bad parameters --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    dict(kind="sliding", window=0), dict(kind="sliding", window=-3), dict(kind="sliding"),
    dict(kind="sink", window=4, sinks=0), dict(kind="sink", window=4), dict(kind="sink", window=0, sinks=2),
    dict(kind="banded"), dict(kind=""), dict(kind="causal", window=4), dict(kind="full", sinks=2),
])
def test_bad_pattern_parameters_raise(kwargs):
    with pytest.raises(PatternError):
        Pattern(**kwargs)


@pytest.mark.parametrize("N,M", [(10, 0), (10, -1), (0, 4), (-5, 4)])
def test_bad_sizes_raise(N, M):
    with pytest.raises(PatternError):
        block_spans(N, M)
    with pytest.raises(PatternError):
        build_graph(spec(N, M, Pattern("causal")))


def test_sampled_pattern_refuses_a_causal_model():
    with pytest.raises(PatternError):
        build_graph(spec(64, 16, [Pattern("sampled"), Pattern("causal")]))
