"""Every registered rewrite, alone, over the model zoo: the contract it declares holds.

Oracles are the stock model (deep copy) and its autograd: forward outputs, the gradient reaching the
input embedding's output (everything downstream of it contributes), parameter values and
state_dict keys. A rewrite must also apply to at least one site across the zoo (else the check
proves nothing).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from tiny_zoo import EXTRA_FAMILIES, FAMILIES, forward, projection_loss, relative_error  # noqa: E402

from lowmembp_convert import convert  # noqa: E402
from lowmembp_convert.rewrites.registry import REWRITES, Rewrite  # noqa: E402

ZOO = ["llama", "gemma", "gpt2", "bert", "timm_vit", "convnext", "llama_lora"]
_APPLIED: dict[str, int] = {}
_CHANGED: dict[str, int] = {}  # parameters whose values a rewrite changed, over the zoo


def _embedding_grad(model: nn.Module, family, inputs) -> torch.Tensor:
    owner = family.embedding.rpartition(".")[0]
    captured = {}

    def keep(_m, _i, out):
        if not out.requires_grad:  # a frozen embedding (PEFT): make its output the leaf to differentiate
            out.requires_grad_()
        out.retain_grad()
        captured["out"] = out

    handle = model.get_submodule(owner).register_forward_hook(keep)
    try:
        torch.manual_seed(0)  # dropout draws the same masks in both models
        projection_loss(forward(model, inputs)).backward()
    finally:
        handle.remove()
    return captured["out"].grad


@pytest.mark.parametrize("family_name", ZOO)
@pytest.mark.parametrize("rw", REWRITES, ids=[r.name for r in REWRITES])
def test_each_rewrite_keeps_its_declared_contract(rw: Rewrite, family_name: str) -> None:
    family = {**FAMILIES, **EXTRA_FAMILIES}[family_name]
    stock = family.make().train()
    inputs = family.inputs(0, 2)
    model = copy.deepcopy(stock)
    own = dict(model.named_parameters())
    convert(model, **rw.options)
    sites = rw.sites(model.lowmembp_report.plan)
    _APPLIED[rw.name] = _APPLIED.get(rw.name, 0) + len(sites)
    after = dict(model.named_parameters())
    changed = [n for n, p in stock.named_parameters() if n not in after or not torch.equal(p, after[n])]
    _CHANGED[rw.name] = _CHANGED.get(rw.name, 0) + len(changed)
    contract = rw.contract
    if contract.exact_forward:
        with torch.no_grad():
            torch.manual_seed(0)
            expected = forward(stock, inputs)
            torch.manual_seed(0)
            assert relative_error(expected, forward(model, inputs)) < 1e-5
    if contract.exact_backward:
        a, b = _embedding_grad(stock, family, inputs), _embedding_grad(model, family, inputs)
        assert relative_error(a, b) < 1e-4, f"{rw.name} on {family_name}: gradients differ"
    if not contract.changes_parameter_values:
        assert not changed, f"{rw.name} changed {changed}"
        # the stock parameters themselves: the same objects under the same names, and a stock state dict
        assert dict(model.named_parameters()).keys() == own.keys()
        assert all(p is own[n] for n, p in model.named_parameters()), f"{rw.name} replaced a Parameter"
        assert not [s.module for s in model.lowmembp_report.plan.norms if s.action == "fold"]
        expected, got = stock.state_dict(), model.state_dict()
        assert list(got) == list(expected)
        for key, value in expected.items():
            assert torch.equal(value, got[key]), f"{rw.name} changed state_dict[{key!r}]"
    if contract.keeps_state_dict_keys:
        assert list(model.state_dict()) == list(stock.state_dict())


def test_every_rewrite_applied_somewhere_in_the_zoo() -> None:
    """Runs after the parametrized checks (same module, file order): each rewrite was exercised."""
    if len(_APPLIED) < len(REWRITES):
        pytest.skip("run together with test_each_rewrite_keeps_its_declared_contract")
    assert all(_APPLIED[r.name] > 0 for r in REWRITES), _APPLIED
    # a rewrite declaring that it changes parameter values (the fold) did change some: its options turn it on
    assert all(_CHANGED[r.name] > 0 for r in REWRITES if r.contract.changes_parameter_values), _CHANGED
