"""Triton kernels of the memory-sharing LayerNorm / RMSNorm (MS-BP, docs/method.md section 2).

``@triton.jit`` code only; the launchers and the autograd wiring live in
``lowmembp_convert.ops.norms``. Every row of N elements (the normalized, last dimension) is
normalized by one program. The forward writes y and rstd; the backward rebuilds x_hat from y, so
the input x is never needed after the forward:

    LayerNorm:  mean = sum(x) / N,  var = sum((x - mean)^2) / N,  rstd = 1 / sqrt(var + eps)
                x_hat = (x - mean) * rstd
    RMSNorm:    rstd = 1 / sqrt(sum(x^2) / N + eps),             x_hat = x * rstd
    both:       y = x_hat * (w + weight_offset) + b              (each factor only when present)

    backward:   x_hat = (y - b) / (w + weight_offset),  g = dy * (w + weight_offset)
                LayerNorm: dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))
                RMSNorm:   dx = rstd * (g - x_hat * mean(g * x_hat))
                dw = sum_rows(dy * x_hat),  db = sum_rows(dy)

Ill-conditioned channels (HAS_KEPT): where |w_eff_j| is tiny or |b_j| / |w_eff_j| large, recovering
x_hat_j from a rounded y_j would amplify its rounding (or divide by zero). For those channels the
forward also stores x_hat itself, in float32, into KEPT [M, K] at column SLOT[j] (SLOT[j] = -1 for
every other channel), and the backward kernels read it there instead of recovering it. The launcher
picks the channels from the current weights (``lowmembp_convert.ops.norms.ill_conditioned_channels``).

All math is in float32 whatever the storage dtype. Row offsets are int64 (tensors past 2**31
elements), every load and store is masked, and nothing here depends on a GPU (the kernels run under
``TRITON_INTERPRET=1``).

Rows of at most BLOCK_N elements (ONE_BLOCK) are read once and kept in registers. Longer rows loop
over column blocks: the forward reads the row three times (mean, then the centred variance, which
is exact where a one-pass sum of squares would cancel, then normalize; RMSNorm twice) and the
backward twice (the two row means, then dx). The re-reads of one row mostly hit L2.

dw / db come from a separate column-reduction kernel (``ms_norm_bwd_affine_kernel``): each program
owns a [rows_per_program, BLOCK_N] slab, accumulates it in registers and writes one fp32 partial row;
the launcher sums the few partial rows in torch. It is deterministic (no atomics), works for any N
(the row kernels need no [N]-sized accumulator, which long rows could not hold), and the common
folded norm, which has no affine, never launches it. The price, paid only by ``keep_affine`` norms,
is a second read of y and dy.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _affine(
    x_hat,  # [BLOCK_N] fp32, the normalized values of one column block
    W,  # pointer to the weight [N]
    B,  # pointer to the bias [N]
    cols,  # [BLOCK_N] column indices of the block
    mask,  # [BLOCK_N] cols < N
    weight_offset,  # w_eff = w + weight_offset
    HAS_WEIGHT: tl.constexpr,  # multiply by w_eff
    HAS_BIAS: tl.constexpr,  # add b
):
    # y = x_hat * (w + weight_offset) + b
    y = x_hat
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        y = y * (w + weight_offset)
    if HAS_BIAS:
        b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        y = y + b
    return y


@triton.jit
def _store_kept(
    x_hat,  # [BLOCK_N] fp32, the normalized values of one column block
    SLOT,  # pointer to the slot map [N], int32: column of KEPT for channel j, or -1
    KEPT_ROW,  # pointer to this row of KEPT [K], fp32
    cols,  # [BLOCK_N] column indices of the block
    mask,  # [BLOCK_N] cols < N
):
    # KEPT[row, SLOT[j]] = x_hat_j for the ill-conditioned channels j (SLOT[j] >= 0)
    slot = tl.load(SLOT + cols, mask=mask, other=-1)
    tl.store(KEPT_ROW + slot, x_hat, mask=mask & (slot >= 0))


@triton.jit
def _recover_x_hat(
    y,  # [BLOCK_N] fp32, the saved forward output of one column block
    dy,  # [BLOCK_N] fp32, its gradient
    W,  # pointer to the weight [N]
    B,  # pointer to the bias [N]
    SLOT,  # pointer to the slot map [N], int32 (read only when HAS_KEPT)
    KEPT_ROW,  # pointer to this row of KEPT [K], fp32 (read only when HAS_KEPT)
    cols,  # [BLOCK_N] column indices of the block
    mask,  # [BLOCK_N] cols < N
    weight_offset,  # w_eff = w + weight_offset
    HAS_WEIGHT: tl.constexpr,  # y carries the factor w_eff
    HAS_BIAS: tl.constexpr,  # y carries the shift b
    HAS_KEPT: tl.constexpr,  # some channels' x_hat was stored by the forward: use it there
):
    # x_hat = (y - b) / w_eff (or the stored x_hat) and g = dy * w_eff: the gradient reaching x_hat.
    x_hat = y
    g = dy
    if HAS_BIAS:
        b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        x_hat = x_hat - b
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        w_eff = tl.where(mask, w + weight_offset, 1.0)  # masked lanes: 0 / 1, never 0 / 0
        g = g * w_eff
        w_eff = tl.where(w_eff == 0.0, 1.0, w_eff)  # a zero channel is a kept one: no 0 / 0 on the way
        x_hat = x_hat / w_eff
    if HAS_KEPT:
        slot = tl.load(SLOT + cols, mask=mask, other=-1)
        kept = tl.load(KEPT_ROW + slot, mask=mask & (slot >= 0), other=0.0)
        x_hat = tl.where(slot >= 0, kept, x_hat)
    return x_hat, g


@triton.jit
def ms_norm_fwd_kernel(
    X,  # pointer to the input, [M, N] with unit column stride
    Y,  # pointer to the output y, [M, N] in the output dtype (saved for backward)
    W,  # pointer to the weight [N] (read only when HAS_WEIGHT)
    B,  # pointer to the bias [N] (read only when HAS_BIAS)
    RSTD,  # pointer to rstd [M], fp32 (saved for backward)
    SLOT,  # pointer to the slot map [N], int32 (read only when HAS_KEPT)
    KEPT,  # pointer to the kept x_hat [M, K], fp32 (written only when HAS_KEPT; saved for backward)
    stride_x_row,  # elements between consecutive rows of X
    stride_y_row,  # elements between consecutive rows of Y
    stride_kept_row,  # elements between consecutive rows of KEPT (K)
    N,  # row length: the normalized size
    eps,  # added to the variance (LayerNorm) or mean square (RMSNorm) before the square root
    weight_offset,  # w_eff = w + weight_offset (1.0 for Gemma's (1 + w))
    RMS: tl.constexpr,  # True: RMSNorm (no centring), False: LayerNorm
    HAS_WEIGHT: tl.constexpr,  # apply the weight
    HAS_BIAS: tl.constexpr,  # apply the bias
    HAS_KEPT: tl.constexpr,  # store x_hat of the ill-conditioned channels into KEPT
    BLOCK_N: tl.constexpr,  # columns per block, a power of two
    ONE_BLOCK: tl.constexpr,  # N <= BLOCK_N: the whole row fits in one block, one pass
):
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x_row
    Y += row * stride_y_row
    KEPT += row * stride_kept_row
    cols = tl.arange(0, BLOCK_N)
    if ONE_BLOCK:
        mask = cols < N
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        if RMS:
            # rstd = 1 / sqrt(mean(x^2) + eps); masked lanes are 0 and add nothing
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
            x_hat = x * rstd
        else:
            # mean = sum(x) / N;  var = sum((x - mean)^2) / N (biased);  rstd = 1 / sqrt(var + eps)
            mean = tl.sum(x, axis=0) / N
            x_centred = tl.where(mask, x - mean, 0.0)
            var = tl.sum(x_centred * x_centred, axis=0) / N
            rstd = 1.0 / tl.sqrt(var + eps)
            x_hat = x_centred * rstd
        y = _affine(x_hat, W, B, cols, mask, weight_offset, HAS_WEIGHT, HAS_BIAS)
        tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
        if HAS_KEPT:
            _store_kept(x_hat, SLOT, KEPT, cols, mask)
    else:
        # Long row: per-lane partial sums over the column blocks, reduced across lanes at the end.
        mean = 0.0
        if not RMS:
            sum_x = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                sum_x += tl.load(X + c, mask=c < N, other=0.0).to(tl.float32)
            mean = tl.sum(sum_x, axis=0) / N
        # var = sum((x - mean)^2) / N for LayerNorm, mean(x^2) for RMSNorm (mean stays 0)
        sum_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            m = c < N
            x = tl.load(X + c, mask=m, other=0.0).to(tl.float32)
            x_centred = tl.where(m, x - mean, 0.0)
            sum_sq += x_centred * x_centred
        rstd = 1.0 / tl.sqrt(tl.sum(sum_sq, axis=0) / N + eps)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            m = c < N
            x = tl.load(X + c, mask=m, other=0.0).to(tl.float32)
            x_hat = (x - mean) * rstd
            y = _affine(x_hat, W, B, c, m, weight_offset, HAS_WEIGHT, HAS_BIAS)
            tl.store(Y + c, y.to(Y.dtype.element_ty), mask=m)
            if HAS_KEPT:
                _store_kept(x_hat, SLOT, KEPT, c, m)
    tl.store(RSTD + row, rstd)


@triton.jit
def ms_norm_bwd_kernel(
    DY,  # pointer to the output gradient dy, [M, N] with unit column stride
    Y,  # pointer to the saved output y, [M, N] with unit column stride
    RSTD,  # pointer to the saved rstd [M], fp32
    W,  # pointer to the weight [N] (read only when HAS_WEIGHT)
    B,  # pointer to the bias [N] (read only when HAS_BIAS)
    DX,  # pointer to the input gradient dx, [M, N] in the input dtype
    SLOT,  # pointer to the slot map [N], int32 (read only when HAS_KEPT)
    KEPT,  # pointer to the kept x_hat [M, K], fp32 (read only when HAS_KEPT)
    stride_dy_row,  # elements between consecutive rows of DY (0 for a broadcast gradient)
    stride_y_row,  # elements between consecutive rows of Y
    stride_dx_row,  # elements between consecutive rows of DX
    stride_kept_row,  # elements between consecutive rows of KEPT (K)
    N,  # row length: the normalized size
    weight_offset,  # w_eff = w + weight_offset
    RMS: tl.constexpr,  # True: RMSNorm (no mean(g) term), False: LayerNorm
    HAS_WEIGHT: tl.constexpr,  # y = x_hat * w_eff (+ b): divide it out, scale dy by it
    HAS_BIAS: tl.constexpr,  # y = x_hat (* w_eff) + b: subtract it
    HAS_KEPT: tl.constexpr,  # the ill-conditioned channels' x_hat is in KEPT
    BLOCK_N: tl.constexpr,  # columns per block, a power of two
    ONE_BLOCK: tl.constexpr,  # N <= BLOCK_N: the whole row fits in one block, one pass
):
    row = tl.program_id(0).to(tl.int64)
    DY += row * stride_dy_row
    Y += row * stride_y_row
    DX += row * stride_dx_row
    KEPT += row * stride_kept_row
    rstd = tl.load(RSTD + row)
    cols = tl.arange(0, BLOCK_N)
    if ONE_BLOCK:
        mask = cols < N
        y = tl.load(Y + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
        x_hat, g = _recover_x_hat(y, dy, W, B, SLOT, KEPT, cols, mask, weight_offset, HAS_WEIGHT, HAS_BIAS, HAS_KEPT)
        # dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)), without mean(g) for RMSNorm
        mean_g_x_hat = tl.sum(g * x_hat, axis=0) / N
        dx = g - x_hat * mean_g_x_hat
        if not RMS:
            dx -= tl.sum(g, axis=0) / N
        tl.store(DX + cols, (rstd * dx).to(DX.dtype.element_ty), mask=mask)
    else:
        # Long row: pass 1 forms both row means, pass 2 writes dx.
        sum_g = tl.zeros([BLOCK_N], dtype=tl.float32)
        sum_g_x_hat = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            m = c < N
            y = tl.load(Y + c, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(DY + c, mask=m, other=0.0).to(tl.float32)
            x_hat, g = _recover_x_hat(y, dy, W, B, SLOT, KEPT, c, m, weight_offset, HAS_WEIGHT, HAS_BIAS, HAS_KEPT)
            sum_g += g
            sum_g_x_hat += g * x_hat
        mean_g = tl.sum(sum_g, axis=0) / N
        mean_g_x_hat = tl.sum(sum_g_x_hat, axis=0) / N
        for start in range(0, N, BLOCK_N):
            c = start + cols
            m = c < N
            y = tl.load(Y + c, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(DY + c, mask=m, other=0.0).to(tl.float32)
            x_hat, g = _recover_x_hat(y, dy, W, B, SLOT, KEPT, c, m, weight_offset, HAS_WEIGHT, HAS_BIAS, HAS_KEPT)
            dx = g - x_hat * mean_g_x_hat
            if not RMS:
                dx -= mean_g
            tl.store(DX + c, (rstd * dx).to(DX.dtype.element_ty), mask=m)


@triton.jit
def ms_norm_bwd_affine_kernel(
    DY,  # pointer to the output gradient dy, [M, N] with unit column stride
    Y,  # pointer to the saved output y, [M, N] with unit column stride
    W,  # pointer to the weight [N] (read only when HAS_WEIGHT)
    B,  # pointer to the bias [N] (read only when HAS_BIAS)
    DW_PARTIAL,  # pointer to fp32 [num_row_groups, N]: this program's partial sum of dy * x_hat
    DB_PARTIAL,  # pointer to fp32 [num_row_groups, N]: this program's partial sum of dy
    SLOT,  # pointer to the slot map [N], int32 (read only when HAS_KEPT)
    KEPT,  # pointer to the kept x_hat [M, K], fp32 (read only when HAS_KEPT)
    stride_dy_row,  # elements between consecutive rows of DY
    stride_y_row,  # elements between consecutive rows of Y
    stride_kept_row,  # elements between consecutive rows of KEPT (K)
    M,  # number of rows
    N,  # row length: the normalized size
    rows_per_program,  # rows summed by one program, a multiple of BLOCK_M
    weight_offset,  # w_eff = w + weight_offset
    HAS_WEIGHT: tl.constexpr,  # y carries the factor w_eff
    HAS_BIAS: tl.constexpr,  # y carries the shift b
    COMPUTE_DW: tl.constexpr,  # accumulate dw = sum_rows(dy * x_hat) (reads y)
    COMPUTE_DB: tl.constexpr,  # accumulate db = sum_rows(dy)
    HAS_KEPT: tl.constexpr,  # the ill-conditioned channels' x_hat is in KEPT (used for dw)
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # columns per tile (and per program)
):
    # Program (pid_n, pid_m) sums the column block pid_n over rows
    # [pid_m * rows_per_program, (pid_m + 1) * rows_per_program) and writes partial row pid_m.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w_eff = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        w_eff = tl.where(col_mask, w + weight_offset, 1.0)  # masked lanes: never 0 / 0
        w_eff = tl.where(w_eff == 0.0, 1.0, w_eff)  # a zero channel is a kept one
    slot = tl.full([BLOCK_N], -1, dtype=tl.int32)
    if HAS_KEPT:
        slot = tl.load(SLOT + cols, mask=col_mask, other=-1)
    b = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_start = pid_m * rows_per_program
    for i in range(0, rows_per_program, BLOCK_M):
        rows = row_start + i + tl.arange(0, BLOCK_M).to(tl.int64)
        mask = (rows < M)[:, None] & col_mask[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dy_row + cols[None, :], mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        if COMPUTE_DW:
            y = tl.load(Y + rows[:, None] * stride_y_row + cols[None, :], mask=mask, other=0.0)
            # x_hat = (y - b) / w_eff;  dw += dy * x_hat (masked lanes have dy = 0)
            x_hat = (y.to(tl.float32) - b[None, :]) / w_eff[None, :]
            if HAS_KEPT:
                kept_mask = mask & (slot >= 0)[None, :]
                kept = tl.load(KEPT + rows[:, None] * stride_kept_row + slot[None, :], mask=kept_mask, other=0.0)
                x_hat = tl.where((slot >= 0)[None, :], kept, x_hat)
            dw_acc += dy * x_hat
        if COMPUTE_DB:
            db_acc += dy
    partial = pid_m * N + cols
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + partial, tl.sum(dw_acc, axis=0), mask=col_mask)
    if COMPUTE_DB:
        tl.store(DB_PARTIAL + partial, tl.sum(db_acc, axis=0), mask=col_mask)
