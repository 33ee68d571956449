"""Pair calls on CUDA: torch's fused attention kernels, which also return the log-sum-exp.

The kernel oracle's contract (emulate/runtime/kernels.py): q [H, mq, dh], k and v [Hkv, mk, dh] ->
(o [H, mq, dh], lse [H, mq]), lse the natural log of the row's softmax denominator, -inf (and
o = 0) for a row that sees no key. Two of torch's fused CUDA kernels return that lse beside the
output, so a pair call never writes its [mq, mk] score matrix to GPU memory:

    flash      aten._scaled_dot_product_flash_attention (FlashAttention-2): float16 and bfloat16
               on sm80 and newer, head_dim a multiple of 8 up to 256, no mask tensor, its causal
               flag only on square blocks (it aligns the diagonal bottom-right), and grouped KV
               heads natively. lse: float32 [B, H, mq], natural log, +inf on a row with no key.
    efficient  aten._scaled_dot_product_efficient_attention (the CUTLASS memory-efficient kernel)
               with compute_log_sumexp: float32 and float16 (sm50 and newer), bfloat16 (sm80 and
               newer), an additive bias, its causal flag aligned top-left like attend_math. Its
               float32 products on sm80 and newer are 3xTF32 (cutlass OpMultiplyAddFastF32), of
               float32 accuracy, which is why float32 calls may use it under the float32 contract.
               lse: float32 [B, H, mq rounded up to 32] (padding +inf), natural log; 0 on a row
               with no key in recent torch.
    math       attend_math below: float64 (no fused kernel takes it) and whatever the
               rule below sends away from both.

cuDNN's kernel (aten._scaled_dot_product_cudnn_attention) also returns an lse, but only for the
half-precision calls flash already takes, behind cuDNN-version checks; it is not used.

`choose_kernel` is the whole rule, a pure function of the call's description (`explain_kernel`
gives the same choice with its reason, and `kernel_note` the line a 16-bit run that misses flash
reports), so it is tested on machines without a GPU; `run_kernel` holds everything around the op call (layout, GQA, alignment,
the lse's padding and empty rows) and is tested on CPU with stand-ins for the two ops.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from graphs import MaskKind

FLASH, EFFICIENT, MATH = "flash", "efficient", "math"
KERNELS = (FLASH, EFFICIENT, MATH)
HALF = (torch.float16, torch.bfloat16)
# The architectures torch 2.13's own SDPA checks accept for each kernel (sdp_utils.cpp); a newer
# GPU is sent to the math path rather than to a kernel that may not have been built for it.
FLASH_ARCHS = ((8, 0), (12, 1))
EFFICIENT_ARCHS = ((5, 0), (12, 1))
# Both kernels load 16-byte vectors: every stride but the last, and the storage offset, must be a
# multiple of 16 bytes; the bias's row stride a multiple of 16 elements (torch pads it the same way).
ALIGN_BYTES = 16
BIAS_ALIGN = 16
NEG_INF = float("-inf")


def choose_kernel(dtype: torch.dtype, mask: MaskKind, head_dim: int, capability: tuple[int, int] | None,
                  q_len: int, k_len: int) -> str:
    """flash, efficient or math for one pair call; capability None: not a CUDA device.

    mask: none, causal (an aligned diagonal block) or explicit (an additive bias).
    """
    return explain_kernel(dtype, mask, head_dim, capability, q_len, k_len)[0]


def explain_kernel(dtype: torch.dtype, mask: MaskKind, head_dim: int, capability: tuple[int, int] | None,
                   q_len: int, k_len: int) -> tuple[str, str]:
    """(choose_kernel's kernel, why): the rule itself, with the reason a call does not reach a faster
    kernel in words, so that a 16-bit run that falls back from FlashAttention says why (kernel_note)."""
    if capability is None:
        return MATH, "not a CUDA device"
    if dtype not in (*HALF, torch.float32):
        return MATH, f"no fused kernel takes {_name(dtype)}"
    mask = MaskKind(mask)
    half = dtype in HALF
    arch = f"sm{capability[0]}{capability[1]}"
    why_not_flash = (
        "flash runs float16 and bfloat16 only" if not half else
        f"flash runs on sm80 to sm121, this GPU is {arch}" if not FLASH_ARCHS[0] <= capability <= FLASH_ARCHS[1] else
        f"flash needs head_dim a multiple of 8 up to 256, the model's is {head_dim}"
        if head_dim % 8 or head_dim > 256 else
        "flash takes no mask tensor (a partly visible block)" if mask == MaskKind.EXPLICIT else
        f"flash aligns a causal block's diagonal bottom-right, this block is {q_len} x {k_len}"
        if mask == MaskKind.CAUSAL and q_len != k_len else None)
    if why_not_flash is None:
        return FLASH, f"{_name(dtype)} on {arch}"
    if not EFFICIENT_ARCHS[0] <= capability <= EFFICIENT_ARCHS[1]:
        return MATH, f"{why_not_flash}; the efficient kernel runs on sm50 to sm121, this GPU is {arch}"
    if dtype == torch.bfloat16 and capability < (8, 0):
        return MATH, f"{why_not_flash}; the efficient kernel runs bfloat16 from sm80, this GPU is {arch}"
    if head_dim % (8 if half else 4):
        return MATH, (f"{why_not_flash}; the efficient kernel needs head_dim a multiple of {8 if half else 4}, "
                      f"the model's is {head_dim}")
    return EFFICIENT, why_not_flash


def kernel_note(dtype: torch.dtype, head_dim: int, capability: tuple[int, int] | None) -> str | None:
    """For a 16-bit run on a CUDA device: one line when its unmasked and causal diagonal pair calls
    (every block but the partly visible ones of a window) will not run FlashAttention, naming the
    kernel they run instead and why; None where they will, or off CUDA, or for float32 and float64."""
    if capability is None or dtype not in HALF:
        return None
    kernel, why = explain_kernel(dtype, MaskKind.NONE, head_dim, capability, 1, 1)
    if kernel == FLASH:
        return None
    path = "the math path (attend_math)" if kernel == MATH else f"the {kernel} kernel"
    return f"{_name(dtype)} pair calls run {path}, not FlashAttention: {why}"


def kernel_figures(dtype: torch.dtype, head_dim: int, device: str) -> dict:
    """What a backend's summary adds for a run on `device` ("cpu", "cuda", "cuda:1"): {"kernel_note": ...}
    where its 16-bit pair calls miss FlashAttention (kernel_note), else {} (also for a head_dim not known)."""
    if head_dim is None:
        return {}
    note = kernel_note(dtype, head_dim, device_capability(torch.device(device)))
    return {} if note is None else {"kernel_note": note}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The device's compute capability, (major, minor); None for anything but a CUDA device."""
    if device.type != "cuda":
        return None
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def attend_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: MaskKind = MaskKind.NONE,
                bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [H, mq, dh], k and v [Hkv, mk, dh] -> (o [H, mq, dh], lse [H, mq]) with a fused kernel where one applies.

    bias: the additive [mq, mk] mask (0 or -inf) of an explicit mask, else None. lse has q's dtype
    for float32 and float64, and is float32 for float16 and bfloat16 (the fused kernels' own; a
    half-precision log-weight would cost the merge about three digits).
    """
    kernel = choose_kernel(q.dtype, mask, q.shape[-1], device_capability(q.device), q.shape[1], k.shape[1])
    return run_kernel(kernel, q, k, v, scale, mask, bias)


def run_kernel(kernel: str, q, k, v, scale: float, mask: MaskKind = MaskKind.NONE, bias=None):
    """One pair call with the named kernel (attend_cuda's contract); the kernel is called through FUSED."""
    mask = MaskKind(mask)
    H, mq, dh = q.shape
    Hkv = k.shape[0]
    if Hkv != H and mask == MaskKind.NONE:
        # Unmasked GQA: each KV head's query heads become rows of one head (every row is its own
        # softmax), so no kernel sees repeated keys; the CPU path does the same
        o, lse = run_kernel(kernel, q.reshape(Hkv, -1, dh), k, v, scale, mask, bias)
        return o.reshape(H, mq, dh), lse.reshape(H, mq)
    if Hkv != H and kernel != FLASH:
        # A mask ties rows to positions, so heads cannot be folded; flash reads grouped KV heads
        # itself, the others are given the keys repeated
        k = k.repeat_interleave(H // Hkv, dim=0)
        v = v.repeat_interleave(H // Hkv, dim=0)
    if kernel == MATH:
        o, lse = attend_math(q, k, v, scale, mask, bias)
    else:
        o, lse = FUSED[kernel](_aligned(q)[None], _aligned(k)[None], _aligned(v)[None], scale,
                               mask == MaskKind.CAUSAL, bias)
        # the efficient kernel pads the lse's rows to a multiple of 32
        o, lse = o[0], lse[0, :, :mq]
    if q.dtype in HALF:
        lse = lse.float()
    if bias is not None:
        # A row with no visible key: flash would say +inf, the efficient kernel 0 (and its output
        # may be NaN); the merge needs lse = -inf so the row weighs nothing. torch.where, not a
        # Python test of any(), so no call waits for the GPU here.
        empty = torch.isneginf(bias).all(dim=-1)
        lse = lse.masked_fill(empty, NEG_INF)
        o = o.masked_fill(empty[:, None], 0.0)
    return o, lse


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself where the fused kernels can read it in place, else a contiguous copy."""
    step = max(1, ALIGN_BYTES // t.element_size())
    if t.stride(-1) == 1 and t.storage_offset() % step == 0 and all(s % step == 0 for s in t.stride()[:-1]):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def aligned_bias(bias: torch.Tensor, heads: int) -> torch.Tensor:
    """The [mq, mk] additive mask as the efficient kernel reads it: [1, heads, mq, mk], rows 16-aligned.

    The expansion over batch and heads is a view (stride 0); only a row stride that is not a
    multiple of 16 elements costs a copy into a padded buffer (torch's own SDPA pads the same way).
    """
    mq, mk = bias.shape[-2:]
    if bias.stride(-1) != 1 or bias.stride(-2) % BIAS_ALIGN or bias.storage_offset() % BIAS_ALIGN:
        padded = bias.new_empty(mq, -(-mk // BIAS_ALIGN) * BIAS_ALIGN)[:, :mk]
        padded.copy_(bias)
        bias = padded
    return bias.expand(1, heads, mq, mk)


def _flash(q, k, v, scale: float, causal: bool, bias):
    """FlashAttention-2 on [1, H, m, dh] tensors (k, v may have fewer heads) -> (o, lse [1, H, mq])."""
    assert bias is None, "flash takes no mask tensor; choose_kernel never sends it one"
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return out[0], out[1]


def _efficient(q, k, v, scale: float, causal: bool, bias):
    """The memory-efficient kernel on [1, H, m, dh] tensors -> (o, lse [1, H, >= mq])."""
    if bias is not None:
        bias = aligned_bias(bias, q.shape[1])
    out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, causal, scale=scale)
    return out[0], out[1]


FUSED = {FLASH: _flash, EFFICIENT: _efficient}


def attend_math(q, k, v, scale, mask, bias):
    """The textbook form: float64 on GPUs (no fused kernel takes it) and whatever the fused kernels refuse."""
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask == MaskKind.CAUSAL:
        mq, mk = scores.shape[-2:]
        causal = torch.ones(mq, mk, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, NEG_INF)
    elif bias is not None:
        scores = scores + bias
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    return weights @ v, lse
