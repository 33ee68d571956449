"""The numerics contract a run is checked against (docs/numerics.md), and the comparison `verify` makes."""
from __future__ import annotations

import math

import torch

from emulate.errors import EmulateError
from emulate.runtime.contract import capability
from graphs import PatternKind

# The numerics contract of the exact modes (docs/numerics.md): max per-row relative error.
TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-10}
# Sampled attention (Thm 4.1) estimates full attention from a sample of keys per query block. The
# theorem's M >= 8 C^4 log(40 N) / eps^2 puts its error at eps = K sqrt(log(40 N) / m) for a block of m
# sampled keys, with K = C^2 sqrt(8) for scores bounded by log C. A model's C is not known (and huge
# for real weights: docs/theorems.md), so K is stated: 1.0, above every constant measured: 0.39 at
# most (M = 8) on inputs that meet the assumption (the 90th percentiles of docs/theorems.md,
# benchmarks/thm41_sampling.py) and about 0.3 on the tiny-bert preset's whole forward
# (tests/test_numerics.py). Real weights need not meet it (all-MiniLM-L6-v2: docs/theorems.md).
SAMPLED_CONSTANT = 1.0
# bfloat16 and float16 promise no absolute figure but one relative to the monolithic forward in the same
# dtype (docs/numerics.md): the emulated forward's norm-wise error against float64 (normwise_error) at most
# HALF_RATIO times the monolithic forward's own, and its perplexity within HALF_PERPLEXITY of the monolithic
# forward's. Over 20 seeds x 4 models x 2 dtypes x M in {16, 64} (benchmarks/half_ratio.py) a correct run's
# norm-wise ratio stayed within 0.98 to 1.04, where its max-row ratio spread over 0.74 to 1.29.
HALF_RATIO = 1.25
HALF_PERPLEXITY = 0.005


def sampled_tolerance(tokens: int, block_size: int, dtype: torch.dtype) -> float:
    """The error verify allows a sampled run of N = `tokens` in blocks of M = `block_size`:
    SAMPLED_CONSTANT * sqrt(log(40 N) / m * (N - m) / (N - 1)), m the fewest keys a block samples (the
    ragged last block's, else M). The last factor is the correction of a sample drawn without
    replacement, 0 where one block samples every key: the estimate is then exact attention, and the
    dtype's contract applies (as it does below it)."""
    n = int(tokens)
    m = n - (math.ceil(n / block_size) - 1) * block_size  # the last block's size: M, or fewer where ragged
    if m >= n:
        return TOLERANCE[dtype]
    return max(SAMPLED_CONSTANT * math.sqrt(math.log(40 * n) / m * (n - m) / (n - 1)), TOLERANCE[dtype])


def tolerance_for(patterns, oracle, dtype: torch.dtype, tokens: int | None = None,
                  block_size: int | None = None) -> float:
    """The error a run's mode promises: the dtype's contract, or what an approximate mode states
    (the sampled pattern, from its N and M: sampled_tolerance; an oracle whose `tolerance(dtype)` is
    looser, as the raw paper oracle's)."""
    if any(pat.kind == PatternKind.SAMPLED for pat in patterns):
        if tokens is None or block_size is None:
            raise EmulateError("a sampled run's tolerance depends on its N and M: give tokens and block_size")
        return sampled_tolerance(tokens, block_size, dtype)
    own = capability(oracle, "tolerance", None)
    stated = None if own is None else own(dtype)
    return TOLERANCE[dtype] if stated is None else max(float(stated), TOLERANCE[dtype])


def check_tolerance(tolerance) -> None:
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                  or not math.isfinite(tolerance) or tolerance <= 0):
        raise EmulateError(f"--tolerance must be a finite number > 0, got {tolerance!r}")


def row_errors(hidden: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max |y - t|, max_i ||y_i - t_i|| / ||t_i||): the paper's per-row relative error."""
    diff = hidden.double() - reference.double()
    rel = diff.norm(dim=1) / reference.double().norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    return float(diff.abs().max()), float(rel.max())


def compare(hidden: torch.Tensor, logprobs: torch.Tensor | None, want_hidden: torch.Tensor,
            want_logprobs: torch.Tensor | None, tolerance: float) -> dict:
    """verify's figures: per-row errors of the hidden states (and log-probabilities) against a reference."""
    out = {}
    out["max_abs_err"], out["max_rel_err"] = row_errors(hidden, want_hidden.to(hidden.device))
    finite = math.isfinite(out["max_rel_err"])
    if logprobs is not None:
        err = float((logprobs.double() - want_logprobs.double().to(logprobs.device)).abs().max()) \
            if logprobs.numel() else 0.0
        out["max_logprob_err"] = err
        finite = finite and math.isfinite(err)
    out["tolerance"] = tolerance
    out["verified"] = bool(finite and out["max_rel_err"] <= tolerance)  # NaN never passes
    return out


def normwise_error(hidden: torch.Tensor, reference: torch.Tensor) -> float:
    """||Y - T||_F / ||T||_F over all rows: the norm-wise relative error of the whole output.

    The 16-bit contract's ratio is taken on this figure, not on the worst row's: a max over rows is an
    extreme value, and two 16-bit forwards that round differently put their worst row in different
    places, so its ratio swings (0.74x to 1.29x for correct runs in docs/numerics.md) where this one,
    a sum over every row, holds within a few percent and still moves when every merged row is worse."""
    diff = hidden.double() - reference.double()
    return float(diff.norm() / reference.double().norm().clamp_min(torch.finfo(torch.float64).tiny))


def mean_row_error(hidden: torch.Tensor, reference: torch.Tensor) -> float:
    """mean_i ||y_i - t_i|| / ||t_i||."""
    diff = hidden.double() - reference.double()
    return float((diff.norm(dim=1) / reference.double().norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)).mean())


def perplexity(logprobs: torch.Tensor) -> float:
    return math.exp(-float(logprobs.double().mean()))


def compare_half(hidden: torch.Tensor, logprobs: torch.Tensor | None, exact_hidden: torch.Tensor,
                 exact_logprobs: torch.Tensor | None, same_hidden: torch.Tensor, same_logprobs: torch.Tensor | None,
                 ratio: float | None = None) -> dict:
    """verify's figures for a 16-bit run: its error against the float64 forward (exact_*) beside the
    monolithic forward's in the same dtype (same_*). The ratio verify gates on, `error_ratio`, is of the
    norm-wise errors (`normwise_error`); `tolerance` is `ratio` (HALF_RATIO) times the monolithic
    forward's norm-wise error. The worst rows' errors and their ratio (`max_error_ratio`) and the mean
    per-row errors are reported beside it and gate nothing."""
    ratio = HALF_RATIO if ratio is None else float(ratio)
    exact_hidden = exact_hidden.to(hidden.device)
    out = compare(hidden, logprobs, exact_hidden, exact_logprobs, math.inf)
    same_hidden = same_hidden.to(hidden.device)
    _, same_err = row_errors(same_hidden, exact_hidden)
    out["monolithic_rel_err"] = same_err
    out["max_error_ratio"] = out["max_rel_err"] / same_err if same_err > 0 else math.inf
    out["mean_rel_err"], out["monolithic_mean_rel_err"] = mean_row_error(hidden, exact_hidden), \
        mean_row_error(same_hidden, exact_hidden)
    err, same_norm = normwise_error(hidden, exact_hidden), normwise_error(same_hidden, exact_hidden)
    out["normwise_rel_err"], out["monolithic_normwise_rel_err"] = err, same_norm
    out["error_ratio"] = err / same_norm if same_norm > 0 else math.inf
    out["tolerance"], out["error_ratio_bound"] = ratio * same_norm, ratio
    ok = math.isfinite(err) and err <= out["tolerance"]  # NaN never passes
    if logprobs is not None and logprobs.numel():
        out["monolithic_perplexity"] = perplexity(same_logprobs)
        out["perplexity_gap"] = abs(perplexity(logprobs) / out["monolithic_perplexity"] - 1)
        ok = ok and out["perplexity_gap"] <= HALF_PERPLEXITY  # NaN never passes
    out["verified"] = bool(ok)
    return out
