"""Post-norm blocks under autocast: one saved low-precision tensor for the norm and its Linears.

In a post-norm block (BERT, RoBERTa) the norm output y feeds a residual add, which must stay in
full precision, and Linear layers, which autocast feeds a new bf16 cast of y that they save. Stock,
that is two saved tensors (the norm's input and the cast); a memory-sharing norm emitting y in full
precision would still leave two. ``ms_norm_with_twin`` returns y and its autocast-dtype twin (the
very cast autocast would have made, so forward values are unchanged), saves the twin and rstd only,
and the converter points the consumer Linears at the twin: one bf16 tensor, as in a pre-norm block.
Backward receives the gradients of both outputs and adds them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .norms import grads_from_output, ms_norm_fwd, refuse_double_backward


class _MSNormTwin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, weight_offset, rms, low_dtype):
        y, rstd = ms_norm_fwd(x, weight, bias, eps, weight_offset, rms, None)
        twin = y.to(low_dtype)
        # Saved: the twin (shared with the consumer Linears), rstd, and the parameters. Not y.
        ctx.save_for_backward(twin, rstd, weight, bias)
        ctx.weight_offset, ctx.rms, ctx.x_dtype = weight_offset, rms, x.dtype
        return y, twin

    @staticmethod
    def backward(ctx, dy: Tensor | None, dtwin: Tensor | None):
        refuse_double_backward(next(g for g in (dy, dtwin) if g is not None))
        twin, rstd, weight, bias = ctx.saved_tensors
        grads = [g.float() for g in (dy, dtwin) if g is not None]
        g = grads[0] if len(grads) == 1 else grads[0] + grads[1]
        dx, dweight, dbias = grads_from_output(ctx, g, twin, rstd, weight, bias)
        return dx, dweight, dbias, None, None, None, None


def ms_norm_with_twin(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    weight_offset: float,
    rms: bool,
    low_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Memory-sharing norm over the last dim returning ``(y, y.to(low_dtype))``.

    Saved for backward: the twin ``y.to(low_dtype)`` and rstd (plus weight/bias), not y. Backward
    rebuilds x_hat from the twin, so gradients carry the twin's precision (that of autocast).
    """
    return _MSNormTwin.apply(x, weight, bias, float(eps), float(weight_offset), bool(rms), low_dtype)
