"""Cross-entropy of a linear head without keeping anything of size rows x vocabulary for backward.

Stock, ``F.cross_entropy(logits.float(), target)`` keeps the float32 log-probabilities (4 bytes per
row and vocabulary entry: for a 152k vocabulary and 512 tokens, 298 MiB) for backward. Here:

    forward   loss from the logits the head already computed (rows in chunks: float32 upcast,
              log_softmax, the target's entry), which are the stock per-row values; kept: nothing
              but the head's input h (which the head keeps anyway), the targets and the divisor
    backward  per chunk of rows: logits = head(h) again (the same op), log_softmax, then the stock
              gradients: nll_loss's (-g / divisor at the target) and log_softmax's backward, cast
              to the logits' dtype; dh = dlogits W, dW += dlogits^T h, db += sum(dlogits)

So the saved bytes drop by the whole float32 log-probability tensor, and the backward's transient
is one chunk of logits instead of all of them. The price is the head's forward GEMM again in
backward (head FLOPs x 4/3). The loss is the stock one up to the order of a float32 sum (chunks);
gradients are the stock formula (a chunk's GEMM may round a logit differently from the full
GEMM's by one unit in the last place, which is within the rounding stock itself has).

Eager, on torch ops (any device): under ``torch.compile`` or ``torch.func`` the caller takes the
stock loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["chunk_rows_for", "linear_cross_entropy"]

_CHUNK_FLOAT32_BYTES = 64 * 2**20  # one chunk's float32 logits at most (a floor of 64 rows)


def refuse_double_backward(head: str) -> None:
    """Second derivatives through the loss head are not implemented: say so (grad mode is on inside a
    backward only under ``create_graph=True``)."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"lowmembp_convert: double backward (create_graph=True) through the {head} loss head is not supported; "
            "convert with loss_head=False"
        )


def chunk_rows_for(rows: int, vocab: int) -> int:
    """Rows per chunk: float32 logits of at most 64 MiB per chunk, a power of two, 64 rows or more."""
    limit = max(64, _CHUNK_FLOAT32_BYTES // (4 * max(1, vocab)))
    return min(max(1, rows), 1 << (limit.bit_length() - 1))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, logits, target, ignore_index, divisor, chunk, recipe):
        device = h.device.type
        ctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        rows = logits.shape[0]
        total = logits.new_zeros((), dtype=torch.float32)
        for start in range(0, rows, chunk):
            part = logits[start : start + chunk].float()
            t = target[start : start + chunk]
            valid = t != ignore_index
            logp = torch.log_softmax(part, dim=-1)
            picked = logp.gather(1, torch.where(valid, t, 0).unsqueeze(1)).squeeze(1)
            total = total - torch.where(valid, picked, 0.0).sum()
        ctx.save_for_backward(h, weight, bias, target, divisor)
        ctx.ignore_index, ctx.chunk, ctx.recipe = ignore_index, chunk, recipe
        ctx.logits_dtype = logits.dtype
        return total / divisor

    @staticmethod
    def backward(ctx, grad):
        refuse_double_backward("exact")
        h, weight, bias, target, divisor = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        scale = (grad.float() / divisor).to(torch.float32)  # nll_loss's -g / total_weight, negated below
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        db = torch.zeros_like(bias, dtype=torch.float32) if need_b and bias is not None else None
        enabled, dtype = ctx.autocast
        for start in range(0, h.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            h_c, t = h[rows], target[rows]
            with torch.autocast(h.device.type, dtype=dtype, enabled=enabled):
                logits = F.linear(h_c, weight, bias)  # the head's op again, as the forward ran it
            z = logits
            if ctx.recipe is not None:  # e.g. softcapping: replayed with autograd, for its stock derivative
                with torch.enable_grad(), torch.autocast(h.device.type, dtype=dtype, enabled=enabled):
                    logits = logits.detach().requires_grad_(True)
                    z = ctx.recipe(logits)
            logp = torch.log_softmax(z.detach().float(), dim=-1)
            valid = t != ctx.ignore_index
            dlogp = torch.zeros_like(logp)
            dlogp.scatter_(1, torch.where(valid, t, 0).unsqueeze(1), torch.where(valid, -scale, 0.0).unsqueeze(1))
            dz = torch.ops.aten._log_softmax_backward_data(dlogp, logp, 1, torch.float32).to(z.dtype)
            del logp, dlogp
            dlogits = dz if ctx.recipe is None else torch.autograd.grad(z, logits, dz)[0]
            logits = logits.detach()
            w = weight.to(logits.dtype)
            if need_h:
                dh[rows] = (dlogits @ w).to(h.dtype)
            if need_w and dw.dtype == dlogits.dtype:  # float32: accumulate inside the GEMM (no temporary)
                dw.addmm_(dlogits.t(), h_c.to(dlogits.dtype))
            elif need_w:  # 16-bit: the GEMM in the head's dtype, as stock, summed in float32
                dw += (dlogits.t() @ h_c.to(logits.dtype)).float()
            if db is not None:
                db += dlogits.float().sum(0)
        dw = dw.to(weight.dtype) if dw is not None else None
        db = db.to(bias.dtype) if db is not None else None
        return dh, dw, db, None, None, None, None, None, None


def linear_cross_entropy(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    logits: Tensor,
    target: Tensor,
    ignore_index: int = -100,
    divisor: Tensor | None = None,
    chunk: int | None = None,
    recipe=None,
) -> Tensor:
    """``cross_entropy(logits.float(), target, ignore_index, reduction)`` where ``logits = linear(h)``,
    differentiable in h, weight and bias, keeping nothing of size rows x vocabulary.

    Args:
        h: the head's input, [rows, hidden] (the tensor the head was called on, flattened).
        weight, bias: the head's (a plain Linear: [vocab, hidden], [vocab] or None).
        logits: what the head returned for h, [rows, vocab] (read for the loss value only).
        target: class index per row, int64 [rows]; ``ignore_index`` rows count for nothing.
        divisor: the loss is sum over rows / divisor: None for the mean over the rows that count
            (``reduction="mean"``), or e.g. transformers' ``num_items_in_batch``.
        chunk: rows per chunk (default :func:`chunk_rows_for`).
        recipe: elementwise function from the head's output to ``logits`` (softcapping), or None when
            ``logits`` is the head's output itself; backward replays it for its derivative.
    """
    if logits.dim() != 2 or h.dim() != 2 or target.dim() != 1 or logits.shape[0] != h.shape[0] != target.shape[0]:
        raise ValueError("linear_cross_entropy: h [rows, hidden], logits [rows, vocab] and target [rows] expected")
    if divisor is None:
        divisor = (target != ignore_index).sum().float()
    divisor = torch.as_tensor(divisor, device=h.device).float()
    chunk = chunk or chunk_rows_for(h.shape[0], logits.shape[1])
    return _LinearCrossEntropy.apply(h, weight, bias, logits.detach(), target, ignore_index, divisor, chunk, recipe)
