"""Folding a norm's per-channel affine into the layer that consumes its output.

For y = x_hat * gamma + beta feeding z = W y + b (``linear`` layout, W is [out, in]):
    z = (W * gamma) x_hat + (b + W @ beta)
so W' = W * gamma (scale input columns) and b' = b + W @ beta. The ``conv1d`` layout (transformers'
Conv1D, W is [in, out], z = y @ W + b) scales rows instead. The math runs in float64 and is cast
back once, so folding adds one rounding, not a chain of them. The ``conv`` layout (W is
[out, in / groups, *kernel]) scales each weight by the gamma of the input channel it reads; its
bias shift sums W over the kernel (valid only without zero padding, which the analysis checks).
Tensor-level on purpose: the in-memory rewrite and the streaming checkpoint converter call the same
function.
"""

from __future__ import annotations

import torch

from ..plan import ConsumerLayout


def fold_affine_into(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    layout: ConsumerLayout = "linear",
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return the consumer's (weight, bias) with the norm's affine folded in.

    Args:
        weight: consumer weight, [out, in] for ``linear`` or [in, out] for ``conv1d``.
        bias: consumer bias [out] or None. Must exist when ``beta`` is given.
        gamma: effective per-channel scale [in] (already ``w + offset`` for 1+w norms), or None.
        beta: per-channel shift [in], or None.
        layout: which weight axis is the input-channel axis.
        groups: convolution groups (``conv`` layout only).
    Returns:
        New tensors in the dtypes of ``weight`` and ``bias``; the inputs are not modified.
    """
    if layout not in ("linear", "conv1d", "conv"):
        raise ValueError(f"unknown consumer layout {layout!r}; expected 'linear', 'conv1d' or 'conv'")
    if layout == "conv":
        return _fold_into_conv(weight, bias, gamma, beta, groups)
    in_dim = 1 if layout == "linear" else 0
    channels = weight.shape[in_dim]
    for name, vec in (("gamma", gamma), ("beta", beta)):
        if vec is not None and vec.shape != (channels,):
            raise ValueError(
                f"{name} has shape {tuple(vec.shape)} but the consumer weight {tuple(weight.shape)} "
                f"has {channels} input channels"
            )
    if beta is not None and bias is None:
        raise ValueError("cannot fold a norm bias into a consumer without a bias")
    w64 = weight.detach().to(torch.float64)
    new_weight = weight
    if gamma is not None:
        g64 = gamma.detach().to(torch.float64)
        scaled = w64 * (g64 if layout == "linear" else g64[:, None])
        new_weight = scaled.to(weight.dtype)
    new_bias = bias
    if beta is not None:
        b64 = beta.detach().to(torch.float64)
        shift = w64 @ b64 if layout == "linear" else b64 @ w64
        new_bias = (bias.detach().to(torch.float64) + shift).to(bias.dtype)
    return new_weight, new_bias


def _fold_into_conv(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    out_channels, in_per_group = weight.shape[0], weight.shape[1]
    channels = in_per_group * groups
    for name, vec in (("gamma", gamma), ("beta", beta)):
        if vec is not None and vec.shape != (channels,):
            raise ValueError(
                f"{name} has shape {tuple(vec.shape)} but the conv weight {tuple(weight.shape)} with "
                f"groups={groups} reads {channels} input channels"
            )
    if beta is not None and bias is None:
        raise ValueError("cannot fold a norm bias into a convolution without a bias")
    # channel_of[o, j]: the input channel that weight[o, j] multiplies
    group = torch.arange(out_channels, device=weight.device) // (out_channels // groups)
    channel_of = group[:, None] * in_per_group + torch.arange(in_per_group, device=weight.device)[None, :]
    w64 = weight.detach().to(torch.float64)
    kernel_dims = (1,) * (weight.dim() - 2)
    new_weight, new_bias = weight, bias
    if gamma is not None:
        g64 = gamma.detach().to(torch.float64)[channel_of]
        new_weight = (w64 * g64.reshape(*g64.shape, *kernel_dims)).to(weight.dtype)
    if beta is not None:
        b64 = beta.detach().to(torch.float64)[channel_of]
        summed = w64.sum(dim=tuple(range(2, weight.dim()))) if weight.dim() > 2 else w64
        new_bias = (bias.detach().to(torch.float64) + (summed * b64).sum(1)).to(bias.dtype)
    return new_weight, new_bias
