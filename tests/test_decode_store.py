"""The decode step's store and calls (emulate/runtime/decode.py, KVCache): full blocks in one stacked
store, attended in one batched invocation per run of whole blocks, merged in the prefill's tree.

Each block is still its own call of at most M keys: the batched invocation's partials are those of
one `attend` per block, every block is counted, and the stacked merge is merge.py's balanced tree.
"""
from __future__ import annotations

import pytest
import torch

from emulate.runtime.contract import CallCounts
from emulate.runtime.decode import Decoder, KVCache
from emulate.runtime.kernels import attend, attend_blocks
from emulate.runtime.merge import merge, merge_stacked
from emulate.runtime.oracles import KernelOracle
from graphs import Pattern

H, HKV, DH, M = 6, 2, 8, 4


class OneCallEach:
    """The kernel oracle without its batched form: the store then makes one `attend` per block."""

    name = "one-call-each"

    def attend(self, pair, q, k, v, scale):
        return KernelOracle().attend(pair, q, k, v, scale)

    def summary(self):
        return {}


class Batched(OneCallEach):
    """The kernel oracle with its batched form, noting how many invocations of each kind ran."""

    def __init__(self):
        self.invocations = {"attend": 0, "attend_blocks": 0}

    def attend(self, pair, q, k, v, scale):
        self.invocations["attend"] += 1
        return super().attend(pair, q, k, v, scale)

    def attend_blocks(self, pairs, q, k, v, scale):
        self.invocations["attend_blocks"] += 1
        assert k.shape[0] == len(pairs) and k.shape[2] == M
        return KernelOracle().attend_blocks(pairs, q, k, v, scale)


@pytest.mark.parametrize("n", range(1, 10))
def test_stacked_merge_is_the_tree_merge(n):
    g = torch.Generator().manual_seed(n)
    o = torch.randn(n, H, 1, DH, generator=g, dtype=torch.float64)
    lse = 30 * torch.randn(n, H, 1, generator=g, dtype=torch.float64)
    lse[n // 2, :2] = float("-inf")  # an empty partial carries no weight, in both
    o[n // 2, :2] = 0.0
    want_o, want_lse = merge([(o[i], lse[i]) for i in range(n)])
    got_o, got_lse = merge_stacked(o, lse)
    assert torch.allclose(got_o, want_o, rtol=1e-14, atol=1e-14) and torch.allclose(got_lse, want_lse, rtol=1e-14)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_batched_blocks_are_one_call_per_block(dtype, tol):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(H, 1, DH, generator=g).to(dtype)
    k, v = torch.randn(5, HKV, M, DH, generator=g).to(dtype), torch.randn(5, HKV, M, DH, generator=g).to(dtype)
    o, lse = attend_blocks(q, k, v, 0.3)
    assert o.shape == (5, H, 1, DH) and lse.shape == (5, H, 1)
    for b in range(5):
        ob, lb = attend(q, k[b], v[b], 0.3)
        assert (o[b] - ob).abs().max() <= tol and (lse[b] - lb).abs().max() <= tol


def fill(cache: KVCache, blocks: list[int], tokens: int, g) -> None:
    """The prefill's keep of `tokens` prompt tokens in blocks of M, in the order `blocks`."""
    for j in blocks:
        n = min(M, tokens - j * M)
        cache.keep(0, j, torch.randn(HKV, n, DH, generator=g, dtype=torch.float64),
                   torch.randn(HKV, n, DH, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("capacity,order", [(22, [0, 1, 2, 3]), (None, [2, 0, 3, 1])])
def test_the_store_keeps_full_blocks_stacked_and_attends_them_as_one_call_each(capacity, order):
    """A 14-token prompt at M = 4, then 8 decoded tokens (the tail fills, moves into the store, a new
    one starts): the batched store gives the partials, counts and merge of one call per block. With
    the capacity known the store is made once; without, it holds exactly the full blocks held."""
    g = torch.Generator().manual_seed(1)
    batched, single = KVCache(1, M, capacity), KVCache(1, M, capacity)
    fill(batched, order, 14, torch.Generator().manual_seed(2))
    fill(single, order, 14, torch.Generator().manual_seed(2))
    store = batched._stacked[0]
    causal = Pattern("causal")
    for position in range(14, 22):
        k, v = torch.randn(HKV, 1, DH, generator=g, dtype=torch.float64), torch.randn(HKV, 1, DH, generator=g,
                                                                                      dtype=torch.float64)
        q = torch.randn(H, 1, DH, generator=g, dtype=torch.float64)
        results = []
        fast = Batched()
        for cache, oracle in ((batched, fast), (single, OneCallEach())):
            cache.append(0, position, k, v)
            pairs = Decoder(None, [causal], cache, oracle).pairs(causal, position, 0)
            counts = CallCounts()
            o, lse = cache.attend(0, pairs, q, 0.3, oracle, counts)
            assert o.shape[0] == len(pairs) == position // M + 1
            assert counts.attention_calls == len(pairs) and counts.max_call_tokens <= M
            results.append(merge_stacked(o, lse))
        assert torch.allclose(results[0][0], results[1][0], rtol=0, atol=1e-12)
        # the full blocks in one invocation, the tail (when it holds tokens short of M) in its own
        assert fast.invocations == {"attend_blocks": 1, "attend": int((position + 1) % M != 0)}
    if capacity is not None:  # made once for the sequence's full blocks: nothing re-stacked as it grew
        assert batched._stacked[0] is store and store[0].shape[0] == capacity // M
    else:
        assert store is None and batched._stacked[0][0].shape[0] == 22 // M
    for j in range(22 // M):  # every full block a view of the stacked store
        assert batched.blocks[0][j][0].untyped_storage().data_ptr() == batched._stacked[0][0].untyped_storage().data_ptr()
    # the tail's room and the full blocks: at most the sequence's keys plus the tail's doubling
    per_token = 2 * HKV * DH * 8
    assert batched.nbytes() <= 22 * per_token + M * per_token
    assert torch.equal(batched.keys(0, 5)[0], single.keys(0, 5)[0])
