"""Decoding on the block KV cache: one new token through every layer as small calls of at most M keys.

    KVCache     each block's keys and values (after RoPE), kept where the prefill made them, full
                blocks side by side in one stacked store per layer; new tokens go to a tail block
                that joins the store once it holds M tokens; attend(layer, pairs, q) runs a step's
                pair calls on the blocks it holds (a run of whole blocks as one batched invocation)
    Decoder     step(token, position) -> logits: per layer, the new query attends each key block
                its pattern lets it see in one call (the query and at most M keys), the stacked
                partials merged in the prefill's tree (emulate/runtime/merge.py, merge_stacked)
    KVLost      a store lost blocks (a Ray worker died, cluster/decode.py): the generation rebuilds
                the cache and replays its steps (emulate/generation.py)

The Decoder reads its cache through four members, so the blocks may live elsewhere: `block_size`,
`filled` (per layer, tokens held by each block), `append` and `attend`. The local executor's store
is a KVCache in this process; the Ray executor's (cluster/decode.py, RemoteKV) keeps each block in
a KVCache on the worker that projected it and sends the step's query there.

Block j holds positions [j M, (j + 1) M), prompt and generated tokens alike, so the pairs of a
decode step are the prefill's pairs for a query block of one row (graphs/patterns.py, pair_mask):
a causal layer reads every block (O(N / M) calls per token), a sliding window or sinks only the
blocks the window and the sinks reach (O(1)). Every call is counted as it runs (contract.CallCounts).
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np
import torch

from emulate.models.block import Transformer
from emulate.runtime.contract import BoundOracle, CallCounts, PairCall, Partial
from emulate.runtime.merge import merge_stacked
from graphs import MaskKind, Pattern, pair_mask

if TYPE_CHECKING:
    import networkx as nx

TAIL_START = 16  # rows a new tail block is given; it doubles from there up to M


class KVLost(Exception):
    """Blocks a step needed are gone with the process that held them: the cache is to be rebuilt."""


class KVCache:
    """Keys and values [Hkv, m, dh] per layer and block; the last block of each layer is the tail.

    keep(layer, block, k, v) is the prefill's store (emulate/runtime/runner.py calls it for every
    projection); append(layer, position, k, v) adds one decoded token. A layer's full blocks (M
    tokens) live side by side in one stacked tensor [slots, Hkv, M, dh], so a step attends them in
    one batched call without stacking anything per step; the tail grows in place and joins the
    store once full. capacity: the tokens the cache will hold (the prompt and every new token but
    the last), when known: the store is made once, block j in slot j, for the full blocks those
    tokens make. Otherwise (a Ray worker's share, cluster/worker.py) the full blocks kept since the
    last step are stacked with the store's at the next attend: exactly the blocks held, one copy of
    the layer's blocks once per M tokens, never a slot for a block held elsewhere.
    """

    def __init__(self, layers: int, block_size: int, capacity: int | None = None):
        self.block_size = block_size
        self.capacity = capacity
        self.blocks: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(layers)]
        self.filled: list[dict[int, int]] = [{} for _ in range(layers)]  # tokens held by each block
        self._stacked: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * layers  # full blocks' k, v
        self._slot: list[dict[int, int]] = [{} for _ in range(layers)]  # block -> its slot in _stacked
        self._loose: list[set[int]] = [set() for _ in range(layers)]  # full blocks not yet in _stacked
        self._lock = threading.Lock()  # the local executor's call workers keep blocks side by side

    def keep(self, layer: int, block: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if k.shape[1] == self.block_size:
            with self._lock:
                k, v = self._full(layer, block, k, v)
        self.blocks[layer][block] = (k, v)
        self.filled[layer][block] = k.shape[1]

    def _full(self, layer: int, block: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A block that holds M tokens: copied into its slot when the store was made for it, else loose."""
        slots = self._slot[layer]
        if self.capacity is not None and block < self.capacity // self.block_size:
            held = self._stacked[layer]
            if held is None:
                room = self.capacity // self.block_size
                held = self._stacked[layer] = tuple(t.new_empty((room, *t.shape)) for t in (k, v))
            held[0][block], held[1][block] = k, v
            slots[block] = block
            return held[0][block], held[1][block]
        slots.pop(block, None)
        self._loose[layer].add(block)
        return k, v

    def _stack(self, layer: int) -> None:
        """The layer's full blocks, the store's and the loose ones, into one store of exactly those blocks."""
        full = sorted(set(self._slot[layer]) | self._loose[layer])
        k = torch.stack([self.blocks[layer][j][0] for j in full])
        v = torch.stack([self.blocks[layer][j][1] for j in full])
        self._stacked[layer] = (k, v)
        self._slot[layer] = {j: s for s, j in enumerate(full)}
        for s, j in enumerate(full):  # the blocks' views of the new store; the old one is freed
            self.blocks[layer][j] = (k[s], v[s])
        self._loose[layer].clear()

    def append(self, layer: int, position: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one token's k, v [Hkv, 1, dh] at `position` (the next one): into the tail block, or a new one."""
        M = self.block_size
        block, row = tail_slot(self.filled[layer], layer, position, M)
        if row == 0:
            kb, vb = k.new_empty((k.shape[0], 0, k.shape[2])), v.new_empty((v.shape[0], 0, v.shape[2]))
        else:
            kb, vb = self.blocks[layer][block]
        if kb.shape[1] <= row:
            # the tail's room doubles as it fills (at most M): the cache holds at most twice the
            # tail's tokens beyond the sequence, never a whole block of empty rows
            room = min(M, max(TAIL_START, 2 * row))
            grown_k = kb.new_empty((kb.shape[0], room, kb.shape[2]))
            grown_v = vb.new_empty((vb.shape[0], room, vb.shape[2]))
            grown_k[:, :row], grown_v[:, :row] = kb[:, :row], vb[:, :row]
            kb, vb = grown_k, grown_v
        kb[:, row:row + 1], vb[:, row:row + 1] = k, v
        if row + 1 == M:  # the tail is full: an ordinary block, for the stacked store
            kb, vb = self._full(layer, block, kb, vb)
        self.blocks[layer][block] = (kb, vb)
        self.filled[layer][block] = row + 1

    def keys(self, layer: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's keys and values, the tokens it holds so far."""
        if block not in self.blocks[layer]:
            raise KVLost(f"layer {layer} block {block} is not held here")
        k, v = self.blocks[layer][block]
        n = self.filled[layer][block]
        return k[:, :n], v[:, :n]

    def tokens(self, layer: int = 0) -> int:
        return sum(self.filled[layer].values())

    def attend(self, layer: int, pairs: list[tuple[int, PairCall]], q: torch.Tensor, scale: float,
               oracle: BoundOracle, counts: CallCounts) -> Partial:
        """The partials of query q [H, 1, dh] against each block of `pairs` ((block, pair call),
        ascending), stacked in that order (o [n, H, 1, dh], lse [n, H, 1]); one call each, counted in
        `counts`, each reading the keys of its pair's span. A run of whole blocks that see every key
        (mask none) next to each other in the stacked store goes to the oracle as one batched
        invocation when it offers one (`attend_blocks`, emulate/runtime/oracles.py), each block its
        own softmax of M keys; the rest one `attend` each."""
        batched = getattr(oracle, "attend_blocks", None)
        if batched is not None and self._loose[layer]:
            self._stack(layer)
        M, slots, held = self.block_size, self._slot[layer], self._stacked[layer]
        os, lses, run = [], [], []

        def flush():
            if run:
                a = slots[run[0][0]]
                k, v = held[0][a:a + len(run)], held[1][a:a + len(run)]
                o, lse = batched([at_layer(pair, layer) for _, pair in run], q, k, v, scale)
                os.append(o)
                lses.append(lse)
                run.clear()

        for j, pair in pairs:
            width = pair.key_span[1] - pair.key_span[0]
            have = self.filled[layer].get(j)
            if have is None:
                raise KVLost(f"layer {layer} block {j} is not held here")
            if have < width:
                raise KVLost(f"layer {layer} block {j} holds {have} tokens where the step reads {width}")
            counts.call(max(1, width), layer, attention=True)
            slot = slots.get(j)
            if batched is not None and width == M and pair.mask == MaskKind.NONE and slot is not None:
                if run and slots[run[-1][0]] + 1 != slot:
                    flush()
                run.append((j, pair))
                continue
            flush()
            kb, vb = self.keys(layer, j)
            o, lse = oracle.attend(at_layer(pair, layer), q, kb[:, :width], vb[:, :width], scale)
            os.append(o[None])
            lses.append(lse[None])
        flush()
        if not os:  # nothing asked of this store (a Ray worker sent only the new token's keys)
            acc = torch.promote_types(q.dtype, torch.float32)
            return q.new_zeros((0, *q.shape), dtype=acc), q.new_zeros((0, *q.shape[:2]), dtype=acc)
        if len(os) == 1:
            return os[0], lses[0]
        return torch.cat(os), torch.cat(lses)

    def inventory(self) -> dict[tuple[int, int], int]:
        """(layer, block) -> tokens held, for every block here."""
        return {(layer, j): n for layer, held in enumerate(self.filled) for j, n in held.items()}

    def clear(self) -> None:
        for layer in range(len(self.blocks)):
            self.blocks[layer].clear()
            self.filled[layer].clear()
            self._slot[layer].clear()
            self._loose[layer].clear()
            self._stacked[layer] = None

    def nbytes(self) -> int:
        """Bytes the cache holds: the stacked stores (free slots included) and the tails' room."""
        stores = sum(t.numel() * t.element_size() for held in self._stacked if held is not None for t in held)
        tails = sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                    for layer, slots in zip(self.blocks, self._slot)
                    for j, (k, v) in layer.items() if j not in slots)
        return stores + tails


def tail_slot(filled: dict[int, int], layer: int, position: int, block_size: int) -> tuple[int, int]:
    """(block, row) where the token at `position` goes, given each block's filled count of the layer:
    the next row of the tail block (row 0: a new block), or ValueError where it is not the next."""
    block, row = divmod(position, block_size)
    have = filled.get(block, 0)
    if have != row:
        raise ValueError(f"layer {layer}: position {position} appended where block {block} holds {have} tokens")
    return block, row


def at_layer(pair: PairCall, layer: int) -> PairCall:
    """The step's pair call for `layer` (the layers of one pattern share a step's pairs); built
    directly, as dataclasses.replace costs several times more on a step's hundreds of calls."""
    return pair if pair.layer == layer else PairCall(layer, pair.span, pair.key_span, pair.mask, pair.pattern)


def visible_blocks(pattern: Pattern, position: int, block_size: int) -> list[int]:
    """The key blocks a query at `position` sees under `pattern`, ascending (the window's and the sinks')."""
    r = pattern.key_range(np.array([position]))
    lo, hi, sink_hi = int(r.lo[0]), int(r.hi[0]), int(r.sink_hi[0])
    wanted = set(range(lo // block_size, (hi - 1) // block_size + 1)) if hi > lo else set()
    if sink_hi > 0:
        wanted |= set(range((sink_hi - 1) // block_size + 1))
    return sorted(wanted)


class Decoder:
    """One token at a time through the model, reading and extending `cache`; every call counted in `counts`."""

    def __init__(self, model: Transformer, patterns: list[Pattern], cache, oracle: BoundOracle):
        self.model, self.patterns, self.cache, self.oracle = model, patterns, cache, oracle
        self.block_size = cache.block_size
        self.counts = CallCounts()

    def step(self, token: int, position: int) -> torch.Tensor:
        """The logits [vocab] after `token` at `position` (every earlier position already in the cache)."""
        m = self.model
        pos = torch.tensor([position], device=m.device)
        self.counts.call(1)
        x = m.embed(torch.tensor([token], device=m.device), pos)
        rope = m.rope(pos) if m.config.positions == "rope" else None  # the same for every layer
        plans: dict[Pattern, list[tuple[int, PairCall]]] = {}  # layers of one pattern share the step's pairs
        for layer, pattern in enumerate(self.patterns):
            self.counts.call(1)
            q, k, v = m.project(layer, x, pos, rope)
            self.cache.append(layer, position, k, v)
            if pattern not in plans:
                plans[pattern] = self.pairs(pattern, position, layer)
            o, lse = self.cache.attend(layer, plans[pattern], q, m.scale, self.oracle, self.counts)
            if o.shape[0] > 1:
                self.counts.call(1)
            o, _ = merge_stacked(o, lse)
            self.counts.call(1)
            x = m.mix(layer, x, o)
        self.counts.call(1)
        return logits(m, m.final(x))[0]

    def pairs(self, pattern: Pattern, position: int, layer: int) -> list[tuple[int, PairCall]]:
        """(key block, pair call) of the query at `position` against each block it sees (the cache as
        filled for `layer`, the same for every layer once the step's key is appended)."""
        M, out = self.block_size, []
        for j in visible_blocks(pattern, position, M):
            span = (j * M, j * M + self.cache.filled[layer][j])
            pm = pair_mask(pattern, (position, position + 1), span)
            if pm.visible:
                out.append((j, PairCall(layer, (position, position + 1), span, pm.kind, pattern)))
        return out


def logits(model: Transformer, hidden: torch.Tensor) -> torch.Tensor:
    """The head's scores [rows, vocab] for final-norm hidden states [rows, width]."""
    return hidden @ model.w["lm_head.weight"].T


def decode_graph(config, patterns: list[Pattern], position: int, block_size: int, dtype) -> nx.DiGraph:
    """The calls of one decode step, for the token at `position`, as a logical graph (graphs/nodes.py).

    Query block position // M in every layer: embed, then per layer its projection, one attend node
    per key block the pattern lets `position` see (the keys come from the cache, so an attend node
    reads only the step's projection), the merge of their partials, the mix; the head last. The
    graph's attributes are a forward's over position + 1 tokens, so emulate.draw draws it.
    """
    import networkx as nx

    from emulate.problem import forward_spec
    from graphs import MaskKind, NodeKind, block_spans
    from graphs.costs import (
        attend_cost,
        embed_cost,
        head_cost,
        merge_cost,
        mix_cost,
        project_cost,
    )
    from graphs.nodes import Node, node_id

    spec = forward_spec(config, position + 1, block_size, list(patterns), dtype)
    M, i, span = block_size, position // block_size, (position, position + 1)
    g = nx.DiGraph(spec=spec.to_dict(), blocks=i + 1, block_spans=block_spans(position + 1, M),
                   decode={"position": position})

    def add(nid: str, node: Node) -> str:
        g.add_node(nid, **node.attrs())
        for src in dict.fromkeys(node.inputs):
            g.add_edge(src, nid)
        return nid

    x = add(node_id(NodeKind.EMBED, None, i), Node(NodeKind.EMBED, -1, i, (), span, 1, *embed_cost(spec, 1)))
    for layer, pattern in enumerate(patterns):
        p = add(node_id(NodeKind.PROJECT, layer, i),
                Node(NodeKind.PROJECT, layer, i, (x,), span, 1, *project_cost(spec, 1)))
        partials = []
        for j in visible_blocks(pattern, position, M):
            key_span = (j * M, min((j + 1) * M, position + 1))
            pm = pair_mask(pattern, span, key_span)
            if pm.visible:
                keys = key_span[1] - key_span[0]
                partials.append(add(node_id(NodeKind.ATTEND, layer, i, j), Node(
                    NodeKind.ATTEND, layer, i, (p,), span, keys, *attend_cost(spec, 1, keys, pm.visible), key_block=j,
                    key_span=key_span, mask=MaskKind(pm.kind))))
        o = partials[0]
        if len(partials) > 1:
            o = add(node_id(NodeKind.MERGE, layer, i), Node(NodeKind.MERGE, layer, i, tuple(partials), span, 1,
                                                           *merge_cost(spec, 1, len(partials))))
        x = add(node_id(NodeKind.MIX, layer, i), Node(NodeKind.MIX, layer, i, (x, o), span, 1, *mix_cost(spec, 1)))
    add(node_id(NodeKind.HEAD, None, i), Node(NodeKind.HEAD, len(patterns), i, (x,), span, 1, *head_cost(spec, 1)))
    return g
