"""get_peft_model() after convert(): the converted model keeps its savings through adapters added
later, and a second convert() picks up every adapter, so the order of the two calls does not matter.

Oracle: the same adapters on the unconverted model (float64 adapters over a float32 model: wider
adapters, as PEFT's default float32 adapters over a bf16 model, at precisions that keep the check tight).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from tiny_zoo import FAMILIES, assert_grads_match, cross_entropy, forward, relative_error

import lowmembp_convert.rewrites.recompute as recompute_module
from lowmembp_convert import convert
from lowmembp_convert.memory import activation_memory

peft = pytest.importorskip("peft")


def _lora(model: nn.Module) -> nn.Module:
    torch.manual_seed(5)
    config = peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    model = peft.get_peft_model(model, config)
    for name, module in model.named_modules():
        if ".lora_" in name and isinstance(module, nn.Linear):
            module.double()
    return model.train()


def _grads(model: nn.Module, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    logits = forward(model, inputs)
    cross_entropy(logits).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _saved(model: nn.Module, inputs) -> int:
    return activation_memory(lambda: forward(model, inputs).float().sum(), params=model).total


def test_adapters_added_after_convert_keep_the_savings_and_a_second_convert_matches_the_other_order(monkeypatch):
    monkeypatch.setattr(recompute_module, "_HINTED", set())
    family = FAMILIES["llama"]
    base = family.make().train()
    inputs = family.inputs(3, 2)
    stock = _lora(copy.deepcopy(base))
    peft_after = _lora(convert(copy.deepcopy(base), loss_head=False))
    convert_after = convert(_lora(copy.deepcopy(base)), loss_head=False)

    logits, grads = _grads(stock, inputs)
    with pytest.warns(UserWarning, match=r"Call lowmembp_convert.convert\(\) on the PeftModel"):
        got_logits, got_grads = _grads(peft_after, inputs)
    assert relative_error(logits, got_logits) < 1e-5
    assert set(got_grads) == set(grads)
    assert_grads_match(got_grads, grads)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not at every step
        _grads(peft_after, inputs)

    stock_bytes, after_bytes = _saved(stock, inputs), _saved(peft_after, inputs)
    assert after_bytes < 0.85 * stock_bytes, (after_bytes, stock_bytes)  # MLP recompute through LoRA kept

    again = convert(peft_after, loss_head=False)
    assert again is peft_after
    again_logits, again_grads = _grads(again, inputs)
    assert relative_error(logits, again_logits) < 1e-5
    assert_grads_match(again_grads, grads)
    assert _saved(again, inputs) == _saved(convert_after, inputs) < after_bytes
