"""Exact-recompute kernels (rebuild p, activation gradients) against the stock ops and a float64 oracle.

The Triton tests call the launchers of ``lowmembp_convert.ops.recompute_launch`` directly (no
dispatch to force); on a machine without CUDA the kernels run under TRITON_INTERPRET=1, set by
tests/conftest.py before Triton is imported.

What is checked, and how tightly:

- Reference: bit for bit what autograd gives for the stock ``F.gelu`` / ``F.silu`` (``* u``) graph.
- Rounding structure of the kernels, exactly: gated p is the plain kernel's h times u rounded once;
  gated du is round(dp * h); gated dg is the plain gradient kernel fed dh = round(dp * u).
- Rebuild against the torch reference. Not bitwise in the interpreter: there erf is ``math.erf``
  (rounded from float64), exp numpy's float32 exp and tanh the exp-based helper of
  ``kernels/activations.py``, while torch's CPU kernels use their own vectorized erf / exp / tanh. They
  differ by an ulp or so (measured: about a third of the fp32 erf-GELU elements), and
  ``1 + erf(x / sqrt(2))`` / ``1 + tanh(.)`` cancel for x << 0, so the difference scales with |x|,
  not |h|: ``|h - h_ref| <= 8 eps32 max(|a|, |h_ref|)`` (measured: at most 3.0 in these units).
  fp16/bf16 add the rounding of each cast (one ulp: the interpreter truncates fp32 -> bf16, compiled
  Triton and torch round to nearest even), and the gated product the propagated h difference.
- Gradients against float64 autograd through the float64 formula, within a bound derived from the
  roundings (see ``_grad_bounds``); the torch reference must meet the same bound, which checks the
  bound as much as the kernels.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from lowmembp_convert.dispatch import triton_available
from lowmembp_convert.ops import recompute_launch as rl
from lowmembp_convert.ops.recompute_launch import (
    KINDS,
    launch_settings,
    reference_act_grads,
    reference_rebuild,
    triton_act_grads,
    triton_rebuild,
)

# The interpreter evaluates exp(-x) in numpy, which warns where it overflows to inf (as intended).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
INTERPRETED = not CUDA
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 7, 1031, 4099]
EPS32 = torch.finfo(torch.float32).eps  # 2^-23, one fp32 ulp at 1
TINY32 = torch.finfo(torch.float32).tiny  # fp32 intermediates below this may underflow
C_FP32 = 8  # fp32 evaluation error of act / act' in units of EPS32 times the magnitudes below

TRITON = [
    pytest.mark.triton,
    pytest.mark.skipif(
        not (triton_available() and (CUDA or os.environ.get("TRITON_INTERPRET") == "1")),
        reason="needs triton and CUDA, or TRITON_INTERPRET=1 set before triton is imported",
    ),
]


def triton_test(fn):
    for mark in reversed(TRITON):
        fn = mark(fn)
    return fn


# --------------------------------------------------------------------------------------------------
# Inputs and oracles
# --------------------------------------------------------------------------------------------------

# Written in front of a: zeros, tiny, the erf/tanh cancellation region, saturation, exp overflow.
_EDGES = [0.0, -0.0, 1e-4, -1e-4, 1.0, -1.0, 3.0, -3.0, 5.2, -5.2, 9.0, -9.0, 40.0, -40.0, 100.0, -100.0]


def _inputs(shape, dtype, gated: bool, seed: int = 0):
    """(dp, a, u): a = normal * 3 with the edge values in front, u and dp normal; u None when plain."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(shape, generator=g) * 3).reshape(-1)
    edges = torch.tensor(_EDGES)[: a.numel()]
    a[: edges.numel()] = edges
    u = torch.randn(shape, generator=g)
    dp = torch.randn(shape, generator=g)
    cast = lambda t: t.reshape(shape).to(dtype).to(DEVICE)
    return cast(dp), cast(a), (cast(u) if gated else None)


def _act64(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The activation in float64, typed out (not the package's)."""
    if kind == "gelu":
        return x * 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    if kind == "gelu_tanh":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return x * torch.sigmoid(x)


def _oracle(dp, a, u, kind: str):
    """float64 autograd through the formula: (h, act'(a), da, du) on the CPU; du None when plain."""
    a64 = a.detach().double().cpu().requires_grad_(True)
    h = _act64(a64, kind)
    (d_act,) = torch.autograd.grad(h, a64, torch.ones_like(h), retain_graph=True)
    if u is None:
        (da,) = torch.autograd.grad(h, a64, dp.double().cpu())
        return h.detach(), d_act, da, None
    u64 = u.detach().double().cpu().requires_grad_(True)
    da, du = torch.autograd.grad(h * u64, (a64, u64), dp.double().cpu())
    return h.detach(), d_act, da, du


def _derivative_magnitude(x: torch.Tensor, kind: str) -> torch.Tensor:
    """M(x): the fp32 evaluation of act'(x) (and dy * act'(x) / |dy|) is within C_FP32 * EPS32 * M(x).

    erf-GELU  cdf = 0.5 (1 + erf) carries an absolute erf error (~1 ulp of 1), the pdf term
              |x| phi(x) a relative error that grows with the rounding of x^2 / 2: 1 + (1 + x^2)|x| phi(x).
    tanh-GELU 0.5 (1 + t) carries t's absolute error; the right term 0.5 |x| k (1 + 3 kappa x^2) (1 - t^2)
              carries it too, multiplied by 0.5 |x| k (1 + 3 kappa x^2), until 1 - t^2 drops below an
              ulp of 1 and rounds to 0 (then the error is the tiny true term).
    SiLU      s (1 + x (1 - s)): relative error of s, absolute error of 1 - s times |x|: s (1 + |x|).
    """
    x = x.double()
    if kind == "gelu":
        phi = torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)
        return 1 + (1 + x * x) * x.abs() * phi
    if kind == "gelu_tanh":
        k = math.sqrt(2 / math.pi)
        t = torch.tanh(k * (x + 0.044715 * x**3))
        sensitivity = 0.5 * x.abs() * k * (1 + 3 * 0.044715 * x * x)
        return 1 + sensitivity * torch.clamp((1 - t * t) / EPS32, max=1.0)
    s = torch.sigmoid(x)
    return s * (1 + x.abs())


def _unit(dtype: torch.dtype) -> float:
    """Rounding error of one cast to dtype, relative: one full ulp (the interpreter truncates bf16)."""
    return torch.finfo(dtype).eps


def _grad_bounds(dp, a, u, kind: str, oracle):
    """Per-element bounds on |da - da64| and |du - du64| (float64, CPU), derived from the roundings.

    With r = one ulp of the dtype (relative), e = EPS32, M = _derivative_magnitude, D = act'(a):
        plain  da = round(dp * D32):            |dp| C e M + r |da64|
        gated  dh = round(dp * u): dg = round(dh * D32):
                                                |dp u| (r |D| + C e M) + r |dg64|
               h = round(act32(g)), du = round(dp * h):
                                                |dp| (r |h64| + C e |g|) + r |du64|
    (act32 is within C e |g| of act: see the rebuild tolerance). Each bound adds two smallest
    subnormals of the dtype (roundings in its subnormal range) and C smallest normal fp32 numbers
    (fp32 intermediates that underflow: exp(-x) overflowing makes s = 0 for x << 0).
    """
    h64, d_act, da64, du64 = oracle
    dp64, a64 = dp.double().cpu(), a.double().cpu()
    r = _unit(dp.dtype)
    floor = 2 * torch.finfo(dp.dtype).tiny * torch.finfo(dp.dtype).eps + C_FP32 * TINY32
    m = _derivative_magnitude(a64, kind)
    if u is None:
        return dp64.abs() * C_FP32 * EPS32 * m + r * da64.abs() + floor, None
    u64 = u.double().cpu()
    bound_da = (dp64 * u64).abs() * (r * d_act.abs() + C_FP32 * EPS32 * m) + r * da64.abs() + floor
    bound_du = dp64.abs() * (r * h64.abs() + C_FP32 * EPS32 * a64.abs()) + r * du64.abs() + floor
    return bound_da, bound_du


def _assert_within(name: str, got: torch.Tensor, expected64: torch.Tensor, bound: torch.Tensor) -> None:
    err = (got.double().cpu() - expected64).abs()
    ok = err <= bound
    if not bool(ok.all()):
        i = int((err / bound).argmax())
        raise AssertionError(
            f"{name}: {int((~ok).sum())} of {ok.numel()} elements outside the bound; worst err / bound = "
            f"{(err / bound).max().item():.3g} (got {got.reshape(-1)[i].item()!r}, "
            f"float64 {expected64.reshape(-1)[i].item()!r})"
        )


def _rebuild_bound(a, u, p_ref, h_ref):
    """|p - p_ref| bound of the kernel's rebuild against the torch reference (module docstring)."""
    r = _unit(a.dtype) if a.dtype != torch.float32 else 0.0
    floor = 2 * torch.finfo(a.dtype).tiny * torch.finfo(a.dtype).eps
    a64, h_ref64, p_ref64 = a.double().cpu(), h_ref.double().cpu(), p_ref.double().cpu()
    delta_h = C_FP32 * EPS32 * torch.maximum(a64.abs(), h_ref64.abs())  # fp32 act difference
    delta_h = delta_h + r * (h_ref64.abs() + delta_h)  # each side's cast to the dtype
    if u is None:
        return delta_h + floor
    u64 = u.double().cpu().abs()
    # p = round(h * u) on both sides: the h difference times |u|, then each side's rounding
    return u64 * delta_h + _unit(a.dtype) * (p_ref64.abs() + u64 * delta_h) + floor


def _round_fp32_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round fp32 to ``dtype`` as the kernels do: the interpreter truncates fp32 -> bf16 casts (its
    cast_impl passes no rounding mode); compiled Triton rounds to nearest even, as torch does."""
    if dtype == torch.bfloat16 and INTERPRETED:
        return (t.view(torch.int32) & -65536).view(torch.float32).to(dtype)  # exact: low bits are 0
    return t.to(dtype)


# --------------------------------------------------------------------------------------------------
# Torch reference: bit for bit the stock graph
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("kind", KINDS)
def test_reference_is_stock_autograd(kind, gated, dtype):
    base_dp, base_a, base_u = _inputs((6, 9, 22), dtype, gated, seed=5)
    # contiguous, and a 3-D non-contiguous view of the same values
    for view in (lambda t: t, lambda t: t[:, :, ::2].transpose(0, 2)):
        dp, a = view(base_dp), view(base_a).detach().requires_grad_(True)
        u = view(base_u).detach().requires_grad_(True) if gated else None
        h = rl._stock_activation(a, kind)
        p = h * u if gated else h
        grads = torch.autograd.grad(p, (a, u) if gated else (a,), dp)
        assert torch.equal(reference_rebuild(a.detach(), u if u is None else u.detach(), kind), p)
        da, du = reference_act_grads(dp, a.detach(), u if u is None else u.detach(), kind)
        assert torch.equal(da, grads[0]) and da.is_contiguous()
        assert (du is None) if not gated else torch.equal(du, grads[1])


def test_cpu_only_install_without_triton_imports_and_runs():
    """Importing the launcher module never imports Triton; the reference runs without it."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch\n"
        "from lowmembp_convert.ops import recompute_launch as rl\n"
        "a, u = torch.randn(5, 6), torch.randn(5, 6)\n"
        "p = rl.reference_rebuild(a, u, 'silu')\n"
        "da, du = rl.reference_act_grads(torch.ones(5, 6), a, u, 'gelu')\n"
        "assert p.shape == da.shape == du.shape == (5, 6)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LOWMEMBP_FORCE_TRITON"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_bad_arguments_name_the_fix():
    a = torch.randn(3, 4)
    with pytest.raises(ValueError, match="kind must be one of"):
        reference_rebuild(a, None, "relu")
    with pytest.raises(ValueError, match="u must match a"):
        triton_rebuild(a, torch.randn(4, 3), "gelu")
    with pytest.raises(ValueError, match="dp must match a"):
        triton_act_grads(a.half(), a, None, "gelu")
    with pytest.raises(TypeError, match="reference"):
        triton_rebuild(a.double(), None, "silu")


def test_launch_settings_cover_every_element():
    for n in (1, 7, 128, 129, 1031, 2048, 2049, 4099, 10**7, 2**31 + 5):
        s = launch_settings(n)
        assert s.block_size & (s.block_size - 1) == 0 and 256 <= s.block_size <= 2048
        assert 1 <= s.num_warps <= 8 and s.block_size // (32 * s.num_warps) == 8
        assert s.num_programs * s.block_size >= n > (s.num_programs - 1) * s.block_size
        assert s.grid == (s.num_programs,)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


def _shapes():
    # odd flat lengths (1 program, a masked tail, several programs) and one 3-D non-contiguous view
    return [*((n,) for n in SIZES), "3d-strided"]


def _case(shape, dtype, gated, seed):
    if shape == "3d-strided":
        dp, a, u = _inputs((5, 13, 42), dtype, gated, seed)
        view = lambda t: t[:, :, 1::2].permute(2, 0, 1)  # (21, 5, 13), no unit stride
        dp, a, u = view(dp), view(a), (view(u) if gated else None)
        assert not a.is_contiguous()
        return dp, a, u
    return _inputs(shape, dtype, gated, seed)


@triton_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("kind", KINDS)
def test_kernels(kind, gated, dtype):
    for i, shape in enumerate(_shapes()):
        dp, a, u = _case(shape, dtype, gated, seed=i)
        where = f"{kind} {'gated' if gated else 'plain'} {dtype} {shape}"

        # Rebuild: against the stock ops, within the transcendental-ulp bound.
        p = triton_rebuild(a, u, kind)
        assert p.shape == a.shape and p.dtype == a.dtype and p.is_contiguous()
        h_ref = reference_rebuild(a, None, kind)
        p_ref = reference_rebuild(a, u, kind) if gated else h_ref
        _assert_within(f"p {where}", p, p_ref.double().cpu(), _rebuild_bound(a, u, p_ref, h_ref))

        # Gradients: against float64 autograd, within the rounding bound; the reference meets it too.
        da, du = triton_act_grads(dp, a, u, kind)
        assert da.shape == a.shape and da.dtype == a.dtype and da.is_contiguous()
        oracle = _oracle(dp, a, u, kind)
        bound_da, bound_du = _grad_bounds(dp, a, u, kind, oracle)
        da_ref, du_ref = reference_act_grads(dp, a, u, kind)
        _assert_within(f"da {where}", da, oracle[2], bound_da)
        _assert_within(f"reference da {where}", da_ref, oracle[2], bound_da)
        if not gated:
            assert du is None
            continue
        assert du.shape == a.shape and du.dtype == a.dtype and du.is_contiguous()
        _assert_within(f"du {where}", du, oracle[3], bound_du)
        _assert_within(f"reference du {where}", du_ref, oracle[3], bound_du)


@triton_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_gated_rounding_structure_is_exact(kind, dtype):
    """Gated = plain kernel + the stock mul roundings, bit for bit: p = round(h * u), du = round(dp * h),
    dg = plain gradient of dh = round(dp * u)."""
    dp, a, u = _inputs((1031,), dtype, gated=True, seed=11)
    h = triton_rebuild(a, None, kind)
    assert torch.equal(triton_rebuild(a, u, kind), _round_fp32_to(h.float() * u.float(), dtype))
    da, du = triton_act_grads(dp, a, u, kind)
    assert torch.equal(du, _round_fp32_to(dp.float() * h.float(), dtype))
    dh = _round_fp32_to(dp.float() * u.float(), dtype)
    assert torch.equal(da, triton_act_grads(dh, a, None, kind)[0])


@triton_test
@pytest.mark.parametrize("shape", [(0,), (3, 0, 5)])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_zero_size(shape, gated):
    a = torch.empty(shape, device=DEVICE, dtype=torch.bfloat16)
    u = torch.empty_like(a) if gated else None
    p = triton_rebuild(a, u, "gelu")
    da, du = triton_act_grads(torch.empty_like(a), a, u, "silu")
    assert p.shape == da.shape == shape and p.dtype == da.dtype == torch.bfloat16
    assert (du is None) if not gated else (du.shape == shape)


@triton_test
def test_nan_propagates():
    a = torch.tensor([float("nan"), 1.0, -1.0], device=DEVICE)
    u = torch.tensor([1.0, float("nan"), 2.0], device=DEVICE)
    for kind in KINDS:
        p = triton_rebuild(a, u, kind)
        da, du = triton_act_grads(torch.ones_like(a), a, u, kind)
        assert torch.isnan(p[:2]).all() and not torch.isnan(p[2])
        assert torch.isnan(da[:2]).all() and torch.isnan(du[0]) and not torch.isnan(da[2])
