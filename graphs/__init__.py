"""graphs: what to compute. Specs, attention patterns, typed nodes, the compact graph, analysis and export.

Pure Python on networkx and numpy; imports neither torch nor ray. The pictures live in
graphs.pictures, which imports matplotlib and pygraphviz only when a picture is drawn.
"""
from graphs.analysis import counts, depth, execution_order, last_uses, schedule, span_flops
from graphs.compact import CompactGraph, LayerTemplate, build_graph, compact_graph
from graphs.export import from_json, to_dot, to_json
from graphs.kinds import MaskKind, NodeKind, PatternKind
from graphs.nodes import Node, node_id
from graphs.patterns import (PATTERNS, KeyRange, Pattern, PatternError, block_spans, key_blocks, pair_mask, row_counts,
                             sample_permutation, sampled_keys)
from graphs.spec import ForwardSpec

__all__ = [
    "PATTERNS", "CompactGraph", "ForwardSpec", "KeyRange", "LayerTemplate", "MaskKind", "Node", "NodeKind", "Pattern",
    "PatternError", "PatternKind", "block_spans", "build_graph", "compact_graph", "counts", "depth", "execution_order",
    "from_json", "key_blocks", "last_uses", "node_id", "pair_mask", "row_counts", "sample_permutation",
    "sampled_keys", "schedule", "span_flops", "to_dot", "to_json",
]
