"""Differentiable ops: ReGELU2/ReSiLU2 and memory-sharing norms (autograd + torch reference + launchers)."""

from .activations import regelu2, resilu2
from .norm_twin import ms_norm_with_twin
from .norms import ms_layer_norm, ms_rms_norm

__all__ = ["ms_layer_norm", "ms_norm_with_twin", "ms_rms_norm", "regelu2", "resilu2"]
