"""Thin modules over :mod:`lowmembp_convert.ops.activations`: drop-in nn.GELU / nn.SiLU replacements.

Forward is exact (the stock GELU / SiLU, bit for bit on the torch path); backward is approximate
(a 4-level step function of METHOD.md section 1), and only 2 bits per element are saved for it.
"""

from __future__ import annotations

import torch
from torch import nn

from lowmembp_convert.ops.activations import regelu2, resilu2

__all__ = ["ReGELU2", "ReSiLU2"]


class ReGELU2(nn.Module):
    """GELU with an approximate (ReGELU2) backward that saves 2 bits per element.

    Args:
        approximate: ``"none"`` (erf-GELU) or ``"tanh"`` (tanh-GELU), as in ``nn.GELU``.
    """

    lowmembp_converted = True  # the converter leaves modules carrying this alone
    exact_forward = True
    exact_backward = False

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"ReGELU2: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return regelu2(x, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}, forward=exact, backward=2-bit step"


class ReSiLU2(nn.Module):
    """SiLU with an approximate (ReSiLU2) backward that saves 2 bits per element."""

    lowmembp_converted = True  # the converter leaves modules carrying this alone
    exact_forward = True
    exact_backward = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resilu2(x)

    def extra_repr(self) -> str:
        return "forward=exact, backward=2-bit step"
