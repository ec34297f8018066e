"""ReGELU2 / ReSiLU2 constants (Yang et al., ICML 2024, docs/method.md section 1), used exactly.

code(x) = [x > c0] + [x > c1] + [x > c2] in 0..3, and the approximate derivative is
level[code] with level = [0, a0, a0 + a1, a0 + a1 + a2]. The level sums are formed in float64 and
rounded once to float32, so the Triton kernels and the torch reference multiply by the very same
float32 numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StepDerivative:
    """A 4-level step approximation of an activation's derivative."""

    name: str
    a: tuple[float, float, float]
    c: tuple[float, float, float]

    @property
    def thresholds_fp32(self) -> tuple[float, float, float]:
        """c0 < c1 < c2 rounded to float32 (the comparison happens in float32)."""
        return tuple(float(np.float32(c)) for c in self.c)

    @property
    def levels_fp32(self) -> tuple[float, float, float, float]:
        """[0, a0, a0 + a1, a0 + a1 + a2]: summed in float64, rounded once to float32."""
        a0, a1, a2 = self.a
        return tuple(float(np.float32(v)) for v in (0.0, a0, a0 + a1, a0 + a1 + a2))


REGELU2 = StepDerivative(
    name="ReGELU2",
    a=(-0.04922261145617846, 1.0979632065417297, -0.048740595085551286),
    c=(-3.1858810036855245, -0.001178821281161997, 3.190832613414926),
)
RESILU2 = StepDerivative(
    name="ReSiLU2",
    a=(-0.04060357190528599, 1.080925428529668, -0.040321856624382146),
    c=(-6.3050461001646445, -0.0008684942046214787, 6.325815242089708),
)


# --------------------------------------------------------------------------------------------------
# GELU constants of the exact kernels (kernels/activations.py, kernels/recompute.py), derived here from
# their definitions; tests/ops/test_kernel_constants.py checks every literal in the kernels against them.
# --------------------------------------------------------------------------------------------------

GELU_TANH_KAPPA = 0.044715  # the cubic coefficient of the tanh approximation (Hendrycks & Gimpel)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)  # k in tanh(k (x + kappa x^3))
INV_SQRT2 = math.sqrt(0.5)  # erf-GELU: Phi(x) = 0.5 (1 + erf(x / sqrt(2)))
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)  # erf-GELU: phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
# tanh-GELU's derivative has k (1 + 3 kappa x^2). PyTorch's kernels form 3 * kappa in float32 (two
# float32 operands, one rounding); the float64 product 3 * 0.044715 rounds to a different float32
# (0.134145 is one float32 step away), so the kernels use this value, not round(3 * kappa):
GELU_TANH_3KAPPA_FP32 = float(np.float32(np.float32(3.0) * np.float32(GELU_TANH_KAPPA)))
