"""Causes 2, 6 and 13: recognition by behaviour must not borrow another module's verdict, must not
take a richer interface (a gated norm) for a plain norm, and must know ``nn.RMSNorm(eps=None)``."""

from __future__ import annotations

import enum

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from rule import convert_checked

from lowmembp_convert import convert, plan_conversion
from lowmembp_convert.detect import is_converted

D = 8


def _x() -> tuple[tuple, dict]:
    return (torch.randn(2, 3, D, generator=torch.Generator().manual_seed(0)),), {}


class Act(nn.Module):
    """An activation whose behaviour lives in a stored callable."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class Mode(enum.Enum):
    LAYER = "layer"
    RMS = "rms"


class ConfigurableNorm(nn.Module):
    """One class, two behaviours, chosen by an Enum attribute."""

    def __init__(self, mode: Mode) -> None:
        super().__init__()
        self.mode = mode
        self.weight = nn.Parameter(torch.rand(D) + 0.5)
        self.eps = 1e-5

    def forward(self, x):
        if self.mode is Mode.LAYER:
            return F.layer_norm(x, (D,), self.weight, None, self.eps)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Mlp(nn.Module):
    def __init__(self, act: nn.Module, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.norm = norm or nn.Identity()
        self.fc1, self.act, self.fc2 = nn.Linear(D, D), act, nn.Linear(D, D)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.norm(x))))


def test_a_stored_callable_decides_the_verdict() -> None:
    gelu, relu = Mlp(Act(F.gelu)), Mlp(Act(F.relu))
    model = nn.Sequential(gelu, relu)
    convert_checked(model, _x())
    plan = model.lowmembp_report.plan
    kinds = {s.module: s.kind for s in plan.activations}
    assert kinds == {"0.act": "gelu", "1.act": "elementwise"}, "the ReLU wrapper must not borrow the GELU verdict"
    assert plan.activations[1].action == "skip"  # ReLU keeps its output, which fc2 keeps anyway: a tie


def test_verdicts_do_not_leak_across_models() -> None:
    convert(Mlp(Act(F.gelu)), example_inputs=_x())
    model = convert_checked(Mlp(Act(F.relu)), _x())
    assert [s.kind for s in model.lowmembp_report.plan.activations] == ["elementwise"]
    assert type(model.act) is Act


def test_an_enum_attribute_decides_the_norm_kind() -> None:
    model = nn.Sequential(Mlp(nn.ReLU(), ConfigurableNorm(Mode.LAYER)), Mlp(nn.ReLU(), ConfigurableNorm(Mode.RMS)))
    convert_checked(model, _x(), activations=False)
    kinds = {s.module: s.kind for s in model.lowmembp_report.plan.norms}
    assert kinds == {"0.norm": "layer_norm", "1.norm": "rms_norm"}


class GatedRMSNorm(nn.Module):
    """Mamba2-style: ``forward(hidden_states, gate=None)``; host code reads ``variance_epsilon``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(D) + 0.5)
        self.variance_epsilon = 1e-6

    def forward(self, hidden_states, gate=None):
        if gate is not None:
            hidden_states = hidden_states * F.silu(gate)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * hidden_states * torch.rsqrt(variance + self.variance_epsilon)


class GatedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = GatedRMSNorm()
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        gate = x if not self.training else None
        assert self.norm.variance_epsilon > 0  # host code reading the stock attribute
        return self.fc(self.norm(x, gate) if gate is not None else self.norm(x))


def test_a_gated_norm_is_not_taken_for_a_plain_norm() -> None:
    model = convert_checked(GatedBlock(), _x(), activations=False)
    assert type(model.norm) is GatedRMSNorm
    assert any("more than one argument" in note for note in model.lowmembp_report.plan.notes)


class HostReadsEps(nn.Module):
    def __init__(self) -> None:
        super().__init__()

        class Rms(nn.Module):
            def __init__(self):
                super().__init__()
                self.weight = nn.Parameter(torch.rand(D) + 0.5)
                self.variance_epsilon = 1e-6
                self.hidden_size = D

            def forward(self, x):
                return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

        self.norm = Rms()
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        return self.fc(self.norm(x)) * (1 + self.norm.variance_epsilon) / self.norm.hidden_size


@pytest.mark.parametrize(("norms", "action"), [("share", "keep_affine"), ("fold", "fold")])
def test_a_replacement_keeps_the_attributes_host_code_reads(norms: str, action: str) -> None:
    model = convert_checked(HostReadsEps(), _x(), activations=False, norms=norms)
    assert model.lowmembp_report.plan.norm("norm").action == action
    assert is_converted(model.norm), "the norm must be replaced for the attributes to be at risk"
    assert model.norm.variance_epsilon == 1e-6 and model.norm.hidden_size == D


@pytest.mark.parametrize(("norms", "action"), [("share", "keep_affine"), ("fold", "fold")])
def test_rms_norm_with_eps_none_is_recognised(norms: str, action: str) -> None:
    model = convert_checked(Mlp(nn.ReLU(), nn.RMSNorm(D)), _x(), activations=False, norms=norms)
    site = model.lowmembp_report.plan.norm("norm")
    assert site.action == action and site.eps is None
    x = torch.randn(2, 3, D, dtype=torch.float64)
    weight = model.norm.weight.detach().double()  # the stock weight kept (share), identity buffer (fold)
    assert isinstance(model.norm.weight, nn.Parameter) == (norms == "share")
    expected = F.rms_norm(x, (D,), weight, None)  # eps None: the dtype's machine epsilon, float64 here
    assert torch.allclose(model.norm(x), expected, rtol=1e-12, atol=1e-12)


def test_a_functional_matmul_consumer_gets_the_true_reason() -> None:
    class MatmulConsumer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(D)
            self.w = nn.Parameter(torch.randn(D, D))

        def forward(self, x):
            return self.norm(x) @ self.w.T

    # the reason a fold is refused; the default keeps the affine anyway (the matmul keeps the output itself)
    assert plan_conversion(MatmulConsumer(), example_inputs=_x()).norm("norm").action == "keep_affine"
    site = plan_conversion(MatmulConsumer(), example_inputs=_x(), norms="fold").norm("norm")
    assert site.action == "keep_affine"
    assert "matmul" in site.reason and "normalized channels" in site.reason
    assert "contracts a dim other than" not in site.reason
