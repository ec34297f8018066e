"""Differentiable ops: ReGELU2/ReSiLU2, memory-sharing norms and their post-norm twin, the exact MLP
recompute (autograd + torch reference + launchers)."""

from .activations import regelu2, resilu2
from .norm_twin import ms_norm_with_twin
from .norms import ms_layer_norm, ms_rms_norm
from .recompute import act_linear

__all__ = ["act_linear", "ms_layer_norm", "ms_norm_with_twin", "ms_rms_norm", "regelu2", "resilu2"]
