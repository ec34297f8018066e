"""Triton kernels of ReGELU2 / ReSiLU2 (Approx-BP, docs/method.md section 1): exact forward, 2-bit backward.

Forward, one pass over x:

    y    = act(x)                                   computed in fp32, cast to y's dtype
    code = [x > c0] + [x > c1] + [x > c2]           in 0..3, compared in fp32
    byte j of codes = sum_k code[4j + k] << 2k      4 codes per byte, ceil(n / 4) bytes

Backward, one pass over dy and the packed codes:

    dx = dy * level[code],  level = [0, a0, a0 + a1, a0 + a1 + a2]   fp32 multiply, cast to dx's dtype

The activations follow the formulas (and operation order) of PyTorch's CUDA kernels:

    erf-GELU   y = x * 0.5 * (1 + erf(x / sqrt(2)))
    tanh-GELU  y = 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))
    SiLU       y = x / (1 + exp(-x))

On a GPU exp and tanh are libdevice's ``__nv_expf`` / ``__nv_tanhf``, the very functions PyTorch's
kernels call. The Triton interpreter cannot call libdevice (no extern_elementwise), so there the two
helpers below fall back to ``tl.exp`` (numpy's float32 exp); everything else is the same code.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

# Which activation the forward kernel computes (a tl.constexpr, so each one compiles separately).
GELU_ERF = 0
GELU_TANH = 1
SILU = 2

if triton.knobs.runtime.interpret:

    @triton.jit
    def _exp(x):
        return tl.exp(x)

    @triton.jit
    def _tanh(x):
        # tanh(x) = 2 / (1 + exp(-2x)) - 1, exact to a few ulps where 1 + tanh(x) (its only use) matters.
        return tl.math.div_rn(2.0, 1.0 + tl.exp(-2.0 * x)) - 1.0

else:
    _exp = libdevice.exp
    _tanh = libdevice.tanh


@triton.jit
def _activation_fp32(x, ACTIVATION: tl.constexpr):
    """act(x) for an fp32 tile, in the operation order of PyTorch's CUDA kernels."""
    if ACTIVATION == 0:  # GELU_ERF
        y = x * 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))  # 1 / sqrt(2)
    elif ACTIVATION == 1:  # GELU_TANH
        inner = 0.7978845608028654 * (x + 0.044715 * (x * x * x))  # sqrt(2 / pi)
        y = 0.5 * x * (1.0 + _tanh(inner))
    else:  # SILU
        y = tl.math.div_rn(x, 1.0 + _exp(-x))
    return y


@triton.jit
def _step_activation_fwd_kernel(
    X,  # pointer to the input x, contiguous, n_elements long
    Y,  # pointer to the output y = act(x), same dtype and length as x
    CODES,  # pointer to the packed 2-bit codes, uint8, ceil(n_elements / 4) long
    n_elements,  # number of elements of x
    c0,  # threshold c0 < c1 < c2, fp32
    c1,
    c2,
    ACTIVATION: tl.constexpr,  # GELU_ERF, GELU_TANH or SILU
    BLOCK: tl.constexpr,  # elements per program, a multiple of 4
):
    # int64 offsets: tensors with more than 2^31 elements must not wrap.
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)

    # y = act(x), in fp32, rounded once to y's dtype
    y = _activation_fp32(x, ACTIVATION)
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)

    # code = [x > c0] + [x > c1] + [x > c2]; element 4j + k goes to bits 2k..2k+1 of byte j.
    # x and y stay 1-D (16-byte vector loads/stores); only the codes are viewed as [BLOCK // 4, 4].
    code = (x > c0).to(tl.int32) + (x > c1).to(tl.int32) + (x > c2).to(tl.int32)
    # Tail elements past n load x = 0, whose code is not 0 (c1 < 0): zero them, so the unused
    # high bits of the last byte are 0 as in the reference packing.
    code = tl.where(mask, code, 0)
    shift = 2 * (tl.arange(0, BLOCK) % 4)
    # The 2-bit fields are disjoint, so summing the 4 shifted codes of a row is a bitwise or.
    packed = tl.sum(tl.reshape(code << shift, (BLOCK // 4, 4)), axis=1)
    byte_offsets = pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    tl.store(CODES + byte_offsets, packed.to(tl.uint8), mask=byte_offsets < (n_elements + 3) // 4)


@triton.jit
def _step_activation_bwd_kernel(
    DY,  # pointer to the incoming gradient dy, contiguous, n_elements long
    CODES,  # pointer to the packed 2-bit codes written by the forward kernel
    DX,  # pointer to the output gradient dx, same dtype and length as dy
    n_elements,  # number of elements of dy
    level0,  # level[code] for code = 0, 1, 2, 3, fp32
    level1,
    level2,
    level3,
    BLOCK: tl.constexpr,  # elements per program, a multiple of 4
):
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)

    # Unpack: byte j holds the codes of elements 4j .. 4j + 3, element 4j + k at bits 2k.
    byte_offsets = pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    packed = tl.load(CODES + byte_offsets, mask=byte_offsets < (n_elements + 3) // 4, other=0)
    packed = packed.to(tl.int32)
    shift = 2 * tl.arange(0, 4)
    code = tl.reshape((packed[:, None] >> shift[None, :]) & 3, (BLOCK,))

    # dx = dy * level[code], one fp32 multiply rounded once to dx's dtype
    level = tl.where(code == 0, level0, tl.where(code == 1, level1, tl.where(code == 2, level2, level3)))
    dx = dy * level
    tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)
