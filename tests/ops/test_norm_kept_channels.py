"""Ill-conditioned channels of a memory-sharing norm that keeps its affine (the ``norms="share"`` default).

Backward recovers x_hat = (y - b) / w from the saved output; a channel where that division is
ill-conditioned (|w| < keep_below, or |b| > 7 |w|) keeps its x_hat in float32 instead. These tests
put such channels next to ordinary ones (weights exactly 0, 1e-30, 1e-3, 1e-4 and |b / w| = 1e4)
and judge dx, dweight and dbias against a float64 oracle: torch's own F.layer_norm / F.rms_norm
(+ bias) with float64 autograd on the very input values. The bound is relative to the stock op in
the input dtype (what the model computed before conversion): our relative error (max abs error /
max abs reference) may be at most 4x the stock one plus a rounding floor, over the whole tensor and
over the ill-conditioned columns alone (so a wrong channel cannot hide behind larger ones).

Covered: the torch reference path, the Triton kernels (interpreted on CPU, see tests/conftest.py;
one-block rows and the looped long-row path), the channel selection itself, a training run whose
norm weights SGD drives through zero (it must follow the stock model), and opcheck of the forward
op with K > 0 kept channels.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lowmembp_convert import convert
from lowmembp_convert.dispatch import force_triton, triton_available
from lowmembp_convert.ops import norms as ops

KINDS = ("layer", "rms")
EPS = {"layer": 1e-5, "rms": 1e-6}
CUDA = torch.cuda.is_available()
# The rounding floor added to 4x the stock op's relative error: one rounding unit (half an ulp).
FLOOR = {torch.float32: 1e-7, torch.bfloat16: torch.finfo(torch.bfloat16).eps / 2}
# The Triton interpreter (3.8) rounds float32 -> bfloat16 toward zero (the GPU rounds to nearest): up
# to one bf16 ulp on the kernels' bf16 outputs, so one more unit there (as in tests/ops/test_norms.py).
INTERPRETED_BF16_FLOOR = torch.finfo(torch.bfloat16).eps

needs_kernels = pytest.mark.skipif(
    not (triton_available() and (CUDA or os.environ.get("TRITON_INTERPRET") == "1")),
    reason="needs triton and CUDA, or TRITON_INTERPRET=1 set before triton is imported",
)

# (weight, bias) of the ill-conditioned (or borderline) channels; None: a random bias.
SPECIAL = (
    (0.0, None),  # zero scale: y carries nothing of x_hat
    (1e-30, None),  # vanishing scale (a normal float32)
    (1e-3, 1e-3),  # at keep_below: recovered in float32 (|b| = |w|), kept in bfloat16 (rounds below 1e-3)
    (1e-4, None),  # below keep_below
    (0.5, 5e3),  # |b / w| = 1e4: the shift swamps the signal in y's rounding
)


def special_affine(n: int, positions: list[int], dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random |w| in [0.5, 1.5] (random signs) and b ~ 0.5 N(0, 1), the SPECIAL channels at ``positions``."""
    gen = torch.Generator().manual_seed(seed)
    w = (torch.rand(n, generator=gen) + 0.5) * torch.randn(n, generator=gen).sign()
    b = torch.randn(n, generator=gen) * 0.5
    for j, (wj, bj) in zip(positions, SPECIAL, strict=True):
        w[j] = wj
        if bj is not None:
            b[j] = bj
    return w.to(dtype), b.to(dtype)


def stock_norm(kind: str, x, w, b):
    """What the unconverted model computes."""
    n = x.shape[-1]
    if kind == "layer":
        return F.layer_norm(x, (n,), w, b, EPS[kind])
    return F.rms_norm(x, (n,), w, EPS[kind]) + b


def ms_norm(kind: str, x, w, b):
    fn = ops.ms_layer_norm if kind == "layer" else ops.ms_rms_norm
    return fn(x, w, b, eps=EPS[kind])


def forward_backward(fn, kind, x, w, b, dy, cast=lambda t: t) -> list[torch.Tensor]:
    """[y, dx, dweight, dbias] of ``fn`` on copies of the inputs (``cast`` first), on CPU."""
    leaves = [cast(t).detach().requires_grad_() for t in (x, w, b)]
    y = fn(kind, *leaves)
    grads = torch.autograd.grad(y, leaves, cast(dy).to(y.dtype))
    return [t.detach().cpu() for t in (y, *grads)]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|, in float64."""
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def check_against_oracle(kind: str, x, w, b, dy, positions: list[int], device: str = "cpu", kernels=False) -> None:
    """Ours (inputs on ``device``) vs stock (CPU, same dtype) vs the float64 oracle, per output."""
    dtype = x.dtype
    floor = FLOOR[dtype]
    if kernels and dtype == torch.bfloat16 and not CUDA:
        floor = INTERPRETED_BF16_FLOOR
    ours = forward_backward(ms_norm, kind, x, w, b, dy, cast=lambda t: t.to(device))
    stock = forward_backward(stock_norm, kind, x, w, b, dy)
    ref = forward_backward(stock_norm, kind, x, w, b, dy, cast=lambda t: t.double())
    for name, o, s, r in zip(("y", "dx", "dweight", "dbias"), ours, stock, ref, strict=True):
        assert o.dtype == dtype and o.shape == r.shape, name
        assert torch.isfinite(o).all(), f"{name}: non-finite values"
        for where, cols in (("all channels", slice(None)), ("ill-conditioned channels", positions)):
            err, stock_err = rel_err(o[..., cols], r[..., cols]), rel_err(s[..., cols], r[..., cols])
            bound = 4 * stock_err + floor
            assert err <= bound, (
                f"{kind} {dtype} {name} ({where}): relative error {err:.3e} > {bound:.3e} (stock {stock_err:.3e})"
            )


def make_case(n: int, positions: list[int], dtype: torch.dtype, rows: tuple[int, ...] = (4, 16), seed: int = 0):
    gen = torch.Generator().manual_seed(seed + 100)
    x = (torch.randn(*rows, n, generator=gen) * 2 + 0.5).to(dtype)
    dy = torch.randn(*rows, n, generator=gen).to(dtype)
    w, b = special_affine(n, positions, dtype, seed)
    return x, w, b, dy


# --------------------------------------------------------------------------------------------------
# Which channels are kept
# --------------------------------------------------------------------------------------------------


def test_ill_conditioned_channels_picks_the_expected_indices():
    nan, inf = float("nan"), float("inf")
    cases = [  # (weight, bias) per channel, kept?
        (1.0, 0.0, False),
        (0.0, 0.0, True),  # zero scale
        (-(2**-10), 0.0, True),  # |w| = 9.8e-4 < 1e-3, negative
        (2**-9, 0.0, False),  # |w| = 2.0e-3
        (0.25, 1.75, False),  # |b| = 7 |w| exactly: not past the limit
        (0.25, -1.875, True),  # |b| = 7.5 |w|, negative shift
        (-0.5, 3.0, False),
        (-0.5, -3.75, True),
        (nan, 0.0, True),  # a non-finite scale
        (inf, 0.0, True),
        (1.0, inf, True),
        (1e-30, 0.0, True),
    ]
    w = torch.tensor([c[0] for c in cases])
    b = torch.tensor([c[1] for c in cases])
    expected = [j for j, c in enumerate(cases) if c[2]]
    got = ops.ill_conditioned_channels(w, b, 0.0, 1e-3)
    assert got.dtype == torch.int64 and got.tolist() == expected
    # Without a bias only the scale counts; without a weight the scale is 1 (a bias past 7 is kept).
    assert ops.ill_conditioned_channels(w, None, 0.0, 1e-3).tolist() == [1, 2, 8, 9, 11]
    assert ops.ill_conditioned_channels(None, torch.tensor([0.5, -7.5, 7.0, 100.0]), 0.0, 1e-3).tolist() == [1, 3]
    assert ops.ill_conditioned_channels(None, None, 0.0, 1e-3).numel() == 0
    # The (1 + w) offset: the scale is w + 1.
    w1 = torch.tensor([-1.0, 0.0, -0.9995, -0.99, 1.0])
    assert ops.ill_conditioned_channels(w1, None, 1.0, 1e-3).tolist() == [0, 2]
    # A larger keep_below, and keep_below = 0 (only the shift rule and non-finite scales).
    w2 = torch.tensor([0.05, 0.2, 0.0, 1.0])
    assert ops.ill_conditioned_channels(w2, None, 0.0, 0.1).tolist() == [0, 2]
    assert ops.ill_conditioned_channels(w2, torch.tensor([0.0, 0.0, 0.5, 8.0]), 0.0, 0.0).tolist() == [2, 3]
    # The special channels of the numerics tests below.
    positions = [0, 3, 7, 12, 15]
    w32, b32 = special_affine(16, positions, torch.float32)
    assert ops.ill_conditioned_channels(w32, b32, 0.0, 1e-3).tolist() == [0, 3, 12, 15]  # 1e-3 itself is not below
    wb16, bb16 = special_affine(16, positions, torch.bfloat16)
    assert ops.ill_conditioned_channels(wb16, bb16, 0.0, 1e-3).tolist() == positions  # bf16(1e-3) < 1e-3


# --------------------------------------------------------------------------------------------------
# Numerics: the torch reference path
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", (0, 1))
def test_reference_matches_float64(kind, dtype, seed):
    positions = [0, 3, 7, 12, 15]
    x, w, b, dy = make_case(16, positions, dtype, seed=seed)
    with force_triton(False):
        check_against_oracle(kind, x, w, b, dy, positions)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_keeps_the_exact_x_hat_of_the_kept_channels(kind):
    """The op's kept_x_hat is x_hat of exactly the ill-conditioned channels, to float32 rounding."""
    positions = [0, 3, 7, 12, 15]
    x, w, b, _ = make_case(16, positions, torch.float32)
    with force_triton(False):
        y, rstd, kept_channels, kept_x_hat = ops.ms_norm_fwd(x, w, b, EPS[kind], 0.0, kind == "rms", None, 1e-3)
    assert kept_channels.tolist() == [0, 3, 12, 15]
    assert kept_x_hat.shape == (*x.shape[:-1], 4) and kept_x_hat.dtype == torch.float32
    x64 = x.double()
    x_hat = stock_norm(kind, x64, None, torch.zeros(16, dtype=torch.float64))
    torch.testing.assert_close(kept_x_hat.double(), x_hat[..., kept_channels], rtol=1e-6, atol=1e-6)


# keep_below=0 (convert(min_abs_weight=0.0)) with a weight exactly 0: the channel must still be kept
# (a regression test: it was not, and dweight / dx of that channel came out silently wrong).
@pytest.mark.parametrize("kind", KINDS)
def test_zero_weight_channel_with_keep_below_zero(kind):
    gen = torch.Generator().manual_seed(0)
    x, dy = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    w = torch.ones(8)
    w[2] = 0.0
    b = torch.zeros(8)
    fn = ops.ms_layer_norm if kind == "layer" else ops.ms_rms_norm
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    with force_triton(False):
        y = fn(*leaves, eps=EPS[kind], keep_below=0.0)
        ours = torch.autograd.grad(y, leaves, dy)
    ref = forward_backward(stock_norm, kind, x, w, b, dy, cast=lambda t: t.double())[1:]
    for name, o, r in zip(("dx", "dweight", "dbias"), ours, ref, strict=True):
        torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-5, msg=name)


# --------------------------------------------------------------------------------------------------
# Numerics: the Triton kernels (interpreted on CPU)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def kernels_only(monkeypatch):
    """Makes the torch reference path raise, so a passing test proves the kernels did the work."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("the torch reference ran where the Triton kernels should have")

    for name in ("reference_fwd", "reference_bwd", "reference_bwd_affine"):
        monkeypatch.setattr(ops, name, refuse)


@pytest.mark.triton
@needs_kernels
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("n", "positions", "max_block"),
    [
        pytest.param(16, [0, 3, 7, 12, 15], None, id="one-block-N16"),
        # blocks of 16 columns over a row of 40: kept channels in each block, the last one partial
        pytest.param(40, [1, 15, 16, 31, 39], 32, id="looped-N40"),
    ],
)
def test_triton_kernels_match_float64(kind, dtype, n, positions, max_block, monkeypatch, kernels_only):
    if max_block is not None:
        monkeypatch.setattr(ops, "MAX_FUSED_BLOCK_N", max_block)
    device = "cuda" if CUDA else "cpu"
    assert ops.launch_settings(12, n, torch.device(device)).one_block == (max_block is None)
    x, w, b, dy = make_case(n, positions, dtype, rows=(2, 6))  # few rows: the interpreter runs one program each
    assert ops.ill_conditioned_channels(w, b, 0.0, 1e-3).numel() >= 4
    with force_triton():
        check_against_oracle(kind, x, w, b, dy, positions, device=device, kernels=True)


# --------------------------------------------------------------------------------------------------
# Training through zero
# --------------------------------------------------------------------------------------------------


def test_sgd_drives_norm_weights_through_zero_like_stock():
    """Norm weights starting at +0.01 that SGD pushes negative: every step's loss and the final
    parameters follow the stock model's; the kept channels change from step to step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    driven = [2, 5, 11]
    with torch.no_grad():
        model[1].weight.copy_(torch.rand(16) + 0.5)
        model[1].bias.copy_(torch.randn(16) * 0.1)
        model[1].weight[driven] = 0.01
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        teacher[1].weight[driven] = -0.3
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 8, generator=gen)
    with torch.no_grad():
        target = teacher(x) + 0.05 * torch.randn(32, 4, generator=gen)  # the loss stays away from 0

    stock = copy.deepcopy(model)
    weight, bias = model[1].weight, model[1].bias
    convert(model, example_inputs=((x,), {}), activations=False)
    assert type(model[1]).__name__.startswith("MS"), type(model[1])
    assert model[1].weight is weight and model[1].bias is bias, "the norm keeps the stock Parameters"

    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, stock)]
    kept_sets, driven_values = set(), []
    for step in range(30):
        losses = []
        for m, opt in zip((model, stock), optimizers, strict=True):
            opt.zero_grad()
            loss = F.mse_loss(m(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-5), f"step {step}: loss {losses[0]} vs stock {losses[1]}"
        norm = model[1]
        kept_sets.add(tuple(ops.ill_conditioned_channels(norm.weight, norm.bias, 0.0, norm.min_abs_weight).tolist()))
        driven_values.append(norm.weight.detach()[driven].clone())

    values = torch.stack(driven_values)
    assert (values < 0).any(dim=0).all(), "every driven weight went through zero"
    assert (values.abs() < 1e-3).any(), "some step ran with a weight below min_abs_weight"
    assert len(kept_sets) > 1, "the kept channels changed during training"
    for (name, p), (_, q) in zip(model.named_parameters(), stock.named_parameters(), strict=True):
        assert rel_err(p.detach(), q.detach().double()) <= 1e-5, f"{name} drifted from stock"


# --------------------------------------------------------------------------------------------------
# opcheck with kept channels
# --------------------------------------------------------------------------------------------------


def test_opcheck_ms_norm_fwd_with_kept_channels():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=gen, requires_grad=True)
    w = torch.randn(16, generator=gen)
    w[[1, 7]] = 0.0
    w[9] = 1e-4
    b = torch.randn(16, generator=gen)
    b[4] = 100.0
    w1 = w - 1.0  # with the (1 + w) offset the same scales
    cases = [
        (x, w.clone().requires_grad_(), b.clone().requires_grad_(), 1e-5, 0.0, False, None, 1e-3),
        (x, w.clone().requires_grad_(), b, 1e-6, 0.0, True, torch.bfloat16, 1e-3),
        (x, w1.requires_grad_(), None, 1e-6, 1.0, True, None, 1e-3),
        (x.detach(), None, b.clone().requires_grad_(), 1e-5, 0.0, False, None, 1e-3),
    ]
    for args in cases:
        _, weight, bias, _, offset, *_ = args
        assert ops.ill_conditioned_channels(weight, bias, offset, 1e-3).numel() > 0
        torch.library.opcheck(ops.ms_norm_fwd, args)
