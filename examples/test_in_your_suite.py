"""Local mode in your own test suite: a small emulated forward equals the monolithic one.

    pytest examples/test_in_your_suite.py
"""
import torch

import emulate


def test_emulated_forward_equals_the_monolithic_forward():
    tokens = torch.randint(0, 1024, (1000,), generator=torch.Generator().manual_seed(0))
    model = emulate.load("tiny-llama")  # a preset, or your checkpoint directory
    problem = dict(attention="sliding", window=200, dtype="float64")
    run = emulate.run(model, tokens, block_size=128, **problem)  # in-process: the Local executor
    ref = emulate.monolithic(model, tokens, **problem)  # one full-length pass, no blocks
    torch.testing.assert_close(run.hidden, ref.hidden, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(run.logprobs, ref.logprobs, rtol=1e-10, atol=1e-10)
    assert run.stats["max_call_tokens"] <= 128  # no small call saw more than M tokens
