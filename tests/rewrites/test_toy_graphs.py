"""The analysis on toy graphs: one hand-written nn.Module per dataflow case between a norm and its consumers.

Each case states what must happen under ``norms="fold"`` (fold / keep_affine / skip) and the reason
the plan must give, from the algebra: y = x_hat * gamma + beta commutes with ops that act per channel
identically (views and permutations that keep the channel dim, token slicing, mean pooling), a scale
but not a shift commutes with zero padding and sums, and nothing commutes with ops that mix channels.
Every case is then converted (norms only, so the backward is exact) and judged against a deep copy:
outputs and input gradients equal, and the folded weights equal W * gamma and b + W @ beta computed
here. The helpers fold unless told ``norms="share"``; the default's own cases are at the end.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lowmembp_convert import convert, plan_conversion

C = 16  # channels
B, T = 2, 6


def _signed_scale(n: int, gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=gen) + 0.5) * torch.randn(n, generator=gen).sign()


class HFRMSNorm(nn.Module):
    """transformers-style RMSNorm: float32 variance, ``variance_epsilon``; optional (1 + w) scale."""

    def __init__(self, n: int, eps: float = 1e-6, one_plus: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n) if one_plus else torch.ones(n))
        self.variance_epsilon = eps
        self.one_plus = one_plus

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return x * (1.0 + self.weight if self.one_plus else self.weight)


def make_norm(kind: str) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(C)
    if kind == "rms":
        return nn.RMSNorm(C, eps=1e-6)
    if kind == "hf_rms":
        return HFRMSNorm(C)
    if kind == "gemma_rms":
        return HFRMSNorm(C, one_plus=True)
    if kind == "layer_no_bias":
        return nn.LayerNorm(C, bias=False)
    raise ValueError(kind)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random signed norm scales, random biases: identity init values would hide a wrong fold."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, (nn.LayerNorm, nn.RMSNorm, HFRMSNorm)) and name == "weight":
                    offset = 1.0 if getattr(module, "one_plus", False) else 0.0
                    p.copy_(_signed_scale(p.numel(), gen) - offset)
                elif name == "bias":
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def inputs(seed: int = 1, shape=(B, T, C)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * 2 + 0.3


def plan_of(model: nn.Module, x: torch.Tensor, **options):
    """The plan, with ``norms="fold"`` unless ``options`` say otherwise."""
    options.setdefault("norms", "fold")
    return plan_conversion(model, example_inputs=((x,), {}), activations=False, **options)


def convert_exactly(model: nn.Module, x: torch.Tensor, **options):
    """Convert (norms only; ``norms="fold"`` unless ``options`` say otherwise) and check forward and
    input gradient against the unconverted copy."""
    options.setdefault("norms", "fold")
    original = copy.deepcopy(model)
    convert(model, example_inputs=((x,), {}), activations=False, **options)
    outs, grads = [], []
    for m in (original, model):
        xi = x.clone().requires_grad_(True)
        out = m(xi)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        outs.append(out.detach())
        grads.append(xi.grad)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5 * outs[0].abs().max().item())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5 * grads[0].abs().max().item())
    return original, model.lowmembp_report.plan


def scale_of(norm: nn.Module) -> torch.Tensor:
    return norm.weight.detach().double() + (1.0 if getattr(norm, "one_plus", False) else 0.0)


# --------------------------------------------------------------------------------------------------
# norm -> Linear
# --------------------------------------------------------------------------------------------------


class NormLinear(nn.Module):
    def __init__(self, kind: str, bias: bool = True):
        super().__init__()
        self.norm = make_norm(kind)
        self.lin = nn.Linear(C, 8, bias=bias)

    def forward(self, x):
        return self.lin(self.norm(x))


@pytest.mark.parametrize("kind", ["layer", "rms", "hf_rms", "gemma_rms", "layer_no_bias"])
def test_norm_then_linear_folds_into_the_weight_and_bias(kind: str) -> None:
    model = randomize(NormLinear(kind))
    x = inputs()
    plan = plan_of(model, x)
    site = plan.norm("norm")
    assert (site.action, site.reason) == ("fold", "")
    assert [c.module for c in site.consumers] == ["lin"]
    assert site.consumers[0].shares_output
    assert site.weight_offset == (1.0 if kind == "gemma_rms" else 0.0)
    original, plan = convert_exactly(model, x)
    gamma = scale_of(original.norm)
    w, b = original.lin.weight.detach().double(), original.lin.bias.detach().double()
    torch.testing.assert_close(model.lin.weight.double(), (w * gamma).float().double(), rtol=0, atol=0)
    beta = original.norm.bias.detach().double() if getattr(original.norm, "bias", None) is not None else 0 * gamma
    torch.testing.assert_close(model.lin.bias.double(), (b + w @ beta).float().double(), rtol=0, atol=0)
    assert not any(isinstance(p, nn.Parameter) for p in model.norm.parameters()), "the folded affine is gone"


def test_layer_norm_feeding_a_linear_without_bias_keeps_its_affine() -> None:
    """A shift cannot move into a consumer that has no bias, and the scale alone cannot be folded."""
    model = randomize(NormLinear("layer", bias=False))
    x = inputs()
    site = plan_of(model, x).norm("norm")
    assert site.action == "keep_affine"
    assert re.search(r"lin has no bias( parameter)? to take the norm's shift", site.reason)
    original, _ = convert_exactly(model, x)
    assert torch.equal(model.lin.weight, original.lin.weight)


class NormToQKV(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(C)
        self.q, self.k, self.v = nn.Linear(C, 8), nn.Linear(C, 8), nn.Linear(C, 8, bias=True)

    def forward(self, x):
        y = self.norm(x)
        return torch.cat([self.q(y), self.k(y), self.v(y)], -1)


def test_norm_feeding_several_linears_folds_into_each() -> None:
    model = randomize(NormToQKV())
    x = inputs()
    original, plan = convert_exactly(model, x)
    site = plan.norm("norm")
    assert site.action == "fold" and sorted(c.module for c in site.consumers) == ["k", "q", "v"]
    gamma = scale_of(original.norm)
    for name in "qkv":
        w = getattr(original, name).weight.detach().double()
        torch.testing.assert_close(getattr(model, name).weight.double(), (w * gamma).float().double(), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Ops between the norm and the consumer
# --------------------------------------------------------------------------------------------------


class Between(nn.Module):
    """norm -> fn -> Linear, with the in-between op given as a function of the norm's output."""

    def __init__(self, kind: str, fn, in_features: int = C):
        super().__init__()
        self.norm = make_norm(kind)
        self.fn = fn
        self.lin = nn.Linear(in_features, 8)

    def forward(self, x):
        return self.lin(self.fn(self.norm(x)))


class NormDropoutLinear(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.norm = nn.LayerNorm(C)
        self.drop = nn.Dropout(p)
        self.lin = nn.Linear(C, 8)

    def forward(self, x):
        return self.lin(self.drop(self.norm(x)))


def test_dropout_with_p_above_zero_between_norm_and_linear_is_skipped() -> None:
    model = randomize(NormDropoutLinear(0.1))
    x = inputs()
    site = plan_of(model, x).norm("norm")
    assert site.action == "skip"
    assert "sharing would break" in site.reason and "drop (p=0.1)" in site.reason
    assert plan_of(model, x, norms="share").norm("norm").reason == site.reason  # the default skips it alike
    convert(model, example_inputs=((x,), {}), activations=False, norms="fold")
    assert type(model.norm) is nn.LayerNorm, "a skipped norm is left untouched"


def test_dropout_with_p_zero_is_transparent() -> None:
    model = randomize(NormDropoutLinear(0.0))
    x = inputs()
    _, plan = convert_exactly(model, x)
    site = plan.norm("norm")
    assert site.action == "fold" and site.consumers[0].module == "lin" and site.consumers[0].shares_output


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_zero_padding_tokens_folds_a_scale_but_not_a_shift(kind: str) -> None:
    """pad(gamma * x_hat) = gamma * pad(x_hat), but pad(x_hat + beta) puts 0, not beta, on the border."""
    model = randomize(Between(kind, lambda y: F.pad(y, (0, 0, 2, 1))))
    x = inputs()
    site = plan_of(model, x).norm("norm")
    if kind == "rms":
        assert (site.action, site.reason) == ("fold", "")
    else:  # the padded tensor is a copy, so keeping the affine in the norm would share nothing either
        assert site.action == "skip"
        assert site.reason.startswith("cannot fold (pad")
        assert "pads with zeros (commutes with a scale, not a shift)) and no Linear receives the output itself" in (
            site.reason
        )
    convert_exactly(model, x)


@pytest.mark.parametrize(
    "fn, why",
    [
        (lambda y: F.pad(y, (0, 0, 1, 1), value=0.5), "pads the channels or pads with a nonzero value"),
        (lambda y: F.pad(y, (1, 1))[..., 2:], "pads the channels or pads with a nonzero value"),
    ],
    ids=["nonzero_value", "channel_dim"],
)
def test_padding_that_does_not_commute_with_a_scale_is_blocked(fn, why: str) -> None:
    model = randomize(Between("rms", fn))
    site = plan_of(model, inputs()).norm("norm")
    assert site.action == "skip"
    assert why in site.reason


@pytest.mark.parametrize(
    "fn",
    [
        lambda y: y.permute(1, 0, 2),
        lambda y: y.transpose(1, 2).transpose(1, 2),
        lambda y: y.reshape(B * T, C),
        lambda y: y.unsqueeze(0).squeeze(0),
    ],
    ids=["permute", "transpose_twice", "flatten_tokens", "unsqueeze_squeeze"],
)
def test_views_keeping_the_channel_dim_last_fold_and_share(fn) -> None:
    model = randomize(Between("layer", fn))
    x = inputs()
    _, plan = convert_exactly(model, x)
    site = plan.norm("norm")
    assert (site.action, site.reason) == ("fold", "")
    assert site.consumers[0].shares_output, "a view of the norm output is the same storage"


def test_reshape_mixing_channels_with_tokens_is_blocked() -> None:
    model = randomize(Between("layer", lambda y: y.reshape(B, T // 2, 2 * C), in_features=2 * C))
    x = inputs()
    site = plan_of(model, x).norm("norm")
    assert site.action == "skip"
    assert "mixes the normalized channels with other dims" in site.reason
    assert not site.consumers


def test_slicing_channels_is_blocked() -> None:
    model = randomize(Between("rms", lambda y: y[..., : C // 2], in_features=C // 2))
    site = plan_of(model, inputs()).norm("norm")
    assert site.action == "skip" and "slices the normalized channels" in site.reason


def test_selecting_the_cls_token_folds() -> None:
    model = randomize(Between("layer", lambda y: y[:, 0]))
    _, plan = convert_exactly(model, inputs())
    site = plan.norm("norm")
    assert (site.action, site.fold_bias) == ("fold", True)


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_mean_pooling_over_tokens_folds_scale_and_shift(kind: str) -> None:
    model = randomize(Between(kind, lambda y: y.mean(1)))
    _, plan = convert_exactly(model, inputs())
    site = plan.norm("norm")
    assert (site.action, site.reason) == ("fold", "")
    assert site.fold_bias == (kind == "layer")
    assert not site.consumers[0].shares_output, "the pooled tensor is a new one"


def test_sum_pooling_commutes_with_a_scale_only() -> None:
    """sum_t (x_hat + beta) = sum_t x_hat + T * beta: the shift does not fold as W @ beta."""
    model = randomize(Between("layer", lambda y: y.sum(1)))
    x = inputs()
    site = plan_of(model, x).norm("norm")
    assert site.action != "fold"
    assert "sums (commutes with a scale, not a shift)" in site.reason
    convert(copy.deepcopy(model), example_inputs=((x,), {}), activations=False, norms="fold")  # no error


def test_pooling_over_channels_is_blocked() -> None:
    model = randomize(Between("layer", lambda y: y.mean(-1, keepdim=True).expand(B, T, C)))
    site = plan_of(model, inputs()).norm("norm")
    assert site.action == "skip" and "reduces over channels" in site.reason


# --------------------------------------------------------------------------------------------------
# Users other than Linear layers
# --------------------------------------------------------------------------------------------------


class Residual(nn.Module):
    """Post-norm style: the norm output feeds a Linear and the residual add."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(C)
        self.lin = nn.Linear(C, C)

    def forward(self, x):
        y = self.norm(x)
        return self.lin(y) + y


def test_residual_add_plus_linear_keeps_the_affine_in_the_norm() -> None:
    model = randomize(Residual())
    x = inputs()
    original, plan = convert_exactly(model, x)
    site = plan.norm("norm")
    assert site.action == "keep_affine"
    assert site.reason.startswith("affine kept in the norm: add in")
    assert [c.module for c in site.consumers] == ["lin"] and site.consumers[0].shares_output
    assert torch.equal(model.lin.weight, original.lin.weight) and torch.equal(model.lin.bias, original.lin.bias)
    # the affine stays trainable, with the original's gradient
    for m in (original, model):
        m(x).square().mean().backward()
    for name in ("weight", "bias"):
        assert isinstance(getattr(model.norm, name), nn.Parameter)
        torch.testing.assert_close(
            getattr(model.norm, name).grad, getattr(original.norm, name).grad, rtol=1e-4, atol=1e-6
        )


class Returned(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(C, eps=1e-6)
        self.lin = nn.Linear(C, 8)

    def forward(self, x):
        y = self.norm(x)
        return self.lin(y), y


def test_norm_output_returned_by_the_model_keeps_the_affine() -> None:
    model = randomize(Returned())
    x = inputs()
    site = plan_of(model, x).norm("norm")
    assert site.action == "keep_affine"
    assert site.reason == "affine kept in the norm: returned from the model's forward"
    original = copy.deepcopy(model)
    convert(model, example_inputs=((x,), {}), activations=False, norms="fold")
    for a, b in zip(original(x), model(x), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


class ReusedLinear(nn.Module):
    """The consumer is applied to the norm output and to another tensor: its weight cannot absorb gamma."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(C)
        self.lin = nn.Linear(C, 8)

    def forward(self, x):
        return self.lin(self.norm(x)) + self.lin(x)


def test_linear_also_used_elsewhere_is_not_folded() -> None:
    model = randomize(ReusedLinear())
    x = inputs()
    original, plan = convert_exactly(model, x)
    site = plan.norm("norm")
    assert site.action == "keep_affine"
    assert re.search(r"lin\.(weight|bias) is also read by .* \(tied or reused weights\)", site.reason)
    assert torch.equal(model.lin.weight, original.lin.weight)


class SharedNorm(nn.Module):
    """One norm module called on two inputs, each call feeding its own Linear."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(C)
        self.a, self.b = nn.Linear(C, 8), nn.Linear(C, 8)

    def forward(self, x):
        return self.a(self.norm(x)) + self.b(self.norm(x.flip(1) * 0.5))


def test_norm_called_twice_folds_into_the_consumers_of_both_calls() -> None:
    model = randomize(SharedNorm())
    _, plan = convert_exactly(model, inputs())
    site = plan.norm("norm")
    assert site.action == "fold" and sorted(c.module for c in site.consumers) == ["a", "b"]


class TwoNormsOneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.lin = nn.Linear(C, 8)

    def forward(self, x):
        return self.lin(self.n1(x)) + self.lin(self.n2(x * 2))


def test_two_norms_feeding_one_linear_fold_neither() -> None:
    """W cannot absorb two different gammas."""
    model = randomize(TwoNormsOneLinear())
    x = inputs()
    plan = plan_of(model, x)
    assert all(s.action != "fold" for s in plan.norms), [(s.module, s.action, s.reason) for s in plan.norms]
    convert_exactly(model, x)


# --------------------------------------------------------------------------------------------------
# keep_affine divides by the weight in backward: ill-conditioned channels keep x_hat instead
# --------------------------------------------------------------------------------------------------


def _tiny_weight(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        model.norm.weight[3] = 1e-5
    return model


@pytest.mark.parametrize("norms", ["fold", "share"])
def test_near_zero_weight_in_keep_affine_mode_is_converted_exactly(norms: str) -> None:
    """Nothing is skipped for a tiny |weight| (below min_abs_weight, and a shift 7x larger than it):
    that channel keeps x_hat for backward, the others recover it, and every gradient stays exact."""
    model = _tiny_weight(randomize(Residual()))
    x = inputs()
    site = plan_of(model, x, norms=norms).norm("norm")
    assert site.action == "keep_affine"
    assert "min_abs_weight" not in site.reason and "keeping the affine would" not in site.reason
    original, plan = convert_exactly(model, x, norms=norms)
    assert plan.norm("norm").action == "keep_affine"
    assert getattr(model.norm, "lowmembp_converted", False)
    for m in (original, model):
        m.zero_grad()
        m(x).square().mean().backward()
    for name in ("weight", "bias"):  # the tiny channel's dweight needs its x_hat
        torch.testing.assert_close(
            getattr(model.norm, name).grad, getattr(original.norm, name).grad, rtol=1e-4, atol=1e-6
        )


def test_near_zero_weight_is_harmless_when_folding() -> None:
    """Folding multiplies by gamma and never divides: no guard needed."""
    model = randomize(NormLinear("layer"))
    with torch.no_grad():
        model.norm.weight[3] = 1e-5
    _, plan = convert_exactly(model, inputs())
    assert plan.norm("norm").action == "fold"


# --------------------------------------------------------------------------------------------------
# Channels-first norms and convolution consumers
# --------------------------------------------------------------------------------------------------


class LayerNorm2d(nn.LayerNorm):
    """timm-style channels-first LayerNorm (permute, layer_norm, permute back)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class NormConv(nn.Module):
    def __init__(self, kernel: int, padding: int):
        super().__init__()
        self.norm = LayerNorm2d(C)
        self.conv = nn.Conv2d(C, 8, kernel, padding=padding)

    def forward(self, x):
        return self.conv(self.norm(x))


def test_channels_first_norm_folds_into_an_unpadded_conv() -> None:
    model = randomize(NormConv(kernel=2, padding=0))
    x = inputs(shape=(B, C, 4, 4))
    original, plan = convert_exactly(model, x)
    site = plan.norm("norm")
    assert (site.action, site.fold_bias) == ("fold", True)
    gamma = scale_of(original.norm)
    w = original.conv.weight.detach().double()
    torch.testing.assert_close(model.conv.weight.double(), (w * gamma[None, :, None, None]).float().double())


def test_channels_first_norm_keeps_its_shift_before_a_zero_padded_conv() -> None:
    model = randomize(NormConv(kernel=3, padding=1))
    x = inputs(shape=(B, C, 4, 4))
    site = plan_of(model, x).norm("norm")
    assert site.action == "keep_affine" and "pads with zeros" in site.reason
    convert_exactly(model, x)


# --------------------------------------------------------------------------------------------------
# Things that are not foldable norms
# --------------------------------------------------------------------------------------------------


class NotANorm(nn.Module):
    """Named like a norm, computes something else (a scaled tanh): recognised by behaviour, not name."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(C))
        self.eps = 1e-5

    def forward(self, x):
        return torch.tanh(x) * self.weight


class FakeNormModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = NotANorm()
        self.lin = nn.Linear(C, 8)

    def forward(self, x):
        return self.lin(self.norm(x))


def test_a_module_named_like_a_norm_but_computing_something_else_is_left_alone() -> None:
    model = FakeNormModel()
    plan = plan_of(model, inputs())
    assert not plan.norms
    assert any("norm (NotANorm): not a LayerNorm/RMSNorm over one dim by behaviour" in n for n in plan.notes)


# --------------------------------------------------------------------------------------------------
# The default, norms="share": the affine stays in the norm, no parameter changes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, shape",
    [
        (lambda: NormLinear("layer"), (B, T, C)),
        (lambda: NormLinear("gemma_rms"), (B, T, C)),
        (lambda: NormLinear("layer", bias=False), (B, T, C)),
        (NormToQKV, (B, T, C)),
        (Residual, (B, T, C)),
        (SharedNorm, (B, T, C)),
        (lambda: NormConv(kernel=3, padding=1), (B, C, 4, 4)),
    ],
    ids=["linear", "gemma_linear", "linear_no_bias", "qkv", "residual", "called_twice", "padded_conv"],
)
def test_default_shares_the_output_and_keeps_every_parameter(build, shape) -> None:
    """Wherever a Linear receives the norm's output itself, the default keeps the affine in the norm
    (whether or not it could fold), for no other reason; the parameters are the stock ones."""
    model = randomize(build())
    x = inputs(shape=shape)
    plan = plan_of(model, x, norms="share")
    assert plan.norms and all((s.action, s.reason) == ("keep_affine", "") for s in plan.norms), plan.norms
    assert all(any(c.shares_output for c in s.consumers) for s in plan.norms)
    original, _ = convert_exactly(model, x, norms="share")
    before, after = original.state_dict(), model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in original.named_parameters()]


@pytest.mark.parametrize(
    "fn", [lambda y: y.mean(1), lambda y: F.pad(y, (0, 0, 2, 1))], ids=["mean_pooling", "zero_padding"]
)
def test_default_skips_a_norm_whose_consumers_only_get_a_copy(fn) -> None:
    """What a fold could still save there (the Linear keeps its copy either way) the default cannot."""
    model = randomize(Between("rms", fn))
    x = inputs()
    assert plan_of(model, x).norm("norm").action == "fold"
    site = plan_of(model, x, norms="share").norm("norm")
    assert site.action == "skip"
    assert site.reason == "no Linear receives the output itself (it is copied on the way), so nothing is shared"
    original = copy.deepcopy(model)
    convert(model, example_inputs=((x,), {}), activations=False)
    assert type(model.norm) is type(original.norm), "a skipped norm is left untouched"
