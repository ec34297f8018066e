"""Triton kernel of the loss head's rows: cross-entropy of [R, V] logits, and its gradient in place.

``@triton.jit`` code only; the launcher, the torch reference and the custom ops live in
``lowmembp_convert.ops.cross_entropy_rows``. One program owns one row of V logits (V up to the
largest vocabularies, 262,144 and beyond) and walks it in blocks of BLOCK_V columns:

    pass 1 (online log-sum-exp):  m <- max(m, max(x_block)),  s <- s * exp(m_old - m) + sum(exp(x_block - m))
                                  lse = m + log(s),  loss = lse - x[target]        (0 for an ignored row)
    pass 2 (HAS_GRAD):            grad = (exp(x - lse) - [col == target]) * scale   (0 for an ignored row)

So a row's softmax is never held: two reads of the row (the second mostly from L2) and, with
HAS_GRAD, one write, which may go over the logits themselves (GRAD == LOGITS: each element is read
before it is overwritten by the same program). ``scale`` is read from a float32 scalar on the device
(1 / the number of counted rows, or 1 / ``num_items_in_batch``), so the caller never synchronises.

All math is in float32 whatever the storage dtype; -inf logits (masked vocabulary entries) count as
probability 0. Row offsets are int64 (R x V past 2**31 elements: 65,536 rows of 262,144 logits is
2**34), every load and store is masked, and nothing here depends on a GPU (the kernel runs under
``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def ce_rows_kernel(
    LOGITS,  # [R, V] the logits (any float dtype), rows at stride_row
    TARGET,  # [R] int64 class indices (ignore_index for an ignored row)
    SCALE,  # [1] float32: the gradient's factor for a counted row
    LOSS,  # [R] float32 out: lse - x[target], 0 for an ignored row
    LSE,  # [R] float32 out: log-sum-exp of the row
    GRAD,  # [R, V] out (HAS_GRAD): the gradient of sum(loss * scale); may be LOGITS itself
    stride_row,  # LOGITS row stride (elements)
    stride_grad_row,  # GRAD row stride (elements)
    V,  # columns
    ignore_index,
    HAS_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    target = tl.load(TARGET + row)
    counted = (target != ignore_index) & (target >= 0) & (target < V)

    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        new_m = tl.maximum(m, tl.max(x, 0))
        # exp(-inf - -inf) is nan: a block (or a history) of -inf contributes exactly 0
        rescale = tl.where(m > float("-inf"), tl.exp(m - new_m), 0.0)
        s = s * rescale + tl.sum(tl.where(x > float("-inf"), tl.exp(x - new_m), 0.0), 0)
        m = new_m
    lse = m + tl.log(s)
    safe_target = tl.where(counted, target, 0)
    x_target = tl.load(base + safe_target).to(tl.float32)
    tl.store(LOSS + row, tl.where(counted, lse - x_target, 0.0))
    tl.store(LSE + row, lse)

    if HAS_GRAD:
        scale = tl.where(counted, tl.load(SCALE).to(tl.float32), 0.0)
        grad_base = GRAD + row * stride_grad_row
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            x = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
            p = tl.where(x > float("-inf"), tl.exp(x - lse), 0.0)
            g = (p - tl.where(cols == safe_target, 1.0, 0.0)) * scale
            tl.store(grad_base + cols, g.to(GRAD.dtype.element_ty), mask=mask)
