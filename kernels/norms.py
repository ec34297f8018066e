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
x_hat_j from a rounded y_j would amplify its rounding (or divide by zero). For the K channels listed
in KC (``lowmembp_convert.ops.norms.ill_conditioned_channels``; -1 entries are padding) the forward
also stores x_hat itself, in float32, into KEPT [M, K]. Three small kernels, vectorized over the K
entries, do that work beside the row kernels, which only gain a scalar per row (no [BLOCK_N] map in
their registers): ``ms_norm_kept_fwd_kernel`` stores KEPT from x and the row's mean (which the
forward writes when HAS_KEPT) and rstd; ``ms_norm_kept_correction_kernel`` computes, per row,
sum_kept g_j * (x_hat_kept_j - x_hat_recovered_j), which the backward adds to its sum(g * x_hat)
(the backward then writes its two row means); ``ms_norm_kept_dx_kernel`` rewrites dx of the kept
channels from the kept x_hat. The column-reduction kernel reads a slot map SLOT [N] (column of KEPT
for channel j, or -1): its tile is narrow.

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

# |w + offset| below this is never divided by (such a channel is always kept; see _safe_divisor).
MIN_DIVISOR: tl.constexpr = tl.constexpr(1e-30)


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
def _safe_divisor(w_eff):
    # A scale that small (0 included) is always a kept channel: divide by 1, never by ~0.
    return tl.where(tl.abs(w_eff) < MIN_DIVISOR, 1.0, w_eff)


@triton.jit
def _recover_x_hat(
    y,  # [BLOCK_N] fp32 (or a scalar), the saved forward output
    dy,  # [BLOCK_N] fp32 (or a scalar), its gradient
    W,  # pointer to the weight [N]
    B,  # pointer to the bias [N]
    cols,  # [BLOCK_N] column indices of the block (or one column)
    mask,  # [BLOCK_N] cols < N (or the scalar's validity)
    weight_offset,  # w_eff = w + weight_offset
    HAS_WEIGHT: tl.constexpr,  # y carries the factor w_eff
    HAS_BIAS: tl.constexpr,  # y carries the shift b
):
    # x_hat = (y - b) / w_eff and g = dy * w_eff: the gradient reaching x_hat.
    x_hat = y
    g = dy
    if HAS_BIAS:
        b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        x_hat = x_hat - b
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        w_eff = tl.where(mask, w + weight_offset, 1.0)  # masked lanes: 0 / 1, never 0 / 0
        x_hat = x_hat / _safe_divisor(w_eff)
        g = g * w_eff
    return x_hat, g


@triton.jit
def ms_norm_fwd_kernel(
    X,  # pointer to the input, [M, N] with unit column stride
    Y,  # pointer to the output y, [M, N] in the output dtype (saved for backward)
    W,  # pointer to the weight [N] (read only when HAS_WEIGHT)
    B,  # pointer to the bias [N] (read only when HAS_BIAS)
    RSTD,  # pointer to rstd [M], fp32 (saved for backward)
    MEAN,  # pointer to the row means [M], fp32 (written only when HAS_KEPT and not RMS)
    stride_x_row,  # elements between consecutive rows of X
    stride_y_row,  # elements between consecutive rows of Y
    N,  # row length: the normalized size
    eps,  # added to the variance (LayerNorm) or mean square (RMSNorm) before the square root
    weight_offset,  # w_eff = w + weight_offset (1.0 for Gemma's (1 + w))
    RMS: tl.constexpr,  # True: RMSNorm (no centring), False: LayerNorm
    HAS_WEIGHT: tl.constexpr,  # apply the weight
    HAS_BIAS: tl.constexpr,  # apply the bias
    HAS_KEPT: tl.constexpr,  # some channels keep x_hat: write the row mean for ms_norm_kept_fwd_kernel
    BLOCK_N: tl.constexpr,  # columns per block, a power of two
    ONE_BLOCK: tl.constexpr,  # N <= BLOCK_N: the whole row fits in one block, one pass
):
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x_row
    Y += row * stride_y_row
    cols = tl.arange(0, BLOCK_N)
    mean = 0.0
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
    else:
        # Long row: per-lane partial sums over the column blocks, reduced across lanes at the end.
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
    if HAS_KEPT and not RMS:
        tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def ms_norm_bwd_kernel(
    DY,  # pointer to the output gradient dy, [M, N] with unit column stride
    Y,  # pointer to the saved output y, [M, N] with unit column stride
    RSTD,  # pointer to the saved rstd [M], fp32
    W,  # pointer to the weight [N] (read only when HAS_WEIGHT)
    B,  # pointer to the bias [N] (read only when HAS_BIAS)
    DX,  # pointer to the input gradient dx, [M, N] in the input dtype
    CORRECTION,  # pointer to [M] fp32: the kept channels' share of sum(g * x_hat) (read when HAS_KEPT)
    ROW_MEANS,  # pointer to [M, 2] fp32: (mean(g), mean(g * x_hat)) per row (written when HAS_KEPT)
    stride_dy_row,  # elements between consecutive rows of DY (0 for a broadcast gradient)
    stride_y_row,  # elements between consecutive rows of Y
    stride_dx_row,  # elements between consecutive rows of DX
    N,  # row length: the normalized size
    weight_offset,  # w_eff = w + weight_offset
    RMS: tl.constexpr,  # True: RMSNorm (no mean(g) term), False: LayerNorm
    HAS_WEIGHT: tl.constexpr,  # y = x_hat * w_eff (+ b): divide it out, scale dy by it
    HAS_BIAS: tl.constexpr,  # y = x_hat (* w_eff) + b: subtract it
    HAS_KEPT: tl.constexpr,  # some channels keep x_hat: correct the sum, write the row means
    BLOCK_N: tl.constexpr,  # columns per block, a power of two
    ONE_BLOCK: tl.constexpr,  # N <= BLOCK_N: the whole row fits in one block, one pass
):
    row = tl.program_id(0).to(tl.int64)
    DY += row * stride_dy_row
    Y += row * stride_y_row
    DX += row * stride_dx_row
    rstd = tl.load(RSTD + row)
    cols = tl.arange(0, BLOCK_N)
    if ONE_BLOCK:
        mask = cols < N
        y = tl.load(Y + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
        x_hat, g = _recover_x_hat(y, dy, W, B, cols, mask, weight_offset, HAS_WEIGHT, HAS_BIAS)
        # dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)), without mean(g) for RMSNorm
        sum_g_x_hat = tl.sum(g * x_hat, axis=0)
        if HAS_KEPT:
            sum_g_x_hat += tl.load(CORRECTION + row)
        mean_g_x_hat = sum_g_x_hat / N
        mean_g = 0.0
        if not RMS:
            mean_g = tl.sum(g, axis=0) / N
        dx = g - x_hat * mean_g_x_hat - mean_g
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
            x_hat, g = _recover_x_hat(y, dy, W, B, c, m, weight_offset, HAS_WEIGHT, HAS_BIAS)
            sum_g += g
            sum_g_x_hat += g * x_hat
        mean_g = 0.0
        if not RMS:
            mean_g = tl.sum(sum_g, axis=0) / N
        total_g_x_hat = tl.sum(sum_g_x_hat, axis=0)
        if HAS_KEPT:
            total_g_x_hat += tl.load(CORRECTION + row)
        mean_g_x_hat = total_g_x_hat / N
        for start in range(0, N, BLOCK_N):
            c = start + cols
            m = c < N
            y = tl.load(Y + c, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(DY + c, mask=m, other=0.0).to(tl.float32)
            x_hat, g = _recover_x_hat(y, dy, W, B, c, m, weight_offset, HAS_WEIGHT, HAS_BIAS)
            dx = g - x_hat * mean_g_x_hat - mean_g
            tl.store(DX + c, (rstd * dx).to(DX.dtype.element_ty), mask=m)
    if HAS_KEPT:
        tl.store(ROW_MEANS + 2 * row, mean_g + 0.0)  # (+ 0.0: a tensor for RMSNorm's constant 0 too)
        tl.store(ROW_MEANS + 2 * row + 1, mean_g_x_hat)


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
        w_eff = _safe_divisor(tl.where(col_mask, w + weight_offset, 1.0))  # masked lanes: never 0 / 0
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


# --------------------------------------------------------------------------------------------------
# The kept (ill-conditioned) channels: one program per row, BLOCK_K entries of KC at a time
# --------------------------------------------------------------------------------------------------


@triton.jit
def ms_norm_kept_fwd_kernel(
    X,  # pointer to the input, [M, N] with unit column stride
    MEAN,  # pointer to the row means [M], fp32 (read only for LayerNorm)
    RSTD,  # pointer to rstd [M], fp32
    KC,  # pointer to the kept channel indices [K], int64, -1 padded
    KEPT,  # pointer to the kept x_hat [M, K], fp32 (written)
    stride_x_row,  # elements between consecutive rows of X
    K,  # entries of KC, and the row stride of KEPT
    RMS: tl.constexpr,  # True: RMSNorm (mean 0)
    BLOCK_K: tl.constexpr,  # entries per block, a power of two
):
    # KEPT[row, k] = x_hat of channel KC[k] = (x - mean) * rstd, the very value the forward used
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x_row
    KEPT += row * K
    rstd = tl.load(RSTD + row)
    mean = 0.0
    if not RMS:
        mean = tl.load(MEAN + row)
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        j = tl.load(KC + k, mask=k < K, other=-1)
        valid = j >= 0
        x = tl.load(X + tl.where(valid, j, 0), mask=valid, other=0.0).to(tl.float32)
        tl.store(KEPT + k, (x - mean) * rstd, mask=valid)


@triton.jit
def _kept_entries(
    Y,  # pointer to this row of y
    DY,  # pointer to this row of dy
    W,  # pointer to the weight [N]
    B,  # pointer to the bias [N]
    KC,  # pointer to the kept channel indices [K], int64, -1 padded
    KEPT,  # pointer to this row of KEPT [K], fp32
    k,  # [BLOCK_K] entry indices
    K,  # entries of KC
    weight_offset,  # w_eff = w + weight_offset
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    # For entries k: the channel j, whether the entry is one, the recovered x_hat_j (as the row
    # kernel computed it), the kept x_hat_j and g_j = dy_j * w_eff_j
    j = tl.load(KC + k, mask=k < K, other=-1)
    valid = j >= 0
    j = tl.where(valid, j, 0)
    y = tl.load(Y + j, mask=valid, other=0.0).to(tl.float32)
    dy = tl.load(DY + j, mask=valid, other=0.0).to(tl.float32)
    recovered, g = _recover_x_hat(y, dy, W, B, j, valid, weight_offset, HAS_WEIGHT, HAS_BIAS)
    kept = tl.load(KEPT + k, mask=valid, other=0.0)
    return j, valid, recovered, kept, g


@triton.jit
def ms_norm_kept_correction_kernel(
    DY,  # pointer to the output gradient dy, [M, N] with unit column stride
    Y,  # pointer to the saved output y, [M, N] with unit column stride
    W,  # pointer to the weight [N] (read only when HAS_WEIGHT)
    B,  # pointer to the bias [N] (read only when HAS_BIAS)
    KC,  # pointer to the kept channel indices [K], int64, -1 padded
    KEPT,  # pointer to the kept x_hat [M, K], fp32
    CORRECTION,  # pointer to [M] fp32 (written): sum_kept g_j * (x_hat_kept_j - x_hat_recovered_j)
    stride_dy_row,  # elements between consecutive rows of DY
    stride_y_row,  # elements between consecutive rows of Y
    K,  # entries of KC, and the row stride of KEPT
    weight_offset,  # w_eff = w + weight_offset
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_K: tl.constexpr,  # entries per block, a power of two
):
    # What turns the row kernel's sum(g * x_hat_recovered) into the exact sum(g * x_hat)
    row = tl.program_id(0).to(tl.int64)
    DY += row * stride_dy_row
    Y += row * stride_y_row
    KEPT += row * K
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        _j, valid, recovered, kept, g = _kept_entries(Y, DY, W, B, KC, KEPT, k, K, weight_offset, HAS_WEIGHT, HAS_BIAS)
        acc += tl.where(valid, g * (kept - recovered), 0.0)
    tl.store(CORRECTION + row, tl.sum(acc, axis=0))


@triton.jit
def ms_norm_kept_dx_kernel(
    DY,  # pointer to the output gradient dy, [M, N] with unit column stride
    Y,  # pointer to the saved output y, [M, N] with unit column stride
    RSTD,  # pointer to the saved rstd [M], fp32
    W,  # pointer to the weight [N] (read only when HAS_WEIGHT)
    B,  # pointer to the bias [N] (read only when HAS_BIAS)
    KC,  # pointer to the kept channel indices [K], int64, -1 padded
    KEPT,  # pointer to the kept x_hat [M, K], fp32
    ROW_MEANS,  # pointer to [M, 2] fp32: (mean(g), mean(g * x_hat)) per row, from the row kernel
    DX,  # pointer to the input gradient dx, [M, N] (the kept channels rewritten)
    stride_dy_row,  # elements between consecutive rows of DY
    stride_y_row,  # elements between consecutive rows of Y
    stride_dx_row,  # elements between consecutive rows of DX
    K,  # entries of KC, and the row stride of KEPT
    weight_offset,  # w_eff = w + weight_offset
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_K: tl.constexpr,  # entries per block, a power of two
):
    # dx_j = rstd * (g_j - mean(g) - x_hat_j * mean(g * x_hat)) with the kept x_hat_j
    row = tl.program_id(0).to(tl.int64)
    DY += row * stride_dy_row
    Y += row * stride_y_row
    DX += row * stride_dx_row
    KEPT += row * K
    rstd = tl.load(RSTD + row)
    mean_g = tl.load(ROW_MEANS + 2 * row)
    mean_g_x_hat = tl.load(ROW_MEANS + 2 * row + 1)
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        j, valid, _recovered, kept, g = _kept_entries(Y, DY, W, B, KC, KEPT, k, K, weight_offset, HAS_WEIGHT, HAS_BIAS)
        dx = rstd * (g - mean_g - kept * mean_g_x_hat)
        tl.store(DX + j, dx.to(DX.dtype.element_ty), mask=valid)
