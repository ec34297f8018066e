"""The constants of the exact GELU kernels, pinned.

A constant one float32 step off (0.134145 for tanh-GELU's 3 * kappa) moves about 15% of float32
gradients near act'(x) = 0 by up to a few hundred ulps, which no tolerance-based kernel test sees.
Three checks that do:

- every float literal in the kernels' GELU code equals the constant derived from its definition in
  ``lowmembp_convert/ops/constants.py`` (the derivation is tested too);
- interpreted (CPU): the tanh-GELU gradient kernel equals, bit for bit, a float32 numpy evaluation of
  PyTorch's formula term for term with the derived constants (tanh the interpreter's
  ``2 / (1 + exp(-2x)) - 1``), on inputs crowded around act'(x) = 0;
- GPU (``bench/gpu.sh``): the kernel against ``aten.gelu_backward`` itself.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lowmembp_convert.dispatch import triton_available
from lowmembp_convert.ops import constants as C

KERNELS = Path(__file__).parents[2] / "kernels"
DERIVED = {
    "sqrt(2/pi)": C.SQRT_2_OVER_PI,
    "kappa": C.GELU_TANH_KAPPA,
    "3 kappa (fp32 product)": C.GELU_TANH_3KAPPA_FP32,
    "1/sqrt(2)": C.INV_SQRT2,
    "1/sqrt(2 pi)": C.INV_SQRT_2PI,
}


def test_the_derivations() -> None:
    assert C.SQRT_2_OVER_PI == pytest.approx(0.7978845608028654, rel=1e-16)
    assert C.INV_SQRT2 * math.sqrt(2) == pytest.approx(1.0, rel=1e-16)
    three_kappa = np.float32(C.GELU_TANH_3KAPPA_FP32)
    assert three_kappa == np.float32(3.0) * np.float32(0.044715)  # the float32 product PyTorch forms
    assert three_kappa != np.float32(3 * 0.044715)  # not the rounded float64 product
    assert np.float32(0.134145) != three_kappa  # the one-step-off value this file exists to catch


def _literals(path: Path, function: str) -> list[float]:
    tree = ast.parse(path.read_text())
    (fn,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function]
    return [n.value for n in ast.walk(fn) if isinstance(n, ast.Constant) and isinstance(n.value, float)]


def _unexplained(literals: list[float]) -> list[float]:
    """Literals close to a derived constant (within 1e-5) but not equal to it: a mistyped constant."""
    plain = {0.5, 1.0, 2.0, 3.0, -0.5, -1.0, -2.0}
    return [
        v
        for v in literals
        if v not in plain
        and any(abs(v - d) <= 1e-5 * abs(d) for d in DERIVED.values())
        and not any(v == d for d in DERIVED.values())
    ]


@pytest.mark.parametrize(
    "path, function",
    [("recompute.py", "_activation_grad_fp32"), ("activations.py", "_activation_fp32")],
)
def test_every_kernel_literal_is_a_derived_constant(path: str, function: str) -> None:
    literals = _literals(KERNELS / path, function)
    assert literals, "no float literal found: the test no longer reads the kernel"
    assert not _unexplained(literals)
    recognised = {v for v in literals if v in DERIVED.values()}
    expected = {C.SQRT_2_OVER_PI, C.GELU_TANH_KAPPA, C.INV_SQRT2}
    if function == "_activation_grad_fp32":
        expected |= {C.GELU_TANH_3KAPPA_FP32, C.INV_SQRT_2PI}
    assert recognised == expected


def test_the_literal_check_catches_the_one_step_off_constant() -> None:
    assert _unexplained([0.134145]) == [0.134145]
    assert _unexplained([0.79788456]) == [0.79788456]
    assert _unexplained([C.GELU_TANH_3KAPPA_FP32]) == []


def _tanh_gelu_grad_fp32(x: np.ndarray, dy: np.ndarray, three_kappa: float) -> np.ndarray:
    """PyTorch's tanh-GELU backward, term for term in float32, tanh as the interpreter computes it."""
    f = np.float32
    k, kappa, c3 = f(C.SQRT_2_OVER_PI), f(C.GELU_TANH_KAPPA), f(three_kappa)
    x_sq = x * x
    x_cube = x_sq * x
    inner = k * (x + kappa * x_cube)
    t = f(2.0) / (f(1.0) + np.exp(f(-2.0) * inner)) - f(1.0)
    left = f(0.5) * x
    left_derivative = f(0.5) * (f(1.0) + t)
    right_derivative = left * (f(1.0) - t * t) * (k * (f(1.0) + c3 * x_sq))
    return dy * (left_derivative + right_derivative)


def _inputs() -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.default_rng(0)
    x = np.concatenate([gen.normal(-0.7518, 0.05, 6000), gen.normal(0, 3, 2000)]).astype(np.float32)
    return x, np.ones_like(x)


def test_the_emulation_tells_the_constants_apart() -> None:
    """The oracle below is sensitive: with 0.134145 a large share of gradients change."""
    x, dy = _inputs()
    with np.errstate(over="ignore"):
        right, off = _tanh_gelu_grad_fp32(x, dy, C.GELU_TANH_3KAPPA_FP32), _tanh_gelu_grad_fp32(x, dy, 0.134145)
    assert (right != off).mean() > 0.05


@pytest.mark.triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below checks the compiled kernel")
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_interpreted_tanh_gelu_gradient_is_the_formula_bit_for_bit() -> None:
    from lowmembp_convert.ops.recompute_launch import triton_act_grads

    x, dy = _inputs()
    da, _ = triton_act_grads(torch.from_numpy(dy), torch.from_numpy(x), None, "gelu_tanh")
    with np.errstate(over="ignore"):
        expected = _tanh_gelu_grad_fp32(x, dy, C.GELU_TANH_3KAPPA_FP32)
    assert np.array_equal(da.numpy(), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs in bench/gpu.sh)")
@pytest.mark.parametrize("kind", ["gelu", "gelu_tanh"])
def test_gpu_gelu_gradient_kernel_against_aten(kind: str) -> None:
    """Against aten's own CUDA kernel: at most one ulp of the result on 99.9% of the elements, and
    never more than one ulp of the larger term (nvcc and Triton may contract differently into fma)."""
    from lowmembp_convert.ops.recompute_launch import triton_act_grads

    x, _ = _inputs()
    a = torch.from_numpy(x).cuda()
    dy = torch.ones_like(a)
    da, _ = triton_act_grads(dy, a, None, kind)
    ref = torch.ops.aten.gelu_backward(dy, a, approximate="tanh" if kind == "gelu_tanh" else "none")
    ulp = torch.finfo(torch.float32).eps * ref.abs().clamp_min(torch.finfo(torch.float32).tiny)
    err = (da - ref).abs()
    assert (err <= ulp).float().mean().item() >= 0.999
    assert (err <= torch.finfo(torch.float32).eps * 1.5).all()  # terms are at most ~1.1 in size
