"""Memory-sharing LayerNorm and RMSNorm (MS-BP, docs/method.md section 2): launchers, reference, autograd.

A stock norm saves its input x for backward while the Linear after it saves the norm's output y:
two tensors of the same size. These norms save y itself (the very tensor they return, so the
consumer's saved input is the same storage) plus rstd, one float per row, and rebuild
x_hat = (y - b) / (w + weight_offset) in backward. Nothing else is saved: no x, no mean, and no
x_hat but for the few ill-conditioned channels of a kept affine (:func:`ill_conditioned_channels`:
|w + offset| tiny, or |b| large against it), whose x_hat the forward keeps in float32, chosen in
every forward from the current weights, so a weight that training drives through zero stays exact.

Three tiers:
- ``kernels/norms.py`` (installed as ``lowmembp_convert.kernels.norms``): the ``@triton.jit`` code.
- here: Triton launchers (imported lazily, so a CPU-only install never imports Triton), the torch
  reference (the same saved state, and the oracle the kernels are tested against), and three
  ``torch.library.custom_op``s - ``lowmembp::ms_norm_fwd``, ``lowmembp::ms_norm_bwd`` (dx) and
  ``lowmembp::ms_norm_bwd_affine`` (dweight / dbias, only run when they require grad) - with fake
  implementations and autograd, so ``torch.compile(fullgraph=True)`` traces them without breaks.
- the public functions :func:`ms_layer_norm` and :func:`ms_rms_norm`.

Each op picks its path once through :func:`lowmembp_convert.dispatch.use_triton`. float64 always
takes the reference (the kernels compute in float32), which keeps ``gradcheck`` meaningful.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from lowmembp_convert.dispatch import use_triton

__all__ = [
    "ms_layer_norm",
    "ms_rms_norm",
    "ms_norm_fwd",
    "ms_norm_bwd",
    "ms_norm_bwd_affine",
    "reference_fwd",
    "reference_bwd",
    "reference_bwd_affine",
]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32, or float64 when any operand is float64 (gradcheck)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _as_rows(t: Tensor, n: int) -> Tensor:
    """[..., n] -> [rows, n] with unit column stride (a view when possible, else a copy)."""
    rows = math.prod(t.shape[:-1])
    t2d = t.reshape(rows, n)
    if n > 1 and t2d.stride(1) != 1:
        t2d = t2d.contiguous()
    return t2d


# --------------------------------------------------------------------------------------------------
# Triton launchers
# --------------------------------------------------------------------------------------------------

# Recovering x_hat_j = (y_j - b_j) / w_j from a rounded y_j costs it about (1 + |b_j| / |w_j|) times
# the rounding of a normalized output: a channel past this factor keeps x_hat (3 bits lost at most).
MAX_RECOVERY_AMPLIFICATION = 8.0
# Channels whose |w + offset| is below this keep x_hat (the default of ConvertConfig.min_abs_weight).
DEFAULT_KEEP_BELOW = 1e-3
# A scale below this is never divided by, whatever keep_below says (the kernels' MIN_DIVISOR).
MIN_DIVISOR = 1e-30


def ill_conditioned_channels(
    weight: Tensor | None, bias: Tensor | None, weight_offset: float, keep_below: float, capacity: int = -1
) -> Tensor:
    """Indices (int64, ascending) of the channels whose x_hat the forward keeps.

    Channel j is kept when |w_j + offset| < max(``keep_below``, MIN_DIVISOR) (a vanishing scale: y_j
    carries almost nothing of x_hat_j) or |b_j| > (MAX_RECOVERY_AMPLIFICATION - 1) * |w_j + offset|
    (the shift swamps the signal in y_j's rounding). Without a weight the scale is 1.

    ``capacity < 0`` (eager): all of them, [K] (reading K back is one host sync). ``capacity >= 0``
    (torch.compile, where shapes must not depend on values): exactly ``capacity`` entries, the first
    kept channels then -1 padding; channels past the capacity are recovered, not kept, and a warning
    says so (the count is read back too: one host sync).
    """
    ref = weight if weight is not None else bias
    if ref is None:
        return torch.empty((max(capacity, 0),), dtype=torch.int64).fill_(-1)
    acc = _compute_dtype(ref.dtype)
    scale = (weight.detach().to(acc) + weight_offset).abs() if weight is not None else None
    floor = max(keep_below, MIN_DIVISOR)
    bad = scale < floor if scale is not None else torch.zeros_like(ref, dtype=torch.bool)
    if bias is not None:
        limit = (MAX_RECOVERY_AMPLIFICATION - 1) * (scale if scale is not None else 1.0)
        bad |= bias.detach().to(acc).abs() > limit
    if scale is not None:
        bad |= ~torch.isfinite(scale)
    if capacity < 0:
        return bad.nonzero().squeeze(1)
    count = int(bad.sum())
    if count > capacity:
        warnings.warn(
            f"lowmembp_convert: a memory-sharing norm ({bad.numel()} channels) run under torch.compile has {count} "
            f"ill-conditioned channels but room to keep x_hat for {capacity}: the other {count - capacity} are "
            "recovered from the output, with more rounding than stock. Set the norm module's "
            "compiled_kept_capacity (then torch.compile again), or run it eagerly, where every such channel is kept",
            stacklevel=2,
        )
    return torch.nonzero_static(bad, size=capacity, fill_value=-1).squeeze(1)


def _slot_map(kept_channels: Tensor, n: int, device: torch.device) -> Tensor:
    """int32 [N]: the column of the kept buffer holding channel j, or -1 (what the column-reduction
    kernel and the reference read); an empty one (never read) when no channel is kept. Built on the
    device without a sync (padding entries -1 scatter to a dummy slot past the end)."""
    k = kept_channels.numel()
    if not k:
        return torch.empty((0,), dtype=torch.int32, device=device)
    kept_channels = kept_channels.to(device)
    target = torch.where(kept_channels >= 0, kept_channels, n)
    slot = torch.full((n + 1,), -1, dtype=torch.int32, device=device)
    slot.scatter_(0, target, torch.arange(k, dtype=torch.int32, device=device))
    return slot[:n]


# Longest row normalized in one pass with the row in registers; longer rows loop over blocks of
# this size. Module-level so tests can lower it and reach the loop path with small shapes.
MAX_FUSED_BLOCK_N = 8192


@dataclass(frozen=True)
class LaunchSettings:
    """Launch parameters of the three norm kernels for one [M, N] problem."""

    block_n: int  # row kernels: columns per block
    one_block: bool  # row kernels: N <= block_n, single pass
    num_warps: int  # row kernels
    affine_block_m: int  # column-reduction kernel: rows per tile
    affine_block_n: int  # column-reduction kernel: columns per program
    affine_rows_per_program: int  # column-reduction kernel: rows summed by one program
    affine_row_groups: int  # column-reduction kernel: programs along the rows (partial sums)
    affine_num_warps: int


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.cache
def _num_programs_target(device: torch.device) -> int:
    """About four programs per SM for the column reduction; a few in the interpreter."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def launch_settings(rows: int, n: int, device: torch.device) -> LaunchSettings:
    """All launch settings of the norm kernels, in one place.

    Row kernels: one program per row, a power-of-two block of at least 16 and at most
    ``MAX_FUSED_BLOCK_N`` columns, about 16 elements per thread (1 to 16 warps). Column reduction:
    32 x 128 tiles, row groups sized so the grid has about four programs per SM.
    """
    block_n = min(max(_next_power_of_2(n), 16), MAX_FUSED_BLOCK_N)
    num_warps = min(max(block_n // 256, 1), 16)
    if n > MAX_FUSED_BLOCK_N:
        # Rows longer than one block loop over half-size blocks with half the warps: the looped
        # backward holds dy, y and partial sums per element, and at 16 elements per thread over 512
        # threads it needed 74-100 registers (one program per SM); this keeps two resident.
        block_n, num_warps = MAX_FUSED_BLOCK_N // 2, max(num_warps // 2, 1)
    affine_block_m = 32
    affine_block_n = min(max(_next_power_of_2(n), 16), 128)
    col_blocks = -(-n // affine_block_n)
    row_tiles = max(-(-rows // affine_block_m), 1)
    groups = min(max(_num_programs_target(device) // col_blocks, 1), row_tiles)
    rows_per_program = -(-row_tiles // groups) * affine_block_m
    return LaunchSettings(
        block_n=block_n,
        one_block=n <= block_n,
        num_warps=num_warps,
        affine_block_m=affine_block_m,
        affine_block_n=affine_block_n,
        affine_rows_per_program=rows_per_program,
        affine_row_groups=max(-(-rows // rows_per_program), 1),
        affine_num_warps=4,
    )


def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _kernels():
    # Lazy: importing this module must not import Triton.
    from lowmembp_convert.kernels import norms

    return norms


def triton_fwd(
    x2d: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    weight_offset: float,
    rms: bool,
    out_dtype: torch.dtype,
    kept_channels: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the forward kernel on [M, N] rows (unit column stride), then, when channels are kept,
    the kernel storing their x_hat.

    Returns (y [M, N], rstd [M], kept_x_hat [M, K] fp32: x_hat of the ``kept_channels``)."""
    rows, n = x2d.shape
    k = kept_channels.numel()
    y = torch.empty((rows, n), dtype=out_dtype, device=x2d.device)
    rstd = torch.empty((rows,), dtype=torch.float32, device=x2d.device)
    kept = torch.empty((rows, k), dtype=torch.float32, device=x2d.device)
    mean = torch.empty((rows if k and not rms else 0,), dtype=torch.float32, device=x2d.device)
    s = launch_settings(rows, n, x2d.device)
    kernels = _kernels()
    with _device_guard(x2d):
        kernels.ms_norm_fwd_kernel[(rows,)](
            x2d,
            y,
            weight if weight is not None else x2d,  # never read without HAS_WEIGHT
            bias if bias is not None else x2d,
            rstd,
            mean,  # written only with HAS_KEPT (LayerNorm)
            x2d.stride(0),
            y.stride(0),
            n,
            eps,
            weight_offset,
            RMS=rms,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            HAS_KEPT=k > 0,
            BLOCK_N=s.block_n,
            ONE_BLOCK=s.one_block,
            num_warps=s.num_warps,
        )
        if k:
            block_k, warps = kept_launch_settings(k)
            kernels.ms_norm_kept_fwd_kernel[(rows,)](
                x2d, mean if not rms else rstd, rstd, kept_channels.to(x2d.device), kept, x2d.stride(0), k,
                RMS=rms, BLOCK_K=block_k, num_warps=warps,
            )  # fmt: skip
    return y, rstd, kept


def kept_launch_settings(k: int) -> tuple[int, int]:
    """(BLOCK_K, num_warps) of the kept-channel kernels: all K entries in one block up to 1024."""
    block_k = min(max(_next_power_of_2(k), 16), 1024)
    return block_k, min(max(block_k // 256, 1), 4)


def triton_bwd(
    dy2d: Tensor,
    y2d: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    weight_offset: float,
    rms: bool,
    dx_dtype: torch.dtype,
    kept_channels: Tensor,
    kept2d: Tensor,
) -> Tensor:
    """Launch the backward (dx) kernel on [M, N] rows (with kept channels: the correction kernel
    before it and the kernel rewriting their dx after it). Returns dx [M, N] in ``dx_dtype``."""
    rows, n = y2d.shape
    k = kept_channels.numel()
    dx = torch.empty((rows, n), dtype=dx_dtype, device=y2d.device)
    s = launch_settings(rows, n, y2d.device)
    kernels = _kernels()
    w_arg = weight if weight is not None else y2d  # never read without HAS_WEIGHT
    b_arg = bias if bias is not None else y2d  # never read without HAS_BIAS
    flags = {"HAS_WEIGHT": weight is not None, "HAS_BIAS": bias is not None}
    correction = torch.empty((rows if k else 0,), dtype=torch.float32, device=y2d.device)
    row_means = torch.empty((rows if k else 0, 2), dtype=torch.float32, device=y2d.device)
    kc = kept_channels.to(y2d.device)
    block_k, warps = kept_launch_settings(k)
    with _device_guard(y2d):
        if k:
            kernels.ms_norm_kept_correction_kernel[(rows,)](
                dy2d, y2d, w_arg, b_arg, kc, kept2d, correction, dy2d.stride(0), y2d.stride(0), k, weight_offset,
                **flags, BLOCK_K=block_k, num_warps=warps,
            )  # fmt: skip
        kernels.ms_norm_bwd_kernel[(rows,)](
            dy2d,
            y2d,
            rstd,
            w_arg,
            b_arg,
            dx,
            correction,  # read only with HAS_KEPT
            row_means,  # written only with HAS_KEPT
            dy2d.stride(0),
            y2d.stride(0),
            dx.stride(0),
            n,
            weight_offset,
            RMS=rms,
            **flags,
            HAS_KEPT=k > 0,
            BLOCK_N=s.block_n,
            ONE_BLOCK=s.one_block,
            num_warps=s.num_warps,
        )
        if k:
            kernels.ms_norm_kept_dx_kernel[(rows,)](
                dy2d, y2d, rstd, w_arg, b_arg, kc, kept2d, row_means, dx,
                dy2d.stride(0), y2d.stride(0), dx.stride(0), k, weight_offset,
                **flags, BLOCK_K=block_k, num_warps=warps,
            )  # fmt: skip
    return dx


def triton_bwd_affine(
    dy2d: Tensor,
    y2d: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    weight_offset: float,
    need_dweight: bool,
    need_dbias: bool,
    kept_channels: Tensor,
    kept2d: Tensor,
) -> tuple[Tensor, Tensor]:
    """Launch the column reduction; returns fp32 (dweight, dbias), each [N] when asked, else [0]."""
    rows, n = y2d.shape
    k = kept_channels.numel() if need_dweight else 0  # dbias needs no x_hat
    s = launch_settings(rows, n, y2d.device)
    shape = (s.affine_row_groups, n)
    dw_partial = torch.empty(shape if need_dweight else (0,), dtype=torch.float32, device=y2d.device)
    db_partial = torch.empty(shape if need_dbias else (0,), dtype=torch.float32, device=y2d.device)
    grid = (-(-n // s.affine_block_n), s.affine_row_groups)
    with _device_guard(y2d):
        _kernels().ms_norm_bwd_affine_kernel[grid](
            dy2d,
            y2d,
            weight if weight is not None else y2d,  # never read without HAS_WEIGHT
            bias if bias is not None else y2d,
            dw_partial if need_dweight else db_partial,  # never written without COMPUTE_DW
            db_partial if need_dbias else dw_partial,
            _slot_map(kept_channels, n, y2d.device),
            kept2d,  # never read without HAS_KEPT
            dy2d.stride(0),
            y2d.stride(0),
            k,
            rows,
            n,
            s.affine_rows_per_program,
            weight_offset,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            COMPUTE_DW=need_dweight,
            COMPUTE_DB=need_dbias,
            HAS_KEPT=k > 0,
            BLOCK_M=s.affine_block_m,
            BLOCK_N=s.affine_block_n,
            num_warps=s.affine_num_warps,
        )
    # A handful of partial rows (about 4 programs per SM in all): summed here, deterministically.
    dweight = dw_partial.sum(0) if need_dweight else dw_partial
    dbias = db_partial.sum(0) if need_dbias else db_partial
    return dweight, dbias


# --------------------------------------------------------------------------------------------------
# Torch reference (same saved state; the oracle of the kernels)
# --------------------------------------------------------------------------------------------------


def reference_fwd(
    x2d: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    weight_offset: float,
    rms: bool,
    out_dtype: torch.dtype,
    kept_channels: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Torch forward on [M, N] rows, math in float32 (float64 for float64).

    Returns (y, rstd [M], kept_x_hat [M, K]: x_hat of the ``kept_channels``)."""
    acc = _compute_dtype(x2d.dtype)
    x = x2d.to(acc)
    if rms:
        rstd = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
        x_hat = x * rstd
    else:
        var, mean = torch.var_mean(x, dim=-1, correction=0, keepdim=True)
        rstd = torch.rsqrt(var + eps)
        x_hat = (x - mean) * rstd
    y = x_hat
    if weight is not None:
        y = y * (weight.to(acc) + weight_offset)
    if bias is not None:
        y = y + bias.to(acc)
    # x_hat of each kept channel (a -1 padding entry reads channel 0: never used)
    index = kept_channels.to(x_hat.device).clamp(min=0).expand(x_hat.shape[0], -1)
    kept = x_hat.gather(1, index)
    return y.to(out_dtype).contiguous(), rstd.squeeze(-1), kept.to(_stats_dtype(x2d.dtype))


def _reference_recover(
    y2d: Tensor,
    dy2d: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    weight_offset: float,
    kept_channels: Tensor,
    kept2d: Tensor,
) -> tuple[Tensor, Tensor]:
    """x_hat = (y - b) / w_eff (the kept x_hat on the kept channels) and g = dy * w_eff, in the compute dtype."""
    acc = _compute_dtype(y2d.dtype, dy2d.dtype)
    x_hat = y2d.to(acc)
    g = dy2d.to(acc)
    if bias is not None:
        x_hat = x_hat - bias.to(acc)
    if weight is not None:
        w_eff = weight.to(acc) + weight_offset
        g = g * w_eff
        x_hat = x_hat / torch.where(w_eff.abs() < MIN_DIVISOR, 1.0, w_eff)  # such a channel is a kept one
    if kept_channels.numel():
        slot = _slot_map(kept_channels, x_hat.shape[1], x_hat.device).long()
        kept = kept2d.to(acc).gather(1, slot.clamp(min=0).expand(x_hat.shape[0], -1))
        x_hat = torch.where(slot >= 0, kept, x_hat)
    return x_hat, g


def reference_bwd(
    dy2d: Tensor,
    y2d: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    weight_offset: float,
    rms: bool,
    dx_dtype: torch.dtype,
    kept_channels: Tensor,
    kept2d: Tensor,
) -> Tensor:
    """Torch backward (dx) on [M, N] rows from y and rstd (and the kept channels' x_hat) only."""
    x_hat, g = _reference_recover(y2d, dy2d, weight, bias, weight_offset, kept_channels, kept2d)
    # dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)), without mean(g) for RMSNorm
    dx = g - x_hat * (g * x_hat).mean(-1, keepdim=True)
    if not rms:
        dx = dx - g.mean(-1, keepdim=True)
    return (rstd.to(dx.dtype).unsqueeze(-1) * dx).to(dx_dtype)


def reference_bwd_affine(
    dy2d: Tensor,
    y2d: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    weight_offset: float,
    need_dweight: bool,
    need_dbias: bool,
    kept_channels: Tensor,
    kept2d: Tensor,
) -> tuple[Tensor, Tensor]:
    """Torch dweight = sum_rows(dy * x_hat), dbias = sum_rows(dy); [0]-sized when not asked."""
    acc = _compute_dtype(y2d.dtype, dy2d.dtype)
    empty = dy2d.new_empty((0,), dtype=acc)
    dweight = dbias = empty
    if need_dweight:
        x_hat, _ = _reference_recover(y2d, dy2d, weight, bias, weight_offset, kept_channels, kept2d)
        dweight = (dy2d.to(acc) * x_hat).sum(0)
    if need_dbias:
        dbias = dy2d.to(acc).sum(0)
    return dweight, dbias


# --------------------------------------------------------------------------------------------------
# Custom ops: one dispatch point each, fake implementations, autograd
# --------------------------------------------------------------------------------------------------


def _takes_triton(x: Tensor) -> bool:
    return x.dtype in _KERNEL_DTYPES and use_triton(x)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("lowmembp::ms_norm_fwd", mutates_args=())
def ms_norm_fwd(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    weight_offset: float,
    rms: bool,
    out_dtype: torch.dtype | None,
    keep_below: float = DEFAULT_KEEP_BELOW,
    kept_capacity: int = -1,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Memory-sharing norm forward over the last dim. Returns (y, rstd, kept_channels, kept_x_hat).

    Args:
        x: input [..., N], any strides, float16 / bfloat16 / float32 (float64: reference only).
        weight: [N] or None; the output is scaled by ``weight + weight_offset``.
        bias: [N] or None; added after the scale.
        eps: added to the variance (LayerNorm) or mean square (RMSNorm).
        weight_offset: 1.0 for Gemma-style ``(1 + w)`` norms, else 0.0.
        rms: True for RMSNorm, False for LayerNorm.
        out_dtype: dtype of y (autocast); None keeps ``x.dtype``.
        keep_below: channels with |weight + weight_offset| below this (or a shift large against
            the scale) keep their x_hat for backward (:func:`ill_conditioned_channels`).
        kept_capacity: -1 (eager): as many kept channels as there are (K read back: one sync);
            >= 0 (torch.compile): exactly that many entries, -1 padded, so no shape depends on values.

    Returns y (contiguous, shape of x), rstd (x.shape[:-1], float32; float64 for float64 x),
    kept_channels (int64 [K]) and kept_x_hat (x.shape[:-1] + (K,), rstd's dtype): x_hat of the
    ill-conditioned channels, usually K = 0. All of it is what backward saves: y is the very tensor
    returned to the caller.
    """
    n = x.shape[-1]
    out_dtype = out_dtype or x.dtype
    stats = _stats_dtype(x.dtype)
    kept_channels = ill_conditioned_channels(weight, bias, weight_offset, keep_below, kept_capacity).to(x.device)
    k = kept_channels.numel()
    if x.numel() == 0:
        y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        kept = torch.zeros((*x.shape[:-1], k), dtype=stats, device=x.device)
        return y, torch.zeros(x.shape[:-1], dtype=stats, device=x.device), kept_channels, kept
    x2d = _as_rows(x, n)
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    impl = triton_fwd if _takes_triton(x) else reference_fwd
    y2d, rstd, kept = impl(x2d, weight, bias, eps, weight_offset, rms, out_dtype, kept_channels)
    return y2d.view(x.shape), rstd.view(x.shape[:-1]), kept_channels, kept.view(*x.shape[:-1], k)


@ms_norm_fwd.register_fake
def _(x, weight, bias, eps, weight_offset, rms, out_dtype, keep_below=DEFAULT_KEEP_BELOW, kept_capacity=-1):
    y = x.new_empty(x.shape, dtype=out_dtype or x.dtype)
    k = kept_channels_size(weight, bias, kept_capacity)
    stats = _stats_dtype(x.dtype)
    kept_channels = x.new_empty((k,), dtype=torch.int64)
    return y, x.new_empty(x.shape[:-1], dtype=stats), kept_channels, x.new_empty((*x.shape[:-1], k), dtype=stats)


@torch.library.custom_op("lowmembp::ms_norm_bwd", mutates_args=())
def ms_norm_bwd(
    dy: Tensor,
    y: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    weight_offset: float,
    rms: bool,
    dx_dtype: torch.dtype,
    kept_channels: Tensor,
    kept_x_hat: Tensor,
) -> Tensor:
    """Memory-sharing norm backward: dx from dy, the saved y and rstd (and the parameters).

    Args:
        dy: gradient of y, [..., N], any strides.
        y, rstd, kept_channels, kept_x_hat: what :func:`ms_norm_fwd` returned.
        weight, bias, weight_offset, rms: as given to the forward.
        dx_dtype: dtype of dx (the forward input's dtype).
    """
    n = y.shape[-1]
    if y.numel() == 0:
        return torch.zeros(y.shape, dtype=dx_dtype, device=y.device)
    dy2d, y2d = _as_rows(dy, n), _as_rows(y, n)
    kept2d = _as_rows(kept_x_hat, kept_channels.numel())
    rstd = rstd.reshape(-1).contiguous()
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    impl = triton_bwd if _takes_triton(y) else reference_bwd
    return impl(dy2d, y2d, rstd, weight, bias, weight_offset, rms, dx_dtype, kept_channels, kept2d).view(y.shape)


@ms_norm_bwd.register_fake
def _(dy, y, rstd, weight, bias, weight_offset, rms, dx_dtype, kept_channels, kept_x_hat):
    return y.new_empty(y.shape, dtype=dx_dtype)


@torch.library.custom_op("lowmembp::ms_norm_bwd_affine", mutates_args=())
def ms_norm_bwd_affine(
    dy: Tensor,
    y: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    weight_offset: float,
    need_dweight: bool,
    need_dbias: bool,
    kept_channels: Tensor,
    kept_x_hat: Tensor,
) -> tuple[Tensor, Tensor]:
    """Parameter gradients: dweight = sum_rows(dy * x_hat), dbias = sum_rows(dy).

    Args:
        dy: gradient of y, [..., N].
        y, kept_channels, kept_x_hat: the saved forward output and kept channels.
        weight, bias, weight_offset: as given to the forward.
        need_dweight, need_dbias: which to compute; the other comes back with shape [0].

    Returns (dweight, dbias) in the dtypes of weight and bias.
    """
    n = y.shape[-1]
    if need_dweight and weight is None:
        raise ValueError("ms_norm_bwd_affine: need_dweight=True but the norm has no weight")
    if need_dbias and bias is None:
        raise ValueError("ms_norm_bwd_affine: need_dbias=True but the norm has no bias")
    # Custom op outputs cannot be None: a gradient not asked for is a fresh [0] tensor.
    dweight, dbias = y.new_empty((0,)), y.new_empty((0,))
    if y.numel() == 0:
        dweight = torch.zeros((n,), dtype=weight.dtype, device=y.device) if need_dweight else dweight
        dbias = torch.zeros((n,), dtype=bias.dtype, device=y.device) if need_dbias else dbias
        return dweight, dbias
    dy2d, y2d = _as_rows(dy, n), _as_rows(y, n)
    kept2d = _as_rows(kept_x_hat, kept_channels.numel())
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    impl = triton_bwd_affine if _takes_triton(y) else reference_bwd_affine
    dweight_acc, dbias_acc = impl(
        dy2d, y2d, weight, bias, weight_offset, need_dweight, need_dbias, kept_channels, kept2d
    )
    if need_dweight:
        dweight = dweight_acc.to(weight.dtype)
    if need_dbias:
        dbias = dbias_acc.to(bias.dtype)
    return dweight, dbias


@ms_norm_bwd_affine.register_fake
def _(dy, y, weight, bias, weight_offset, need_dweight, need_dbias, kept_channels, kept_x_hat):
    n = y.shape[-1]
    dweight = weight.new_empty((n,)) if need_dweight else y.new_empty((0,))
    dbias = bias.new_empty((n,)) if need_dbias else y.new_empty((0,))
    return dweight, dbias


def kept_channels_size(weight: Tensor | None, bias: Tensor | None, kept_capacity: int):
    """The fake size of the kept-channel outputs: the capacity, or (eager, -1) a size known only at
    run time from the weights' values (none without an affine)."""
    if kept_capacity >= 0:
        return kept_capacity
    return torch.library.get_ctx().new_dynamic_size() if (weight is not None or bias is not None) else 0


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, _eps, weight_offset, rms, _out_dtype, _keep_below, _kept_capacity = inputs
    y, rstd, kept_channels, kept_x_hat = output
    # The whole saved state: y (the returned tensor itself), rstd, the kept channels' x_hat (usually
    # none), and the parameters.
    ctx.save_for_backward(y, rstd, kept_channels, kept_x_hat, weight, bias)
    ctx.weight_offset = weight_offset
    ctx.rms = rms
    ctx.x_dtype = x.dtype
    ctx.mark_non_differentiable(rstd, kept_channels, kept_x_hat)


def grads_from_output(
    ctx,
    dy: Tensor,
    y: Tensor,
    rstd: Tensor,
    kept_channels: Tensor,
    kept_x_hat: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
):
    """(dx, dweight, dbias) from the saved output y, rstd and kept x_hat; None for what needs no gradient.

    ``ctx`` supplies ``needs_input_grad`` (x, weight, bias first), ``weight_offset``, ``rms`` and
    ``x_dtype``. Shared by this op and :mod:`lowmembp_convert.ops.norm_twin`.
    """
    need_dx, need_dweight, need_dbias = ctx.needs_input_grad[:3]
    dx = dweight = dbias = None
    if need_dx:
        dx = ms_norm_bwd(dy, y, rstd, weight, bias, ctx.weight_offset, ctx.rms, ctx.x_dtype, kept_channels, kept_x_hat)
    need_dweight = bool(need_dweight and weight is not None)
    need_dbias = bool(need_dbias and bias is not None)
    if need_dweight or need_dbias:  # the folded (no affine) norm never gets here
        dweight, dbias = ms_norm_bwd_affine(
            dy, y, weight, bias, ctx.weight_offset, need_dweight, need_dbias, kept_channels, kept_x_hat
        )
        dweight = dweight if need_dweight else None
        dbias = dbias if need_dbias else None
    return dx, dweight, dbias


def refuse_double_backward(dy: Tensor) -> None:
    """Second derivatives through a memory-sharing norm are not implemented: say so, never return
    silently wrong ones. Grad mode is on inside a backward only under ``create_graph=True``."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            "lowmembp_convert: double backward (create_graph=True: a gradient penalty, R1, Hessian-vector "
            "products) through a memory-sharing LayerNorm/RMSNorm is not supported. Convert with norms=False, "
            "or exclude the norms on this path with filter_fn."
        )


def _backward(ctx, dy: Tensor, _drstd: Tensor | None, _dkept_channels: Tensor | None, _dkept: Tensor | None):
    refuse_double_backward(dy)
    y, rstd, kept_channels, kept_x_hat, weight, bias = ctx.saved_tensors
    return (*grads_from_output(ctx, dy, y, rstd, kept_channels, kept_x_hat, weight, bias), *(None,) * 6)


ms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------


def _check(name: str, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> None:
    if x.dim() == 0:
        raise ValueError(f"{name}: x must have at least one dimension (the normalized one)")
    n = x.shape[-1]
    for label, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (n,):
            raise ValueError(
                f"{name}: {label} has shape {tuple(p.shape)} but x's last dim is {n}; "
                f"pass a 1-D {label} of size {n} (the norm acts over the last dim)"
            )


def ms_layer_norm(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    weight_offset: float = 0.0,
    out_dtype: torch.dtype | None = None,
    keep_below: float = DEFAULT_KEEP_BELOW,
    kept_capacity: int = -1,
) -> Tensor:
    """Memory-sharing LayerNorm over the last dim: y = (x - mean) * rstd * (w + offset) + b.

    Args:
        x: input [..., N]; any leading shape and strides; float32 / float16 / bfloat16.
        weight: optional [N] scale (any float dtype). Omit it when it is folded into consumers.
        bias: optional [N] shift.
        eps: added to the biased variance.
        weight_offset: the scale is ``weight + weight_offset`` (1.0 for ``(1 + w)`` norms).
        out_dtype: dtype of the result (the autocast dtype under autocast); default ``x.dtype``.
        keep_below: channels with |weight + offset| below this, or a bias large against it, keep
            their x_hat for backward (float32), chosen from the current weights in every call.
        kept_capacity: -1: every such channel (one host sync to size the buffer); >= 0: at most
            that many, no sync and no value-dependent shape (what a compiled module passes).

    Saved for backward: the returned y itself and rstd (one float32 per row), plus weight/bias, and
    x_hat of the ill-conditioned channels (usually none). Backward rebuilds x_hat = (y - b) / (w + offset)
    on every other channel.
    """
    _check("ms_layer_norm", x, weight, bias)
    eps, weight_offset, keep_below = float(eps), float(weight_offset), float(keep_below)
    return ms_norm_fwd(x, weight, bias, eps, weight_offset, False, out_dtype, keep_below, int(kept_capacity))[0]


def ms_rms_norm(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-6,
    weight_offset: float = 0.0,
    out_dtype: torch.dtype | None = None,
    keep_below: float = DEFAULT_KEEP_BELOW,
    kept_capacity: int = -1,
) -> Tensor:
    """Memory-sharing RMSNorm over the last dim: y = x * rstd * (w + offset) + b.

    Args:
        x: input [..., N]; any leading shape and strides; float32 / float16 / bfloat16.
        weight: optional [N] scale (any float dtype). Omit it when it is folded into consumers.
        bias: optional [N] shift.
        eps: added to mean(x^2).
        weight_offset: the scale is ``weight + weight_offset`` (1.0 for Gemma's ``(1 + w)``).
        out_dtype: dtype of the result (the autocast dtype under autocast); default ``x.dtype``.
        keep_below: channels with |weight + offset| below this, or a bias large against it, keep
            their x_hat for backward (float32), chosen from the current weights in every call.
        kept_capacity: -1: every such channel (one host sync to size the buffer); >= 0: at most
            that many, no sync and no value-dependent shape (what a compiled module passes).

    Saved for backward: the returned y itself and rstd (one float32 per row), plus weight/bias, and
    x_hat of the ill-conditioned channels (usually none). Backward rebuilds x_hat = (y - b) / (w + offset)
    on every other channel.
    """
    _check("ms_rms_norm", x, weight, bias)
    eps, weight_offset, keep_below = float(eps), float(weight_offset), float(keep_below)
    return ms_norm_fwd(x, weight, bias, eps, weight_offset, True, out_dtype, keep_below, int(kept_capacity))[0]
