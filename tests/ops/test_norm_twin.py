"""The autocast twin of a post-norm MS norm and the TwinLinear that reads it.

Exact forward (bit for bit what the MS norm + a stock Linear give under autocast), one saved
low-precision tensor for the norm and its Linears whatever views lie between them, eager and under
torch.compile(fullgraph=True), and gradients within a bound derived from bf16 rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import lowmembp_convert.nn.linear as linear_module
from lowmembp_convert.memory import activation_memory
from lowmembp_convert.nn import MSLayerNorm, MSRMSNorm
from lowmembp_convert.nn.linear import TwinLinear
from lowmembp_convert.ops import norm_twin
from lowmembp_convert.ops.norm_twin import linear_on_twin, linear_on_twin_bwd, ms_norm_twin_fwd, ms_norm_with_twin

LOW = torch.bfloat16
U_LOW = 2.0**-8  # unit roundoff of bfloat16 (8 significand bits): |t.to(bf16) - t| <= U_LOW * |t|
B, T, D = 4, 16, 64
ROWS = B * T


class _Reverse(torch.autograd.Function):
    """A view with a custom backward (gradient reversal): the twin must not bypass it."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return -g


# Each feeds the norm output y [B, T, D] to the Linear through a different view (or none) and
# returns the Linear's output [B, T', D] to be added to y's matching part (the residual).
VIEWS = {
    "none": lambda fc, y: fc(y),
    "flatten": lambda fc, y: fc(y.flatten(0, 1)).view(B, T, D),
    "transpose": lambda fc, y: fc(y.transpose(0, 1)).transpose(0, 1),
    "heads": lambda fc, y: fc(y.view(B, T, 4, D // 4).transpose(1, 2).transpose(1, 2).reshape(B, T, D)),
    "token_slice": lambda fc, y: torch.cat([fc(y[:, :1]), fc(y[:, 1:])], 1),
    "grad_reversal": lambda fc, y: fc(_Reverse.apply(y)),
}


class PostNormBlock(nn.Module):
    """norm output -> (a view ->) Linear, and -> residual add, as in BERT's post-norm blocks."""

    def __init__(self, norm: nn.Module, fc: nn.Module, view: str):
        super().__init__()
        self.norm, self.fc, self.view = norm, fc, view

    def forward(self, x):
        y = self.norm(x)
        return VIEWS[self.view](self.fc, y) + y


def _params(d=D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = nn.Parameter(torch.rand(d, generator=gen) + 0.5)
    bias = nn.Parameter(torch.randn(d, generator=gen))
    fc = nn.Linear(d, d)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(d, d, generator=gen) / d**0.5)
        fc.bias.copy_(torch.randn(d, generator=gen))
    return weight, bias, fc


def _blocks(view: str, kind: str = "layer"):
    """(reference, twin): the same MS norm without / with the twin, a stock nn.Linear / a TwinLinear
    over the same Parameters."""
    weight, bias, fc = _params()
    cls = MSLayerNorm if kind == "layer" else MSRMSNorm

    def norm(twin):
        return cls(D, 1e-5, weight=weight, bias=bias, affine_weight=True, affine_bias=True, autocast_twin=twin)

    return PostNormBlock(norm(False), fc, view), PostNormBlock(norm(True), TwinLinear.from_linear(fc), view)


def _x(seed=1):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed)) * 3 + 1


def _step(block, x, probe, params=None):
    """Forward under bf16 autocast and backward of <out, probe>; (out, dx, grads of every parameter)."""
    params = block if params is None else params
    params.zero_grad()
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=LOW):
        out = block(x)
    (out.float() * probe).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in params.named_parameters()}


def _saved(block, x):
    def run():
        with torch.autocast("cpu", dtype=LOW):
            block(x.clone().requires_grad_(True)).float().sum()

    return activation_memory(run, params=block)


# --------------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------------


def test_custom_ops_opcheck():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    w, b = torch.rand(16, requires_grad=True), torch.randn(16, requires_grad=True)
    for twin_output in (True, False):
        torch.library.opcheck(ms_norm_twin_fwd, (x, w, b, 1e-5, 0.0, False, LOW, twin_output))
        torch.library.opcheck(ms_norm_twin_fwd, (x, w, None, 1e-6, 1.0, True, torch.float16, twin_output))
        torch.library.opcheck(ms_norm_twin_fwd, (x.detach(), None, None, 1e-6, 0.0, True, LOW, twin_output))
    fc = nn.Linear(16, 8)
    y = torch.randn(5, 3, 16, requires_grad=True)
    for t in (y, y.transpose(0, 1), y[:, 1:]):  # dense, dense transposed, not dense
        twin = t.detach().to(LOW)
        torch.library.opcheck(linear_on_twin, (t, twin, fc.weight, fc.bias))
        torch.library.opcheck(linear_on_twin, (t, twin, fc.weight, None))
        dout = torch.randn(*t.shape[:-1], 8).to(LOW)
        for need in (True, False):
            torch.library.opcheck(
                linear_on_twin_bwd, (dout, twin, fc.weight.detach(), torch.float32, torch.float32, need, need)
            )
            torch.library.opcheck(
                linear_on_twin_bwd, (dout, twin, fc.weight.detach(), torch.float32, None, need, not need)
            )


def test_linear_on_twin_is_autocast_linear_bit_for_bit():
    weight, bias, fc = _params()
    y = _x() @ torch.randn(D, D) / 8
    probe = torch.randn(T, B, D)
    results = []
    for use_twin in (False, True):
        fc.zero_grad()
        t = y.clone().requires_grad_(True)
        view = t.transpose(0, 1)
        with torch.autocast("cpu", dtype=LOW):
            out = linear_on_twin(view, view.detach().to(LOW), fc.weight, fc.bias) if use_twin else fc(view)
        (out.float() * probe).sum().backward()
        results.append((out, t.grad, fc.weight.grad.clone(), fc.bias.grad.clone()))
    for ref, got in zip(*results, strict=True):
        assert ref.dtype == got.dtype and torch.equal(ref, got)


@pytest.mark.parametrize("rms", [False, True])
def test_twin_norm_gradients_within_the_bf16_rounding_bound_of_a_float64_oracle(rms: bool):
    """The only inexact step is recovering x_hat = (twin - b) / w from the bf16 twin. Rounding y to
    bf16 moves each x_hat_j by e_j <= u |y_j| / |w_j|; to first order that moves
    dx_i = rstd (g_i - mean(g) - x_hat_i mean(g x_hat)), g = w dy, by at most
    rstd (e_i |mean(g x_hat)| + |x_hat_i| mean(|g| e)), and dw_j = sum_rows dy_j x_hat_j by
    sum_rows |dy_j| e_j. Asserted elementwise, with a float32 arithmetic allowance on top (dy is the
    sum of both outputs' gradients, the twin's being bf16 as any bf16 output's is)."""
    gen = torch.Generator().manual_seed(2)
    n = 96
    x = torch.randn(40, n, generator=gen, dtype=torch.float64) * 3 + 1
    w = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    g_y, g_twin = torch.randn(2, 40, n, generator=gen, dtype=torch.float64)
    g_twin = g_twin.to(LOW).double()  # what reaches the op: the gradient of a bf16 output is bf16
    xf, wf, bf = (t.float().requires_grad_(True) for t in (x, w, b))
    y, twin = ms_norm_with_twin(xf, wf, bf, 1e-5, 0.0, rms, LOW)
    assert torch.equal(twin, y.to(LOW))
    ((y * g_y.float()).sum() + (twin.float() * g_twin.float()).sum()).backward()

    x64, w64, b64 = (t.clone().requires_grad_(True) for t in (x, w, b))
    if rms:
        y64 = F.rms_norm(x64, (n,), w64, 1e-5) + b64
    else:
        y64 = F.layer_norm(x64, (n,), w64, b64, 1e-5)
    (y64 * (g_y + g_twin)).sum().backward()

    with torch.no_grad():
        centred = x if rms else x - x.mean(-1, keepdim=True)
        rstd = torch.rsqrt(centred.square().mean(-1, keepdim=True) + 1e-5)
        x_hat = centred * rstd
        dy = g_y + g_twin
        g = w * dy
        e = U_LOW * (x_hat * w + b).abs() / w
        bound_dx = rstd * (e * (g * x_hat).mean(-1, keepdim=True).abs() + x_hat.abs() * (g.abs() * e).mean(-1, True))
        fp32_dx = 1e-5 * rstd * (g.abs() + g.abs().mean(-1, True) + x_hat.abs() * (g * x_hat).abs().mean(-1, True))
        bound_dw = (dy.abs() * e).sum(0)
        fp32_dw = 1e-5 * (dy * x_hat).abs().sum(0)
    err_dx = (xf.grad.double() - x64.grad).abs()
    err_dw = (wf.grad.double() - w64.grad).abs()
    assert (err_dx <= 1.01 * bound_dx + fp32_dx).all(), (err_dx / (bound_dx + fp32_dx)).max()
    assert (err_dw <= 1.01 * bound_dw + fp32_dw).all(), (err_dw / (bound_dw + fp32_dw)).max()
    torch.testing.assert_close(bf.grad.double(), b64.grad, rtol=1e-5, atol=1e-5)  # no x_hat in dbias
    # the bound is a real constraint: a few percent of the gradient, not a blanket tolerance
    assert bound_dx.max() < 0.05 * x64.grad.abs().max() and bound_dw.max() < 0.05 * w64.grad.abs().max()


def test_double_backward_is_refused_not_silently_wrong():
    weight, bias, fc = _params()
    x = _x().requires_grad_(True)
    y, twin = ms_norm_with_twin(x, weight, bias, 1e-5, 0.0, False, LOW)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum() + twin.float().sum(), x, create_graph=True)
    t = _x().requires_grad_(True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(linear_on_twin(t, t.detach().to(LOW), fc.weight, fc.bias).sum(), t, create_graph=True)


# --------------------------------------------------------------------------------------------------
# Norm + TwinLinear: exact forward, one saved tensor through any view, stock-close gradients
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("view", list(VIEWS))
def test_forward_is_bitwise_that_of_stock_autocast_and_linear_gradients_match(view: str):
    reference, twin = _blocks(view)
    x, probe = _x(), torch.randn(B, T, D)
    out_ref, dx_ref, grads_ref = _step(reference, x, probe)
    out, dx, grads = _step(twin, x, probe)
    assert out.dtype == out_ref.dtype == torch.float32 and torch.equal(out, out_ref)
    if view != "token_slice":  # one call: autocast's linear backward formulas, bit for bit
        assert torch.equal(grads["fc.weight"], grads_ref["fc.weight"])
        assert torch.equal(grads["fc.bias"], grads_ref["fc.bias"])
    # dx: from x_hat of the bf16 twin instead of fp32 y; bounded op-level above, close here
    assert (dx - dx_ref).norm() <= 0.01 * dx_ref.norm()


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("view", list(VIEWS))
def test_norm_and_linear_keep_one_bf16_tensor_through_any_view(view: str, kind: str):
    reference, twin = _blocks(view, kind)
    x = _x()
    # the twin (bf16, shared by the norm and the Linear) + rstd; the Linear keeps its fp32 weight
    # Parameter (not counted) instead of a bf16 copy
    expected = ROWS * D * 2 + ROWS * 4
    saved = _saved(twin, x)
    assert (saved.total, saved.storages) == (expected, 2), saved
    assert saved.by_dtype == {"bfloat16": ROWS * D * 2, "float32": ROWS * 4}
    # besides those, the norm saves its kept channels (indices and x_hat): empty for this well-conditioned weight
    empty = []

    def pack(t):
        if t.numel() == 0:
            empty.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=LOW):
            twin(x.clone().requires_grad_(True))
    assert len(empty) == 2 and sorted(t.is_floating_point() for t in empty) == [False, True]
    # without the twin: fp32 y + rstd + the Linear's bf16 cast(s) of y + its bf16 weight copy
    assert _saved(reference, x).total >= ROWS * D * (4 + 2) + ROWS * 4


@pytest.mark.parametrize("view", ["none", "transpose", "heads", "token_slice", "grad_reversal"])
def test_compiled_fullgraph_keeps_no_more_than_eager(view: str):
    _, twin = _blocks(view)
    x, probe = _x(), torch.randn(B, T, D)
    out, dx, grads = _step(twin, x, probe)
    eager = _saved(twin, x).total
    torch._dynamo.reset()
    compiled = torch.compile(twin, fullgraph=True)
    out_c, dx_c, grads_c = _step(compiled, x, probe, params=twin)
    torch.testing.assert_close(out_c, out, rtol=2e-2, atol=2e-2)  # Inductor's own bf16 rounding
    assert (dx_c - dx).norm() <= 0.01 * dx.norm()
    for name, g in grads.items():
        assert (grads_c[name] - g).norm() <= 0.01 * g.norm(), name
    compiled_bytes = _saved(compiled, x).total
    assert compiled_bytes <= eager, (compiled_bytes, eager)
    assert compiled_bytes == ROWS * D * 2 + ROWS * 4


def test_gradient_reversal_between_norm_and_linear_is_respected():
    """The Linear's input gradient goes through its input's own autograd path, never around it."""
    reference, twin = _blocks("grad_reversal")
    probe = torch.randn(B, T, D)
    _, dx_ref, _ = _step(reference, _x(), probe)
    _, dx, _ = _step(twin, _x(), probe)
    assert (dx - dx_ref).norm() <= 0.01 * dx_ref.norm()
    _, plain, _ = _step(PostNormBlock(twin.norm, twin.fc, "none"), _x(), probe)
    assert (dx - plain).norm() > 0.1 * plain.norm(), "the reversal changed the gradient"


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "under_no_grad"])
def test_output_modified_in_place_is_not_paired_with_a_stale_twin(recorded: bool):
    class Scaled(PostNormBlock):
        def forward(self, x):
            y = self.norm(x)
            with torch.set_grad_enabled(recorded):  # unrecorded: only y's version counter tells
                y.mul_(2.0)
            return self.fc(y.transpose(0, 1)).transpose(0, 1)

    weight, bias, fc = _params()
    norm = MSLayerNorm(D, 1e-5, weight=weight, bias=bias, affine_weight=True, affine_bias=True, autocast_twin=True)
    x = _x()
    with torch.autocast("cpu", dtype=LOW), torch.no_grad():
        expected = fc((norm(x) * 2.0).transpose(0, 1)).transpose(0, 1)
    with torch.autocast("cpu", dtype=LOW):
        out = Scaled(norm, TwinLinear.from_linear(fc), "none")(x.requires_grad_(True))
    assert torch.equal(out.detach(), expected)


def test_outside_autocast_and_without_grad_it_is_a_plain_linear():
    reference, twin = _blocks("transpose")
    x = _x()
    assert torch.equal(twin(x), reference(x))
    with torch.no_grad(), torch.autocast("cpu", dtype=LOW):
        assert torch.equal(twin(x), reference(x))


def test_non_reentrant_checkpoint_recomputes_the_same_gradients():
    reference, twin = _blocks("heads")
    probe = torch.randn(B, T, D)
    expected = _step(twin, _x(), probe)
    twin.zero_grad()
    x = _x().requires_grad_(True)
    with torch.autocast("cpu", dtype=LOW):
        out = checkpoint(twin, x, use_reentrant=False)
    (out.float() * probe).sum().backward()
    assert torch.equal(out.detach(), expected[0]) and torch.equal(x.grad, expected[1])


def test_twin_linear_holds_the_same_parameters_and_shows_in_print():
    fc = nn.Linear(D, 8)
    twin = TwinLinear.from_linear(fc)
    assert twin.weight is fc.weight and twin.bias is fc.bias
    assert list(twin.state_dict()) == list(fc.state_dict())
    assert isinstance(twin, nn.Linear) and "TwinLinear(in_features=64, out_features=8, bias=True" in repr(twin)
    no_bias = TwinLinear.from_linear(nn.Linear(D, 8, bias=False))
    assert no_bias.bias is None and list(no_bias.state_dict()) == ["weight"]
    with pytest.raises(TypeError, match="expected an nn.Linear"):
        TwinLinear.from_linear(nn.Conv1d(2, 2, 1))


@pytest.mark.parametrize("view", ["none", "heads", "token_slice"])
def test_save_on_cpu_is_handed_one_twin_by_the_norm_and_every_linear(view: str):
    """Offloading packs whatever autograd saves; the Linears must pack the norm's own twin (the
    same storage), not an unpacked copy of it nor a cast of their own."""
    reference, twin = _blocks(view)
    probe = torch.randn(B, T, D)
    expected = _step(reference, _x(), probe)
    low_storages, packed = set(), []

    def pack(t):
        if t.dtype == LOW:
            low_storages.add(t.untyped_storage().data_ptr())
            packed.append(t)
        return t.clone()  # an offloaded copy: unpacking yields another tensor, as save_on_cpu does

    twin.zero_grad()
    x = _x().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=LOW):
        out = twin(x)
    (out.float() * probe).sum().backward()
    assert len(packed) >= 2 and len(low_storages) == 1, (len(packed), len(low_storages))
    assert torch.equal(out.detach(), expected[0])
    assert (x.grad - expected[1]).norm() <= 0.01 * expected[1].norm()
    with torch.autograd.graph.save_on_cpu(), torch.autocast("cpu", dtype=LOW):
        out_cpu = twin(_x().requires_grad_(True))
    assert torch.equal(out_cpu.detach(), expected[0])


def test_checkpoint_forward_and_recomputation_both_read_the_twin(monkeypatch):
    """Non-reentrant checkpoint recomputes the block in backward and requires the recomputation to
    save what the first forward saved: both must take the twin path (two calls, no metadata error)."""
    calls = []
    real = linear_module.linear_on_twin

    def counting(*args):
        calls.append(torch.is_grad_enabled())
        return real(*args)

    monkeypatch.setattr(linear_module, "linear_on_twin", counting)
    _, twin = _blocks("heads")
    probe = torch.randn(B, T, D)
    expected = _step(twin, _x(), probe)
    assert len(calls) == 1
    twin.zero_grad()
    x = _x().requires_grad_(True)
    with torch.autocast("cpu", dtype=LOW):
        out = checkpoint(twin, x, use_reentrant=False)
    (out.float() * probe).sum().backward()
    assert len(calls) == 3, calls  # the first forward and the recomputation
    assert torch.equal(out.detach(), expected[0]) and torch.equal(x.grad, expected[1])
    for name, p in twin.named_parameters():
        assert torch.equal(p.grad, expected[2][name]), name


def test_a_published_twin_is_released_after_backward_and_when_its_output_dies():
    _, twin = _blocks("none")
    norm = twin.norm
    x = _x().requires_grad_(True)
    with torch.autocast("cpu", dtype=LOW):
        y = norm(x)
    key = (y.device, y.untyped_storage().data_ptr())
    assert norm_twin._PUBLISHED[key].twin.shape == y.shape
    y.float().sum().backward()
    assert key not in norm_twin._PUBLISHED  # y still alive, the twin no longer held
    with torch.autocast("cpu", dtype=LOW):
        y = norm(x)
    key = (y.device, y.untyped_storage().data_ptr())
    assert key in norm_twin._PUBLISHED
    del y
    assert key not in norm_twin._PUBLISHED
    with torch.autocast("cpu", dtype=LOW), torch.no_grad():
        norm(x)
    assert not norm_twin._PUBLISHED  # nothing published without autograd


def test_an_alias_of_other_storage_or_dtype_is_not_paired():
    """Only tensors viewing y's own storage in y's dtype get the twin; anything else casts itself."""
    _, twin = _blocks("none")
    x = _x().requires_grad_(True)
    with torch.autocast("cpu", dtype=LOW):
        y = twin.norm(x)
        assert norm_twin.autocast_twin_of(y[1:, ::2], LOW) is not None
        assert torch.equal(norm_twin.autocast_twin_of(y[1:, ::2], LOW), y[1:, ::2].to(LOW))
        assert norm_twin.autocast_twin_of(y.clone(), LOW) is None
        assert norm_twin.autocast_twin_of(y.view(torch.int32), LOW) is None
        assert norm_twin.autocast_twin_of(y, torch.float16) is None
