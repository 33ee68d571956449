"""The deployment model: the sourced GPU rates, tensor parallelism's ring all-reduce, fp8
feed-forward weights, and the refusal of a layout that does not fit a worker's memory."""
from __future__ import annotations

import subprocess
from types import SimpleNamespace

import pytest

from emulate.errors import EmulateError
from emulate.planner import DEVICES, Hardware, predict, ring_allreduce_s, task_seconds
from emulate.planner.costs import NVLINK_BYTES_PER_S, PCIE_BYTES_PER_S
from tests.test_hardening import CHILD_ENV, EMULATE, one_error_line


def test_gemm_and_attention_rates_are_the_published_ones():
    h100 = DEVICES["h100"]
    assert h100.rate("bf16", "matmul") == pytest.approx(792.1e12)  # MAMF, ml-engineering's table
    assert h100.rate("bf16", "attention") == 740e12  # FlashAttention-3's abstract
    assert DEVICES["a100"].rate("bf16", "matmul") == pytest.approx(267.9e12)
    assert DEVICES["a100"].rate("bf16", "attention") == pytest.approx(0.73 * 312e12)
    assert NVLINK_BYTES_PER_S["h100"] == 450e9 and PCIE_BYTES_PER_S["h100"] == 64e9


def test_ring_allreduce_is_two_p_minus_one_over_p_of_the_bytes():
    assert ring_allreduce_s(1e9, 1, 450e9) == 0.0
    assert ring_allreduce_s(1e9, 2, 100e9) == pytest.approx(1e9 / 100e9)
    assert ring_allreduce_s(1e9, 8, 450e9) == pytest.approx(2 * 7 / 8 * 1e9 / 450e9)


def task(flops, attend=0.0):
    return SimpleNamespace(flops=flops, attend_flops=attend, calls=1, pairs=0, attend_blocks=[0, 0, 0, 0], bytes=0)


def test_a_tensor_parallel_task_pays_its_all_reduce_and_fp8_speeds_the_feed_forward():
    dev = DEVICES["h100"]
    gemm = 792.1e12
    t = task(8 * 1e12)  # 1 TFLOP of GEMMs per GPU of 8
    plain = Hardware(dev, 1, 8, task_overhead_s=0.0)
    base = 8e12 / (8 * gemm) + dev.call_overhead_s
    assert task_seconds(t, plain) == pytest.approx(base)
    tp = Hardware(dev, 1, 8, task_overhead_s=0.0, tp_bytes_per_s=450e9, allreduce_bytes_per_flop=1e-3)
    assert task_seconds(t, tp) == pytest.approx(base + 2 * 7 / 8 * 8e9 / 450e9)
    fp8 = Hardware(dev, 1, 8, task_overhead_s=0.0, ffn_share=0.5, ffn_speedup=2.0)
    assert task_seconds(t, fp8) == pytest.approx(0.75 * 8e12 / (8 * gemm) + dev.call_overhead_s)


def test_tensor_parallel_over_pcie_is_slower_than_over_nvlink():
    common = dict(block_size=4096, attention="causal", workers=2, gpus_per_worker=8, device="h100")
    nv = predict("llama3-8b", 32768, **common)
    pcie = predict("llama3-8b", 32768, tp_link="pcie", **common)
    one = predict("llama3-8b", 32768, **{**common, "gpus_per_worker": 1})
    assert nv.predicted_s < pcie.predicted_s and nv.predicted_s < one.predicted_s
    assert nv.inputs["tp_link"] == "nvlink" and one.inputs["tp_link"] is None


def test_fp8_feed_forward_weights_are_smaller_and_faster():
    bf16 = predict("llama3-8b", 16384, block_size=4096, attention="causal", device="h100")
    fp8 = predict("llama3-8b", 16384, block_size=4096, attention="causal", device="h100", weight_dtype="fp8-ffn")
    assert fp8.predicted_s < bf16.predicted_s and fp8.weights_gb_per_worker < bf16.weights_gb_per_worker
    with pytest.raises(EmulateError, match="fp8 tensor cores"):
        predict("llama3-8b", 16384, block_size=4096, device="a100", weight_dtype="fp8-ffn")


def test_a_layout_that_does_not_fit_is_refused_naming_what_would():
    with pytest.raises(EmulateError, match=r"does not fit 1 x h100 \(80 GB\): --gpus-per-worker 2 would"):
        predict("llama3-70b", 8192, block_size=4096, attention="causal", device="h100")
    over = predict("llama3-70b", 8192, block_size=4096, attention="causal", device="h100", allow_overcommit=True)
    assert not over.fits and over.predicted_s > 0
    assert predict("llama3-70b", 8192, block_size=4096, attention="causal", device="h100", gpus_per_worker=2).fits


def test_the_anchor_on_one_gpu_per_worker_is_refused_in_one_line():
    """A real child: Llama-3 405B on 16 workers of one H100 each; the refusal names fp8 feed-forward
    weights on 7 GPUs, and the same layout in bf16 on 8 GPUs names fp8 alone."""
    args = ["plan", "--shape", "llama3-405b", "--tokens", "1048576", "-M", "4096", "--attention", "causal",
            "--workers", "16", "--device", "h100"]
    done = subprocess.run([str(EMULATE), *args], capture_output=True, text=True, timeout=120, env=CHILD_ENV,
                          check=False)
    assert done.returncode == 2 and done.stdout == ""
    line = one_error_line(done.stderr)
    assert "812 GB per worker" in line and "does not fit 1 x h100" in line
    assert "--weight-dtype fp8-ffn --gpus-per-worker 7" in line and "--allow-overcommit" in line
