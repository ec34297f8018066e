"""ReGELU2 and ReSiLU2 (Approx-BP, docs/method.md section 1): exact forward, 2-bit step-function backward.

Three tiers, as in TransformerEngine:

1. Triton launchers (``_triton_fwd`` / ``_triton_bwd``) around the kernels of
   ``lowmembp_convert.kernels.activations``, imported lazily so a CPU-only install never imports Triton.
2. The torch reference (``_reference_fwd`` / ``_reference_bwd``): the stock ``F.gelu`` / ``F.silu``
   plus :func:`pack_codes`; it is also the test oracle of the kernels.
3. ``torch.library`` custom ops ``lowmembp::regelu2_fwd``, ``lowmembp::resilu2_fwd`` and
   ``lowmembp::step_bwd`` with fake (meta) kernels and autograd, so ``torch.compile(fullgraph=True)``
   traces them without graph breaks; :func:`regelu2` and :func:`resilu2` are the public entry points.

The only tensor saved for backward is the uint8 tensor of packed codes, ceil(n / 4) bytes:
element 4j + k of the flattened input sits at bits 2k..2k+1 of byte j.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowmembp_convert.dispatch import use_triton
from lowmembp_convert.ops.constants import REGELU2, RESILU2, StepDerivative

__all__ = ["regelu2", "resilu2", "pack_codes", "unpack_codes", "step_codes", "packed_numel"]

# Which step function each custom op uses; the name is what lowmembp::step_bwd receives.
_STEPS: dict[str, StepDerivative] = {"regelu2": REGELU2, "resilu2": RESILU2}
# The forward activations the kernels know, keyed like F.gelu's `approximate` (plus "silu").
_GELU_APPROXIMATIONS = ("none", "tanh")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Codes: computation and packing (torch reference, also the oracle of the kernels)
# --------------------------------------------------------------------------------------------------


def packed_numel(n_elements: int) -> int:
    """Bytes of packed codes for ``n_elements`` elements: ceil(n / 4)."""
    return (n_elements + 3) // 4


def step_codes(x: torch.Tensor, step: StepDerivative) -> torch.Tensor:
    """code = [x > c0] + [x > c1] + [x > c2] per element, flattened, as uint8 in 0..3.

    Args:
        x: input of any shape; fp16/bf16/fp32 are compared in fp32 (exact upcast), fp64 in fp64,
            always against the fp32-rounded thresholds.
        step: the step function whose thresholds to use.
    """
    xc = x.reshape(-1)
    xc = xc if xc.dtype == torch.float64 else xc.float()
    c0, c1, c2 = step.thresholds_fp32
    return (xc > c0).to(torch.uint8) + (xc > c1) + (xc > c2)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Pack 2-bit codes 4 per byte: element 4j + k goes to bits 2k..2k+1 of byte j.

    Args:
        codes: uint8 tensor of any shape with values in 0..3 (flattened in row-major order).

    Returns:
        uint8 tensor of ceil(n / 4) bytes; the unused high bits of the last byte are 0.
    """
    flat = codes.reshape(-1).to(torch.uint8)
    padded = F.pad(flat, (0, (-flat.numel()) % 4)).view(-1, 4)
    return padded[:, 0] | (padded[:, 1] << 2) | (padded[:, 2] << 4) | (padded[:, 3] << 6)


def unpack_codes(packed: torch.Tensor, n_elements: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes in 0..3, flat, ``n_elements`` long.

    Args:
        packed: uint8 tensor of ceil(n_elements / 4) bytes.
        n_elements: number of codes to return.
    """
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=packed.device)
    return ((packed.reshape(-1, 1) >> shifts) & 3).reshape(-1)[:n_elements]


# --------------------------------------------------------------------------------------------------
# Tier 1: Triton launchers
# --------------------------------------------------------------------------------------------------


def _launch_config(n_elements: int) -> tuple[tuple[int], int, int]:
    """Grid, BLOCK and num_warps of both kernels: 16 elements per thread, up to 4096 per program."""
    block = 4096
    while block > 64 and block // 2 >= n_elements:
        block //= 2  # small tensors: one small program rather than a mostly masked one
    num_warps = max(1, min(8, block // 512))
    return ((n_elements + block - 1) // block,), block, num_warps


def _triton_activation_id(activation: str) -> int:
    from lowmembp_convert.kernels import activations as kernels

    return {"none": kernels.GELU_ERF, "tanh": kernels.GELU_TANH, "silu": kernels.SILU}[activation]


def _triton_fwd(x: torch.Tensor, activation: str, step: StepDerivative) -> tuple[torch.Tensor, torch.Tensor]:
    from lowmembp_convert.kernels import activations as kernels

    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    codes = torch.empty(packed_numel(x.numel()), dtype=torch.uint8, device=x.device)
    n = x.numel()
    if n == 0:
        return y, codes
    grid, block, num_warps = _launch_config(n)
    c0, c1, c2 = step.thresholds_fp32
    kernels._step_activation_fwd_kernel[grid](
        x, y, codes, n, c0, c1, c2,
        ACTIVATION=_triton_activation_id(activation), BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    return y, codes


def _triton_bwd(grad: torch.Tensor, codes: torch.Tensor, step: StepDerivative) -> torch.Tensor:
    from lowmembp_convert.kernels import activations as kernels

    dx = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
    n = grad.numel()
    if n == 0:
        return dx
    grid, block, num_warps = _launch_config(n)
    l0, l1, l2, l3 = step.levels_fp32
    kernels._step_activation_bwd_kernel[grid](grad, codes, dx, n, l0, l1, l2, l3, BLOCK=block, num_warps=num_warps)
    return dx


# --------------------------------------------------------------------------------------------------
# Tier 2: torch reference
# --------------------------------------------------------------------------------------------------


def _reference_activation(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(x)
    return F.gelu(x, approximate=activation)


def _reference_fwd(x: torch.Tensor, activation: str, step: StepDerivative) -> tuple[torch.Tensor, torch.Tensor]:
    # The stock op on x as given (torch's strided CPU loops round differently from its contiguous
    # ones), so the forward is bit-identical to the unconverted model's; then made contiguous.
    y = _reference_activation(x, activation).contiguous()
    return y, pack_codes(step_codes(x, step))


def _reference_bwd(grad: torch.Tensor, codes: torch.Tensor, step: StepDerivative) -> torch.Tensor:
    compute_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    levels = torch.tensor(step.levels_fp32, dtype=compute_dtype, device=grad.device)
    level = levels.index_select(0, unpack_codes(codes, grad.numel()).to(torch.int32))
    return (grad.to(compute_dtype) * level.view(grad.shape)).to(grad.dtype)


# --------------------------------------------------------------------------------------------------
# Tier 3: custom ops, fake kernels, autograd
# --------------------------------------------------------------------------------------------------


def _step_fwd(x: torch.Tensor, activation: str, step: StepDerivative) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x) and x.dtype in _TRITON_DTYPES:
        return _triton_fwd(x.contiguous(), activation, step)
    return _reference_fwd(x, activation, step)


def _step_fwd_fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return y, x.new_empty(((x.numel() + 3) // 4,), dtype=torch.uint8)


@torch.library.custom_op("lowmembp::regelu2_fwd", mutates_args=())
def regelu2_fwd(x: torch.Tensor, approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """y = gelu(x, approximate) (exact) and the packed ReGELU2 codes of x (uint8, ceil(n / 4))."""
    return _step_fwd(x, approximate, REGELU2)


@torch.library.custom_op("lowmembp::resilu2_fwd", mutates_args=())
def resilu2_fwd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y = silu(x) (exact) and the packed ReSiLU2 codes of x (uint8, ceil(n / 4))."""
    return _step_fwd(x, "silu", RESILU2)


@torch.library.custom_op("lowmembp::step_bwd", mutates_args=())
def step_bwd(grad: torch.Tensor, codes: torch.Tensor, step: str) -> torch.Tensor:
    """grad * level[code] with the fp32 levels of ``step`` ("regelu2" or "resilu2")."""
    grad = grad.contiguous()
    if use_triton(grad) and grad.dtype in _TRITON_DTYPES:
        return _triton_bwd(grad, codes, _STEPS[step])
    return _reference_bwd(grad, codes, _STEPS[step])


@regelu2_fwd.register_fake
def _regelu2_fwd_fake(x: torch.Tensor, approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _step_fwd_fake(x)


@resilu2_fwd.register_fake
def _resilu2_fwd_fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _step_fwd_fake(x)


@step_bwd.register_fake
def _step_bwd_fake(grad: torch.Tensor, codes: torch.Tensor, step: str) -> torch.Tensor:
    return torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)


def _save_codes_only(ctx, inputs, output) -> None:
    # Exactly one tensor is kept for backward: the packed codes. Shape and dtype are plain attributes.
    x = inputs[0]
    ctx.save_for_backward(output[1])
    ctx.x_shape = x.shape
    ctx.x_dtype = x.dtype


def _step_backward(ctx, grad_y: torch.Tensor, step: str) -> torch.Tensor:
    (codes,) = ctx.saved_tensors
    return step_bwd(grad_y, codes, step).to(ctx.x_dtype).view(ctx.x_shape)


def _regelu2_backward(ctx, grad_y: torch.Tensor, grad_codes: torch.Tensor | None):
    return _step_backward(ctx, grad_y, "regelu2"), None


def _resilu2_backward(ctx, grad_y: torch.Tensor, grad_codes: torch.Tensor | None):
    return _step_backward(ctx, grad_y, "resilu2")


regelu2_fwd.register_autograd(_regelu2_backward, setup_context=_save_codes_only)
resilu2_fwd.register_autograd(_resilu2_backward, setup_context=_save_codes_only)


def _step_bwd_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1])
    ctx.step = inputs[2]


def _step_bwd_backward(ctx, grad_dx: torch.Tensor):
    # step_bwd is linear in grad with the same diagonal, so double backward is step_bwd again.
    (codes,) = ctx.saved_tensors
    return step_bwd(grad_dx, codes, ctx.step), None, None


step_bwd.register_autograd(_step_bwd_backward, setup_context=_step_bwd_setup_context)


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------


def regelu2(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU forward, exact; ReGELU2 step-function backward.

    Args:
        x: input of any shape and strides (a non-contiguous x is copied), fp32/fp16/bf16 (fp64 runs
            the torch reference).
        approximate: ``"none"`` (erf-GELU) or ``"tanh"`` (tanh-GELU), as in ``F.gelu``. Both share
            the ReGELU2 constants.

    Returns:
        ``F.gelu(x, approximate=approximate)``, contiguous, x's shape and dtype.

    Saved for backward: one uint8 tensor of ceil(x.numel() / 4) bytes (2-bit codes); x's shape and
    dtype as plain attributes.
    """
    if approximate not in _GELU_APPROXIMATIONS:
        raise ValueError(f"regelu2: approximate must be 'none' or 'tanh', got {approximate!r}")
    return regelu2_fwd(x, approximate)[0]


def resilu2(x: torch.Tensor) -> torch.Tensor:
    """SiLU forward, exact; ReSiLU2 step-function backward.

    Args:
        x: input of any shape and strides (a non-contiguous x is copied), fp32/fp16/bf16 (fp64 runs
            the torch reference).

    Returns:
        ``F.silu(x)``, contiguous, x's shape and dtype.

    Saved for backward: one uint8 tensor of ceil(x.numel() / 4) bytes (2-bit codes); x's shape and
    dtype as plain attributes.
    """
    return resilu2_fwd(x)[0]
