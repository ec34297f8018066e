"""Thin modules over the ops: what the converter swaps into a model."""

from .activations import ReGELU2, ReSiLU2
from .handoff import HandoffActivation, HandoffLinear
from .linear import TwinLinear, UpcastInputLinear
from .norms import MSLayerNorm, MSRMSNorm

__all__ = [
    "HandoffActivation",
    "HandoffLinear",
    "MSLayerNorm",
    "MSRMSNorm",
    "ReGELU2",
    "ReSiLU2",
    "TwinLinear",
    "UpcastInputLinear",
]
