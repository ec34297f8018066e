"""PEFT LoRA and convert(): converting a PeftModel, converting before get_peft_model, lora_dropout > 0.

The oracle is the unconverted PeftModel with the same adapters. The default (``norms="share"``) keeps
every parameter, adapters included, as it is. Folding (``norms="fold"``) gamma into a consumer that
LoRA wraps must fold it into both the base weight and lora_A (both read the norm output), so the
converted adapter is lora_A * gamma: the same function. The test steps AdamW once from PEFT's own
init (lora_B = 0, so lora_A gets no gradient and lora_B the same one in both models) and checks the
two still agree; with a nonzero lora_B it checks the adapter path's forward directly.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from tiny_zoo import FAMILIES, cross_entropy, forward, relative_error

from lowmembp_convert import convert

peft = pytest.importorskip("peft")

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
FIRST_NORM = {"llama": "model.layers.0.input_layernorm", "gpt2": "transformer.h.0.ln_1"}
FIRST_TARGET = {"llama": "model.layers.0.self_attn.q_proj", "gpt2": "transformer.h.0.attn.c_attn"}


def _lora(base: nn.Module, name: str, dropout: float = 0.0, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # the same adapter init for the model and its oracle
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS[name], fan_in_fan_out=name == "gpt2"
    )
    return peft.get_peft_model(base, config)


def _randomize_lora_b(model: nn.Module, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for fqn, p in model.named_parameters():
            if "lora_B" in fqn:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _gamma(norm: nn.Module) -> torch.Tensor:
    return norm.weight.detach().double()


def _lora_a(model: nn.Module, target: str) -> torch.Tensor:
    return model.get_submodule(f"base_model.model.{target}.lora_A.default").weight.detach().double()


def _step(model: nn.Module, inputs) -> float:
    torch.manual_seed(0)  # the same dropout masks in both models
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = cross_entropy(forward(model, inputs))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_converting_a_peft_model_by_default_changes_no_parameter(name: str) -> None:
    """The default shares the norm's output with base and lora_A alike, keeping its affine."""
    family = FAMILIES[name]
    oracle = _lora(family.make(), name)
    _randomize_lora_b(oracle)
    model = convert(copy.deepcopy(oracle), activations=False)
    site = model.lowmembp_report.plan.norm(f"base_model.model.{FIRST_NORM[name]}")
    target = FIRST_TARGET[name]
    consumers = {c.module for c in site.consumers}
    assert {f"base_model.model.{target}.base_layer", f"base_model.model.{target}.lora_A.default"} <= consumers
    assert site.action == "keep_affine"
    assert getattr(model.get_submodule(site.module), "lowmembp_converted", False)
    before, after = oracle.state_dict(), model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in oracle.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable), "PEFT's freezing survives"
    x = family.inputs(1, 2)
    with torch.no_grad():
        assert relative_error(forward(oracle, x), forward(model, x)) < 1e-5


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_converting_a_peft_model_folds_into_base_and_lora_a(name: str) -> None:
    """norms="fold": RMSNorm (LLaMA) folds into base and lora_A. GPT-2's LayerNorm has a shift, which
    lora_A (no bias) cannot take, so there the norm keeps its affine and the adapter is left as it is."""
    family = FAMILIES[name]
    oracle = _lora(family.make(), name)
    _randomize_lora_b(oracle)
    model = convert(copy.deepcopy(oracle), activations=False, norms="fold")
    site = model.lowmembp_report.plan.norm(f"base_model.model.{FIRST_NORM[name]}")
    target = FIRST_TARGET[name]
    consumers = {c.module for c in site.consumers}
    assert {f"base_model.model.{target}.base_layer", f"base_model.model.{target}.lora_A.default"} <= consumers
    if name == "gpt2":
        assert site.action == "keep_affine"
        assert site.reason == (
            f"affine kept in the norm: base_model.model.{target}.lora_A.default has no bias parameter "
            "to take the norm's shift"
        )
        assert torch.equal(_lora_a(model, target), _lora_a(oracle, target))
    else:
        assert site.action == "fold"
        gamma = _gamma(oracle.get_submodule(f"base_model.model.{FIRST_NORM[name]}"))
        torch.testing.assert_close(_lora_a(model, target), (_lora_a(oracle, target) * gamma).float().double())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in oracle.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable), "PEFT's freezing survives"
    x = family.inputs(1, 2)
    with torch.no_grad():
        assert relative_error(forward(oracle, x), forward(model, x)) < 1e-5


@pytest.mark.parametrize("norms", ["share", "fold"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_converted_peft_model_trains_like_the_unconverted_one(name: str, norms: str) -> None:
    family = FAMILIES[name]
    oracle = _lora(family.make(), name).train()
    model = convert(copy.deepcopy(oracle), activations=False, norms=norms).train()
    x = family.inputs(2, 2)
    assert _step(model, x) == pytest.approx(_step(oracle, x), rel=1e-5)
    lora_b = [n for n, p in oracle.named_parameters() if "lora_B" in n]
    assert any(oracle.get_parameter(n).abs().sum() > 0 for n in lora_b), "the step moved lora_B"
    with torch.no_grad():
        assert relative_error(forward(oracle.eval(), x), forward(model.eval(), x)) < 1e-5


@pytest.mark.parametrize("norms", ["share", "fold"])
@pytest.mark.parametrize("name", ["llama"])
def test_converting_before_get_peft_model(name: str, norms: str) -> None:
    """Under the default lora_A reads the norm's output as in the stock model: the same adapters give the
    same model. Under norms="fold" lora_A reads x_hat instead of gamma * x_hat: with lora_A' = lora_A *
    gamma it is the same model."""
    family = FAMILIES[name]
    base = family.make()
    oracle = _lora(copy.deepcopy(base), name).train()
    model = _lora(convert(copy.deepcopy(base), activations=False, norms=norms), name).train()
    assert getattr(model.get_submodule(f"base_model.model.{FIRST_NORM[name]}"), "lowmembp_converted", False)
    x = family.inputs(4, 2)
    with torch.no_grad():
        assert relative_error(forward(oracle, x), forward(model, x)) < 1e-5  # lora_B = 0 at init
        for layer in range(2 if norms == "fold" else 0):  # the default: the same adapters as they are
            norm = oracle.get_submodule(f"base_model.model.model.layers.{layer}.input_layernorm")
            for proj in TARGETS[name]:
                target = f"model.layers.{layer}.self_attn.{proj}"
                model.get_submodule(f"base_model.model.{target}.lora_A.default").weight.copy_(
                    _lora_a(oracle, target) * _gamma(norm)
                )
    assert _step(model, x) == pytest.approx(_step(oracle, x), rel=1e-5)
    with torch.no_grad():
        assert relative_error(forward(oracle, x), forward(model, x)) < 1e-5


@pytest.mark.parametrize("norms", ["share", "fold"])
def test_lora_dropout_above_zero_leaves_the_norm_unconverted_with_the_reason(norms: str) -> None:
    family = FAMILIES["llama"]
    oracle = _lora(family.make(), "llama", dropout=0.1)
    model = convert(copy.deepcopy(oracle), activations=False, norms=norms)
    plan = model.lowmembp_report.plan
    for layer in range(2):
        site = plan.norm(f"base_model.model.model.layers.{layer}.input_layernorm")
        assert site.action == "skip"
        assert site.reason == (
            f"sharing would break: dropout in base_model.model.model.layers.{layer}.self_attn.q_proj"
            ".lora_dropout.default (p=0.1) sits between the norm and its consumer"
        )
        # the MLP norm has no adapter in front of its consumers and still converts (folds, on request)
        expected = "fold" if norms == "fold" else "keep_affine"
        assert plan.norm(f"base_model.model.model.layers.{layer}.post_attention_layernorm").action == expected
    x = family.inputs(5, 2)
    with torch.no_grad():
        assert relative_error(forward(oracle.eval(), x), forward(model.eval(), x)) < 1e-5
