"""Thin modules over :mod:`lowmembp_convert.ops.activations`: drop-in nn.GELU / nn.SiLU replacements.

Forward is exact (the stock GELU / SiLU, bit for bit on the torch path); backward is approximate
(a 4-level step function of docs/method.md section 1), and only 2 bits per element are saved for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowmembp_convert.ops.activations import regelu2, resilu2

__all__ = ["ReGELU2", "ReSiLU2"]


class ReGELU2(nn.Module):
    """GELU with an approximate (ReGELU2) backward that saves 2 bits per element.

    Args:
        approximate: ``"none"`` (erf-GELU) or ``"tanh"`` (tanh-GELU), as in ``nn.GELU``.
        inplace: write the result into the input too (as ``nn.GELU``-style in-place modules do,
            whose callers may read the input afterwards); still only the 2-bit codes are saved.
    """

    lowmembp_converted = True  # the converter leaves modules carrying this alone
    exact_forward = True
    exact_backward = False

    def __init__(self, approximate: str = "none", inplace: bool = False) -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"ReGELU2: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate
        self.inplace = bool(inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            not torch.compiler.is_compiling() and _functorch_active()
        ):  # per-sample gradients etc.: the stock op, exact (see _functorch_active)
            return _inplace(x, F.gelu(x, approximate=self.approximate), self.inplace)
        return _inplace(x, regelu2(x, self.approximate), self.inplace)

    def extra_repr(self) -> str:
        mode = ", inplace=True" if self.inplace else ""
        return f"approximate={self.approximate!r}{mode}, forward=exact, backward=2-bit step"


class ReSiLU2(nn.Module):
    """SiLU with an approximate (ReSiLU2) backward that saves 2 bits per element.

    Args:
        inplace: write the result into the input too (see :class:`ReGELU2`).
    """

    lowmembp_converted = True  # the converter leaves modules carrying this alone
    exact_forward = True
    exact_backward = False

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = bool(inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() and _functorch_active():
            return _inplace(x, F.silu(x), self.inplace)
        return _inplace(x, resilu2(x), self.inplace)

    def extra_repr(self) -> str:
        mode = "inplace=True, " if self.inplace else ""
        return f"{mode}forward=exact, backward=2-bit step"


def _inplace(x: torch.Tensor, y: torch.Tensor, inplace: bool) -> torch.Tensor:
    """The in-place contract of the replaced module: its input holds the result afterwards."""
    if not inplace:
        return y
    return x.copy_(y)


def _functorch_active() -> bool:
    """True inside torch.func transforms (vmap, grad, jacrev...), where the custom ops have no rules.

    There the stock op runs instead: exact forward and exact gradients (per-sample gradients of a
    converted model are the stock model's), only the memory saving is not had inside the transform.
    """
    return torch._C._are_functorch_transforms_active()
