"""The ring baseline (emulate/planner/ring.py) worked out by hand on the shapes, and the published GPU
rates it and the placements share: FlashAttention-3's curves by call length and mask, DeepGEMM's fp8
GEMM rate."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from emulate.errors import EmulateError
from emulate.models.shapes import SHAPES
from emulate.planner import DEVICES, Hardware, predict, predict_ring, task_seconds
from emulate.planner.costs import (
    FP8_GEMM_FLOPS,
    GPU_CALL_OVERHEAD_S,
    GPU_LINK_LATENCY_S,
    NVLINK_BYTES_PER_S,
)
from emulate.planner.deployment import deployment, layer_gemm_flops
from emulate.planner.prediction import _config

H100 = DEVICES["h100"]


def test_flash_attention_runs_at_fa3s_published_rate_for_the_calls_length_and_mask():
    assert H100.attention_at("none", 16384) == 648e12 and H100.attention_at("causal", 4096) == 579e12
    assert H100.attention_at("none", 1 << 20) == 648e12  # past 16k: the 16k rate
    assert H100.attention_at("none", 512) == 467e12 and H100.attention_at("explicit", 512) == 292e12
    between = H100.attention_at("none", 5793)  # about 2^12.5: halfway in log between 4k and 8k
    assert 638e12 < between < 646e12 and between == pytest.approx(642e12, rel=1e-3)


def attend_task(unmasked, causal_block, visible):
    """A task of pair calls only: `unmasked` kernel FLOPs without a mask, `causal_block` of causal
    diagonals (their visible FLOPs are in `visible`)."""
    return SimpleNamespace(flops=visible, attend_flops=visible, calls=2, pairs=2, bytes=0,
                           attend_blocks=[unmasked, causal_block, 0, 0])


def test_a_gpu_task_prices_unmasked_and_causal_calls_at_their_own_rates():
    t = attend_task(1e12, 2e12, 1e12 + 1e12)  # a causal diagonal: half its block visible
    hw = Hardware(H100, 1, 8, task_overhead_s=0.0, call_tokens=4096)
    expect = (1e12 / 638e12 + 1e12 / 579e12) / 8 + 2 * GPU_CALL_OVERHEAD_S
    assert task_seconds(t, hw) == pytest.approx(expect)
    longer = Hardware(H100, 1, 8, task_overhead_s=0.0, call_tokens=16384)
    assert task_seconds(t, longer) < task_seconds(t, hw)  # longer calls run nearer the peak


def test_fp8_feed_forward_runs_at_deepgemms_rate_over_the_bf16_mamf():
    config = _config("llama3-8b")
    fields = deployment(config, "h100", H100, 8, "fp8-ffn", "nvlink", 2)
    assert FP8_GEMM_FLOPS["h100"] == 1550e12
    assert fields["ffn_speedup"] == pytest.approx(1550 / 792.1)


def test_the_ring_is_its_gemms_all_reduces_and_load_balanced_steps_by_hand():
    s = SHAPES["llama3-8b"]
    N, C, G = 65536, 4, 8
    r = predict_ring("llama3-8b", N, nodes=C, gpus_per_node=G, device="h100")
    proj, ffn = layer_gemm_flops(_config("llama3-8b"))
    L, d, H, dh = s["layers"], s["width"], s["heads"], s["head_dim"]
    local, chunk = N / C, N / (2 * C)
    assert r.tokens_per_node == local
    assert r.gemm_s == pytest.approx(L * local * (proj + ffn) / G / 792.1e12, rel=1e-9)
    assert r.allreduce_s == pytest.approx(L * 2 * 2 * (G - 1) / G * local * d * 2 / NVLINK_BYTES_PER_S["h100"])
    per_score = 4 * dh * H / G
    first = 2 * chunk**2 * per_score / 602e12  # own chunks: causal rate at c = 8192
    step = 2 * chunk**2 * per_score / 646e12  # 2c queries on c keys, unmasked
    assert r.attention_compute_s == pytest.approx(L * (first + (C - 1) * step))
    # every node's steps add up to its share of the causal work: N^2 / 2 visible scores over C nodes
    assert 2 * chunk**2 * C == pytest.approx(N**2 / 2 / C)
    assert r.exposed_transfer_s == pytest.approx(0.0) and r.attention_s == pytest.approx(r.attention_compute_s)
    kv = local * 2 * 1 * dh * 2  # 8 KV heads over 8 GPUs: one each
    assert r.transfer_s == pytest.approx(L * (C - 1) * (GPU_LINK_LATENCY_S + kv / 50e9))


def test_a_ring_step_waits_for_its_keys_when_the_link_is_slower_than_the_attention():
    L, C = SHAPES["llama3-8b"]["layers"], 4
    fast = predict_ring("llama3-8b", 65536, nodes=C)
    slow = predict_ring("llama3-8b", 65536, nodes=C, link_gbps=1.0)
    transfer = slow.transfer_s / (L * (C - 1))  # one step's keys and values
    chunk = slow.tokens_per_node / 2
    s = SHAPES["llama3-8b"]
    first = 2 * chunk**2 * 4 * s["head_dim"] * s["heads"] / 8 / H100.attention_at("causal", int(chunk))
    step = (slow.attention_compute_s / L - first) / (C - 1)
    assert transfer > first > step  # every transfer outlasts every step's attention
    # steps 0 .. C - 2 each wait for the next keys (max(attention, transfer)); the last computes alone
    assert slow.attention_s == pytest.approx(L * ((C - 1) * transfer + step))
    assert slow.exposed_transfer_s > 0 and fast.exposed_transfer_s == 0 and slow.predicted_s > fast.predicted_s


def test_one_node_is_causal_attention_with_no_transfer():
    r = predict_ring("llama3-405b", 131072, nodes=1, weight_dtype="fp8-ffn")
    assert r.transfer_s == 0.0 and r.exposed_transfer_s == 0.0 and r.tokens_per_node == 131072
    assert r.predicted_s == pytest.approx(r.gemm_s + r.allreduce_s + r.attention_s + r.call_overhead_s)


@pytest.mark.parametrize("kw", [{"nodes": 0}, {"nodes": 2, "device": "cpu"}, {"nodes": 2, "weight_dtype": "fp4"},
                                {"nodes": 2, "gpus_per_node": 1.5}])
def test_bad_ring_input_is_refused(kw):
    with pytest.raises(EmulateError):
        predict_ring("llama3-8b", 65536, **kw)


def test_the_sequence_placement_prices_its_m_token_calls_at_their_rate():
    """M = 4096 calls run at FA3's 4k rates (638 and 579 TFLOP/s), below the 740 headline the
    planner used before: the same plan is slower than at the flat rate."""
    from dataclasses import replace

    from emulate.planner import hardware

    curve = predict("llama3-8b", 32768, block_size=4096, attention="causal", device="h100")
    flat_hw = replace(hardware("h100"), device=replace(H100, attention_by_length=None))
    flat = predict("llama3-8b", 32768, block_size=4096, attention="causal", device="h100", hw=flat_hw)
    assert curve.predicted_s > flat.predicted_s


def test_a_partial_prefill_adds_the_cached_keys_to_every_step_and_pass_kv_moves_them():
    """T new tokens after P cached (the paper's persistent-KV prefill): every step adds the node's T / C
    queries on its P / C cached keys, one unmasked call at FA3's rate for the rectangle's shorter side;
    pass-KV moves the (P + T) / C tokens' keys and values a step."""
    s = SHAPES["llama3-405b"]
    T, P, C, G = 12800, 115200, 4, 8
    full = predict_ring("llama3-405b", T, nodes=C, weight_dtype="fp8-ffn")
    part = predict_ring("llama3-405b", T, nodes=C, cached=P, weight_dtype="fp8-ffn")
    L, dh, H = s["layers"], s["head_dim"], s["heads"]
    local, held = T / C, P / C
    on_cached = local * held * 4 * dh * H / G / H100.attention_at("none", int(local))
    assert part.attention_compute_s - full.attention_compute_s == pytest.approx(L * C * on_cached)
    assert part.gemm_s == full.gemm_s and part.allreduce_s == full.allreduce_s  # the same T new tokens
    kv = (P + T) / C * 2 * 1 * dh * 2
    assert part.transfer_s == pytest.approx(L * (C - 1) * (GPU_LINK_LATENCY_S + kv / 50e9))
    assert part.cached == P and part.variant == "pass-kv" and part.all_to_all_s == 0.0


def test_pass_q_moves_the_queries_and_returns_the_outputs_in_an_all_to_all():
    s = SHAPES["llama3-405b"]
    T, P, C, G = 1280, 126720, 4, 8
    kv = predict_ring("llama3-405b", T, nodes=C, cached=P, weight_dtype="fp8-ffn")
    q = predict_ring("llama3-405b", T, nodes=C, cached=P, weight_dtype="fp8-ffn", variant="pass-q")
    L, dh, H = s["layers"], s["head_dim"], s["heads"]
    local = T / C
    assert q.attention_compute_s == pytest.approx(kv.attention_compute_s)  # the same scores either way
    assert q.transfer_s == pytest.approx(L * (C - 1) * (GPU_LINK_LATENCY_S + local * H / G * dh * 2 / 50e9))
    # 16 query heads a GPU on T / C rows against 1 KV head's keys and values on (P + T) / C: 8% of the bytes
    assert q.transfer_s < kv.transfer_s / 8
    outputs = (C - 1) * local * H / G * (dh * 2 + 4)
    assert q.all_to_all_s == pytest.approx(L * (GPU_LINK_LATENCY_S + outputs / 50e9))
    assert q.exposed_transfer_s == 0.0 and kv.exposed_transfer_s > 0  # 320 queries a step: pass-KV waits on its keys
    assert q.predicted_s < kv.predicted_s  # at a 1% miss rate pass-Q is the faster, as the paper finds
    assert predict_ring("llama3-405b", T, nodes=1, cached=P, variant="pass-q").all_to_all_s == 0.0


@pytest.mark.parametrize("kw", [{"cached": -1}, {"cached": 1.5}, {"variant": "pass-o"}, {"link_gbps": 0},
                                {"link_gbps": -1.0}, {"link_gbps": float("nan")}, {"tokens": 7}])
def test_bad_partial_prefill_input_is_refused(kw):
    kw = {"tokens": 4096, **kw}  # 7 tokens cannot fill the 2 x 4 chunks of 4 nodes
    with pytest.raises(EmulateError):
        predict_ring("llama3-8b", nodes=4, **kw)
