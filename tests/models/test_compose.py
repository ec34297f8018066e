"""Converted models composed with what training code wraps them in: gradient checkpointing (transformers
and timm), bf16 autocast, torch.compile. Each is judged against the unconverted model in the same
setting, and, where our own approximate backward is involved, against the converted model without the
wrapper (checkpointing and compiling must not change a single gradient).
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn as nn
from tiny_zoo import FAMILIES, cross_entropy, forward, projection_loss, relative_error

from lowmembp_convert import convert
from lowmembp_convert.memory import activation_memory


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert relative_error(a[name], b[name]) <= rtol, name


# --------------------------------------------------------------------------------------------------
# Gradient checkpointing
# --------------------------------------------------------------------------------------------------


def _enable_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "gradient_checkpointing_enable"):  # transformers
        model.gradient_checkpointing_enable()
    else:  # timm
        model.set_grad_checkpointing(True)


@pytest.mark.parametrize("name", ["llama", "timm_vit"])
def test_gradient_checkpointing_recomputes_converted_blocks_exactly(name: str) -> None:
    family = FAMILIES[name]
    original = family.make().train()
    converted = convert(copy.deepcopy(original)).train()
    plain = copy.deepcopy(converted)
    for model in (original, converted):
        _enable_checkpointing(model)
    x = family.inputs(0, 2)

    def step(model: nn.Module) -> torch.Tensor:
        model.zero_grad()
        logits = forward(model, x)
        cross_entropy(logits).backward()
        return logits.detach()

    ref, got, no_ckpt = step(original), step(converted), step(plain)
    assert relative_error(ref, got) < 1e-5
    assert relative_error(no_ckpt, got) < 1e-6
    # checkpointing recomputes our ops in backward: the converted model's gradients do not change
    _assert_same_grads(_grads(plain), _grads(converted), rtol=1e-5)
    # and it really was on: fewer bytes saved for backward than without it
    saved = {
        label: activation_memory(lambda m=m: cross_entropy(forward(m, x)).backward(), params=m).total
        for label, m in (("checkpointed", converted), ("plain", plain))
    }
    assert saved["checkpointed"] < saved["plain"], saved


# --------------------------------------------------------------------------------------------------
# bf16 autocast
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "timm_vit", "roberta"])
def test_bf16_autocast_error_is_that_of_the_stock_model(name: str) -> None:
    """Under autocast both models round to bf16; judged against fp32, ours may not be much worse."""
    family = FAMILIES[name]
    original = family.make()
    converted = convert(copy.deepcopy(original))
    norms_only = convert(copy.deepcopy(original), activations=False)
    x = family.inputs(1, 2)
    with torch.no_grad():
        exact = forward(original, x)
    outputs, embedding_grads = {}, {}
    for label, model in (("stock", original), ("converted", converted), ("norms_only", norms_only)):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[label] = forward(model, x)
            loss = projection_loss(outputs[label])
        loss.backward()
        grads = _grads(model)
        assert grads and all(torch.isfinite(g).all() for g in grads.values()), label
        embedding_grads[label] = model.get_parameter(family.embedding).grad.clone()
    fp32_model = copy.deepcopy(original)
    projection_loss(forward(fp32_model, x)).backward()
    exact_grad = fp32_model.get_parameter(family.embedding).grad

    stock_error = relative_error(exact, outputs["stock"])
    assert 0 < stock_error < 0.1, "autocast did run in bf16"
    for label in ("converted", "norms_only"):
        assert relative_error(exact, outputs[label]) <= 2 * stock_error + 1e-3, label
    # with exact norms only, the input-embedding gradient is as good as the stock model's under autocast
    stock_grad_error = relative_error(exact_grad, embedding_grads["stock"])
    assert relative_error(exact_grad, embedding_grads["norms_only"]) <= 2 * stock_grad_error + 1e-3


# --------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------


def _llama_layer_and_inputs(model: nn.Module):
    layer = model.model.layers[0]
    hidden = torch.randn(2, 8, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(8)[None].expand(2, 8)
    return layer, (hidden,), {"position_embeddings": model.model.rotary_emb(hidden, positions), "attention_mask": None}


def test_converted_llama_decoder_layer_has_no_graph_break() -> None:
    model = convert(FAMILIES["llama"].make())
    layer, args, kwargs = _llama_layer_and_inputs(model)
    assert getattr(layer.input_layernorm, "lowmembp_converted", False)
    explanation = torch._dynamo.explain(layer)(*args, **kwargs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_converted_timm_block_has_no_graph_break() -> None:
    model = convert(FAMILIES["timm_vit"].make())
    block = model.blocks[0]
    explanation = torch._dynamo.explain(block)(torch.randn(2, 17, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_compiled_converted_llama_matches_eager() -> None:
    """fullgraph=False (transformers' own code may break graphs); aot_eager runs AOTAutograd over our
    custom ops (their fake and autograd registrations) without a C++ toolchain."""
    family = FAMILIES["llama"]
    original = family.make().train()
    converted = convert(copy.deepcopy(original)).train()
    compiled_model = copy.deepcopy(converted)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    x = family.inputs(2, 2)
    eager_out = forward(converted, x)
    cross_entropy(eager_out).backward()
    compiled_out = forward(compiled, x)
    cross_entropy(compiled_out).backward()
    with torch.no_grad():
        assert relative_error(forward(original, x), compiled_out) < 1e-5
    assert relative_error(eager_out, compiled_out) < 1e-6
    _assert_same_grads(_grads(converted), _grads(compiled_model), rtol=1e-5)


@pytest.mark.skipif(
    not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")), reason="inductor on CPU needs a C++ compiler"
)
def test_inductor_compiles_a_converted_timm_block_in_one_graph() -> None:
    model = convert(FAMILIES["timm_vit"].make()).train()
    block = model.blocks[0]
    compiled_block = copy.deepcopy(block)
    compiled = torch.compile(compiled_block, fullgraph=True)
    x = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(0))
    eager = block(x)
    eager.square().mean().backward()
    out = compiled(x)
    out.square().mean().backward()
    assert relative_error(eager, out) < 1e-5
    _assert_same_grads(_grads(block), _grads(compiled_block), rtol=1e-4)
