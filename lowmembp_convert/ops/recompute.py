"""Exact recompute of an MLP activation inside its consumer's backward (docs/method.md section 7).

Stock, a plain MLP ``fc2(act(a))`` keeps two I-sized tensors for backward (act's input a, fc2's input
h = act(a)); a gated MLP ``down(act(g) * u)`` keeps four (g, u, act(g), the product p). The fused op
here computes the same forward (the stock ops, in the stock order) but keeps only a (or g and u):

    forward   p = act(a) [* u];  y = p W^T + b          (linear)  or  y = b + p W  (HF Conv1D, addmm)
    backward  p = act(a) [* u]                           rebuilt from the kept tensors (pass 1)
              dW = dy^T p,  db = sum(dy),  dp = dy W
              da = act'(a) * dp [* u],  du = dp * act(a)  (pass 2)

Both elementwise passes are Triton kernels on a GPU (``ops/recompute_launch.py``), the torch
reference otherwise. Gradients are the exact ones (no approximation); the rebuilt p equals the
forward's bit for bit.

Saved for backward: a, u (None for a plain MLP), and the weight (a parameter, kept anyway).

Kind ``"none"`` (:func:`upcast_linear`) is the same op without an activation: ``y = linear(a.to(W.dtype))``
keeps a in its narrow dtype instead of the upcast copy (PEFT's fp32 adapters on a bf16 model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lowmembp_convert.dispatch import use_triton

__all__ = ["act_linear", "upcast_linear", "KINDS", "LAYOUTS", "exact_upcast"]

KINDS = ("gelu", "gelu_tanh", "silu")
_ALL_KINDS = (*KINDS, "none")  # "none": no activation, only the cast (upcast_linear)
LAYOUTS = ("linear", "conv1d")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _act(a: Tensor, kind: str) -> Tensor:
    if kind == "none":
        return a
    if kind == "silu":
        return F.silu(a)
    return F.gelu(a, approximate="tanh" if kind == "gelu_tanh" else "none")


def _launchers():
    from lowmembp_convert.ops import recompute_launch  # lazy: importing ops must not import triton

    return recompute_launch


def _takes_triton(a: Tensor, kind: str) -> bool:
    return kind != "none" and a.dtype in _KERNEL_DTYPES and use_triton(a)


def rebuild(a: Tensor, u: Tensor | None, kind: str) -> Tensor:
    """p = act(a) [* u], with the stock ops' rounding (act rounded to a's dtype, then the product)."""
    if _takes_triton(a, kind) and (u is None or u.dtype == a.dtype):
        return _launchers().triton_rebuild(a, u, kind)
    h = _act(a, kind)
    return h if u is None else h * u


def act_grads(dp: Tensor, a: Tensor, u: Tensor | None, kind: str) -> tuple[Tensor, Tensor | None]:
    """(da, du) from dp = dL/dp, as the stock mul and activation backward compute them."""
    if _takes_triton(a, kind) and dp.dtype == a.dtype and (u is None or u.dtype == a.dtype):
        return _launchers().triton_act_grads(dp, a, u, kind)
    if kind == "none":
        return dp, None
    if u is None:
        dh, du = dp, None
    else:
        dh, du = dp * u, dp * _act(a, kind)
    if kind == "silu":
        da = torch.ops.aten.silu_backward(dh, a)
    else:
        da = torch.ops.aten.gelu_backward(dh, a, approximate="tanh" if kind == "gelu_tanh" else "none")
    return da, du


def _linear(p: Tensor, weight: Tensor, bias: Tensor | None, layout: str) -> Tensor:
    if layout == "linear":
        return F.linear(p, weight, bias)
    # transformers' Conv1D: addmm on the flattened rows, weight [in, out]
    out = torch.addmm(bias, p.view(-1, p.shape[-1]), weight) if bias is not None else p.view(-1, p.shape[-1]) @ weight
    return out.view(*p.shape[:-1], weight.shape[-1])


@torch.library.custom_op("lowmembp::act_linear", mutates_args=())
def _act_linear(
    a: Tensor,
    u: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    kind: str,
    layout: str,
    p_dtype: torch.dtype,
    x_dtype: torch.dtype,
) -> Tensor:
    """y = linear(p.to(x_dtype)) with p = act(a) [* u] rounded to p_dtype: the stock ops (a consumer
    that casts its input first, as PEFT's lora_A does, gets ``x_dtype`` != ``p_dtype``)."""
    with torch.autocast(a.device.type, enabled=False):
        p = rebuild(a, u, kind).to(p_dtype).to(x_dtype)
        return _linear(p, weight, bias, layout)


@_act_linear.register_fake
def _(a, u, weight, bias, kind, layout, p_dtype, x_dtype):
    out = weight.shape[0] if layout == "linear" else weight.shape[1]
    return a.new_empty((*a.shape[:-1], out), dtype=x_dtype)


def _setup_context(ctx, inputs, output) -> None:
    a, u, weight, bias, kind, layout, p_dtype, x_dtype = inputs
    # the whole saved state: a, u and the weight (only when a or u needs its gradient: under autocast
    # the weight is a fresh 16-bit cast); not act(a), not p
    needs_dp = a.requires_grad or (u is not None and u.requires_grad)
    ctx.save_for_backward(a, u, weight if needs_dp else None)
    ctx.weight_dtype = weight.dtype
    ctx.kind, ctx.layout, ctx.p_dtype, ctx.x_dtype = kind, layout, p_dtype, x_dtype
    ctx.has_bias = bias is not None


def _backward(ctx, dy: Tensor):
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        if ctx.kind == "none":
            raise RuntimeError(
                "lowmembp_convert: double backward (create_graph=True) through a LoRA adapter whose input is "
                "kept narrow is not supported; convert with adapter_inputs=False"
            )
        raise RuntimeError(
            "lowmembp_convert: double backward (create_graph=True) through an MLP converted with the exact "
            "recompute option is not supported; convert with activations=False (or exclude the MLP with filter_fn)"
        )
    a, u, weight = ctx.saved_tensors
    need_a, need_u, need_w, need_b = ctx.needs_input_grad[:4]
    with torch.autocast(dy.device.type, enabled=False):
        dy2d = dy.reshape(-1, dy.shape[-1])
        dweight = dbias = da = du = None
        if need_w:
            p2d = rebuild(a, u, ctx.kind).to(ctx.p_dtype).to(ctx.x_dtype).reshape(-1, a.shape[-1])
            dweight = dy2d.t() @ p2d if ctx.layout == "linear" else p2d.t() @ dy2d
            dweight = dweight.to(ctx.weight_dtype)
        if need_b and ctx.has_bias:
            dbias = dy2d.sum(0)
        if need_a or need_u:
            dp = (dy2d @ weight if ctx.layout == "linear" else dy2d @ weight.t()).view(*a.shape[:-1], -1)
            da, du = act_grads(dp.to(ctx.p_dtype), a, u, ctx.kind)
            da = da.to(a.dtype) if need_a else None
            du = du.to(u.dtype) if (need_u and du is not None) else None
    return da, du, dweight, dbias, None, None, None, None


_act_linear.register_autograd(_backward, setup_context=_setup_context)


def act_linear(
    a: Tensor,
    u: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    kind: str,
    layout: str = "linear",
    in_dtype: torch.dtype | None = None,
) -> Tensor:
    """``linear(act(a) * u)`` (``u`` None: ``linear(act(a))``) keeping only a and u for backward.

    Args:
        a: the activation's input [..., I] (g for a gated MLP).
        u: the other factor of a gated MLP [..., I], or None.
        weight: the consumer's weight, [O, I] (``linear``) or [I, O] (``conv1d``: transformers' Conv1D).
        bias: the consumer's bias [O] or None.
        kind: "gelu", "gelu_tanh" or "silu".
        layout: "linear" or "conv1d".
        in_dtype: the dtype the consumer casts its input to first (PEFT's lora_A: its weight's dtype,
            an exact upcast of p's); None: p's own dtype.

    Under autocast the weight, bias and p are cast to the autocast dtype, as autocast's own linear
    would; p in the dtype the product has otherwise.
    """
    if kind not in KINDS or layout not in LAYOUTS:
        raise ValueError(f"act_linear: kind must be one of {KINDS} and layout one of {LAYOUTS}")
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        # torch.func transforms: the stock ops (exact; only the memory saving is not had there)
        return _linear(rebuild(a, u, kind).to(in_dtype or weight.dtype), weight, bias, layout)
    p_dtype = a.dtype if u is None else torch.promote_types(a.dtype, u.dtype)
    x_dtype = in_dtype or p_dtype
    if x_dtype != p_dtype and not exact_upcast(p_dtype, x_dtype):
        raise ValueError(f"act_linear: in_dtype {x_dtype} is not an exact upcast of the product's {p_dtype}")
    if torch.is_autocast_enabled(a.device.type):
        low = torch.get_autocast_dtype(a.device.type)
        p_dtype = x_dtype = low
        weight = weight.to(low)
        bias = bias.to(low) if bias is not None else None
    return _act_linear(a, u, weight, bias, kind, layout, p_dtype, x_dtype)


def exact_upcast(narrow: torch.dtype, wide: torch.dtype) -> bool:
    """Every value of ``narrow`` is a value of ``wide`` (so ``x.to(wide).to(narrow)`` is ``x``)."""
    exact = {torch.float16: (torch.float32, torch.float64), torch.bfloat16: (torch.float32, torch.float64)}
    exact[torch.float32] = (torch.float64,)
    return wide in exact.get(narrow, ())


def upcast_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x.to(weight.dtype), weight, bias)`` keeping x (narrow) for backward, not the upcast copy.

    Forward and gradients are those of the two stock ops (the upcast is exact, so the copy is
    rebuilt bit for bit in backward); the input gradient is rounded back to x's dtype, as the
    stock cast's backward does.
    """
    if not exact_upcast(x.dtype, weight.dtype):
        raise ValueError(f"upcast_linear: {x.dtype} -> {weight.dtype} is not an exact upcast")
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        return F.linear(x.to(weight.dtype), weight, bias)
    p_dtype, x_dtype = x.dtype, weight.dtype
    if torch.is_autocast_enabled(x.device.type):
        p_dtype = x_dtype = torch.get_autocast_dtype(x.device.type)
        weight = weight.to(x_dtype)
        bias = bias.to(x_dtype) if bias is not None else None
    return _act_linear(x, None, weight, bias, "none", "linear", p_dtype, x_dtype)
