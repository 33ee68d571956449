"""Shared fixtures: seeded presets, and helpers that run a forward both ways."""
from __future__ import annotations

import pytest
import torch

from emulate.executor import run_local
from emulate.forward import Collected, compile_forward, new_model, row_errors
from emulate.ops import NodeRunner
from emulate.presets import preset
from emulate.reference import reference_forward

torch.set_num_threads(2)


def emulate_and_reference(config, weights, tokens, block_size, patterns, dtype, seed=0):
    """(emulated outputs, reference outputs, graph) for one forward on the local executor."""
    model = new_model(config, weights, dtype, "cpu")
    g = compile_forward(config, tokens.shape[0], block_size, patterns, dtype, seed)
    got = Collected()
    for _, value in run_local(g, NodeRunner(model, tokens, g.graph)):
        got.add(value)
    with torch.no_grad():
        ref = reference_forward(model, tokens, patterns)
    return got.result(), ref, g


@pytest.fixture(scope="session")
def presets():
    return {name: preset(name) for name in ("tiny-llama", "tiny-mistral", "tiny-bert")}


__all__ = ["emulate_and_reference", "row_errors"]
