"""Causes 4, 5, 10 and 11: what training sees. In-place activations keep their mutation, trainable
norms next to frozen Linears keep training (a fold would freeze them), an ill-conditioned recovery
keeps x_hat for its channels (exact, never refused, never raising mid-training), and double backward /
torch.func either work exactly or fail with a clear error."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from rule import convert_checked, input_grad, rel

from lowmembp_convert import convert

D = 8


def _x() -> tuple[tuple, dict]:
    return (torch.randn(2, 3, D, generator=torch.Generator().manual_seed(0)),), {}


class InplaceUsedThroughMutation(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.fc1, self.act, self.out = nn.Linear(D, D), act, nn.Linear(D, D)

    def forward(self, x):
        h = self.fc1(x)
        self.act(h)  # result ignored: the mutation of h is the effect
        return self.out(h)


@pytest.mark.parametrize("act", [nn.SiLU(inplace=True), nn.ReLU(inplace=True), nn.Hardswish(inplace=True)])
def test_an_inplace_activation_keeps_its_mutation(act: nn.Module) -> None:
    model = convert_checked(InplaceUsedThroughMutation(act), _x())
    for site in model.lowmembp_report.plan.activations:
        assert site.inplace and model.act.inplace


class PostNormBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.norm, self.head = nn.Linear(D, D), nn.LayerNorm(D), nn.Linear(D, D)

    def forward(self, x):
        h = self.norm(x + self.fc(x))
        return h + self.head(h)


class PreNormBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(D), nn.Linear(D, D)

    def forward(self, x):
        return self.fc(self.norm(x))


def _randomize(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.norm.weight.copy_(torch.rand(D, generator=gen) + 0.5)
        model.norm.bias.copy_(torch.randn(D, generator=gen) * 0.3)
    return model


def test_ln_tuning_keeps_the_norm_trainable() -> None:
    """Norm affine trained, Linear frozen: folding would freeze gamma inside W; it keeps its affine."""
    model = _randomize(PreNormBlock())
    model.fc.requires_grad_(False)
    convert_checked(model, _x(), activations=False, norms="fold")
    site = model.lowmembp_report.plan.norm("norm")
    assert site.action == "keep_affine" and "frozen" in site.reason
    assert model.norm.weight.requires_grad and isinstance(model.norm.weight, nn.Parameter)


def test_norm_bias_tuning_keeps_the_norm_bias_trainable() -> None:
    """Only the norm's bias trains (the Linear's bias is frozen): beta cannot move into a frozen bias."""
    model = _randomize(PreNormBlock())
    model.fc.requires_grad_(False)
    model.norm.weight.requires_grad_(False)
    convert_checked(model, _x(), activations=False, norms="fold")
    assert model.lowmembp_report.plan.norm("norm").action == "keep_affine"
    assert model.norm.bias.requires_grad


def test_full_fine_tuning_shares_by_default_and_folds_on_request() -> None:
    model = convert_checked(_randomize(PreNormBlock()), _x(), activations=False)
    assert model.lowmembp_report.plan.norm("norm").action == "keep_affine"
    model = convert_checked(_randomize(PreNormBlock()), _x(), activations=False, norms="fold")
    assert model.lowmembp_report.plan.norm("norm").action == "fold"


def test_ill_conditioned_recovery_keeps_x_hat_and_gradients_stay_exact() -> None:
    """gamma 0.01 with beta 2: x_hat = (y - beta) / gamma from a rounded y would lose most of its bits,
    so every channel keeps x_hat (float32); the norm is converted, not skipped."""
    model = PostNormBlock()
    with torch.no_grad():
        model.norm.weight.fill_(0.01)
        model.norm.bias.fill_(2.0)
    convert_checked(model, _x(), activations=False)  # exact: the rule compares every gradient
    assert model.lowmembp_report.plan.norm("norm").action == "keep_affine"
    assert type(model.norm).__name__ == "MSLayerNorm"


def test_a_kept_weight_trained_to_zero_keeps_exact_gradients_instead_of_raising() -> None:
    original = _randomize(PostNormBlock())
    import copy

    model = convert(copy.deepcopy(original), example_inputs=_x(), min_abs_weight=1e-3)
    assert model.lowmembp_report.plan.norm("norm").action == "keep_affine"
    for m in (original, model):
        with torch.no_grad():
            m.norm.weight[0] = 1e-5
            m.norm.weight[1] = 0.0
    x = _x()[0][0]
    grads = [torch.autograd.grad(m(x).square().sum(), [m.norm.weight, m.fc.weight]) for m in (original, model)]
    for a, b in zip(*grads, strict=True):
        assert rel(a, b) < 1e-5


def test_double_backward_through_a_memory_sharing_norm_raises_clearly() -> None:
    model = _randomize(PreNormBlock())
    convert(model, example_inputs=_x())
    x = _x()[0][0].requires_grad_(True)
    with pytest.raises(RuntimeError, match="norms=False"):  # a gradient penalty: create_graph=True
        torch.autograd.grad(model(x).pow(2).sum(), x, create_graph=True)


def test_first_order_gradients_are_unaffected_by_the_double_backward_guard() -> None:
    original = _randomize(PreNormBlock())
    model = convert_checked(original, _x(), activations=False)
    assert input_grad(model, _x()[0][0]).abs().sum() > 0


def test_per_sample_gradients_with_torch_func_match_stock() -> None:
    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.fc1, self.act, self.fc2 = nn.LayerNorm(D), nn.Linear(D, D), nn.GELU(), nn.Linear(D, D)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(self.norm(x))))

    original = _randomize(Mlp())
    import copy

    model = convert(copy.deepcopy(original), example_inputs=_x())
    from torch.func import functional_call, grad, vmap

    def per_sample(m):
        params = {k: v.detach() for k, v in m.named_parameters()}

        def loss(p, x):
            return functional_call(m, p, (x[None],)).pow(2).sum()

        return vmap(grad(loss), in_dims=(None, 0))(params, _x()[0][0])

    stock, converted = per_sample(original), per_sample(model)
    # fc2 is not a fold target: its per-sample gradients are the stock ones exactly (torch.func runs the stock ops)
    assert rel(stock["fc2.weight"], converted["fc2.weight"]) < 1e-5
    assert F.gelu is not None


class _CountingMLP(nn.Module):
    """A forward with state: a Python counter and a buffer updated in place on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc1, self.act, self.fc2 = nn.LayerNorm(16), nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)
        self.calls = 0
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.steps += 1
        return self.fc2(self.act(self.fc1(self.norm(x))))


def test_convert_leaves_forward_state_as_it_was_and_every_later_call_updates_it_once() -> None:
    """convert() runs the forward (capture, tracing, verify): what those runs change is put back, and
    a container whose forward changes state is never replaced by a traced copy that would not."""
    from lowmembp_convert.rewrites.recompute import ImpureForward, _trace

    torch.manual_seed(0)
    model = _CountingMLP()
    stock = copy.deepcopy(model)
    x = torch.randn(2, 4, 16)
    convert(model, example_inputs=((x,), {}))
    assert (model.calls, int(model.steps)) == (0, 0)
    for step in range(1, 3):
        x_a, x_b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out, expected = model(x_a), stock(x_b)
        assert (model.calls, int(model.steps)) == (stock.calls, int(stock.steps)) == (step, step)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        out.square().sum().backward()
        expected.square().sum().backward()
        torch.testing.assert_close(x_a.grad, x_b.grad, rtol=1e-5, atol=1e-5)
    with pytest.raises(ImpureForward, match=r"changes its own state when it runs \(calls, steps\)"):
        _trace(model)
    assert (model.calls, int(model.steps)) == (2, 2)
