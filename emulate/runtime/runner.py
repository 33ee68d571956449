"""Run one logical node: the small computation behind each node kind, shared by every executor.

The runner is also where calls are counted (contract.CallCounts): every node call, every pair call
by layer and the widest input, as they execute, so the summary reports what ran.
"""
from __future__ import annotations

import torch

from emulate.models.block import Transformer
from emulate.runtime.contract import BoundOracle, CallCounts, PairCall
from emulate.runtime.merge import merge
from graphs import MaskKind, Node, NodeKind, Pattern, sample_permutation, sampled_keys


class NodeRunner:
    """Binds a model, the run's token ids and a bound oracle; `run(node, inputs)` computes one node's value.

    Values by kind: embed and mix give x [m, width]; project gives (q, k, v); attend and merge give
    (o, lse); head gives {'hidden': [m, width], 'logprob_next': [m'] } where logprob_next[t] is
    log p(token[s + t + 1] | tokens <= s + t). `counts` holds the calls run so far. kv: a store
    whose keep(layer, block, k, v) is given every projection's keys and values (after RoPE).
    """

    def __init__(self, model: Transformer, tokens: torch.Tensor, graph_meta: dict, oracle: BoundOracle, kv=None):
        self.model = model
        self.kv = kv  # where each block's projected keys and values are kept for decoding (decode.py, KVCache)
        self.oracle = oracle
        self.tokens = tokens.to(model.device)
        spec = graph_meta["spec"]
        self.patterns = [Pattern(**p) for p in spec["patterns"]]
        self.block_size = spec["block_size"]
        self.tau = sample_permutation(spec["tokens"], spec["seed"]) if "sample_seed" in graph_meta else None
        self.counts = CallCounts()

    def positions(self, span):
        return torch.arange(span[0], span[1], device=self.model.device)

    def run(self, node: Node, inputs: list):
        kind = node.kind
        m = self.model
        if kind == NodeKind.ATTEND:
            return self.attend(node, inputs)
        if kind == NodeKind.MERGE:
            return self.merge(inputs)
        if kind == NodeKind.EMBED:
            span = node.span
            ids = self.tokens[span[0]:span[1]]
            self.counts.call(ids.shape[0])
            return m.embed(ids, self.positions(span))
        x = inputs[0]
        self.counts.call(x.shape[0])
        if kind == NodeKind.PROJECT:
            q, k, v = m.project(node.layer, x, self.positions(node.span))
            if self.kv is not None:
                self.kv.keep(node.layer, node.block, k, v)
            return q, k, v
        if kind == NodeKind.MIX:
            return m.mix(node.layer, x, inputs[1][0])
        if kind == NodeKind.HEAD:
            return self.head(node, x)
        raise ValueError(f"unknown node kind {kind!r}")

    def attend(self, node: Node, inputs: list):
        q = inputs[0][0]
        pair = PairCall.of(node, self.patterns[node.layer])
        k, v = self.gather_sample(node, inputs[1:]) if pair.mask == MaskKind.SAMPLE else inputs[1][1:]
        self.counts.call(max(q.shape[-2], k.shape[-2]), node.layer, attention=True)
        return self.oracle.attend(pair, q, k, v, self.model.scale)

    def merge(self, partials: list):
        """A merge node, or the top of a merge tree whose partials were made elsewhere (cluster/worker.py)."""
        self.counts.call(partials[0][0].shape[-2])
        return merge(partials)

    def gather_sample(self, node: Node, sources: list):
        """Rows tau(S_t) of the projected keys and values, taken from the blocks that hold them."""
        keys = sampled_keys(self.tau, node.span)
        owner = keys // self.block_size
        ks, vs = [], []
        for j, (_, k, v) in zip(node.key_blocks, sources):
            rows = torch.from_numpy(keys[owner == j] - j * self.block_size).to(k.device)
            ks.append(k[:, rows])
            vs.append(v[:, rows])
        return torch.cat(ks, dim=1), torch.cat(vs, dim=1)

    def head(self, node: Node, x: torch.Tensor) -> dict:
        hidden = self.model.final(x)
        out = {"hidden": hidden}
        if self.model.config.lm_head:
            s, e = node.span
            nxt = self.tokens[s + 1 : e + 1]
            out["logprob_next"] = self.model.logprobs(hidden, nxt)
        return out
