"""Cross-entropy of a linear head with the gradients computed in the forward pass, chunk by chunk.

For ``loss_head="fused"``: the logits never exist beyond one chunk of rows, in forward or backward.

    forward   per chunk of rows: logits = linear(h, W, b) in the head's dtype (the head's GEMM, as
              stock runs it), the elementwise recipe (softcapping), the float32 upcast, log_softmax,
              the target's entry (the stock per-row loss); and, in the same pass, the stock gradient
              of the loss with grad_output = 1 (nll_loss's -1/divisor at the target, log_softmax's
              backward, cast to the logits' dtype, the recipe's derivative): dh = dlogits W,
              dW += dlogits^T h, db += sum(dlogits), accumulated in float32.
    kept      dh (rows x hidden), dW (vocab x hidden), db (vocab), each rounded once to its input's dtype
              (bfloat16 for a bf16 model; float32 for float32 and float16 ones), each only when that
              input needs a gradient (a frozen head keeps no dW); nothing of rows x vocabulary.
    backward  dh, dW, db times grad_output, cast to the input's and parameters' dtypes. No GEMM.

Head GEMMs: three per chunk (the forward's and the two gradient GEMMs), stock's count; the exact
head (ops/linear_cross_entropy.py) needs four. The loss is the stock one up to the order of a float32
sum; gradients are the stock formula, rounded once to the parameters' dtype and scaled by grad_output
in backward (float16 keeps float32, so a GradScaler's scale cannot underflow them). In float16 each
chunk's dlogits is scaled by a power of two before the cast (the unscaled 1/divisor would underflow
where a GradScaler'd stock does not) and unscaled in float32 after the GEMMs (exact: powers of two).

On a GPU (the Triton path of ``dispatch.use_triton``), a chunk with no recipe in float32 or bfloat16
goes through the row kernel instead of torch's softmax ops (``ops/cross_entropy_rows.py``: one
online log-sum-exp pass and the gradient written over the chunk's logits, no float32 copy of it).

Eager; the caller (the fused head) runs only while autograd records, outside
``torch.compile`` and ``torch.func``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..dispatch import use_triton
from .cross_entropy_rows import ce_rows_grad_
from .linear_cross_entropy import chunk_rows_for, refuse_double_backward

__all__ = ["fused_linear_cross_entropy", "linear_dtype"]

_BLOCK_FLOAT32_BYTES = 64 * 2**20  # backward's grad_output scaling and cast, this much at a time


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, target, divisor, ignore_index, chunk, recipe, autocast, needs):
        need_h, need_w, need_b = needs
        device_type, enabled, autocast_dtype = autocast
        dtype = linear_dtype(h, enabled, autocast_dtype)  # what the head's GEMM returns (autocast casts)
        h_mm, w_mm = h.to(dtype), weight.to(dtype)
        b_mm = bias.to(dtype) if bias is not None else None
        rows = h.shape[0]
        total = h.new_zeros((), dtype=torch.float32)
        dh = h.new_empty(h.shape, dtype=torch.float32) if need_h else None
        dw = weight.new_zeros(weight.shape, dtype=torch.float32) if need_w else None
        db = bias.new_zeros(bias.shape, dtype=torch.float32) if need_b else None
        scale = (1.0 / divisor).float()  # nll_loss's 1 / total_weight (grad_output 1)
        # float16: dlogits scaled by 2^k ~ divisor before the cast (max |dlogits| <= 1), unscaled after the GEMMs
        half_unscale = 2.0 ** -math.floor(math.log2(max(1.0, float(divisor)))) if dtype == torch.float16 else 1.0
        for start in range(0, rows, chunk):
            part = slice(start, start + chunk)
            h_c, t = h_mm[part], target[part]
            logits = F.linear(h_c, w_mm, b_mm)  # the head's GEMM (autocast's casts done above, once)
            if _row_kernel_applies(logits, recipe, need_h or need_w or need_b):
                # one pass of the row kernel: the chunk's loss, and its gradient written over the logits
                loss_rows, _lse = ce_rows_grad_(logits, t, scale.reshape(1), ignore_index)
                total = total + loss_rows.sum()
                _accumulate(logits, h_c, w_mm, part, dh, dw, db, 1.0)
                continue
            z = logits
            if recipe is not None:  # e.g. softcapping, as the model ran it; autograd gives its derivative
                with torch.enable_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=enabled):
                    logits = logits.requires_grad_(True)
                    z = recipe(logits)
            logp = torch.log_softmax(z.detach().float(), dim=-1)
            valid = t != ignore_index
            index = torch.where(valid, t, 0).unsqueeze(1)
            total = total - torch.where(valid, logp.gather(1, index).squeeze(1), 0.0).sum()
            if not (need_h or need_w or need_b):
                continue
            dlogp = torch.zeros_like(logp)
            dlogp.scatter_(1, index, torch.where(valid, -scale, 0.0).unsqueeze(1))
            dz = torch.ops.aten._log_softmax_backward_data(dlogp, logp, 1, torch.float32)
            del logp, dlogp
            unscale = half_unscale if z.dtype == torch.float16 else 1.0  # out of float16's subnormals
            if unscale != 1.0:
                dz.mul_(1.0 / unscale)
            dz = dz.to(z.dtype)  # the upcast's backward, as stock
            dlogits = dz if recipe is None else torch.autograd.grad(z, logits, dz)[0]
            del dz, z
            logits = None
            _accumulate(dlogits, h_c, w_mm, part, dh, dw, db, unscale)
        ctx.save_for_backward(*(kept_gradient(t, like) for t, like in ((dh, h), (dw, weight), (db, bias))))
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total / divisor

    @staticmethod
    def backward(ctx, grad):
        refuse_double_backward("fused")
        dh, dw, db = ctx.saved_tensors
        g = grad.float()
        grads = [
            _scaled(t, g, dtype) if t is not None else None for t, dtype in zip((dh, dw, db), ctx.dtypes, strict=True)
        ]
        return (*grads, None, None, None, None, None, None, None)


def _row_kernel_applies(logits: Tensor, recipe, needs_grad: bool) -> bool:
    """The Triton row kernel (``ops/cross_entropy_rows.py``) replaces torch's log_softmax, gather and
    their backward for a chunk: on its path (a GPU), with no recipe, in float32 / bfloat16 (float16 takes
    the torch ops with their rescale), when some gradient is wanted. Its online log-sum-exp rounds in
    another order than torch's: within a few float32 ulps of the stock values."""
    return (
        needs_grad
        and recipe is None
        and logits.dtype in (torch.float32, torch.bfloat16)
        and use_triton(logits)
        and logits.stride(-1) == 1
    )


def kept_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a finished float32 gradient is kept in until backward: its input's own (one rounding,
    where stock's GEMM rounds its result too), except float16, whose range a GradScaler'd grad_output
    would leave: float32 there (and for float32 inputs)."""
    return torch.float32 if dtype in (torch.float16, torch.float32) else dtype


def kept_gradient(t: Tensor | None, like: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(kept_dtype(like.dtype))


def _accumulate(dlogits, h_c, w_mm, part, dh, dw, db, unscale: float) -> None:
    """Add one chunk's share of the gradients: dh rows, dW and db (float32 accumulators)."""
    if dh is not None:
        dh[part] = dlogits @ w_mm
        if unscale != 1.0:
            dh[part] *= unscale
    if dw is not None:
        if dlogits.dtype == torch.float32:  # accumulate inside the GEMM (no vocab x hidden temporary)
            dw.addmm_(dlogits.t(), h_c, alpha=unscale)
        else:  # 16-bit: the GEMM in the head's dtype, as stock, summed in float32
            dw.add_(dlogits.t() @ h_c, alpha=unscale)
    if db is not None:
        db.add_(dlogits.sum(0, dtype=torch.float32), alpha=unscale)


def linear_dtype(h: Tensor, autocast_enabled: bool, autocast_dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``F.linear(h, W)`` under the head's autocast state (autocast casts floating inputs
    other than float64 to its dtype; without it the inputs share one dtype)."""
    if autocast_enabled and h.is_floating_point() and h.dtype != torch.float64:
        return autocast_dtype
    return h.dtype


def _scaled(t: Tensor, g: Tensor, dtype: torch.dtype) -> Tensor:
    """``(t * g).to(dtype)`` in blocks of rows, so the float32 product is never whole when dtype differs."""
    if dtype == torch.float32:
        return t * g
    out = torch.empty(t.shape, dtype=dtype, device=t.device)
    step = max(1, _BLOCK_FLOAT32_BYTES // max(1, 4 * (t[0].numel() if t.dim() > 1 else 1)))
    for start in range(0, t.shape[0], step):
        out[start : start + step] = t[start : start + step] * g
    return out


def fused_linear_cross_entropy(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    ignore_index: int = -100,
    divisor: Tensor | None = None,
    chunk: int | None = None,
    recipe=None,
    autocast: tuple | None = None,
) -> Tensor:
    """``cross_entropy(recipe(linear(h, weight, bias)).float(), target, ignore_index)`` summed over rows
    and divided by ``divisor``, differentiable in h, weight and bias, without materialising the logits.

    Args:
        h: the head's input, [rows, hidden].
        weight, bias: the head's (a plain Linear: [vocab, hidden], [vocab] or None).
        target: class index per row, int64 [rows]; ``ignore_index`` rows count for nothing.
        divisor: None for the mean over the rows that count, or e.g. transformers' ``num_items_in_batch``.
        chunk: rows per chunk (default :func:`~lowmembp_convert.ops.linear_cross_entropy.chunk_rows_for`).
        recipe: elementwise function from the head's output to the logits the loss gets, or None.
        autocast: (device type, enabled, dtype) in force when the head was called (default: now).

    Kept for backward: float32 dh [rows, hidden], dW [vocab, hidden] and db [vocab], each only where
    that input requires grad (and grad mode is on).
    """
    if h.dim() != 2 or target.dim() != 1 or h.shape[0] != target.shape[0]:
        raise ValueError("fused_linear_cross_entropy: h [rows, hidden] and target [rows] expected")
    if divisor is None:
        divisor = (target != ignore_index).sum()
    divisor = torch.as_tensor(divisor, device=h.device).float()
    if autocast is None:
        device_type = h.device.type
        autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    chunk = chunk or chunk_rows_for(h.shape[0], weight.shape[0])
    grad = torch.is_grad_enabled()
    needs = (
        grad and h.requires_grad,
        grad and weight.requires_grad,
        grad and bias is not None and bias.requires_grad,
    )
    return _FusedLinearCrossEntropy.apply(
        h, weight, bias, target, divisor, ignore_index, chunk, recipe, autocast, needs
    )
