"""bfloat16 and float16 runs: docs/numerics.md's relative contract.

A 16-bit run has no absolute tolerance: its norm-wise error against the float64 forward must be at
most 1.25x the monolithic forward's own error in the same dtype, and its perplexity within 0.5% of the
monolithic forward's. Both sides are measured here, on a seeded preset over several seeds and on
SmolLM2; partials rounded to 16 bits before they merge fail the ratio, so the check can fail.
"""
from __future__ import annotations

import json

import pytest
import torch
from test_hardening import emulate_child, one_error_line

import emulate
from emulate.errors import EmulateError
from emulate.runtime import runner
from emulate.runtime.kernels import attend, attend_intervals
from emulate.runtime.merge import merge
from emulate.runtime.verify import (
    HALF_PERPLEXITY,
    HALF_RATIO,
    compare_half,
    normwise_error,
)
from graphs import MaskKind

HALF = [pytest.param(torch.bfloat16, id="bfloat16"), pytest.param(torch.float16, id="float16")]


def errors_of(model, dtype, **problem) -> dict:
    """The emulated and the monolithic forward in `dtype`, each against the float64 monolithic forward."""
    run = emulate.run(model, dtype=dtype, verify=True, **problem)
    s = run.stats
    assert run.hidden.dtype == dtype
    assert s["max_rel_err"] > 0 and s["monolithic_rel_err"] > 0  # both forwards really ran in 16 bits
    # the gate is the norm-wise ratio; the worst rows' ratio is reported beside it
    assert s["error_ratio"] == pytest.approx(s["normwise_rel_err"] / s["monolithic_normwise_rel_err"])
    assert s["max_error_ratio"] == pytest.approx(s["max_rel_err"] / s["monolithic_rel_err"])
    assert s["tolerance"] == pytest.approx(HALF_RATIO * s["monolithic_normwise_rel_err"])
    return s


def test_the_ratio_is_normwise_and_the_worst_row_does_not_gate():
    """One row far off with the rest as good as the monolithic forward's passes; every row 1.3x worse fails."""
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(200, 32, generator=g, dtype=torch.float64)
    noise = torch.randn(200, 32, generator=g, dtype=torch.float64)
    same = exact + 1e-2 * noise
    one_row = same.clone()
    one_row[7] = exact[7] + 5e-2 * noise[7]  # 5x the monolithic forward's error on one row of 200
    s = compare_half(one_row, None, exact, None, same, None)
    # the worst row alone would fail it; the norm-wise ratio sees one row of 200
    assert s["max_error_ratio"] > 2 * HALF_RATIO and s["error_ratio"] < 1.1 and s["verified"], s
    worse = compare_half(exact + 1.3e-2 * noise, None, exact, None, same, None)
    assert worse["error_ratio"] == pytest.approx(1.3) and not worse["verified"], worse
    assert normwise_error(same, exact) == pytest.approx(float((same - exact).norm() / exact.norm()))
    nan = one_row.clone()
    nan[3, 3] = float("nan")
    assert not compare_half(nan, None, exact, None, same, None)["verified"]  # NaN never passes


@pytest.mark.parametrize("dtype", HALF)
def test_pair_partials_and_the_merge_are_float32(dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 32, 16, generator=g).to(dtype) for _ in range(3))
    o, lse = attend(q, k, v, 0.25, MaskKind.CAUSAL)
    assert o.dtype == lse.dtype == torch.float32
    import numpy as np

    lo, hi, sink = np.zeros(32, dtype=np.int64), np.arange(1, 33), np.zeros(32, dtype=np.int64)
    hi[:20] = 0  # rows with no visible key: the empty partial, also float32
    o2, lse2 = attend_intervals(q, k, v, 0.25, lo, hi, sink)
    assert o2.dtype == lse2.dtype == torch.float32 and torch.isinf(lse2[:, :20]).all()
    mo, ml = merge([(o, lse), (o2, lse2)])
    assert mo.dtype == ml.dtype == torch.float32
    # the call ran on the 16-bit inputs: the same call in float32 on them gives the same softmax to float32 rounding
    o32, _ = attend(q.float(), k.float(), v.float(), 0.25, MaskKind.CAUSAL)
    assert (o - o32).abs().max() < 1e-2


@pytest.mark.parametrize("dtype", HALF)
def test_a_seeded_preset_meets_the_relative_contract(dtype):
    s = errors_of("tiny-llama", dtype, random_tokens=600, block_size=64)
    assert s["verified"], s
    assert s["error_ratio"] <= HALF_RATIO and s["perplexity_gap"] <= HALF_PERPLEXITY
    # far from float32's contract: the comparison is against a forward that is itself 16-bit
    assert s["monolithic_rel_err"] > 1e-4


@pytest.mark.parametrize("dtype", HALF)
def test_a_correct_run_passes_over_seeds(dtype):
    """tiny-llama, 300 ids in blocks of 16: the float32 merge verifies on every seed, its norm-wise ratio
    within a few percent of 1 (docs/numerics.md: 0.98 to 1.04 over 20 seeds and 4 models)."""
    for seed in (0, 1, 2):
        s = errors_of("tiny-llama", dtype, random_tokens=300, seed=seed, block_size=16)
        assert s["verified"] and s["error_ratio"] < 1.1, (seed, s)


def merge_in(rounding):
    """The merge of partials first rounded to `rounding`: what a merge that adds in 16 bits computes."""
    return lambda partials: merge([(o.to(rounding), lse.to(rounding)) for o, lse in partials])


@pytest.mark.parametrize("dtype", HALF)
def test_a_merge_in_sixteen_bits_fails_verify(dtype, monkeypatch):
    """The same partials rounded to the run's dtype before they merge: 1.34x on seed 4 in float16 and
    on seed 5 in bfloat16 (1.25x to 1.34x over 20 seeds, benchmarks/half_ratio.py); a bfloat16 merge inside a
    float16 run is several times the monolithic forward's error."""
    seed = 4 if dtype == torch.float16 else 5
    monkeypatch.setattr(runner, "merge", merge_in(dtype))
    bad = errors_of("tiny-llama", dtype, random_tokens=300, seed=seed, block_size=16)
    assert not bad["verified"] and bad["error_ratio"] > HALF_RATIO, bad
    if dtype == torch.float16:
        monkeypatch.setattr(runner, "merge", merge_in(torch.bfloat16))
        bad = errors_of("tiny-llama", dtype, random_tokens=300, seed=seed, block_size=16)
        assert not bad["verified"] and bad["error_ratio"] > 2 * HALF_RATIO, bad


@pytest.mark.slow
def test_smollm2_in_bfloat16_meets_the_relative_contract():
    from emulate.inputs import default_text

    s = errors_of("smollm2-135m", torch.bfloat16, text=default_text()[:800], block_size=48)
    assert s["blocks"] >= 4 and s["verified"], s
    assert s["error_ratio"] <= HALF_RATIO and s["perplexity_gap"] <= HALF_PERPLEXITY


def test_the_cli_verifies_bfloat16_against_float64_and_the_monolithic_run(tmp_path):
    out = tmp_path / "out.arrow"
    r = emulate_child("run", "--model", "tiny-llama", "--random-tokens", "300", "-M", "64", "--dtype", "bfloat16",
                      "--verify", "--json", "--output", out, "--hidden")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["dtype"] == "bfloat16" and s["verified"] and s["tolerance"] == pytest.approx(
        HALF_RATIO * s["monolithic_normwise_rel_err"])
    import pyarrow as pa

    table = pa.ipc.open_file(str(out)).read_all()
    assert table.schema.field("hidden").type.value_type == pa.float32() and table.num_rows == 300
    # a ratio below what the run measured fails verify (exit 1): the check can fail
    r = emulate_child("run", "--model", "tiny-llama", "--random-tokens", "300", "-M", "64", "--dtype", "bfloat16",
                      "--verify", "--tolerance", "1e-3")
    assert r.returncode == 1 and "verify failed" in r.stderr, r.stderr


def test_sixteen_bits_are_refused_where_they_cannot_run(tmp_path):
    from hf_models import checkpoint

    hf_checkpoint = str(checkpoint("llama", tmp_path)[1])
    r = emulate_child("run", "--model", "tiny-llama", "--random-tokens", "64", "-M", "32", "--dtype", "bfloat16",
                      "--oracle", "paper")
    assert r.returncode == 2 and "runs float32 or float64 only; bfloat16 runs on the kernel oracle" in \
        one_error_line(r.stderr)
    with pytest.raises(EmulateError, match="dtype must be float32, float64, bfloat16, float16"):
        emulate.run("tiny-llama", random_tokens=64, dtype="half")
    # the transformers backend runs 16 bits (tests/test_hf_half.py) under the same rule
    with pytest.raises(EmulateError, match="the paper-stable oracle runs float32 or float64 only; float16 runs"):
        emulate.run(hf_checkpoint, random_tokens=64, dtype="float16", backend="transformers", oracle="paper-stable")
