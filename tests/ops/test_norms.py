"""Memory-sharing LayerNorm / RMSNorm: numerics against float64, saved state, modules, compile.

Oracle: the same formulas evaluated in float64 by torch (F.layer_norm, or the RMSNorm formula) with
float64 autograd for dx / dweight / dbias, on the very input values the op saw. Tolerance: the op's
max error must be within twice the max error of the stock op run in the same dtype (F.layer_norm /
F.rms_norm: what the model computed before conversion) plus one rounding unit at the output's
largest magnitude. float32 errors are about 1e-7 relative either way; fp16 / bf16 errors are
rounding-dominated and a fixed atol would either be meaningless or flaky.

Tests marked ``triton`` run the real kernels (under TRITON_INTERPRET=1 without a GPU; see
tests/conftest.py) through ``force_triton()``, on smaller shapes since the interpreter is slow.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lowmembp_convert.dispatch import force_triton, triton_available
from lowmembp_convert.nn.norms import MSLayerNorm, MSRMSNorm
from lowmembp_convert.ops import norms as ops

KINDS = ("layer", "rms")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Affine configurations: none (folded), bias only (folded weight, kept bias), weight, weight + bias
# (keep_affine), and a Gemma-style (1 + w) weight.
AFFINES = ("none", "b", "w", "wb", "w1b")
EPS = {"layer": 1e-5, "rms": 1e-6}

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def make_inputs(shape, dtype, affine, seed=0):
    """x with a non-zero mean, |w_eff| in [0.5, 1.5] with random signs, b ~ 0.5 N(0, 1), dy."""
    gen = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(dtype)
    offset = 1.0 if "1" in affine else 0.0
    w = b = None
    if "w" in affine:
        w_eff = (torch.rand(n, generator=gen) + 0.5) * torch.randn(n, generator=gen).sign()
        w = (w_eff - offset).to(dtype)
    if "b" in affine:
        b = (torch.randn(n, generator=gen) * 0.5).to(dtype)
    dy = torch.randn(shape, generator=gen).to(dtype)
    return x, w, b, offset, dy


def stock_norm(kind, x, w, b, eps, offset):
    """What the unconverted model computes (F.layer_norm / F.rms_norm in x's dtype)."""
    n = x.shape[-1]
    w_eff = w + offset if w is not None else None
    if kind == "layer":
        return F.layer_norm(x, (n,), w_eff, b, eps)
    y = F.rms_norm(x, (n,), w_eff, eps)
    return y + b if b is not None else y


def ms_norm(kind, x, w, b, eps, offset):
    fn = ops.ms_layer_norm if kind == "layer" else ops.ms_rms_norm
    return fn(x, w, b, eps=eps, weight_offset=offset)


def forward_backward(fn, kind, x, w, b, offset, dy, cast=None):
    """Run fn and its backward; returns [y, dx, dw?, db?] (the parameter grads when present)."""
    cast = cast or (lambda t: t)
    leaves = [cast(t).detach().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = fn(kind, *leaves, EPS[kind], offset)
    inputs = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, inputs, cast(dy).to(y.dtype))
    return [y, *grads]


def oracle(kind, x, w, b, offset, dy):
    """float64 formulas and float64 autograd on the same input values."""
    return forward_backward(stock_norm, kind, x, w, b, offset, dy, cast=lambda t: t.double())


def ulp_slack(dtype, ref):
    """One rounding unit (half an ulp) of ``dtype`` at the reference's largest magnitude."""
    return torch.finfo(dtype).eps / 2 * ref.abs().max().item()


def assert_close_to_oracle(ours, stock, ref, dtype, what, slack_units=1.0):
    err = (ours.double() - ref).abs().max().item() if ref.numel() else 0.0
    stock_err = (stock.double() - ref).abs().max().item() if ref.numel() else 0.0
    bound = 2 * stock_err + slack_units * ulp_slack(dtype, ref) if ref.numel() else 0.0
    assert err <= bound, f"{what}: max error {err:.3e} > bound {bound:.3e} (stock {stock_err:.3e})"


def check_against_oracle(kind, shape, dtype, affine, seed=0, slack_units=1.0):
    x, w, b, offset, dy = make_inputs(shape, dtype, affine, seed)
    ours = forward_backward(ms_norm, kind, x, w, b, offset, dy)
    stock = forward_backward(stock_norm, kind, x, w, b, offset, dy)
    ref = oracle(kind, x, w, b, offset, dy)
    names = ["y", "dx"] + [n for n, t in (("dweight", w), ("dbias", b)) if t is not None]
    assert ours[0].dtype == dtype and ours[1].dtype == dtype
    for name, o, s, r in zip(names, ours, stock, ref, strict=True):
        assert o.shape == r.shape, name
        assert_close_to_oracle(o, s, r, dtype, f"{kind} {dtype} {affine} {shape} {name}", slack_units)


# The Triton interpreter (3.8) rounds float32 -> bfloat16 toward zero (its cast ignores the rounding
# mode), an error of up to one bf16 ulp where the GPU rounds to nearest: one more unit of slack.
def interpreter_slack(dtype):
    return 2.0 if dtype == torch.bfloat16 and not torch.cuda.is_available() else 1.0


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts launcher calls, proving the Triton path (not the reference) did the work."""
    calls = {"fwd": 0, "bwd": 0, "bwd_affine": 0}
    for name in calls:
        launcher = getattr(ops, f"triton_{name}")

        def counted(*args, _launcher=launcher, _name=name, **kwargs):
            calls[_name] += 1
            return _launcher(*args, **kwargs)

        monkeypatch.setattr(ops, f"triton_{name}", counted)
    return calls


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 64 columns, so small rows take the long-row loop (ONE_BLOCK=False) path."""
    monkeypatch.setattr(ops, "MAX_FUSED_BLOCK_N", 64)


# --------------------------------------------------------------------------------------------------
# Numerics: torch reference path (the default on CPU)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_reference_matches_float64(kind, dtype, affine):
    check_against_oracle(kind, (9, 41, 341), dtype, affine)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_reference_matches_float64_large(kind, dtype):
    check_against_oracle(kind, (1151, 4097), dtype, "wb")


@pytest.mark.parametrize("affine", ("none", "w1b"))
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind, affine):
    """Folded (no affine), and keep_affine with weight, bias and a (1 + w) offset."""
    x, w, b, offset, _ = make_inputs((3, 4, 7), torch.float64, affine)
    fn = ops.ms_layer_norm if kind == "layer" else ops.ms_rms_norm
    if affine == "none":
        assert torch.autograd.gradcheck(lambda xx: fn(xx, eps=EPS[kind]), (x.requires_grad_(),))
    else:
        leaves = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
        f = lambda xx, ww, bb: fn(xx, ww, bb, eps=EPS[kind], weight_offset=offset)
        assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64_keep_affine_plain(kind):
    """keep_affine without offset, and a bias-only norm (folded weight, kept bias)."""
    x, w, b, _, _ = make_inputs((5, 6), torch.float64, "wb", seed=1)
    fn = ops.ms_layer_norm if kind == "layer" else ops.ms_rms_norm
    leaves = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
    assert torch.autograd.gradcheck(lambda xx, ww, bb: fn(xx, ww, bb, eps=EPS[kind]), leaves)
    assert torch.autograd.gradcheck(lambda xx, bb: fn(xx, None, bb, eps=EPS[kind]), (x, b))


@pytest.mark.parametrize("kind", KINDS)
def test_out_dtype(kind):
    """out_dtype (autocast): y is written in bf16 from float32 math; grads keep the input dtypes."""
    x, w, b, offset, dy = make_inputs((7, 33), torch.float32, "wb")
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    fn = ops.ms_layer_norm if kind == "layer" else ops.ms_rms_norm
    y = fn(*leaves, eps=EPS[kind], out_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    grads = torch.autograd.grad(y, leaves, dy.to(torch.bfloat16))
    assert [g.dtype for g in grads] == [torch.float32] * 3
    ref = oracle(kind, x, w, b, offset, dy.to(torch.bfloat16).float())
    # The best possible bf16 output is the oracle rounded once: that is the "stock" error here.
    assert_close_to_oracle(y, ref[0].to(torch.bfloat16), ref[0], torch.bfloat16, "y")


# --------------------------------------------------------------------------------------------------
# Edge cases, both paths
# --------------------------------------------------------------------------------------------------

PATHS = [
    pytest.param(False, id="reference"),
    pytest.param(True, id="triton", marks=[pytest.mark.triton, needs_triton]),
]


@pytest.mark.parametrize("use_kernels", PATHS)
@pytest.mark.parametrize("shape", [(0, 8), (4, 0), (2, 0, 8), (0,)], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_zero_size(kind, shape, use_kernels):
    n = shape[-1]
    x = torch.randn(shape, requires_grad=True)
    w = torch.ones(n, requires_grad=True)
    b = torch.zeros(n, requires_grad=True)
    with force_triton(use_kernels):
        y = ms_norm(kind, x, w, b, EPS[kind], 0.0)
        assert y.shape == x.shape
        y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == (n,) and b.grad.shape == (n,)
    assert not w.grad.any() and not b.grad.any()


@pytest.mark.parametrize("use_kernels", PATHS)
@pytest.mark.parametrize("affine", ("none", "wb"))
@pytest.mark.parametrize("kind", KINDS)
def test_single_element_rows(kind, affine, use_kernels):
    """N = 1. LayerNorm: y = b, dx = 0 exactly. RMSNorm: dx = rstd * g * (1 - x_hat^2) cancels to
    about 0, so a relative-to-stock bound is meaningless: absolute tolerance at the inputs' scale."""
    x, w, b, offset, dy = make_inputs((6, 1), torch.float32, affine)
    with force_triton(use_kernels):
        ours = forward_backward(ms_norm, kind, x, w, b, offset, dy)
    ref = oracle(kind, x, w, b, offset, dy)
    for o, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_kernels", PATHS)
@pytest.mark.parametrize("kind", KINDS)
def test_non_contiguous(kind, use_kernels):
    x, w, b, offset, _ = make_inputs((3, 4, 2 * 37), torch.float32, "wb")
    cases = {
        "column-strided": x[..., ::2],  # last-dim stride 2: copied to unit stride
        "transposed": x[..., :37].transpose(0, 1),  # rows not evenly strided
    }
    for name, xs in cases.items():
        xs = xs.detach().requires_grad_()
        n = xs.shape[-1]
        dy_variants = {
            "broadcast": torch.randn(n).expand(xs.shape),  # row stride 0
            "strided": torch.randn(*xs.shape[:-1], 2 * n)[..., ::2],
        }
        ww, bb = w[:n].clone(), b[:n].clone()
        for dy_name, dyv in dy_variants.items():
            with force_triton(use_kernels):
                ours = forward_backward(ms_norm, kind, xs, ww, bb, offset, dyv)
            ref = oracle(kind, xs, ww, bb, offset, dyv)
            for o, r in zip(ours, ref, strict=True):
                torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-5, msg=f"{name} {dy_name}")


@pytest.mark.parametrize("use_kernels", PATHS)
@pytest.mark.parametrize("kind", KINDS)
def test_one_long_row(kind, use_kernels):
    """N = 65,536 in one row: past the largest fused block, so the kernels loop over the row."""
    assert not ops.launch_settings(1, 65536, torch.device("cpu")).one_block
    # The interpreter runs one program per 128 columns of the dweight/dbias reduction (slow):
    # it is exercised on shorter rows, so the long interpreted row is a folded norm.
    with force_triton(use_kernels):
        check_against_oracle(kind, (1, 65536), torch.float32, "none" if use_kernels else "wb")


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="last dim is 8"):
        ops.ms_layer_norm(torch.randn(2, 8), torch.ones(7))
    with pytest.raises(ValueError, match="at least one dimension"):
        ops.ms_rms_norm(torch.tensor(1.0))


# --------------------------------------------------------------------------------------------------
# Numerics: real Triton kernels (interpreted on CPU)
# --------------------------------------------------------------------------------------------------


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_triton_matches_float64(kind, dtype, affine, kernel_calls):
    # 200 columns: two blocks of the column-reduction kernel, the last one partial.
    with force_triton():
        check_against_oracle(kind, (3, 5, 200), dtype, affine, slack_units=interpreter_slack(dtype))
    has_affine = affine != "none"
    assert kernel_calls == {"fwd": 1, "bwd": 1, "bwd_affine": int(has_affine)}


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("affine", ("none", "w1b"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_triton_long_row_loop(kind, dtype, affine, small_blocks, kernel_calls):
    """Rows of 200 with 64-column blocks: the looped forward and backward, last block partial."""
    assert not ops.launch_settings(4, 200, torch.device("cpu")).one_block
    with force_triton():
        check_against_oracle(kind, (4, 200), dtype, affine, slack_units=interpreter_slack(dtype))
    assert kernel_calls["fwd"] == 1 and kernel_calls["bwd"] == 1


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("kind", KINDS)
def test_triton_affine_reduction_row_groups(kind, kernel_calls):
    """130 rows: several row groups of the dweight/dbias reduction, each looping over row tiles."""
    s = ops.launch_settings(130, 20, torch.device("cpu"))
    assert s.affine_row_groups > 1 and s.affine_rows_per_program > s.affine_block_m
    with force_triton():
        check_against_oracle(kind, (130, 20), torch.float32, "wb")
        # Bias-only gradient (no dweight): the COMPUTE_DW=False variant.
        x, _, b, _, dy = make_inputs((130, 20), torch.float32, "b")
        b.requires_grad_()
        y = ms_norm(kind, x, None, b, EPS[kind], 0.0)
        (db,) = torch.autograd.grad(y, b, dy)
    torch.testing.assert_close(db, dy.sum(0), rtol=1e-5, atol=1e-5)
    assert kernel_calls["bwd_affine"] == 2


# --------------------------------------------------------------------------------------------------
# Saved state: y's storage + rstd (+ parameters), nothing else
# --------------------------------------------------------------------------------------------------


class SavedTensors:
    """Records every tensor autograd saves inside the block (torch.autograd.graph hooks)."""

    def __init__(self):
        self.tensors: list[torch.Tensor] = []

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    def _pack(self, t):
        self.tensors.append(t)
        return t

    def storages(self, exclude=()):
        """{data_ptr: nbytes} of the distinct storages saved, minus tensors ``exclude`` accepts."""
        out = {}
        for t in self.tensors:
            if not any(rule(t) for rule in exclude):
                s = t.untyped_storage()
                out[s.data_ptr()] = s.nbytes()
        return out


def storage_ptr(t):
    return t.untyped_storage().data_ptr()


def is_parameter_or_cast(params):
    """A saved tensor that is a parameter (same storage: the param or a view such as weight.t()), or
    autocast's cast copy of one (a lower-precision tensor whose values equal the param cast to that
    dtype, in the param's layout or transposed): weights, not activations."""
    ptrs = {storage_ptr(p) for p in params}

    def rule(t):
        if storage_ptr(t) in ptrs:
            return True
        for p in params:
            for view in (p, p.t()) if p.dim() == 2 else (p,):
                if t.dtype != p.dtype and t.shape == view.shape and torch.equal(t, view.detach().to(t.dtype)):
                    return True
        return False

    return rule


@pytest.mark.parametrize("affine", ("none", "b", "wb"))
@pytest.mark.parametrize("kind", KINDS)
def test_saved_state_is_y_and_rstd(kind, affine):
    """Saved for backward: y itself, rstd (one float32 per row) and the ill-conditioned channels' indices
    and x_hat, which are empty (0 bytes) for these well-conditioned weights; never x."""
    x, w, b, offset, _ = make_inputs((4, 6, 32), torch.float32, affine)
    params = [p.requires_grad_() for p in (w, b) if p is not None]
    x.requires_grad_()
    with SavedTensors() as saved:
        y = ms_norm(kind, x, w, b, EPS[kind], offset)
    is_param = is_parameter_or_cast(params)
    activation = [t for t in saved.tensors if not is_param(t)]
    saved_y = [t for t in activation if t.numel() and storage_ptr(t) == storage_ptr(y)]
    rstd = [t for t in activation if t.numel() and t.shape == x.shape[:-1] and t.dtype == torch.float32]
    kept = [t for t in activation if t.numel() == 0]
    assert len(saved_y) == 1 and saved_y[0].shape == y.shape  # the very tensor returned
    assert len(rstd) == 1
    assert len(kept) == 2, "the kept channels' indices and their x_hat"
    assert sorted(t.is_floating_point() for t in kept) == [False, True]
    assert all(t.untyped_storage().nbytes() == 0 for t in kept)
    assert len(activation) == 4, [(tuple(t.shape), t.dtype) for t in activation]  # y, rstd, kept channels, kept x_hat
    nbytes = sum({storage_ptr(t): t.untyped_storage().nbytes() for t in activation}.values())
    assert nbytes == y.nbytes + 4 * math.prod(x.shape[:-1])
    # the parameters themselves are saved (not copies), and x is not
    assert {storage_ptr(p) for p in params} <= set(saved.storages())
    assert storage_ptr(x) not in saved.storages()


@pytest.mark.parametrize("kind", KINDS)
def test_linear_after_norm_shares_storage(kind):
    """nn.Linear(ms_norm(x)) saves one copy of the norm output plus rstd; the stock pair saves two."""
    n, rows = 64, 24
    norm_cls = MSLayerNorm if kind == "layer" else MSRMSNorm
    stock = nn.LayerNorm(n) if kind == "layer" else nn.RMSNorm(n)
    linear = nn.Linear(n, 48)
    norm = norm_cls(n, 1e-5, weight=stock.weight, bias=getattr(stock, "bias", None), affine_weight=True)
    params = [*linear.parameters(), *stock.parameters()]
    x = torch.randn(rows, n, requires_grad=True)
    with SavedTensors() as saved:
        y = norm(x)
        linear(y)
    activation = saved.storages(exclude=[is_parameter_or_cast(params)])
    assert sum(activation.values()) == y.nbytes + 4 * rows
    with SavedTensors() as saved_stock:
        linear(stock(x))
    assert sum(saved_stock.storages(exclude=[is_parameter_or_cast(params)]).values()) >= 2 * y.nbytes


@pytest.mark.parametrize("kind", KINDS)
def test_linear_after_norm_shares_storage_under_autocast(kind):
    """Under CPU bf16 autocast the module emits bf16 itself, so Linear saves that very tensor."""
    n, rows = 64, 24
    norm_cls = MSLayerNorm if kind == "layer" else MSRMSNorm
    linear = nn.Linear(n, 48)
    weight = nn.Parameter(torch.rand(n) + 0.5)
    x = torch.randn(rows, n, requires_grad=True)
    # Parameters are recognised by storage, autocast's bf16 weight copy by its values.
    exclude = [is_parameter_or_cast([*linear.parameters(), weight])]
    for autocast_output in (True, False):
        norm = norm_cls(n, 1e-5, weight=weight, affine_weight=True, autocast_output=autocast_output)
        with torch.autocast("cpu", dtype=torch.bfloat16), SavedTensors() as saved:
            y = norm(x)
            out = linear(y)
        activation = sum(saved.storages(exclude=exclude).values())
        if autocast_output:
            assert y.dtype == torch.bfloat16
            assert activation == y.nbytes + 4 * rows
            out.float().sum().backward()
            assert x.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
        else:  # fp32 y, and F.linear saves its own bf16 cast of it: one more half-size copy
            assert y.dtype == torch.float32
            assert activation == y.nbytes + y.nbytes // 2 + 4 * rows
    assert norm(x).dtype == torch.float32  # outside autocast the dtype is x's


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------


def randomised_layer_norm(n):
    ln = nn.LayerNorm(n)
    with torch.no_grad():
        ln.weight.copy_(torch.rand(n) + 0.5)
        ln.bias.copy_(torch.randn(n))
    return ln


def test_module_keep_affine_registers_the_same_parameters():
    ln = randomised_layer_norm(16)
    ms = MSLayerNorm(16, ln.eps, weight=ln.weight, bias=ln.bias, affine_weight=True, affine_bias=True)
    assert ms.weight is ln.weight and ms.bias is ln.bias
    assert [n for n, _ in ms.named_parameters()] == ["weight", "bias"]
    assert list(ms.state_dict()) == list(ln.state_dict())
    x = torch.randn(3, 16)
    torch.testing.assert_close(ms(x), ln(x))


def test_module_folded_keeps_state_dict_keys_as_identity_buffers():
    ln = randomised_layer_norm(16)
    ms = MSLayerNorm(16, ln.eps, weight=ln.weight, bias=ln.bias)
    assert list(ms.parameters()) == []
    assert list(ms.state_dict()) == list(ln.state_dict())
    assert torch.equal(ms.weight, torch.ones(16)) and torch.equal(ms.bias, torch.zeros(16))
    # A converted checkpoint loads into the stock class and computes the same function (x_hat).
    stock = nn.LayerNorm(16)
    stock.load_state_dict(ms.state_dict())
    x = torch.randn(3, 16)
    torch.testing.assert_close(stock(x), ms(x))
    torch.testing.assert_close(ms(x), F.layer_norm(x, (16,)))


def test_module_bias_only_and_offset():
    ln = randomised_layer_norm(16)
    ms = MSLayerNorm(16, 1e-5, weight=ln.weight, bias=ln.bias, affine_bias=True)
    assert ms.bias is ln.bias and "weight" in dict(ms.named_buffers())
    x = torch.randn(3, 16)
    torch.testing.assert_close(ms(x), F.layer_norm(x, (16,)) + ln.bias)
    # Gemma-style (1 + w): the folded weight's identity is 0; with the weight kept, the scale is 1 + w.
    w = nn.Parameter(torch.randn(16) * 0.1)
    folded = MSRMSNorm(16, 1e-6, weight=w, weight_offset=1.0)
    assert torch.equal(folded.weight, torch.zeros(16)) and list(folded.state_dict()) == ["weight"]
    kept = MSRMSNorm(16, 1e-6, weight=w, affine_weight=True, weight_offset=1.0)
    torch.testing.assert_close(kept(x), F.rms_norm(x, (16,), eps=1e-6) * (1 + w))
    torch.testing.assert_close(folded(x), F.rms_norm(x, (16,), eps=1e-6))
    assert list(nn.RMSNorm(16).state_dict()) == list(kept.state_dict())


def test_module_rejects_a_plain_tensor_as_kept_weight():
    with pytest.raises(TypeError, match="nn.Parameter"):
        MSLayerNorm(8, 1e-5, weight=torch.ones(8), affine_weight=True)
    with pytest.raises(ValueError, match="shape"):
        MSLayerNorm(8, 1e-5, weight=nn.Parameter(torch.ones(9)), affine_weight=True)


def test_module_repr_and_marker():
    ms = MSRMSNorm(32, 1e-6, weight=nn.Parameter(torch.zeros(32)), affine_weight=True, weight_offset=1.0)
    text = repr(ms)
    for part in ("32", "eps=1e-06", "mode=affine(weight)", "weight_offset=1", "channel_dim=-1"):
        assert part in text
    assert "mode=folded" in repr(MSLayerNorm(8, 1e-5))
    assert MSLayerNorm.lowmembp_converted and MSRMSNorm.lowmembp_converted and ms.eps == 1e-6


def test_module_channel_dim_1():
    """NCHW LayerNorm2d-style: normalize over dim 1; the output is a view of the saved storage."""
    n = 6
    weight = nn.Parameter(torch.rand(n, dtype=torch.float64) + 0.5)
    bias = nn.Parameter(torch.randn(n, dtype=torch.float64))
    ms = MSLayerNorm(n, 1e-6, weight=weight, bias=bias, affine_weight=True, affine_bias=True, channel_dim=1)
    x = torch.randn(2, n, 5, 7, dtype=torch.float64, requires_grad=True)
    with SavedTensors() as saved:
        y = ms(x)
    assert y.shape == x.shape and not y.is_contiguous()
    assert storage_ptr(y) in saved.storages()
    x_ref = x.detach().requires_grad_()
    ref = F.layer_norm(x_ref.movedim(1, -1), (n,), weight.detach(), bias.detach(), 1e-6).movedim(-1, 1)
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    (dx_ref,) = torch.autograd.grad(ref, x_ref, dy)
    torch.testing.assert_close(dx, dx_ref)
    assert torch.autograd.gradcheck(ms, (x[:1, :, :2, :3].detach().requires_grad_(),))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    ln = randomised_layer_norm(32)
    block = nn.Sequential(
        MSLayerNorm(32, 1e-5, weight=ln.weight, bias=ln.bias, affine_weight=True, affine_bias=True),
        nn.Linear(32, 16),
    )
    x = torch.randn(4, 5, 32, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True)
    results = []
    for fn in (block, compiled):
        x.grad = None
        block.zero_grad()
        out = fn(x)
        out.square().sum().backward()
        results.append([out.detach(), x.grad.clone()] + [p.grad.clone() for p in block.parameters()])
    for eager, comp in zip(*results, strict=True):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-5)


def test_custom_ops_opcheck():
    """Schema, fake (meta) implementations, autograd registration and AOT dispatch of the three ops."""
    x, w, b, _, dy = make_inputs((3, 5, 16), torch.float32, "wb")
    x_strided = x.transpose(0, 1).requires_grad_()
    torch.library.opcheck(ops.ms_norm_fwd, (x_strided, w.requires_grad_(), b, 1e-5, 1.0, False, None))
    torch.library.opcheck(ops.ms_norm_fwd, (x, None, None, 1e-6, 0.0, True, torch.bfloat16))
    y, rstd, kept_channels, kept = ops.ms_norm_fwd(x, w.detach(), b, 1e-5, 0.0, False, None)
    kept_args = (kept_channels, kept)
    torch.library.opcheck(ops.ms_norm_bwd, (dy, y, rstd, w.detach(), b, 0.0, False, torch.float32, *kept_args))
    torch.library.opcheck(ops.ms_norm_bwd_affine, (dy, y, w.detach(), b, 0.0, True, False, *kept_args))


def test_imports_without_triton():
    """A CPU-only install (no triton) imports the ops and modules and runs them."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from lowmembp_convert.nn.norms import MSLayerNorm\n"
        "x = torch.randn(3, 8, requires_grad=True)\n"
        "MSLayerNorm(8, 1e-5)(x).sum().backward()\n"
        "assert 'lowmembp_convert.kernels.norms' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------------------------------
# GPU only
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (about 20 GB free)")
@pytest.mark.parametrize("kind", KINDS)
def test_more_than_2_31_elements(kind):
    """int64 offsets: rows past element 2**31 are normalized and differentiated correctly."""
    n = 4096
    rows = 2**31 // n + 3
    x = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = nn.Parameter(torch.rand(n, device="cuda") + 0.5)
    b = nn.Parameter(torch.randn(n, device="cuda"))
    y = ms_norm(kind, x, w, b, EPS[kind], 0.0)
    dy = torch.randn_like(y)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
    tail = slice(rows - 4, rows)  # rows that start past element 2**31
    ref = oracle(kind, x[tail].detach().cpu(), w.detach().cpu(), b.detach().cpu(), 0.0, dy[tail].cpu())
    stock = forward_backward(stock_norm, kind, x[tail], w, b, 0.0, dy[tail])
    for name, o, s, r in zip(("y", "dx"), (y[tail], dx[tail]), stock, ref, strict=False):
        assert_close_to_oracle(o.cpu(), s.cpu(), r, torch.bfloat16, name)
    # dweight / dbias over every row, against float64 sums formed chunk by chunk on the device
    dw64 = torch.zeros(n, dtype=torch.float64, device="cuda")
    db64 = torch.zeros(n, dtype=torch.float64, device="cuda")
    for chunk in torch.arange(rows, device="cuda").split(2**16):
        dy64 = dy[chunk].double()
        x_hat = (y[chunk].detach().double() - b.detach().double()) / w.detach().double()
        dw64 += (dy64 * x_hat).sum(0)
        db64 += dy64.sum(0)
    torch.testing.assert_close(db.double(), db64, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(dw.double(), dw64, rtol=1e-4, atol=1e-2)
