"""The CUDA pair call (emulate/runtime/kernels_cuda.py): the rule, the code around the fused ops, and the ops themselves.

On a machine without a GPU: the rule is a pure function; `run_kernel` runs on CPU with stand-ins
that keep each CUDA op's conventions (flash's grouped KV heads and square-only causal flag, the
efficient kernel's 4-d bias, its lse padded to 32 rows with +inf and 0 on an empty row, NaN
output there) and is compared with the math path; the real op calls run on meta tensors, which
checks their signatures and output layouts. The tests marked gpu run the real kernels
(`make check-gpu`, or `pytest -m gpu`).
"""
from __future__ import annotations

import pytest
import torch

from emulate.runtime import kernels, kernels_cuda
from emulate.runtime.kernels_cuda import attend_math as _attend_math
from emulate.runtime.kernels_cuda import EFFICIENT, FLASH, MATH, aligned_bias, choose_kernel, run_kernel
from graphs import MaskKind

NONE, CAUSAL, EXPLICIT = MaskKind.NONE, MaskKind.CAUSAL, MaskKind.EXPLICIT
H100, A100, V100, T4, P100, FUTURE = (9, 0), (8, 0), (7, 0), (7, 5), (6, 0), (13, 0)
f16, bf16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
has_cuda = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not has_cuda, reason="needs a CUDA device")


# -- the rule ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,mask,dh,cap,mq,mk,want", [
    (f16, NONE, 64, H100, 128, 256, FLASH),
    (bf16, CAUSAL, 128, A100, 256, 256, FLASH),
    (bf16, NONE, 256, H100, 64, 64, FLASH),
    (f16, EXPLICIT, 64, H100, 64, 64, EFFICIENT),      # flash takes no mask tensor
    (f16, CAUSAL, 64, H100, 64, 128, EFFICIENT),       # flash aligns a non-square diagonal bottom-right
    (f16, NONE, 20, H100, 64, 64, MATH),               # in half precision both need head_dim % 8 == 0
    (f16, NONE, 512, H100, 64, 64, EFFICIENT),         # flash stops at 256
    (f32, NONE, 32, H100, 64, 64, EFFICIENT),          # flash is half precision only
    (f32, CAUSAL, 32, A100, 64, 64, EFFICIENT),
    (f32, EXPLICIT, 32, H100, 64, 80, EFFICIENT),
    (f32, NONE, 20, H100, 64, 64, EFFICIENT),          # float32 needs head_dim % 4
    (f32, NONE, 18, H100, 64, 64, MATH),
    (f64, NONE, 32, H100, 64, 64, MATH),               # no fused kernel takes float64
    (f64, CAUSAL, 32, H100, 64, 64, MATH),
    (f16, NONE, 64, V100, 64, 64, EFFICIENT),          # flash needs sm80
    (bf16, NONE, 64, V100, 64, 64, MATH),              # no bfloat16 before sm80
    (f32, NONE, 32, T4, 64, 64, EFFICIENT),
    (f32, NONE, 32, P100, 64, 64, EFFICIENT),
    (f32, NONE, 32, (3, 7), 64, 64, MATH),             # below sm50
    (f16, NONE, 64, FUTURE, 64, 64, MATH),             # newer than torch 2.13's kernels know
    (f32, NONE, 32, None, 64, 64, MATH),               # not a CUDA device
    (f16, NONE, 64, None, 64, 64, MATH),
])
def test_choose_kernel(dtype, mask, dh, cap, mq, mk, want):
    assert choose_kernel(dtype, mask, dh, cap, mq, mk) == want


def test_choose_kernel_takes_mask_names():
    assert choose_kernel(f16, "causal", 64, H100, 8, 8) == FLASH
    assert choose_kernel(f16, "explicit", 64, H100, 8, 8) == EFFICIENT


@pytest.mark.parametrize("dtype,mask,dh,cap,mq,mk,want,words", [
    (bf16, NONE, 128, H100, 64, 64, FLASH, "bfloat16 on sm90"),
    (f16, EXPLICIT, 64, H100, 64, 64, EFFICIENT, "flash takes no mask tensor"),
    (f16, CAUSAL, 64, H100, 64, 128, EFFICIENT, "this block is 64 x 128"),
    (f16, NONE, 512, H100, 64, 64, EFFICIENT, "head_dim a multiple of 8 up to 256, the model's is 512"),
    (f16, NONE, 20, H100, 64, 64, MATH, "the efficient kernel needs head_dim a multiple of 8, the model's is 20"),
    (f16, NONE, 64, V100, 64, 64, EFFICIENT, "flash runs on sm80 to sm121, this GPU is sm70"),
    (bf16, NONE, 64, V100, 64, 64, MATH, "the efficient kernel runs bfloat16 from sm80"),
    (f16, NONE, 64, FUTURE, 64, 64, MATH, "the efficient kernel runs on sm50 to sm121, this GPU is sm130"),
    (f32, NONE, 32, H100, 64, 64, EFFICIENT, "flash runs float16 and bfloat16 only"),
    (f64, NONE, 32, H100, 64, 64, MATH, "no fused kernel takes float64"),
    (bf16, NONE, 64, None, 64, 64, MATH, "not a CUDA device"),
])
def test_explain_kernel_is_the_rule_with_its_reason(dtype, mask, dh, cap, mq, mk, want, words):
    kernel, why = kernels_cuda.explain_kernel(dtype, mask, dh, cap, mq, mk)
    assert kernel == want == choose_kernel(dtype, mask, dh, cap, mq, mk) and words in why, why


def test_a_sixteen_bit_run_that_misses_flash_says_so():
    """kernel_note: nothing where a 16-bit run's unmasked and diagonal calls take flash (or off CUDA, or
    in float32), one line naming the kernel and the reason where they do not."""
    note = kernels_cuda.kernel_note
    assert note(bf16, 64, H100) is None and note(f16, 128, A100) is None
    assert note(bf16, 64, None) is None and note(f32, 20, H100) is None and note(f64, 64, H100) is None
    assert note(f16, 64, T4) == ("float16 pair calls run the efficient kernel, not FlashAttention: flash runs on "
                                 "sm80 to sm121, this GPU is sm75")
    assert note(bf16, 100, H100).startswith("bfloat16 pair calls run the math path (attend_math), not "
                                            "FlashAttention: flash needs head_dim a multiple of 8")
    assert kernels_cuda.kernel_figures(bf16, 100, "cpu") == {}  # a CPU run has no kernel to miss
    assert kernels_cuda.kernel_figures(bf16, 64, "meta") == {}


def test_a_cpu_tensor_has_no_capability():
    assert kernels_cuda.device_capability(torch.device("cpu")) is None
    assert kernels_cuda.device_capability(torch.device("meta")) is None


# -- the code around the ops, on CPU -------------------------------------------------------------

def cpu_flash(q, k, v, scale, causal, bias):
    """flash's conventions on CPU: grouped KV heads taken as they are, no bias, causal only when square."""
    assert bias is None and q.dim() == k.dim() == 4 and q.shape[1] % k.shape[1] == 0
    assert not causal or q.shape[2] == k.shape[2]
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return o, lse.float()


def cpu_efficient(q, k, v, scale, causal, bias):
    """The efficient kernel's on CPU: its 4-d aligned bias, lse padded with +inf, 0 and NaN on an empty row."""
    assert q.shape[1] == k.shape[1], "the efficient kernel is given repeated keys"
    if bias is not None:
        bias = aligned_bias(bias, q.shape[1])
        assert bias.shape == (1, q.shape[1], q.shape[2], k.shape[2]) and bias.stride(2) % 16 == 0
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias,
                                                                         scale=scale)
    mq = q.shape[2]
    padded = torch.full((*lse.shape[:2], -(-mq // 32) * 32), float("inf"), dtype=torch.float32)
    padded[..., :mq] = lse
    if bias is not None:
        empty = torch.isneginf(bias[0, 0]).all(dim=-1)
        padded[..., :mq] = padded[..., :mq].masked_fill(empty, 0.0)
        o = o.masked_fill(empty[:, None], float("nan"))
    return o, padded


@pytest.fixture
def stand_ins(monkeypatch):
    monkeypatch.setitem(kernels_cuda.FUSED, FLASH, cpu_flash)
    monkeypatch.setitem(kernels_cuda.FUSED, EFFICIENT, cpu_efficient)


def qkv(H, Hkv, mq, mk, dh, dtype=f32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h, m: torch.randn(h, m, dh, generator=g).to(dtype)  # noqa: E731
    return make(H, mq), make(Hkv, mk), make(Hkv, mk)


def explicit_bias(mq, mk, dtype, empty_rows=(1, 4), seed=1):
    visible = torch.rand(mq, mk, generator=torch.Generator().manual_seed(seed)) < 0.5
    visible[:, 0] = True
    visible[list(empty_rows)] = False
    return torch.zeros(mq, mk, dtype=dtype).masked_fill_(~visible, float("-inf")), visible


def math_reference(q, k, v, scale, mask, bias):
    g = q.shape[0] // k.shape[0]
    return _attend_math(q.double(), k.repeat_interleave(g, 0).double(), v.repeat_interleave(g, 0).double(), scale,
                        mask, None if bias is None else bias.double())


# every (kernel, mask) the rule can choose: it never sends a mask tensor to flash
KERNEL_MASKS = [(kernel, mask) for kernel in (FLASH, EFFICIENT, MATH) for mask in (NONE, CAUSAL, EXPLICIT)
                if (kernel, mask) != (FLASH, EXPLICIT)]


@pytest.mark.parametrize("kernel, mask", KERNEL_MASKS)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
def test_run_kernel_matches_the_math_path(stand_ins, kernel, mask, heads):
    H, Hkv = heads
    m = 37  # not a multiple of 32: the efficient lse's padding is cut off
    q, k, v = qkv(H, Hkv, m, m, 16)
    bias, visible = explicit_bias(m, m, f32) if mask == EXPLICIT else (None, None)
    o, lse = run_kernel(kernel, q, k, v, 0.3, mask, bias)
    want_o, want_lse = math_reference(q, k, v, 0.3, mask, bias)
    assert o.shape == q.shape and lse.shape == q.shape[:2] and o.dtype == lse.dtype == f32
    assert torch.allclose(o.double(), want_o, atol=2e-6, rtol=2e-6)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    finite = torch.isfinite(want_lse)
    assert torch.allclose(lse.double()[finite], want_lse[finite], atol=2e-6, rtol=2e-6)
    if mask == EXPLICIT:
        empty = ~visible.any(dim=1)
        assert torch.isneginf(lse[:, empty]).all() and (o[:, empty] == 0).all() and not o.isnan().any()


@pytest.mark.parametrize("kernel", [FLASH, EFFICIENT])
def test_unmasked_gqa_folds_heads_and_never_repeats_keys(monkeypatch, kernel):
    seen = []

    def spy(q, k, v, scale, causal, bias):
        seen.append((q.shape, k.shape))
        return (cpu_flash if kernel == FLASH else cpu_efficient)(q, k, v, scale, causal, bias)

    monkeypatch.setitem(kernels_cuda.FUSED, kernel, spy)
    q, k, v = qkv(8, 2, 10, 12, 16)
    o, lse = run_kernel(kernel, q, k, v, 0.25, NONE)
    assert seen == [((1, 2, 40, 16), (1, 2, 12, 16))]
    want_o, want_lse = math_reference(q, k, v, 0.25, NONE, None)
    assert torch.allclose(o.double(), want_o, atol=2e-6) and torch.allclose(lse.double(), want_lse, atol=2e-6)


def test_flash_reads_grouped_heads_under_a_causal_mask(monkeypatch):
    seen = []
    monkeypatch.setitem(kernels_cuda.FUSED, FLASH, lambda q, k, *a: seen.append(k.shape) or cpu_flash(q, k, *a))
    q, k, v = qkv(8, 2, 16, 16, 16)
    run_kernel(FLASH, q, k, v, 0.25, CAUSAL)
    assert seen == [(1, 2, 16, 16)]


def test_half_precision_gives_a_float32_lse(stand_ins):
    q, k, v = qkv(4, 2, 16, 16, 16, dtype=torch.bfloat16)
    for kernel in (FLASH, EFFICIENT, MATH):
        o, lse = run_kernel(kernel, q, k, v, 0.25, CAUSAL)
        assert o.dtype == torch.bfloat16 and lse.dtype == f32
        want_o, want_lse = math_reference(q, k, v, 0.25, CAUSAL, None)
        assert torch.allclose(o.double(), want_o, atol=3e-2) and torch.allclose(lse.double(), want_lse, atol=3e-2)


def test_misaligned_inputs_are_copied_and_aligned_ones_are_not():
    base = torch.randn(4 * 17 * 8 + 1)
    odd = base[1:].view(4, 17, 8)  # storage offset of 4 bytes
    assert kernels_cuda._aligned(odd) is not odd and kernels_cuda._aligned(odd).storage_offset() == 0
    assert torch.equal(kernels_cuda._aligned(odd), odd)
    even = torch.randn(4, 17, 8)
    rows = even[:, 3:9]  # a block of rows, as pair calls get them: read in place
    assert kernels_cuda._aligned(even) is even and kernels_cuda._aligned(rows) is rows
    strided = torch.randn(4, 17, 6)[..., :4]  # row stride 6 floats = 24 bytes
    assert kernels_cuda._aligned(strided).stride() == (68, 4, 1)
    halves = torch.randn(4, 16, 8).half()[:, 1:]  # offset of 16 bytes: aligned
    assert kernels_cuda._aligned(halves) is halves


def test_the_bias_is_a_16_aligned_view_over_heads():
    bias, _ = explicit_bias(5, 20, f32)
    b = aligned_bias(bias, 3)
    assert b.shape == (1, 3, 5, 20) and b.stride() == (0, 0, 32, 1) and torch.equal(b[0, 2], bias)
    square, _ = explicit_bias(5, 32, f32)
    b = aligned_bias(square, 3)
    assert b.stride() == (0, 0, 32, 1) and b.data_ptr() == square.data_ptr()  # no copy


@pytest.mark.parametrize("kernel,mask,heads", [(FLASH, NONE, (8, 2)), (FLASH, CAUSAL, (8, 2)),
                                               (EFFICIENT, NONE, (8, 2)), (EFFICIENT, CAUSAL, (8, 2)),
                                               (EFFICIENT, EXPLICIT, (4, 4)), (EFFICIENT, EXPLICIT, (8, 2))])
def test_the_real_op_calls_on_meta_tensors(kernel, mask, heads):
    """torch's own meta functions for the two CUDA ops: argument order, output shapes, the lse's padding."""
    H, Hkv = heads
    dtype = f16 if kernel == FLASH else f32
    q, k, v = (t.to("meta") for t in qkv(H, Hkv, 40, 40, 32, dtype=dtype))
    bias = torch.zeros(40, 40, dtype=dtype, device="meta") if mask == EXPLICIT else None
    o, lse = run_kernel(kernel, q, k, v, 0.2, mask, bias)
    assert o.shape == (H, 40, 32) and o.dtype == dtype and lse.shape == (H, 40) and lse.dtype == f32


def test_attend_on_a_device_other_than_cpu_goes_through_attend_cuda(monkeypatch):
    calls = []

    def spy(q, k, v, scale, mask, bias):
        calls.append((q.device.type, MaskKind(mask)))
        return kernels_cuda.run_kernel(MATH, q, k, v, scale, mask, bias)

    monkeypatch.setattr(kernels_cuda, "attend_cuda", spy)
    q, k, v = (t.to("meta") for t in qkv(8, 2, 16, 16, 16))
    o, lse = kernels.attend(q, k, v, 0.25, CAUSAL)
    assert calls == [("meta", CAUSAL)] and o.shape == (8, 16, 16) and lse.shape == (8, 16)


def test_attend_cuda_on_cpu_is_the_math_path():
    q, k, v = qkv(8, 2, 12, 12, 16)
    bias, _ = explicit_bias(12, 12, f32)
    for mask, b in ((NONE, None), (CAUSAL, None), (EXPLICIT, bias)):
        o, lse = kernels_cuda.attend_cuda(q, k, v, 0.25, mask, b)
        want_o, want_lse = run_kernel(MATH, q, k, v, 0.25, mask, b)
        assert torch.equal(o, want_o) and torch.equal(lse, want_lse)


# -- the real kernels (a CUDA device) -------------------------------------------------------------

TOL = {f16: 2e-3, bf16: 1.6e-2, f32: 2e-5, f64: 1e-10}


# (mask, (mq, mk)): a causal pair is an aligned diagonal block, so square
MASK_SHAPES = [(mask, m) for mask in (NONE, CAUSAL, EXPLICIT) for m in ((128, 128), (100, 100), (64, 200))
               if mask != CAUSAL or m[0] == m[1]]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [f16, bf16, f32, f64])
@pytest.mark.parametrize("mask, m", MASK_SHAPES)
@pytest.mark.parametrize("heads", [(8, 8), (8, 2)])
@pytest.mark.parametrize("dh", [32, 64])
def test_fused_matches_the_math_path_on_cuda(dtype, mask, heads, m, dh):
    mq, mk = m
    H, Hkv = heads
    q, k, v = (t.cuda() for t in qkv(H, Hkv, mq, mk, dh, dtype=dtype))
    bias, visible = explicit_bias(mq, mk, dtype) if mask == EXPLICIT else (None, None)
    if bias is not None:
        bias = bias.cuda()
    kernel = choose_kernel(dtype, mask, dh, kernels_cuda.device_capability(q.device), mq, mk)
    if dtype != f64 and torch.cuda.get_device_capability() >= (8, 0):
        assert kernel != MATH  # every float16/bfloat16/float32 call here has a fused kernel on sm80+
    o, lse = kernels_cuda.attend_cuda(q, k, v, dh ** -0.5, mask, bias)
    want_o, want_lse = math_reference(q, k, v, dh ** -0.5, mask, bias)
    assert o.shape == q.shape and o.dtype == dtype and lse.shape == q.shape[:2]
    tol = TOL[dtype]
    assert torch.allclose(o.double(), want_o, atol=tol, rtol=tol), kernel
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse)), kernel
    finite = torch.isfinite(want_lse)
    assert torch.allclose(lse.double()[finite], want_lse[finite], atol=tol, rtol=tol), kernel
    if mask == EXPLICIT:
        empty = ~visible.cuda().any(dim=1)
        assert torch.isneginf(lse[:, empty]).all() and (o[:, empty] == 0).all() and not o.isnan().any()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [f32, f64])
@pytest.mark.parametrize("model,pattern", [("tiny-llama", {"attention": "causal"}),
                                           ("tiny-mistral", {"attention": "sliding", "window": 300})])
def test_a_forward_on_cuda_meets_the_contract(dtype, model, pattern):
    import emulate

    run = emulate.run(model, random_tokens=2048, block_size=256, **pattern, dtype=str(dtype).removeprefix("torch."),
                      device="cuda", verify=True, collect=False)
    assert run.stats["verified"], run.stats
