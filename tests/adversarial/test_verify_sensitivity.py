"""verify catches small errors, not only gross ones (issue 15): its tolerances are pinned here.

A fold that is off by 1e-3 relative on every weight, or by 2e-4 on one output channel of one
consumer, must be caught and rolled back on a float32 model. Loosening the float32 tolerance or
comparing a mean instead of the max must break these tests.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import lowmembp_convert.rewrites.apply as apply_module
from lowmembp_convert import ConversionError, convert
from lowmembp_convert.demo import _randomise_norms
from lowmembp_convert.verify import default_rtol, relative_error


def test_default_tolerances_are_pinned() -> None:
    assert default_rtol(torch.float32) == 1e-5
    assert default_rtol(torch.float16) == 1e-2
    assert default_rtol(torch.bfloat16) == 5e-2


def test_relative_error_is_the_max_not_the_mean() -> None:
    a = torch.ones(1000)
    b = a.clone()
    b[3] += 1e-3  # one element off: the mean error would be 1e-6
    assert relative_error(a, b) == pytest.approx(1e-3, rel=1e-3)


class _PreNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.norm(x))))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return _randomise_norms(_PreNorm())


def _faulty_fold(scale_fn):
    real = apply_module.fold_affine_into

    def fold(weight, bias, gamma, beta, layout="linear", groups=1):
        new_w, new_b = real(weight, bias, gamma, beta, layout, groups)
        return scale_fn(new_w), new_b

    return fold


@pytest.mark.parametrize(
    "what, scale_fn",
    [
        ("1e-3 relative on every weight", lambda w: w * (1 + 1e-3)),
        ("2e-4 on one output channel", lambda w: torch.cat([w[:1] * (1 + 2e-4), w[1:]])),
    ],
)
def test_a_small_fold_error_is_caught_and_rolled_back(monkeypatch, what: str, scale_fn) -> None:
    model = _model()
    stock = copy.deepcopy(model)
    monkeypatch.setattr(apply_module, "fold_affine_into", _faulty_fold(scale_fn))
    x = torch.randn(4, 6, 32)
    with pytest.raises(ConversionError):
        convert(model, norms="fold", activations=False, example_inputs=((x,), {}))
    for (name, p), q in zip(stock.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(p, q), f"{name} not rolled back after the caught error ({what})"
    assert type(model.norm) is nn.LayerNorm


def test_an_exact_fold_passes() -> None:
    model = _model()
    x = torch.randn(4, 6, 32)
    convert(model, norms="fold", activations=False, example_inputs=((x,), {}))
    assert model.lowmembp_report.plan.norms[0].action == "fold"


def test_converting_inside_an_autocast_region_after_a_step_works() -> None:
    """Autocast caches casts of the weights during a step; converting inside the same region must
    neither trip verify (the norm now emits the autocast dtype its consumer casts to) nor change the
    outputs (the default edits no weight, so no cached cast goes stale)."""
    model = _model()
    stock = copy.deepcopy(model)
    x = torch.randn(4, 6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).sum().backward()
        convert(model, example_inputs=((x,), {}))
        assert type(model.norm).__name__ == "MSLayerNorm"
        torch.testing.assert_close(model(x), stock(x), rtol=0, atol=0)
