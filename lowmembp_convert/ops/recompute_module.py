"""Exact recompute of any pure elementwise activation module inside its consumer's backward.

The generic form of :mod:`lowmembp_convert.ops.recompute` for activations that are not torch's
GELU/SiLU bit for bit (GPT-2's ``NewGELUActivation``, ``QuickGELU``, ``FastGELU``, ``nn.Mish``,
ReLU squared, ...). ``detect`` proves the module pure and elementwise; here the module itself is
re-run on the kept input in backward:

    forward   p = act(a) [* u];  y = linear(p)                 (the stock calls, under the caller's autocast)
    backward  p = act(a) [* u]  again, with autograd recording   (same ops, same inputs: the same bits)
              dW = dy^T p,  db = sum(dy),  dp = dy W            (as the stock linear's backward)
              (da, du) = autograd of the replay at dp           (the stock derivative of the stock ops)

Saved for backward: a, u and the weight, not p nor the module's intermediates (a composite
forward such as ``0.5 x (1 + tanh(...))`` keeps three or four input-sized tensors stock).

Eager only: under ``torch.compile`` or a ``torch.func`` transform the caller runs the stock calls
(exact, without the saving).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["BY_MODULE", "module_act_linear"]

BY_MODULE = "module"  # the recompute kind that re-runs the activation module


def _consume(x: Tensor, weight: Tensor, bias: Tensor | None, layout: str) -> Tensor:
    """The consumer's stock op: ``F.linear`` or transformers' Conv1D (addmm on the flattened rows)."""
    if layout == "linear":
        return torch.nn.functional.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    out = torch.addmm(bias, rows, weight) if bias is not None else rows @ weight
    return out.view(*x.shape[:-1], weight.shape[-1])


class _ModuleActLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, u, weight, bias, act, layout, in_dtype):
        device = a.device.type
        ctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        h = act(a)
        p = h if u is None else h * u
        x = p if in_dtype is None else p.to(in_dtype)
        y = _consume(x, weight, bias, layout)
        ctx.act, ctx.layout, ctx.in_dtype = act, layout, in_dtype
        ctx.p_dtype, ctx.x_dtype = p.dtype, y.dtype  # the linear ran in its output's dtype (autocast's)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(a, u, weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "lowmembp_convert: double backward (create_graph=True) through an MLP converted with the exact "
                "recompute option is not supported; convert with activations=False (or exclude the MLP with filter_fn)"
            )
        a, u, weight = ctx.saved_tensors
        need_a, need_u, need_w, need_b = ctx.needs_input_grad[:4]
        device = a.device.type
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            a_ = a.detach().requires_grad_(need_a)
            u_ = None if u is None else u.detach().requires_grad_(need_u)
            h = ctx.act(a_)
            p = h if u_ is None else h * u_
        da = du = dweight = dbias = None
        with torch.autocast(device, enabled=False):
            x = p.detach() if ctx.in_dtype is None else p.detach().to(ctx.in_dtype)
            x2d = x.to(ctx.x_dtype).reshape(-1, x.shape[-1])
            dy2d = dy.reshape(-1, dy.shape[-1])
            if need_w:
                dweight = (dy2d.t() @ x2d if ctx.layout == "linear" else x2d.t() @ dy2d).to(ctx.weight_dtype)
            if need_b and ctx.bias_dtype is not None:
                dbias = dy2d.sum(0).to(ctx.bias_dtype)
            wanted = [t for t, need in ((a_, need_a), (u_, need_u)) if need and t is not None]
            if wanted:
                w = weight.to(ctx.x_dtype)
                dx = (dy2d @ w if ctx.layout == "linear" else dy2d @ w.t()).view(*x.shape)
                dp = (dx if ctx.in_dtype is None else dx.to(ctx.in_dtype)).to(ctx.p_dtype)
                grads = iter(torch.autograd.grad(p, wanted, dp))
                da = next(grads) if need_a else None
                du = next(grads) if need_u and u_ is not None else None
        return da, du, dweight, dbias, None, None, None


def module_act_linear(
    a: Tensor,
    u: Tensor | None,
    act: nn.Module,
    weight: Tensor,
    bias: Tensor | None,
    layout: str = "linear",
    in_dtype: torch.dtype | None = None,
) -> Tensor:
    """``consumer(act(a) [* u])`` keeping a, u (not the activation's intermediates nor its output).

    ``act`` must be pure and elementwise (``detect`` proves it); ``layout`` "linear" (weight [O, I])
    or "conv1d" (transformers' Conv1D, weight [I, O]); ``in_dtype``: the dtype the consumer casts its
    input to first (PEFT's lora_A), None for none. Forward values and gradients are the stock ones.
    """
    if layout not in ("linear", "conv1d"):
        raise ValueError(f"module_act_linear: layout must be 'linear' or 'conv1d', not {layout!r}")
    return _ModuleActLinear.apply(a, u, weight, bias, act, layout, in_dtype)
