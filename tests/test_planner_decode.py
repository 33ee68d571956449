"""The planner's decode rows (emulate/planner/decode.py): bytes and calls worked out by hand from the
shapes, the causal O(N/M) against a window's O(1), the all-reduces and the hops across workers, the
refusal of a layout whose weights and cache do not fit, and `emulate plan --new-tokens` on a child."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from emulate.errors import EmulateError
from emulate.models.config import ModelConfig, check_positions
from emulate.planner.decode import (
    NCCL_RING_LL_BASE_S,
    NCCL_RING_LL_STEP_S,
    predict_decode,
)
from tests.test_hardening import emulate_child, one_error_line

H100 = {"device": "h100"}
TP8 = {"device": "h100", "gpus_per_worker": 8, "weight_dtype": "fp8-ffn", "attention": "causal"}


def test_weights_read_per_token_are_the_shapes_weights_once():
    # tiny-llama: width 256, 8 heads and 2 KV heads of 32, MLP 512, 4 layers, vocab 1024; float32 on the cpu,
    # here bf16 on an h100: q, k, v 256 x 12 x 32, out 256 x 256, gate/up/down 3 x 256 x 512, two norms
    layer = 256 * 12 * 32 + 256 * 256 + 3 * 256 * 512 + 2 * 256
    params = 4 * layer + 256 + 1024 * 256 + 256  # layers, final norm, head, one embedding row
    p = predict_decode("tiny-llama", 64, 2, block_size=16, **H100)
    assert p.weight_bytes_per_token == 2 * params
    # Llama-3 405B with fp8 feed-forward weights: the feed-forward at one byte, the rest bf16
    attn = 16384 * (128 + 16) * 128 + 128 * 128 * 16384 + 2 * 16384
    ffn = 3 * 16384 * 53248
    big = predict_decode("llama3-405b", 8192, 2, block_size=16384, **TP8)
    expected = 126 * (2 * attn + ffn) + 2 * 128256 * 16384 + 2 * 2 * 16384
    assert big.weight_bytes_per_token == expected
    # batch 1 is bound by the bytes: the weights' share is their bytes over the node's HBM bandwidth
    assert big.parts["weights"] == pytest.approx(expected / (8 * 3.35e12), rel=1e-9)


def test_causal_calls_grow_as_n_over_m_and_a_window_stays_flat():
    causal, window = [], []
    for n in (1024, 4096, 16384):
        causal.append(predict_decode("tiny-llama", n, 2, block_size=256, attention="causal", **H100))
        window.append(predict_decode("tiny-llama", n, 2, block_size=256, attention="sliding", window=512, **H100))
    # the one step is the token at position N: ceil((N + 1) / M) key blocks a layer, 4 layers
    assert [p.attention_calls_per_token for p in causal] == [4 * 5, 4 * 17, 4 * 65]
    assert [p.attention_calls_per_token for p in window] == [4 * 3] * 3
    # every call: embed, head, and per layer the projection, the pairs, their merge and the mix
    assert causal[1].calls_per_token == 2 + 4 * (2 + 17 + 1)
    # the keys read: N + 1 positions a layer for causal, the window's blocks (3 of 256) for sliding
    kv_token = 2 * 2 * 32 * 2
    assert causal[2].kv_bytes_per_token == 4 * (16384 + 1) * kv_token
    assert window[2].kv_bytes_per_token == 4 * (256 + 256 + 1) * kv_token
    assert causal[2].seconds_per_token > 2 * causal[0].seconds_per_token
    assert window[2].seconds_per_token == pytest.approx(window[0].seconds_per_token, rel=1e-3)


def test_the_plan_counts_the_calls_generation_makes():
    import emulate

    prompt = np.arange(70) % 1024
    g = emulate.generate("tiny-llama", prompt, max_new_tokens=6, block_size=16, threads=1, ignore_eos=True)
    p = predict_decode("tiny-llama", 70, 6, block_size=16, **H100)
    assert p.attention_calls_per_token == g.stats["decode_attention_calls_per_token"]
    assert p.calls_per_token == g.stats["decode_calls_per_token"]


def test_tensor_parallel_all_reduces_are_nccls_ring_latency_plus_the_bytes():
    p = predict_decode("llama3-405b", 8192, 2, block_size=16384, **TP8)
    one = NCCL_RING_LL_BASE_S + 14 * NCCL_RING_LL_STEP_S["nvlink"] + 2 * 7 / 8 * 16384 * 2 / 450e9
    assert p.parts["tp_allreduce"] == pytest.approx(2 * 126 * one)
    assert predict_decode("llama3-405b", 8192, 2, block_size=16384, **{**TP8, "gpus_per_worker": 16},
                          allow_overcommit=True).parts["tp_allreduce"] > p.parts["tp_allreduce"]


def test_partials_cross_workers_as_a_tree_a_hop_each_way_per_level():
    rows = {P: predict_decode("llama3-405b", 131072 - 2, 2, block_size=4096, workers=P, **TP8) for P in (1, 2, 8)}
    assert rows[1].hops_per_token == 0 and rows[1].parts["hops"] == 0
    assert rows[2].hops_per_token == 126 * 2 * 1
    assert rows[8].hops_per_token == 126 * 2 * 3  # ceil(log2 8) levels, out and back
    link = 8 * 400e9 / 8  # 400 Gb/s per GPU
    per_level = 2 * 10e-6 + (128 * 128 * 2 + 128 * 129 * 2) / link
    assert rows[8].parts["hops"] == pytest.approx(126 * 3 * per_level)
    # the cache is spread over the workers: each holds less, and reads less per step
    assert max(rows[8].kv_gb_per_worker) < max(rows[2].kv_gb_per_worker) < rows[1].kv_gb_per_worker[0]
    assert sum(rows[8].kv_gb_per_worker) == pytest.approx(rows[1].kv_gb_per_worker[0])
    assert rows[8].parts["kv"] < rows[1].parts["kv"]


def test_a_layout_that_does_not_fit_is_refused_naming_what_would():
    with pytest.raises(EmulateError, match="does not fit 1 x h100"):
        predict_decode("llama3-405b", 8192, 2, **H100)
    over = predict_decode("llama3-405b", 8192, 2, allow_overcommit=True, **H100)
    assert not over.fits and over.refusal and over.peak_worker_memory_gb > 80
    # llama3-8b's cache at 1M tokens: 32 layers x 8 KV heads x 128 x 2 (k, v) x 2 bytes a token = 137 GB
    with pytest.raises(EmulateError, match="does not fit"):
        predict_decode("llama3-8b", 2**20 - 2, 2, block_size=65536, attention="causal", **H100)
    spread = predict_decode("llama3-8b", 2**20 - 2, 2, block_size=65536, attention="causal", workers=8, **H100)
    assert spread.fits and sum(spread.kv_gb_per_worker) == pytest.approx(32 * 8 * 128 * 2 * 2 * 2**20 / 1e9)
    # the prefill balances FLOPs: a causal run's early blocks are light, so the first worker holds the most
    assert spread.kv_gb_per_worker[0] == max(spread.kv_gb_per_worker) > spread.kv_gb_per_worker[-1]


def test_rope_positions_are_refused_past_the_declared_context_unless_allowed():
    config = ModelConfig(name="r", family="llama", vocab=64, width=16, layers=1, heads=2, kv_heads=1, head_dim=8,
                         mlp_width=32, rope_positions=100)
    check_positions(config, 90, 10)
    with pytest.raises(EmulateError, match="exceed r's 100 positions .max_position_embeddings.; --allow-past-positions"):
        check_positions(config, 90, 11)
    check_positions(config, 90, 11, allow_past_positions=True)
    learned = ModelConfig(name="g", family="gpt2", vocab=64, width=16, layers=1, heads=2, kv_heads=2, head_dim=8,
                          mlp_width=32, positions="learned", max_positions=100)
    with pytest.raises(EmulateError, match="100 positions"):
        check_positions(learned, 90, 11, allow_past_positions=True)  # a learned table has no row past its end


def test_emulate_plan_new_tokens_prints_the_decode_row_and_refuses_bad_input():
    r = emulate_child("plan", "--shape", "llama3-405b", "--tokens", "131008", "-M", "4096", "--attention", "causal",
                      "--new-tokens", "64", "--workers", "2", "--gpus-per-worker", "8", "--weight-dtype", "fp8-ffn",
                      "--device", "h100", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["workers"] == 2 and d["new_tokens"] == 64 and d["fits"] and d["ms_per_token"] > 0
    assert d["hops_per_token"] == 126 * 2 and math.isclose(sum(d["parts"].values()) * 1000, d["ms_per_token"])
    bad = emulate_child("plan", "--tokens", "64", "--device", "h100", "--new-tokens", "4", "--placement", "layers")
    assert bad.returncode == 2 and "sequence placement" in one_error_line(bad.stderr)


def test_a_cpu_decode_reads_its_weights_at_the_measured_cold_read_rate_of_their_size(tmp_path, monkeypatch):
    """On a calibrated CPU a decode step's weights are read once, cold, never written: each layer's
    projections and its out-projection + MLP at the measured read rate of their mean matrix (three
    and four matrices for tiny-llama), the head as one matrix; not at a copy's bandwidth."""
    from test_planner import FAKE

    from emulate.planner import cpu_device

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fast_gemm = {**FAKE, "matmul_flops": [[1e3, 1e15], [1e9, 1e15]]}  # so that the bytes bound each GEMV
    monkeypatch.setattr("emulate.planner.calibrate.calibrate_cpu",
                        lambda **_: {k: v for k, v in fast_gemm.items() if k != "format"})
    p = predict_decode("tiny-llama", 64, 2, block_size=16, device="cpu")
    dev = cpu_device()
    # tiny-llama in float32: q, k, v 256 x 12 x 32 and the pre-norm; out 256 x 256, gate/up/down 3 x 256 x 512, a norm
    proj, mix = (256 * 12 * 32 + 256) * 4, (256 * 256 + 3 * 256 * 512 + 256) * 4
    head = 1024 * 256 * 4 + 2 * 256 * 4  # the head and one embedding row, the final norm
    expect = 4 * (proj / dev.reads_per_s(proj / 3) + mix / dev.reads_per_s(mix / 4)) + head / dev.reads_per_s(head)
    assert p.parts["weights"] == pytest.approx(expect, rel=1e-9)
    assert dev.reads_per_s(proj / 3) == 3e10 and dev.reads_per_s(head) < dev.reads_per_s(mix / 4) < 3e10
    assert p.parts["weights"] < p.weight_bytes_per_token / FAKE["bandwidth"]  # a copy would take longer


def test_bad_decode_input_is_one_line():
    for kwargs, message in (({"new_tokens": 1}, "--new-tokens must be an integer >= 2"),
                            ({"model": "tiny-bert"}, "cannot generate"),
                            ({"device": "cpu", "workers": 2}, "one worker")):
        with pytest.raises(EmulateError, match=message):
            predict_decode(**{"model": "tiny-llama", "tokens": 64, "new_tokens": 4, "device": "h100", **kwargs})
