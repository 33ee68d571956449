"""Run one logical node: the small computation behind each node kind, shared by every executor."""
from __future__ import annotations

import torch

from emulate.merge import merge
from emulate.model import Transformer
from emulate.oracles import AttentionOracle, PairCall
from graphs import MaskKind, NodeKind, Pattern, sample_permutation, sampled_keys


class NodeRunner:
    """Binds a model, the run's token ids and an oracle; `run(attrs, inputs)` computes one node's value.

    Values by kind: embed and mix give x [m, width]; project gives (q, k, v); attend and merge give
    (o, lse); head gives {'hidden': [m, width], 'logprob_next': [m'] } where logprob_next[t] is
    log p(token[s + t + 1] | tokens <= s + t).
    """

    def __init__(self, model: Transformer, tokens: torch.Tensor, graph_meta: dict, oracle: AttentionOracle):
        self.model = model
        self.oracle = oracle
        self.tokens = tokens.to(model.device)
        spec = graph_meta["spec"]
        self.patterns = [Pattern(**p) for p in spec["patterns"]]
        self.block_size = spec["block_size"]
        self.tau = sample_permutation(spec["tokens"], spec["seed"]) if "sample_seed" in graph_meta else None

    def positions(self, span):
        return torch.arange(span[0], span[1], device=self.model.device)

    def run(self, a: dict, inputs: list):
        kind = a["kind"]
        m = self.model
        if kind == NodeKind.EMBED:
            span = a["span"]
            return m.embed(self.tokens[span[0]:span[1]], self.positions(span))
        if kind == NodeKind.PROJECT:
            return m.project(a["layer"], inputs[0], self.positions(a["span"]))
        if kind == NodeKind.ATTEND:
            return self.attend(a, inputs)
        if kind == NodeKind.MERGE:
            return merge(inputs)
        if kind == NodeKind.MIX:
            return m.mix(a["layer"], inputs[0], inputs[1][0])
        if kind == NodeKind.HEAD:
            return self.head(a, inputs[0])
        raise ValueError(f"unknown node kind {kind!r}")

    def attend(self, a: dict, inputs: list):
        q = inputs[0][0]
        pair = PairCall.of(a, self.patterns[a["layer"]])
        k, v = self.gather_sample(a, inputs[1:]) if pair.mask == MaskKind.SAMPLE else inputs[1][1:]
        return self.oracle.attend(pair, q, k, v, self.model.scale)

    def gather_sample(self, a: dict, sources: list):
        """Rows tau(S_t) of the projected keys and values, taken from the blocks that hold them."""
        keys = sampled_keys(self.tau, a["span"])
        owner = keys // self.block_size
        ks, vs = [], []
        for j, (_, k, v) in zip(a["key_blocks"], sources):
            rows = torch.from_numpy(keys[owner == j] - j * self.block_size).to(k.device)
            ks.append(k[:, rows])
            vs.append(v[:, rows])
        return torch.cat(ks, dim=1), torch.cat(vs, dim=1)

    def head(self, a: dict, x: torch.Tensor) -> dict:
        hidden = self.model.final(x)
        out = {"hidden": hidden}
        if self.model.config.lm_head:
            s, e = a["span"]
            nxt = self.tokens[s + 1 : e + 1]
            out["logprob_next"] = self.model.logprobs(hidden, nxt)
        return out
