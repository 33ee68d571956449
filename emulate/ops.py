"""Run one logical node: the small computation behind each node kind, shared by every executor."""
from __future__ import annotations

import numpy as np
import torch

from emulate.kernels import attend
from emulate.merge import merge
from emulate.model import Transformer
from graphs import Pattern, sample_permutation, sampled_keys


class NodeRunner:
    """Binds a model and the run's token ids; `run(attrs, inputs)` computes one node's value.

    Values by kind: embed and mix give x [m, width]; project gives (q, k, v); attend and merge give
    (o, lse); head gives {'hidden': [m, width], 'logprob_next': [m'] } where logprob_next[t] is
    log p(token[s + t + 1] | tokens <= s + t).
    """

    def __init__(self, model: Transformer, tokens: torch.Tensor, graph_meta: dict, oracle=None):
        self.model = model
        # the small call behind each attend node: None is the kernel oracle (emulate.kernels.attend);
        # another oracle (emulate.paper.PaperOracle) gets the node and returns the same (o, lse)
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
        if kind == "embed":
            span = a["span"]
            return m.embed(self.tokens[span[0]:span[1]], self.positions(span))
        if kind == "project":
            return m.project(a["layer"], inputs[0], self.positions(a["span"]))
        if kind == "attend":
            return self.attend(a, inputs)
        if kind == "merge":
            return merge(inputs)
        if kind == "mix":
            return m.mix(a["layer"], inputs[0], inputs[1][0])
        if kind == "head":
            return self.head(a, inputs[0])
        raise ValueError(f"unknown node kind {kind!r}")

    def attend(self, a: dict, inputs: list):
        q = inputs[0][0]
        if self.oracle is not None:
            k, v = self.gather_sample(a, inputs[1:]) if a["mask"] == "sample" else inputs[1][1:]
            return self.oracle.pair(q, k, v, self.model.scale, a, self.patterns[a["layer"]])
        if a["mask"] == "sample":
            return attend(q, *self.gather_sample(a, inputs[1:]), self.model.scale)
        _, k, v = inputs[1]
        visible = None
        if a["mask"] == "explicit":
            pattern = self.patterns[a["layer"]]
            qs, ks = a["span"], a["key_span"]
            visible = torch.from_numpy(pattern.visible(np.arange(*qs), np.arange(*ks))).to(q.device)
        return attend(q, k, v, self.model.scale, a["mask"], visible)

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
