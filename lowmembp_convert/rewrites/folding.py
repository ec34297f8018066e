"""Folding a norm's per-channel affine into the layer that consumes its output.

For y = x_hat * gamma + beta feeding z = W y + b (``linear`` layout, W is [out, in]):
    z = (W * gamma) x_hat + (b + W @ beta)
so W' = W * gamma (scale input columns) and b' = b + W @ beta. The ``conv1d`` layout (transformers'
Conv1D, W is [in, out], z = y @ W + b) scales rows instead. The math runs in float64 and is cast
back once, so folding adds one rounding, not a chain of them. Tensor-level on purpose: the in-memory
rewrite and the streaming checkpoint converter call the same function.
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return the consumer's (weight, bias) with the norm's affine folded in.

    Args:
        weight: consumer weight, [out, in] for ``linear`` or [in, out] for ``conv1d``.
        bias: consumer bias [out] or None. Must exist when ``beta`` is given.
        gamma: effective per-channel scale [in] (already ``w + offset`` for 1+w norms), or None.
        beta: per-channel shift [in], or None.
        layout: which weight axis is the input-channel axis.
    Returns:
        New tensors in the dtypes of ``weight`` and ``bias``; the inputs are not modified.
    """
    if layout not in ("linear", "conv1d"):
        raise ValueError(f"unknown consumer layout {layout!r}; expected 'linear' or 'conv1d'")
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
