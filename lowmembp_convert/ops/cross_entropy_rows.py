"""Cross-entropy of a chunk of logit rows, with its gradient written in place: the loss head's row op.

For a chunk of [R, V] logits (the head's output for R rows, after any elementwise recipe), with
targets [R] and a gradient factor ``scale`` (a float32 scalar tensor: 1 / counted rows, or
1 / ``num_items_in_batch``):

    lse_r  = log(sum_j exp(x_rj))                          (float32)
    loss_r = lse_r - x_r,target_r                          (0 where target_r == ignore_index)
    grad_rj = (exp(x_rj - lse_r) - [j == target_r]) * scale (0 on ignored rows), in the logits' dtype

which is what ``cross_entropy(x.float(), target, ignore_index, reduction="sum") * scale`` and its
backward give, computed without a float32 copy of the chunk: the gradient overwrites the logits
(``ce_rows_grad_``), so a fused head holds one chunk of logits at a time and nothing else of
size R x V.

Two tiers (the kernel is the third, ``kernels/cross_entropy.py``, imported lazily):

- :func:`triton_ce_rows` launches ``ce_rows_kernel`` (CUDA tensors, or any tensors under
  ``LOWMEMBP_FORCE_TRITON=1`` with ``TRITON_INTERPRET=1``): an online log-sum-exp over blocks of
  the row, then the gradient block by block.
- :func:`reference_ce_rows`: torch ops in float32 (the CPU path and the kernel's oracle).

Custom ops (opcheck'ed in tests/ops/test_cross_entropy_rows.py):

- ``lowmembp::ce_rows`` (logits, target, ignore_index) -> (loss [R], lse [R]): no gradient.
- ``lowmembp::ce_rows_grad_`` (logits, target, scale, ignore_index) -> (loss, lse), and
  ``logits`` becomes the gradient (mutated in place).

Nothing is saved for backward: these are building blocks of the head's autograd Functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..dispatch import use_triton

__all__ = [
    "TRITON_DTYPES",
    "ce_rows",
    "ce_rows_grad_",
    "launch_settings",
    "reference_ce_rows",
    "triton_ce_rows",
]

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Columns per block: 4 warps x 32 threads x 8 fp32 values per thread in each of the row's passes.
MAX_BLOCK_V = 4096


@dataclass(frozen=True)
class LaunchSettings:
    """``ce_rows_kernel``'s launch: one program per row, BLOCK_V columns per step of its loops."""

    block_v: int
    num_warps: int


def launch_settings(vocab: int) -> LaunchSettings:
    """BLOCK_V: the row's length rounded up to a power of two, at most MAX_BLOCK_V (longer rows loop)."""
    block = min(MAX_BLOCK_V, max(16, 1 << max(0, int(vocab) - 1).bit_length()))
    return LaunchSettings(block, 4 if block <= 1024 else 8)


def _check(logits: Tensor, target: Tensor) -> None:
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(
            f"ce_rows: logits must be [R, V] and target [R]; got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    if target.dtype != torch.int64:
        raise TypeError(f"ce_rows: target must be int64 class indices, got {target.dtype}")
    if logits.stride(-1) != 1:
        raise ValueError("ce_rows: the logits' rows must be contiguous (stride 1 along the vocabulary)")


def reference_ce_rows(
    logits: Tensor, target: Tensor, ignore_index: int, scale: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(loss [R], lse [R], grad [R, V] in the logits' dtype or None when ``scale`` is None), in float32 torch."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    counted = (target != ignore_index) & (target >= 0) & (target < x.shape[-1])
    safe = torch.where(counted, target, torch.zeros_like(target))
    x_target = x.gather(1, safe[:, None]).squeeze(1)
    loss = torch.where(counted, lse - x_target, torch.zeros_like(lse))
    if scale is None:
        return loss, lse, None
    grad = torch.exp(x - lse[:, None])
    grad.scatter_add_(1, safe[:, None], -torch.ones_like(x_target)[:, None])
    grad *= torch.where(counted, scale.float(), torch.zeros_like(lse))[:, None]
    return loss, lse, grad.to(logits.dtype)


def triton_ce_rows(
    logits: Tensor, target: Tensor, ignore_index: int, scale: Tensor | None = None, grad: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Launch ``ce_rows_kernel``: (loss, lse); with ``scale`` the gradient goes into ``grad`` (may be ``logits``)."""
    from lowmembp_convert.kernels import cross_entropy as kernels

    _check(logits, target)
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(loss)
    if rows == 0:
        return loss, lse
    has_grad = scale is not None
    if has_grad and (grad is None or grad.shape != logits.shape or grad.stride(-1) != 1):
        raise ValueError("triton_ce_rows: a gradient needs a [R, V] grad buffer with contiguous rows")
    scale_buf = scale.reshape(1).to(device=logits.device, dtype=torch.float32) if has_grad else loss
    s = launch_settings(vocab)
    kernels.ce_rows_kernel[(rows,)](
        logits, target, scale_buf, loss, lse, grad if has_grad else logits,
        logits.stride(0), grad.stride(0) if has_grad else 0, vocab, ignore_index,
        HAS_GRAD=has_grad, BLOCK_V=s.block_v, num_warps=s.num_warps,
    )  # fmt: skip
    return loss, lse


def _triton_path(logits: Tensor) -> bool:
    return use_triton(logits) and logits.dtype in TRITON_DTYPES


@torch.library.custom_op("lowmembp::ce_rows", mutates_args=())
def ce_rows(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(loss [R], lse [R]) in float32 of the [R, V] ``logits`` against ``target`` [R] (int64)."""
    _check(logits, target)
    if _triton_path(logits):
        return triton_ce_rows(logits, target, ignore_index)
    loss, lse, _ = reference_ce_rows(logits, target, ignore_index)
    return loss, lse


@ce_rows.register_fake
def _(logits, target, ignore_index):
    return logits.new_empty(logits.shape[:1], dtype=torch.float32), logits.new_empty(
        logits.shape[:1], dtype=torch.float32
    )


@torch.library.custom_op("lowmembp::ce_rows_grad_", mutates_args=("logits",))
def ce_rows_grad_(logits: Tensor, target: Tensor, scale: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(loss, lse) as :func:`ce_rows`; ``logits`` is overwritten with the gradient of
    ``sum(loss) * scale`` (``scale``: a float32 scalar tensor), in its own dtype."""
    _check(logits, target)
    if _triton_path(logits):
        return triton_ce_rows(logits, target, ignore_index, scale, grad=logits)
    loss, lse, grad = reference_ce_rows(logits, target, ignore_index, scale)
    logits.copy_(grad)
    return loss, lse


@ce_rows_grad_.register_fake
def _(logits, target, scale, ignore_index):
    return logits.new_empty(logits.shape[:1], dtype=torch.float32), logits.new_empty(
        logits.shape[:1], dtype=torch.float32
    )
