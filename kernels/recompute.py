"""Triton kernels of the exact-recompute MLP rewrite: rebuild p from the activation's input, then its gradients.

A fused consumer keeps only the activation input a (gated MLPs: the gate g and the up projection u)
instead of h = act(a) (and p = act(g) * u). Backward rebuilds p and forms the activation's input
gradients from a, u and dp, with the roundings of PyTorch's own ops, so the result is what the stock
graph ``p = act(a)`` / ``p = act(g) * u`` gives.

Rebuild, one pass over a (and u):

    plain   p = round(act(a))                                       act in fp32, one rounding
    gated   h = round(act(g)),  p = round(float32(h) * float32(u))  two roundings, as F.gelu then * u

Gradients, one pass over dp, a (and u):

    plain   da = round(dp * act'(a))
    gated   dh = round(dp * u)                      mul backward, rounded to the storage dtype
            du = round(dp * h),  h = round(act(g))  the h the stock graph saved
            dg = round(dh * act'(g))

``round`` is the cast of an fp32 value to the storage dtype (a no-op for fp32); everything between
roundings is fp32. act is ``_activation_fp32`` of ``kernels/activations.py`` (PyTorch's CUDA forward
formulas); act' follows PyTorch's CUDA backward kernels term for term (``ActivationGeluKernel.cu``,
``ActivationSiluKernel.cu``; the CPU kernels use the same order):

    erf-GELU   cdf = 0.5 * (1 + erf(x / sqrt(2))),  pdf = exp(-0.5 * x * x) / sqrt(2 pi)
               dx  = dy * (cdf + x * pdf)                               act' = Phi(x) + x phi(x)
    tanh-GELU  t = tanh(k * (x + 0.044715 x^3)),  k = sqrt(2 / pi)
               dx = dy * (0.5 * (1 + t) + 0.5 x * (1 - t^2) * k * (1 + 3 * 0.044715 x^2))
    SiLU       s = 1 / (1 + exp(-x)),  dx = dy * s * (1 + x * (1 - s))     ((dy * s) first, as CUDA)

exp and tanh are the ``_exp`` / ``_tanh`` helpers of ``kernels/activations.py``: libdevice on a GPU
(the functions PyTorch's kernels call), numpy's float32 exp under the interpreter. Divisions are
``div_rn`` (Triton's ``/`` is an approximate division on NVIDIA GPUs). Like nvcc, Triton may contract
a multiply and an add into one fma on a GPU, so a result can differ from PyTorch's by an ulp there.

Flat 1-D over the n elements of contiguous tensors; int64 offsets (tensors past 2^31 elements), every
load and store masked, nothing that needs a GPU (the kernels run under ``TRITON_INTERPRET=1``).
"""

import triton
import triton.language as tl

from .activations import _activation_fp32, _exp, _tanh


@triton.jit
def _activation_grad_fp32(dy, x, ACTIVATION: tl.constexpr):
    """dy * act'(x) for fp32 tiles, in the operation order of PyTorch's CUDA backward kernels."""
    if ACTIVATION == 0:  # GELU_ERF
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))  # 1 / sqrt(2)
        pdf = _exp(-0.5 * x * x) * 0.3989422804014327  # 1 / sqrt(2 pi)
        dx = dy * (cdf + x * pdf)
    elif ACTIVATION == 1:  # GELU_TANH
        x_sq = x * x
        x_cube = x_sq * x
        inner = 0.7978845608028654 * (x + 0.044715 * x_cube)  # sqrt(2 / pi)
        tanh_inner = _tanh(inner)
        left = 0.5 * x
        right = 1.0 + tanh_inner
        left_derivative = 0.5 * right
        tanh_derivative = 1.0 - tanh_inner * tanh_inner
        # 0.13414499163627625 = float32(3) * float32(0.044715) rounded to fp32, as CUDA folds 3 * kKappa
        # (the exact 3 * 0.044715 rounds to a different fp32 value).
        inner_derivative = 0.7978845608028654 * (1.0 + 0.13414499163627625 * x_sq)
        right_derivative = left * tanh_derivative * inner_derivative
        dx = dy * (left_derivative + right_derivative)
    else:  # SILU
        s = tl.math.div_rn(1.0, 1.0 + _exp(-x))
        dx = dy * s * (1.0 + x * (1.0 - s))
    return dx


@triton.jit
def _rebuild_kernel(
    A,  # pointer to the activation input a (g when gated), contiguous, n_elements long
    U,  # pointer to the up projection u, same dtype and length (read only when GATED)
    P,  # pointer to the output p = act(a) or act(g) * u, same dtype and length
    n_elements,  # number of elements of a
    ACTIVATION: tl.constexpr,  # GELU_ERF, GELU_TANH or SILU of kernels/activations.py
    GATED: tl.constexpr,  # p = act(g) * u instead of p = act(a)
    BLOCK_SIZE: tl.constexpr,  # elements per program, a power of two
):
    # int64 offsets: tensors with more than 2^31 elements must not wrap.
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    a = tl.load(A + offsets, mask=mask, other=0.0).to(tl.float32)

    # h = round(act(a)): fp32 math, one rounding to the storage dtype, as F.gelu / F.silu
    h = _activation_fp32(a, ACTIVATION).to(P.dtype.element_ty)
    if GATED:
        # p = round(float32(h) * float32(u)), as the stock h * u
        u = tl.load(U + offsets, mask=mask, other=0.0).to(tl.float32)
        p = (h.to(tl.float32) * u).to(P.dtype.element_ty)
    else:
        p = h
    tl.store(P + offsets, p, mask=mask)


@triton.jit
def _act_grads_kernel(
    DP,  # pointer to the incoming gradient dp, contiguous, n_elements long, dtype of a
    A,  # pointer to the activation input a (g when gated), same dtype and length
    U,  # pointer to the up projection u, same dtype and length (read only when GATED)
    DA,  # pointer to the output da (dg when gated), same dtype and length
    DU,  # pointer to the output du, same dtype and length (written only when GATED)
    n_elements,  # number of elements of a
    ACTIVATION: tl.constexpr,  # GELU_ERF, GELU_TANH or SILU of kernels/activations.py
    GATED: tl.constexpr,  # p = act(g) * u: also write du, and dg from dh = round(dp * u)
    BLOCK_SIZE: tl.constexpr,  # elements per program, a power of two
):
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    dp = tl.load(DP + offsets, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + offsets, mask=mask, other=0.0).to(tl.float32)

    if GATED:
        u = tl.load(U + offsets, mask=mask, other=0.0).to(tl.float32)
        # du = round(dp * h) with the h the stock forward saved: h = round(act(g))
        h = _activation_fp32(a, ACTIVATION).to(DA.dtype.element_ty).to(tl.float32)
        tl.store(DU + offsets, (dp * h).to(DU.dtype.element_ty), mask=mask)
        # dh = round(dp * u): mul backward hands gelu/silu backward a gradient in the storage dtype
        dh = (dp * u).to(DA.dtype.element_ty).to(tl.float32)
    else:
        dh = dp

    # da = round(dh * act'(a))
    da = _activation_grad_fp32(dh, a, ACTIVATION)
    tl.store(DA + offsets, da.to(DA.dtype.element_ty), mask=mask)
