"""Causes 1 and 3: a norm -> Linear pair reached more than once, and tensors used outside what the
analysis saw. Each fold must touch every weight at most once, and only when every read of its
storage is a qualifying consumer. The default (``norms="share"``) edits no weight: every model here
keeps its parameters, the same objects with the same values."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from rule import assert_stock_state, convert_checked, gradients, rel, train_next_to_stock

from lowmembp_convert import convert

D = 8


def _x(batch: int = 2, tokens: int = 3) -> tuple[tuple, dict]:
    return (torch.randn(batch, tokens, D, generator=torch.Generator().manual_seed(0)),), {}


def _randomize(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if name.endswith("norm.weight") else 0.0))
    return model


class Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        return self.fc(self.norm(x))


class TwoInputs(nn.Module):
    """One tower applied to two inputs (a siamese encoder)."""

    def __init__(self) -> None:
        super().__init__()
        self.tower = Tower()

    def forward(self, x):
        return self.tower(x) + self.tower(x.flip(1) * 2)


class Loop(nn.Module):
    """One block applied three times (weight-tied depth)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Tower()

    def forward(self, x):
        for _ in range(3):
            x = x + self.block(x)
        return x


class Slices(nn.Module):
    """One Linear called on two token slices of one norm output."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        y = self.norm(x)
        return torch.cat([self.fc(y[:, :1]), self.fc(y[:, 1:])], dim=1)


class NormWeightReadElsewhere(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        return self.fc(self.norm(x)) * self.norm.weight


class Float32Norm(nn.Module):
    """Computes in float32 (``w.float()``): in a float32 model that is w itself, and the trace hands
    the node made inside the norm to every later reader of w (found by the fuzzer, seed 358)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(D) + 0.5)
        self.eps = 1e-6

    def forward(self, x):
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).type_as(x)


class NormWeightReadThroughAlias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = Float32Norm()
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        return x + self.fc(self.norm(x)) * self.norm.weight


class StorageShared(nn.Module):
    """Two Parameter objects over one storage: folding one silently changes the other."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc = nn.Linear(D, D)
        self.other = nn.Linear(D, D)

    def share(self) -> StorageShared:
        self.other.weight = nn.Parameter(self.fc.weight.data)  # same storage, another Parameter
        return self

    def forward(self, x):
        return self.fc(self.norm(x)) + self.other(x)


class ParamOfTwoModules(nn.Module):
    """A consumer's weight is also a parameter of another module, used on another tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc = nn.Linear(D, D)
        self.twin = nn.Linear(D, D)
        self.twin.weight = self.fc.weight

    def forward(self, x):
        return self.fc(self.norm(x)) + self.twin(x)


class TwoNormsOneLinear(nn.Module):
    """Two different norms feed one shared Linear: no gamma can be folded into it."""

    def __init__(self) -> None:
        super().__init__()
        self.norm_a, self.norm_b = nn.LayerNorm(D), nn.LayerNorm(D)
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        return self.fc(self.norm_a(x)) + self.fc(self.norm_b(x * 3))


def test_tower_applied_to_two_inputs_folds_once() -> None:
    model = convert_checked(_randomize(TwoInputs()), _x(), activations=False, norms="fold")
    assert model.lowmembp_report.plan.norm("tower.norm").action == "fold"


def test_block_applied_in_a_loop_folds_once() -> None:
    model = convert_checked(_randomize(Loop()), _x(), activations=False, norms="fold")
    assert model.lowmembp_report.plan.norm("block.norm").action == "fold"


def test_linear_on_two_slices_folds_once() -> None:
    model = convert_checked(_randomize(Slices()), _x(), activations=False, norms="fold")
    assert len(model.lowmembp_report.plan.norm("norm").consumers) == 1


def test_norm_weight_read_outside_the_norm_keeps_its_affine() -> None:
    model = convert_checked(_randomize(NormWeightReadElsewhere()), _x(), activations=False, norms="fold")
    site = model.lowmembp_report.plan.norm("norm")
    assert site.action == "keep_affine" and "norm.weight is also read outside the norm" in site.reason
    assert isinstance(model.norm.weight, nn.Parameter)


def test_norm_weight_read_through_a_no_op_alias_keeps_its_affine() -> None:
    model = convert_checked(NormWeightReadThroughAlias(), _x(), activations=False, norms="fold", verify=False)
    assert model.lowmembp_report.plan.norm("norm").action == "keep_affine"


def test_consumer_weight_sharing_storage_with_another_parameter_is_not_folded() -> None:
    model = _randomize(StorageShared()).share()
    other_before = model.other.weight.detach().clone()
    convert_checked(model, _x(), activations=False, norms="fold")
    assert model.lowmembp_report.plan.norm("norm").action != "fold"
    assert torch.equal(model.other.weight, other_before)


def test_consumer_weight_that_is_another_modules_parameter_is_not_folded() -> None:
    model = convert_checked(_randomize(ParamOfTwoModules()), _x(), activations=False, norms="fold")
    site = model.lowmembp_report.plan.norm("norm")
    assert site.action == "keep_affine" and "tied or reused" in site.reason


def test_two_norms_sharing_one_consumer_fold_neither() -> None:
    model = convert_checked(_randomize(TwoNormsOneLinear()), _x(), activations=False, norms="fold")
    assert {s.action for s in model.lowmembp_report.plan.norms} <= {"keep_affine", "skip"}


@pytest.mark.parametrize(
    "build",
    [
        TwoInputs,
        Loop,
        Slices,
        NormWeightReadElsewhere,
        lambda: StorageShared().share(),
        ParamOfTwoModules,
        TwoNormsOneLinear,
    ],
    ids=["two_inputs", "loop", "slices", "norm_weight_read_elsewhere", "storage_shared", "param_of_two", "two_norms"],
)
def test_the_default_keeps_every_shared_weight_stock(build) -> None:
    # The stock twin is built the same way, not deep-copied: a deepcopy gives each Parameter its own
    # storage, so StorageShared's copy would train differently from StorageShared itself.
    model, stock = _randomize(build()), _randomize(build())
    before = {name: (p, p.detach().clone()) for name, p in model.named_parameters(remove_duplicate=False)}
    convert(model, activations=False, example_inputs=_x())
    actions = [s.action for s in model.lowmembp_report.plan.norms]
    assert "keep_affine" in actions and "fold" not in actions, actions
    after = dict(model.named_parameters(remove_duplicate=False))
    assert list(after) == list(before)
    for name, (p, value) in before.items():
        assert after[name] is p and torch.equal(p, value), f"{name} changed"
    assert_stock_state(stock, model, _x())  # state dict, and the function after loading it
    (x,), _ = _x()
    for m in (stock, model):
        m.train()
    (ga, params_a), (gb, params_b) = gradients(stock, x), gradients(model, x)
    assert rel(ga, gb) < 1e-5
    assert params_a.keys() == params_b.keys()
    for name in params_a:
        assert rel(params_a[name], params_b[name]) < 1e-5, f"gradient of {name} differs"
    train_next_to_stock(stock, model, x)
