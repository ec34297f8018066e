"""ReGELU2 / ReSiLU2 against independent oracles, on the torch reference and on the Triton kernels.

Every numerical test runs twice through the ``path`` fixture: ``torch`` (the reference) and
``triton`` (the real kernels; on a machine without CUDA they run under TRITON_INTERPRET=1, set by
tests/conftest.py before Triton is imported). Oracles are computed here, in float64, from the
constants of docs/method.md typed out below, not from the package.

Tolerances:
- torch path forward: bitwise equal to the stock ``F.gelu`` / ``F.silu``.
- Triton path forward, fp32: ``|y - stock| <= 8 * eps32 * max(|x|, |stock|)``. The kernels' erf,
  exp and tanh (libdevice on a GPU, numpy in the interpreter) may differ from torch's by an ulp or
  a few, and ``1 + erf(x / sqrt(2))`` cancels for x << 0, so the error scales with |x|, not |y|
  (measured on CPU: at most 3.5 in these units, erf-GELU). fp16/bf16 add one ulp of the output
  dtype (the same fp32 value may round either way after such a difference).
- Codes and backward: exact on both paths, threshold neighbours included (no 1-ulp slack is
  needed: the kernels compare the loaded x in fp32, never y, so codes cannot depend on
  transcendental rounding). The only modelled deviation: the Triton interpreter truncates
  fp32 -> bf16 casts where compiled Triton rounds to nearest even (see _round_fp32_to).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lowmembp_convert.dispatch import force_triton, triton_available
from lowmembp_convert.nn.activations import ReGELU2, ReSiLU2
from lowmembp_convert.ops import activations as ops
from lowmembp_convert.ops.activations import pack_codes, regelu2, resilu2, unpack_codes
from lowmembp_convert.ops.constants import REGELU2, RESILU2

# The interpreter evaluates exp(-x) in numpy, which warns where it overflows to inf (as intended).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
INTERPRETED = not CUDA  # the Triton path runs in the (slow) interpreter: keep its shapes small

# docs/method.md section 1, typed out: the oracle does not read the package's constants.
GELU_A = (-0.04922261145617846, 1.0979632065417297, -0.048740595085551286)
GELU_C = (-3.1858810036855245, -0.001178821281161997, 3.190832613414926)
SILU_A = (-0.04060357190528599, 1.080925428529668, -0.040321856624382146)
SILU_C = (-6.3050461001646445, -0.0008684942046214787, 6.325815242089708)


def _d_gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _d_gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    k = math.sqrt(2 / math.pi)
    t = torch.tanh(k * (x + 0.044715 * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * 0.044715 * x * x)


def _d_silu(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


# name -> (public fn, stock fn, raw custom op returning (y, codes), a, c, true derivative in float64)
ACTIVATIONS = {
    "gelu": (
        lambda x: regelu2(x),
        lambda x: F.gelu(x),
        lambda x: torch.ops.lowmembp.regelu2_fwd(x, "none"),
        GELU_A,
        GELU_C,
        _d_gelu,
    ),
    "gelu_tanh": (
        lambda x: regelu2(x, approximate="tanh"),
        lambda x: F.gelu(x, approximate="tanh"),
        lambda x: torch.ops.lowmembp.regelu2_fwd(x, "tanh"),
        GELU_A,
        GELU_C,
        _d_gelu_tanh,
    ),
    "silu": (
        resilu2,
        F.silu,
        lambda x: torch.ops.lowmembp.resilu2_fwd(x),
        SILU_A,
        SILU_C,
        _d_silu,
    ),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _triton_runnable() -> bool:
    return triton_available() and (CUDA or os.environ.get("TRITON_INTERPRET") == "1")


PATHS = [
    pytest.param("torch", id="torch"),
    pytest.param(
        "triton",
        id="triton",
        marks=[
            pytest.mark.triton,
            pytest.mark.skipif(
                not _triton_runnable(),
                reason="needs triton and CUDA, or TRITON_INTERPRET=1 set before triton is imported",
            ),
        ],
    ),
]


@pytest.fixture(params=PATHS)
def path(request) -> str:
    """Run the test body through the torch reference or through the Triton kernels."""
    with force_triton(request.param == "triton"):
        yield request.param


@pytest.fixture(params=list(ACTIVATIONS))
def act(request):
    return ACTIVATIONS[request.param]


# --------------------------------------------------------------------------------------------------
# Oracles
# --------------------------------------------------------------------------------------------------


def _threshold_neighbours(c: tuple[float, float, float]) -> torch.Tensor:
    """The fp32-rounded thresholds and their fp32 neighbours: where a comparison could go wrong."""
    values = []
    for ci in c:
        c32 = np.float32(ci)
        values += [np.nextafter(c32, np.float32(-np.inf)), c32, np.nextafter(c32, np.float32(np.inf))]
    return torch.tensor(np.array(values, dtype=np.float32))


def _inputs(shape, dtype, c, seed: int = 0) -> torch.Tensor:
    """Normal * 4 (reaches every threshold) with the threshold neighbours written in front."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 4).reshape(-1)
    edges = _threshold_neighbours(c)[: x.numel()]
    x[: edges.numel()] = edges
    return x.reshape(shape).to(dtype).to(DEVICE)


def _oracle_codes(x: torch.Tensor, c: tuple[float, float, float]) -> torch.Tensor:
    """sum_i [x > c_i] in float64, flat, int64.

    The contract compares in fp32: x equal to the fp32-rounded c_i is not above it, even where the
    float64 c_i is a hair smaller. No fp32 value lies strictly between c_i and fp32(c_i), so that
    single point is the only place where the two comparisons differ.
    """
    x64 = x.reshape(-1).double().cpu()
    code = torch.zeros(x64.shape, dtype=torch.int64)
    for ci in c:
        code += ((x64 > ci) & (x64 != float(np.float32(ci)))).long()
    return code


def _oracle_levels(a: tuple[float, float, float]) -> torch.Tensor:
    """[0, a0, a0 + a1, a0 + a1 + a2] summed in float64, rounded once to fp32, held in float64."""
    a0, a1, a2 = a
    return torch.tensor([0.0, a0, a0 + a1, a0 + a1 + a2], dtype=torch.float64).float().double()


def _assert_forward_close(y: torch.Tensor, stock: torch.Tensor, x: torch.Tensor) -> None:
    """Triton vs stock forward: see the module docstring for the tolerance."""
    eps32 = torch.finfo(torch.float32).eps
    y64, stock64, x64 = y.double(), stock.double(), x.double()
    tol = 8 * eps32 * torch.maximum(x64.abs(), stock64.abs())
    if y.dtype != torch.float32:
        tol = tol + torch.finfo(y.dtype).eps * stock64.abs() + torch.finfo(y.dtype).tiny
    err = (y64 - stock64).abs()
    assert bool((err <= tol).all()), f"max err / tol = {(err / tol.clamp_min(1e-300)).max().item():.3g}"


def _check_forward(path: str, act, x: torch.Tensor) -> None:
    fn, stock_fn, *_ = act
    y, stock = fn(x), stock_fn(x)
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    if path == "torch":
        assert torch.equal(y, stock)
    else:
        _assert_forward_close(y, stock, x)


def _check_codes(act, x: torch.Tensor) -> None:
    *_, raw_fwd, _, c, _ = act
    _, packed = raw_fwd(x)
    code = _oracle_codes(x, c)
    assert packed.dtype == torch.uint8 and packed.shape == ((x.numel() + 3) // 4,)
    assert torch.equal(unpack_codes(packed, x.numel()).long().cpu(), code)
    # Byte for byte, unused high bits of the last byte included.
    assert torch.equal(packed.cpu(), pack_codes(code.to(torch.uint8)))


def _round_fp32_to(t: torch.Tensor, dtype: torch.dtype, path: str) -> torch.Tensor:
    """Round fp32 to ``dtype`` as the path under test does.

    The Triton interpreter truncates fp32 -> bf16 casts (its cast_impl passes no rounding mode);
    compiled Triton and torch round to nearest even. Both are modelled exactly.
    """
    if dtype == torch.bfloat16 and path == "triton" and INTERPRETED:
        return (t.view(torch.int32) & -65536).view(torch.float32).to(dtype)  # exact: low bits are 0
    return t.to(dtype)


def _check_backward(path: str, act, x: torch.Tensor, seed: int = 1) -> None:
    fn, _, _, a, c, _ = act
    x = x.detach().requires_grad_(True)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x.dtype).to(DEVICE)
    (dx,) = torch.autograd.grad(fn(x), x, g)
    # The contract: one fp32 multiply grad * level[code], rounded to grad's dtype. A product of an
    # fp32 (or narrower) grad and an fp32 level is exact in float64, so this oracle is exact.
    level = _oracle_levels(a)[_oracle_codes(x, c)].view(x.shape)
    product = g.double().cpu() * level
    if x.dtype == torch.float64:
        expected = product
    else:
        expected = _round_fp32_to(product.float(), x.dtype, path)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    assert torch.equal(dx.cpu(), expected)


# --------------------------------------------------------------------------------------------------
# Constants and packing
# --------------------------------------------------------------------------------------------------


def test_package_constants_are_method_constants():
    assert REGELU2.a == GELU_A and REGELU2.c == GELU_C
    assert RESILU2.a == SILU_A and RESILU2.c == SILU_C
    for step, a in ((REGELU2, GELU_A), (RESILU2, SILU_A)):
        a0, a1, a2 = a
        exact = torch.tensor([0.0, a0, a0 + a1, a0 + a1 + a2], dtype=torch.float64)
        assert torch.equal(torch.tensor(step.levels_fp32, dtype=torch.float64), _oracle_levels(a))
        # Rounded once: within half an fp32 ulp of the float64 sums.
        assert bool(((_oracle_levels(a) - exact).abs() <= 2.0**-24 * exact.abs()).all())


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 6, 7, 8, 13])
def test_pack_unpack_round_trip(n):
    codes = torch.randint(0, 4, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    packed = pack_codes(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 4)
    assert torch.equal(unpack_codes(packed, n), codes)


def test_pack_bit_layout():
    # element 4j + k at bits 2k..2k+1 of byte j; padding bits are zero
    codes = torch.tensor([1, 2, 3, 0, 3], dtype=torch.uint8)
    assert pack_codes(codes).tolist() == [1 | 2 << 2 | 3 << 4 | 0 << 6, 3]


# --------------------------------------------------------------------------------------------------
# Numerics, on both paths
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_stock(path, act, dtype):
    _check_forward(path, act, _inputs((7, 129), dtype, act[4]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_codes_match_float64_oracle(path, act, dtype):
    _check_codes(act, _inputs((7, 129), dtype, act[4]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_matches_float64_step(path, act, dtype):
    _check_backward(path, act, _inputs((7, 129), dtype, act[4]))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 9, 4097])
def test_every_length_mod_4(path, n):
    act = ACTIVATIONS["gelu"]
    x = _inputs((n,), torch.float32, act[4], seed=n)
    _check_forward(path, act, x)
    _check_codes(act, x)
    _check_backward(path, act, x)


def _odd_shapes(path: str) -> list[tuple[int, ...]]:
    if path == "triton" and INTERPRETED:
        return [(9, 41, 341), (5, 4097)]  # every kernel path, at interpreter speed
    return [(9, 41, 341), (1151, 4097)]


def test_odd_shapes(path, act):
    for shape in _odd_shapes(path):
        x = _inputs(shape, torch.float32, act[4], seed=sum(shape))
        _check_forward(path, act, x)
        _check_codes(act, x)
        _check_backward(path, act, x)


def test_odd_shape_bf16(path, act):
    x = _inputs(_odd_shapes(path)[0], torch.bfloat16, act[4], seed=3)
    _check_forward(path, act, x)
    _check_codes(act, x)
    _check_backward(path, act, x)


@pytest.mark.parametrize("shape", [(0,), (3, 0, 5)])
def test_zero_size(path, act, shape):
    fn, _, raw_fwd, *_ = act
    x = torch.empty(shape, device=DEVICE, requires_grad=True)
    y, packed = raw_fwd(x)
    assert y.shape == x.shape and packed.shape == (0,) and packed.dtype == torch.uint8
    (dx,) = torch.autograd.grad(fn(x), x, torch.empty(shape, device=DEVICE))
    assert dx.shape == x.shape


def test_non_contiguous(path, act):
    base = _inputs((33, 70), torch.float32, act[4])
    for x in (base.t(), base[:, ::3], base.unsqueeze(0).expand(2, 33, 70)):
        assert not x.is_contiguous()
        _check_forward(path, act, x)
        _check_codes(act, x)
        _check_backward(path, act, x)


def test_nan_propagates_with_code_zero(path, act):
    raw_fwd = act[2]
    x = torch.tensor([float("nan"), 1.0, -1.0, 0.5], device=DEVICE)
    y, packed = raw_fwd(x)
    assert torch.isnan(y[0]) and unpack_codes(packed, 4)[0].item() == 0


def test_float64_runs_the_reference(path):
    x = torch.randn(5, 11, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.equal(regelu2(x), F.gelu(x))
    assert torch.equal(resilu2(x), F.silu(x))
    _check_backward(path, ACTIVATIONS["gelu"], x)


# --------------------------------------------------------------------------------------------------
# What is saved for backward
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 33), (2, 3, 5)])
def test_saves_one_uint8_tensor_of_ceil_n_over_4_bytes(path, act, shape):
    fn, *_ = act
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    assert len(saved) == 1, [(t.dtype, tuple(t.shape)) for t in saved]
    assert saved[0].dtype == torch.uint8 and saved[0].shape == (math.ceil(x.numel() / 4),)
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_double_backward_is_linear_in_grad(path):
    fn = ACTIVATIONS["silu"][0]
    x = torch.randn(4, 9, device=DEVICE, requires_grad=True)
    g = torch.randn(4, 9, device=DEVICE, requires_grad=True)
    (dx,) = torch.autograd.grad(fn(x), x, g, create_graph=True)
    v = torch.randn(4, 9, device=DEVICE)
    (dg,) = torch.autograd.grad(dx, g, v)
    # d(dx)/dg is the same diagonal level[code], so it maps v exactly as the first backward does
    (expected,) = torch.autograd.grad(fn(x), x, v)
    assert torch.equal(dg, expected)


def test_opcheck(path):
    x = torch.randn(5, 7, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.lowmembp.regelu2_fwd, (x, "none"))
    torch.library.opcheck(torch.ops.lowmembp.regelu2_fwd, (x, "tanh"))
    torch.library.opcheck(torch.ops.lowmembp.resilu2_fwd, (x,))
    codes = torch.ops.lowmembp.resilu2_fwd(x)[1]
    torch.library.opcheck(torch.ops.lowmembp.step_bwd, (torch.randn(5, 7, device=DEVICE), codes, "resilu2"))


# --------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(path, backend):
    if path == "triton" and backend == "inductor" and INTERPRETED:
        pytest.skip("inductor + interpreted Triton adds compile time and nothing aot_eager misses")

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        h = regelu2(x @ w, approximate="tanh") + regelu2(x) * resilu2(x)
        return ReSiLU2()(h).square().sum()

    x = torch.randn(6, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(16, 16, device=DEVICE, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    out_c = compiled(x, w)
    grads_c = torch.autograd.grad(out_c, (x, w))
    out_e = f(x, w)
    grads_e = torch.autograd.grad(out_e, (x, w))
    # inductor fuses the elementwise glue around the custom ops, so allow fp32 reassociation
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    for gc, ge in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Quality of the approximation (docs/method.md section 1)
# --------------------------------------------------------------------------------------------------


def test_gradient_approximation_error_is_bounded(path, act):
    """Step level vs the true derivative. Near c1 ~ 0 the true derivative is 0.5 while the levels
    jump from a0 ~ -0.05 to ~1.05, so the worst case is just above 0.5; away from 0 it is small."""
    fn, *_, d_true = act
    x = torch.linspace(-12, 12, 48_001, device=DEVICE, requires_grad=True)
    (level,) = torch.autograd.grad(fn(x), x, torch.ones_like(x))
    err = (level.double() - d_true(x.detach().double())).abs().cpu()
    far = x.detach().abs().cpu() >= 1
    assert err.max() <= 0.55
    assert err[far].max() <= 0.12
    assert err.mean() <= 0.05

    z = torch.randn(100_000, generator=torch.Generator().manual_seed(0)).to(DEVICE).requires_grad_()
    (level,) = torch.autograd.grad(fn(z), z, torch.ones_like(z))
    cosine = F.cosine_similarity(level.double(), d_true(z.detach().double()), dim=0)
    assert cosine > 0.9


# --------------------------------------------------------------------------------------------------
# Modules and errors
# --------------------------------------------------------------------------------------------------


def test_modules():
    x = torch.randn(3, 10, device=DEVICE)
    assert torch.equal(ReGELU2()(x), F.gelu(x))
    assert torch.equal(ReGELU2("tanh")(x), F.gelu(x, approximate="tanh"))
    assert torch.equal(ReSiLU2()(x), F.silu(x))
    assert repr(ReGELU2("tanh")) == "ReGELU2(approximate='tanh', forward=exact, backward=2-bit step)"
    assert "backward=2-bit step" in repr(ReSiLU2())
    assert ReGELU2.exact_forward and not ReGELU2.exact_backward
    with pytest.raises(ValueError, match="approximate"):
        ReGELU2("sigmoid")
    with pytest.raises(ValueError, match="approximate"):
        regelu2(x, approximate="fast")


def test_cpu_only_install_without_triton_imports_and_runs():
    """Triton is imported lazily, only on the Triton path: a CPU-only install without it works."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch\n"
        "from lowmembp_convert.nn.activations import ReGELU2, ReSiLU2\n"
        "x = torch.randn(5, 6, requires_grad=True)\n"
        "(ReGELU2()(x) + ReSiLU2()(x)).sum().backward()\n"
        "assert x.grad is not None\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LOWMEMBP_FORCE_TRITON"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_launch_config_blocks_are_multiples_of_4():
    for n in (1, 3, 4, 63, 64, 65, 1000, 4096, 4097, 10**7, 2**31 + 5):
        (programs,), block, num_warps = ops._launch_config(n)
        assert block % 4 == 0 and block & (block - 1) == 0 and 1 <= num_warps <= 8
        assert programs * block >= n > (programs - 1) * block


# --------------------------------------------------------------------------------------------------
# GPU only
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.skipif(
    not CUDA,
    reason="needs a CUDA device: >2^31 elements (~13 GiB in bf16) checks the kernels' int64 offsets",
)
def test_more_than_2_pow_31_elements():
    n = 2**31 + 7
    try:
        x = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_(0, 4)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory for 2^31 + 7 bf16 elements")
    act = ACTIVATIONS["gelu"]
    with force_triton(True):
        y, packed = act[2](x)
        dx = torch.ops.lowmembp.step_bwd(y, packed, "regelu2")
    assert packed.numel() == (n + 3) // 4
    level = _oracle_levels(GELU_A).cuda()
    # Slices at the start, across 2^31 (int32 wrap) and at the ragged end.
    for start in (0, 2**31 - 4096, n - 4099):
        sl = slice(start, start + 8192) if start + 8192 <= n else slice(start, n)
        xs = x[sl]
        _assert_forward_close(y[sl], F.gelu(xs), xs)
        code = _oracle_codes(xs, GELU_C).cuda()
        b0 = start // 4
        assert torch.equal(unpack_codes(packed[b0 : b0 + (xs.numel() + 3) // 4], xs.numel()).long(), code)
        expected = (y[sl].double() * level[code]).float().to(torch.bfloat16)
        assert torch.equal(dx[sl], expected)
