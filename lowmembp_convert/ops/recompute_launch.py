"""Exact recompute of an MLP activation: Triton launchers and the torch reference (also the oracle).

A fused consumer that keeps only the activation input a (gated MLPs: g and u) rebuilds in backward
what the stock graph ``p = act(a)`` or ``p = act(g) * u`` would have saved, then forms the gradients:

    rebuild   plain  p = act(a)                 gated  p = round(act(g)) * u
    grads     plain  da = act_backward(dp, a)   gated  du = dp * round(act(g))
                                                       dg = act_backward(round(dp * u), g)

with ``act`` one of ``KINDS``: ``"gelu"`` (erf), ``"gelu_tanh"``, ``"silu"``. Every product and every
``act`` / ``act_backward`` result is rounded to the storage dtype, as PyTorch rounds each stock op, so
the results are the stock ones (bitwise for the reference, up to transcendental ulps for the kernels;
see ``kernels/recompute.py``).

Two tiers here (the kernels are the third):

- Triton launchers :func:`triton_rebuild` and :func:`triton_act_grads` around
  ``lowmembp_convert.kernels.recompute``, imported lazily: importing this module never imports Triton.
  Launch settings come from :func:`launch_settings` alone.
- The torch reference :func:`reference_rebuild` and :func:`reference_act_grads`: the stock ops
  (``F.gelu`` / ``F.silu``, ``aten.gelu_backward`` / ``aten.silu_backward`` and the products of mul's
  forward and backward), so they reproduce an unconverted model's tensors bit for bit. They are the
  CPU path and the test oracle of the kernels.

Nothing here is saved for backward: these are the building blocks of an autograd Function that saves
a (or g and u) only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "KINDS",
    "TRITON_DTYPES",
    "LaunchSettings",
    "launch_settings",
    "reference_act_grads",
    "reference_rebuild",
    "triton_act_grads",
    "triton_rebuild",
]

# The activations, named as the rewrite names them; "gelu" is F.gelu's default (erf) form.
KINDS: tuple[str, ...] = ("gelu", "gelu_tanh", "silu")
# Storage dtypes the kernels take (they compute in fp32); anything else takes the reference.
TRITON_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)

# The largest block: 2048 elements at 8 per thread (8 warps). The gradient kernel keeps three inputs
# and an erf/exp/tanh chain live per element, so it takes half the 16 per thread of the step kernels.
_MAX_BLOCK_SIZE = 2048
_ELEMENTS_PER_THREAD = 8


# --------------------------------------------------------------------------------------------------
# Launch settings
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchSettings:
    """Launch settings of both recompute kernels (flat 1-D, one program per block of elements)."""

    block_size: int  # BLOCK_SIZE constexpr: elements per program, a power of two
    num_warps: int
    num_programs: int  # ceil(n / block_size)

    @property
    def grid(self) -> tuple[int]:
        return (self.num_programs,)


def launch_settings(n_elements: int) -> LaunchSettings:
    """All launch settings of ``_rebuild_kernel`` and ``_act_grads_kernel``, in one place.

    A power-of-two block of 256 to 2048 elements, the smallest that holds a small tensor in one
    program (rather than one mostly masked), 8 elements per thread (1 to 8 warps).
    """
    block_size = 32 * _ELEMENTS_PER_THREAD
    while block_size < min(n_elements, _MAX_BLOCK_SIZE):
        block_size *= 2
    num_warps = max(1, block_size // (32 * _ELEMENTS_PER_THREAD))
    return LaunchSettings(block_size, num_warps, -(-n_elements // block_size))


# --------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------


def _check_kind(kind: str, op: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"{op}: kind must be one of {KINDS}, got {kind!r}")


def _check_like(name: str, t: Tensor, a: Tensor, op: str) -> None:
    """``t`` must have a's shape, dtype and device (the kernels read all of them as one flat array)."""
    if t.shape != a.shape or t.dtype != a.dtype or t.device != a.device:
        raise ValueError(
            f"{op}: {name} must match a in shape, dtype and device; got {name} {tuple(t.shape)} {t.dtype} "
            f"{t.device}, a {tuple(a.shape)} {a.dtype} {a.device} (cast or broadcast {name} before the call)"
        )


def _check_triton_dtype(a: Tensor, op: str) -> None:
    if a.dtype not in TRITON_DTYPES:
        raise TypeError(f"{op}: the kernels take float32, float16 or bfloat16, got {a.dtype}; use the reference_*")


# --------------------------------------------------------------------------------------------------
# Triton launchers
# --------------------------------------------------------------------------------------------------


def _activation_id(kind: str) -> int:
    from lowmembp_convert.kernels import activations as kernels

    return {"gelu": kernels.GELU_ERF, "gelu_tanh": kernels.GELU_TANH, "silu": kernels.SILU}[kind]


def _device_guard(t: Tensor):
    # Launch on t's GPU, not the current one.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def triton_rebuild(a: Tensor, u: Tensor | None, kind: str) -> Tensor:
    """Rebuild the consumer's input: ``p = act(a)``, or ``p = act(g) * u`` with ``a = g``, on the Triton kernel.

    Args:
        a: the activation's input (the gate g of a gated MLP), any shape and strides (copied when not
            contiguous), float32, float16 or bfloat16.
        u: the up projection of a gated MLP, a's shape, dtype and device; None for a plain MLP.
        kind: ``"gelu"``, ``"gelu_tanh"`` or ``"silu"``.

    Returns:
        p, contiguous, a's shape and dtype: ``round(act(a))``, or ``round(float32(round(act(a))) *
        float32(u))`` when gated; act computed in float32.
    """
    op = "triton_rebuild"
    _check_kind(kind, op)
    _check_triton_dtype(a, op)
    if u is not None:
        _check_like("u", u, a, op)
    from lowmembp_convert.kernels import recompute as kernels

    a = a.contiguous()
    u = u.contiguous() if u is not None else None
    p = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    n = a.numel()
    if n == 0:
        return p
    s = launch_settings(n)
    with _device_guard(a):
        kernels._rebuild_kernel[s.grid](
            a,
            u if u is not None else a,  # never read without GATED
            p,
            n,
            ACTIVATION=_activation_id(kind),
            GATED=u is not None,
            BLOCK_SIZE=s.block_size,
            num_warps=s.num_warps,
        )
    return p


def triton_act_grads(dp: Tensor, a: Tensor, u: Tensor | None, kind: str) -> tuple[Tensor, Tensor | None]:
    """Gradients of ``p = act(a)`` (or ``p = act(g) * u`` with ``a = g``) from dp, on the Triton kernel.

    Args:
        dp: gradient of p, a's shape, dtype and device, any strides.
        a: the activation's input (the gate g when gated), any shape and strides, float32, float16 or
            bfloat16.
        u: the up projection of a gated MLP, a's shape, dtype and device; None for a plain MLP.
        kind: ``"gelu"``, ``"gelu_tanh"`` or ``"silu"``.

    Returns:
        ``(da, du)``, contiguous, a's shape and dtype. Plain: ``da = round(dp * act'(a))``, du None.
        Gated: ``du = round(dp * round(act(a)))`` and ``da = round(round(dp * u) * act'(a))``.
    """
    op = "triton_act_grads"
    _check_kind(kind, op)
    _check_triton_dtype(a, op)
    _check_like("dp", dp, a, op)
    if u is not None:
        _check_like("u", u, a, op)
    from lowmembp_convert.kernels import recompute as kernels

    dp, a = dp.contiguous(), a.contiguous()
    u = u.contiguous() if u is not None else None
    da = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    du = torch.empty(a.shape, dtype=a.dtype, device=a.device) if u is not None else None
    n = a.numel()
    if n == 0:
        return da, du
    s = launch_settings(n)
    with _device_guard(a):
        kernels._act_grads_kernel[s.grid](
            dp,
            a,
            u if u is not None else a,  # never read without GATED
            da,
            du if du is not None else da,  # never written without GATED
            n,
            ACTIVATION=_activation_id(kind),
            GATED=u is not None,
            BLOCK_SIZE=s.block_size,
            num_warps=s.num_warps,
        )
    return da, du


# --------------------------------------------------------------------------------------------------
# Torch reference (the stock ops; also the oracle of the kernels)
# --------------------------------------------------------------------------------------------------


def _stock_activation(a: Tensor, kind: str) -> Tensor:
    if kind == "silu":
        return F.silu(a)
    return F.gelu(a, approximate="tanh" if kind == "gelu_tanh" else "none")


def _stock_activation_backward(grad: Tensor, a: Tensor, kind: str) -> Tensor:
    # What autograd runs for F.silu / F.gelu.
    if kind == "silu":
        return torch.ops.aten.silu_backward(grad, a)
    return torch.ops.aten.gelu_backward(grad, a, approximate="tanh" if kind == "gelu_tanh" else "none")


def reference_rebuild(a: Tensor, u: Tensor | None, kind: str) -> Tensor:
    """``F.gelu(a)`` / ``F.gelu(a, approximate="tanh")`` / ``F.silu(a)``, then ``* u`` when gated.

    The stock ops on the tensors as given (torch's strided CPU loops may round differently from its
    contiguous ones, and the stock model ran them on these layouts), so p is bit for bit what the
    unconverted model computed. Any float dtype (float64 too).

    Args:
        a: the activation's input (the gate g when gated), any shape and strides.
        u: the up projection of a gated MLP, a's shape, dtype and device; None for a plain MLP.
        kind: ``"gelu"``, ``"gelu_tanh"`` or ``"silu"``.

    Returns:
        p, contiguous, a's shape and dtype.
    """
    op = "reference_rebuild"
    _check_kind(kind, op)
    if u is not None:
        _check_like("u", u, a, op)
    h = _stock_activation(a, kind)
    p = h if u is None else h * u
    return p.contiguous()


def reference_act_grads(dp: Tensor, a: Tensor, u: Tensor | None, kind: str) -> tuple[Tensor, Tensor | None]:
    """The gradients autograd gives for the stock ``p = act(a)`` or ``p = act(g) * u`` (a = g).

    Plain: ``da = act_backward(dp, a)``. Gated: mul's backward ``dh = dp * u`` and ``du = dp * h``
    with ``h = act(a)`` recomputed by the stock op (the tensor the stock graph saved), then
    ``da = act_backward(dh, a)``; ``act_backward`` is ``aten.gelu_backward`` / ``aten.silu_backward``.
    Each op rounds to the storage dtype, as in the stock backward. Any float dtype (float64 too).

    Args:
        dp: gradient of p, a's shape, dtype and device.
        a: the activation's input (the gate g when gated), any shape and strides.
        u: the up projection of a gated MLP, a's shape, dtype and device; None for a plain MLP.
        kind: ``"gelu"``, ``"gelu_tanh"`` or ``"silu"``.

    Returns:
        ``(da, du)``, contiguous, a's shape and dtype; du is None when u is None.
    """
    op = "reference_act_grads"
    _check_kind(kind, op)
    _check_like("dp", dp, a, op)
    if u is None:
        return _stock_activation_backward(dp, a, kind).contiguous(), None
    _check_like("u", u, a, op)
    h = _stock_activation(a, kind)
    dh = dp * u
    du = dp * h
    return _stock_activation_backward(dh, a, kind).contiguous(), du.contiguous()
