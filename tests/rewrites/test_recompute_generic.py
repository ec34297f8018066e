"""Exact recompute of activations that are not torch's GELU/SiLU bit for bit: the module itself is
re-run in backward (``ops/recompute_module.py``).

Oracles: the stock model (a deep copy) for forward and gradients, bit for bit (the same ops run on
the same inputs); a float64 copy for the size of the rounding; saved-tensor hooks for bytes.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from transformers.activations import (
    FastGELUActivation,
    NewGELUActivation,
    QuickGELUActivation,
    ReLUSquaredActivation,
)

from lowmembp_convert import activation_memory, convert, plan_conversion
from lowmembp_convert.detect import classify_activation
from lowmembp_convert.ops.recompute_module import module_act_linear

D, HIDDEN = 16, 40

ACTIVATIONS = {
    "new_gelu": NewGELUActivation,  # GPT-2: 0.5 x (1 + tanh(...)) in torch ops, not aten's gelu-tanh bits
    "quick_gelu": QuickGELUActivation,  # CLIP: x * sigmoid(1.702 x)
    "fast_gelu": FastGELUActivation,
    "relu_squared": ReLUSquaredActivation,  # Primer / Nemotron
    "mish": nn.Mish,
    "hardswish": nn.Hardswish,
}


class Plain(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(D, HIDDEN), act, nn.Linear(HIDDEN, D)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Gated(nn.Module):
    """T5's gated-gelu / LLaMA's shape: down(act(gate(x)) * up(x))."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.gate, self.up, self.down, self.act = nn.Linear(D, HIDDEN), nn.Linear(D, HIDDEN), nn.Linear(HIDDEN, D), act

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


class Stack(nn.Module):
    def __init__(self, block) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([block(), block()])

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


def _x(dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(3, 5, D, generator=torch.Generator().manual_seed(0)) * 2).to(dtype)


def _run(model: nn.Module, x: torch.Tensor, autocast: bool = False):
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    params = list(model.parameters())
    weights = torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)
    grads = torch.autograd.grad((y * weights).float().sum(), [x, *params])
    return y.detach(), list(grads)


def _bytes(model: nn.Module, x: torch.Tensor) -> int:
    return activation_memory(lambda: model(x).sum(), params=model).total


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_each_activation_is_proven_elementwise_and_not_mistaken_for_torch_op(name: str) -> None:
    spec = classify_activation(ACTIVATIONS[name]())
    assert spec is not None and spec.elementwise and not spec.inplace
    assert not spec.bitwise  # none of these is torch's GELU/SiLU bit for bit: the module is what recomputes


@pytest.mark.parametrize("shape", ["plain", "gated"])
@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "autocast"])
def test_recompute_by_module_is_bitwise_stock(name: str, shape: str, precision: str) -> None:
    torch.manual_seed(0)
    block = Plain if shape == "plain" else Gated
    stock = Stack(lambda: block(ACTIVATIONS[name]()))
    if precision == "bf16":
        stock = stock.to(torch.bfloat16)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = convert(copy.deepcopy(stock), example_inputs=((_x(dtype),), {}), norms=False)
    sites = model.lowmembp_report.plan.activations
    assert len(sites) == 2 and all(s.option == "recompute" for s in sites), [s.reason for s in sites]
    autocast = precision == "autocast"
    y0, g0 = _run(stock, _x(dtype), autocast)
    y1, g1 = _run(model, _x(dtype), autocast)
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1, strict=True):
        assert torch.equal(a, b), (a - b).abs().max()
    assert _bytes(model, _x(dtype)) < _bytes(stock, _x(dtype))


@pytest.mark.parametrize("name", ["new_gelu", "quick_gelu", "mish"])
def test_gradients_against_a_float64_oracle(name: str) -> None:
    torch.manual_seed(0)
    stock = Stack(lambda: Gated(ACTIVATIONS[name]()))
    model = convert(copy.deepcopy(stock), example_inputs=((_x(),), {}), norms=False)
    _, g64 = _run(copy.deepcopy(stock).double(), _x().double())
    _, g32 = _run(model, _x())
    _, g_stock = _run(stock, _x())
    for ref, ours, theirs in zip(g64, g32, g_stock, strict=True):
        err = (ref - ours.double()).abs().max().item()
        assert err == (ref - theirs.double()).abs().max().item()  # stock's own rounding, no more
        assert err <= 1e-5 * ref.abs().max().item()


def test_the_planner_counts_the_intermediates_stock_keeps() -> None:
    """NewGELU keeps its input and three intermediates stock: the estimate says so, and the meter
    agrees with the estimated saving when only one site is converted."""
    torch.manual_seed(0)
    stock = Stack(lambda: Plain(NewGELUActivation()))
    model = convert(copy.deepcopy(stock), example_inputs=((_x(),), {}), norms=False)
    site = model.lowmembp_report.plan.activations[0]
    a_bytes = 3 * 5 * HIDDEN * 4
    assert site.estimate["stock"] == 5 * a_bytes  # a, 3 intermediates, fc2's input
    assert site.estimate["recompute"] == a_bytes
    assert "approx" in site.estimate  # it is GELU-tanh to rounding: the 2-bit form exists on request
    one = convert(
        copy.deepcopy(stock), example_inputs=((_x(),), {}), norms=False,
        filter_fn=lambda m, name: name == site.module,
    )  # fmt: skip
    assert _bytes(stock, _x()) - _bytes(one, _x()) == site.estimate["stock"] - site.estimate["recompute"]


def test_ties_stay_stock_and_no_2bit_form_is_invented() -> None:
    """ReLU and tanh keep their output, which the Linear keeps anyway: recompute saves nothing."""
    torch.manual_seed(0)
    stock = Stack(lambda: Plain(nn.ReLU()))
    for activations in ("auto", "recompute", "approx"):
        model = convert(copy.deepcopy(stock), example_inputs=((_x(),), {}), norms=False, activations=activations)
        for site in model.lowmembp_report.plan.activations:
            assert site.action == "skip" and "keeps only its output" in site.reason, site
        assert type(model.blocks[0].act) is nn.ReLU
    model = convert(Stack(lambda: Plain(nn.Mish())), example_inputs=((_x(),), {}), norms=False, activations="approx")
    for site in model.lowmembp_report.plan.activations:
        assert site.action == "skip" and "no 2-bit form" in site.reason


class _Reduces(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x.mean())


class _Positional(nn.Module):
    def forward(self, x):
        return torch.tanh(x) * torch.arange(x.shape[-1], dtype=x.dtype)


class _Counts(nn.Module):
    """Stateful: each call differs (a counter), so re-running it in backward would not reproduce."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.tanh(x) * self.calls


@pytest.mark.parametrize("module", [_Reduces, _Positional, _Counts, lambda: nn.RReLU(), lambda: nn.Dropout(0.2)])
def test_what_is_not_pure_and_elementwise_is_not_recomputed(module) -> None:
    spec = classify_activation(module())
    assert spec is None or not spec.elementwise
    torch.manual_seed(0)
    plan = plan_conversion(Stack(lambda: Plain(module())), example_inputs=((_x(),), {}), norms=False)
    assert not any(s.option == "recompute" for s in plan.activations)


def test_a_changed_attribute_after_convert_runs_the_stock_calls() -> None:
    """The rewrite was proven for the module as it was; changing it (here its class's public
    attribute) makes the fused path stand aside, exactly."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.alpha = 1.702

        def forward(self, x):
            return x * torch.sigmoid(self.alpha * x)

    torch.manual_seed(0)
    stock = Stack(lambda: Plain(Scaled()))
    model = convert(copy.deepcopy(stock), example_inputs=((_x(),), {}), norms=False)
    assert all(s.option == "recompute" for s in model.lowmembp_report.plan.activations)
    for m in (stock, model):
        for b in m.blocks:
            b.act.alpha = 1.0
    y0, g0 = _run(stock, _x())
    y1, g1 = _run(model, _x())
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))


def test_conv1d_layout_gpt2_mlp() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16)
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    torch.manual_seed(0)
    stock = transformers.GPT2LMHeadModel(cfg).train()
    model = convert(copy.deepcopy(stock), norms=False)
    sites = model.lowmembp_report.plan.activations
    assert sites and all(s.option == "recompute" for s in sites), [s.reason for s in sites]
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    out0, out1 = stock(input_ids=ids, labels=ids), model(input_ids=ids, labels=ids)
    assert torch.equal(out0.logits, out1.logits)
    out0.loss.backward()
    out1.loss.backward()
    for (n, p0), p1 in zip(stock.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(p0.grad, p1.grad), n


def test_double_backward_is_refused_with_the_fix() -> None:
    a = torch.randn(4, HIDDEN, requires_grad=True)
    fc = nn.Linear(HIDDEN, D)
    y = module_act_linear(a, None, nn.Mish(), fc.weight, fc.bias)
    (g,) = torch.autograd.grad(y.sum(), a, create_graph=False)
    assert g.shape == a.shape
    y = module_act_linear(a, None, nn.Mish(), fc.weight, fc.bias)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum(), a, create_graph=True)


def test_under_torch_func_the_stock_calls_run() -> None:
    torch.manual_seed(0)
    stock = Stack(lambda: Plain(nn.Mish()))
    model = convert(copy.deepcopy(stock), example_inputs=((_x(),), {}), norms=False)
    x = _x()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g0 = torch.func.grad(lambda x: stock(x).sum())(x)
        g1 = torch.func.grad(lambda x: model(x).sum())(x)
    assert torch.equal(g0, g1)
