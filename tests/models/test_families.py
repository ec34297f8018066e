"""convert() on tiny models of every supported family, judged against the unconverted model.

Per family (tiny_zoo.FAMILIES) and per norm mode (the default ``norms="share"`` and ``norms="fold"``):
what the analysis decides (every activation module converted unless the family names why recompute
is impossible there, every norm converted unless the architecture gives a reason we name in
advance), exact forward (fp32, max relative error < 1e-5 against a deep copy taken before convert),
``verify=True`` passing, training steps, and, for the norm-only conversion, gradients that match the
original model's: equal under the default (no parameter changes), by the chain rule through the fold
under ``norms="fold"`` (the strongest oracle here: it checks dW, db, dgamma, dbeta and every
untouched parameter, the input embedding included).
"""

from __future__ import annotations

import copy
import functools
import re

import pytest
import torch
import torch.nn as nn
from tiny_zoo import (
    FAMILIES,
    activation_modules,
    assert_grads_match,
    cross_entropy,
    expected_original_grads,
    forward,
    is_activation_module,
    norm_modules,
    projection_loss,
    relative_error,
)

import lowmembp_convert
from lowmembp_convert import ConversionError, convert

NAMES = sorted(FAMILIES)
MODES = ("share", "fold")  # norms=: the default, and the paper's fold on request
FORWARD_RTOL = 1e-5
TRAJECTORY_RTOL = 1e-4  # three AdamW steps of exact gradients: rounding only


@functools.cache
def _original(name: str) -> nn.Module:
    return FAMILIES[name].make()


@functools.cache
def _pair(name: str, norms: str = "share") -> tuple[nn.Module, nn.Module]:
    """(original, converted with verify=True and ``norms``); tests deep-copy before changing either."""
    original = _original(name)
    converted = convert(copy.deepcopy(original), verify=True, norms=norms)
    return original, converted


@pytest.mark.parametrize("norms", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_every_activation_and_every_foldable_norm_is_converted(name: str, norms: str) -> None:
    family = FAMILIES[name]
    original, converted = _pair(name, norms)
    report = converted.lowmembp_report
    plan = report.plan

    activations = activation_modules(original)
    assert activations, "the family has activation modules"
    assert sorted(s.module for s in plan.activations) == sorted(activations)
    stock = [a for a in activations if family.stock_activation(a) is not None]
    assert sorted(s.module for s in plan.activations if s.action == "convert") == sorted(set(activations) - set(stock))
    # activations="auto" never approximates: each converted site is recomputed by its consumer (the
    # container's forward, or a hand-off between two modules); the others stay stock and say that
    # activations="approx" would keep fewer bytes
    for site in plan.activations:
        module = converted.get_submodule(site.module)
        if site.action == "skip":
            assert is_activation_module(module), f"{site.module} was left stock but replaced"
            assert re.search(family.stock_activation(site.module), site.reason), site.reason
            if site.kind == "elementwise":  # no 2-bit form of an arbitrary function (BERT's pooler tanh)
                assert "approx" not in site.estimate, site.estimate
                continue
            assert site.reason.startswith("left stock (exact)"), site.reason
            assert "activations='approx' would keep fewer bytes" in site.reason, site.reason
            assert site.estimate["approx"] < site.estimate["stock"], site.estimate
            continue
        assert site.option == "recompute", f"{site.module}: {site.option} ({site.reason})"
        if site.recompute.layout == "handoff":  # across modules: the activation hands its input over
            assert type(module).__name__ == "HandoffActivation", site.module
            assert type(converted.get_submodule(site.recompute.consumer)).__name__ == "HandoffLinear"
        else:
            container = converted.get_submodule(site.recompute.container)
            assert site.recompute in getattr(container, "lowmembp_recompute", ()), site.module

    norms_found = norm_modules(original)
    assert sorted(s.module for s in plan.norms) == sorted(norms_found)
    expected_skips = [n for n in norms_found if family.expected(n, norms)[0] == "skip"]
    assert report.converted_norms == len(norms_found) - len(expected_skips)
    for site in plan.norms:
        action, reason = family.expected(site.module, norms)
        assert site.action == action, f"{site.module}: {site.action} ({site.reason})"
        assert re.search(reason, site.reason), f"{site.module}: reason {site.reason!r} !~ {reason!r}"
        module = converted.get_submodule(site.module)
        assert getattr(module, "lowmembp_converted", False) == (action != "skip"), site.module
        if action == "fold":  # a folded norm moves its whole affine, the shift too
            assert site.fold_bias == (site.bias is not None), site.module
        if action != "skip":
            assert site.consumers, site.module
    assert any("verified: max relative output error" in note for note in report.notes)
    if norms == "share":  # the default reparameterizes nothing: the state dict is the stock one
        before, after = original.state_dict(), converted.state_dict()
        assert list(after) == list(before)
        assert all(torch.equal(after[k], before[k]) for k in before)
        assert [n for n, _ in converted.named_parameters()] == [n for n, _ in original.named_parameters()]
        assert "parameters: the stock ones" in str(report)


@pytest.mark.parametrize("name", sorted(n for n in NAMES if FAMILIES[n].stock_activations))
def test_approx_on_request_converts_the_sites_auto_leaves_stock(name: str) -> None:
    family = FAMILIES[name]
    original = _original(name)
    converted = convert(copy.deepcopy(original), activations="approx", norms=False, verify=True)
    plan = converted.lowmembp_report.plan
    gelu_silu = [s.module for s in plan.activations if s.kind != "elementwise"]  # the functions with a 2-bit form
    assert sorted(s.module for s in plan.activations if s.action == "convert") == sorted(gelu_silu)
    assert set(activation_modules(original)) == {s.module for s in plan.activations}
    for site in plan.activations:
        if site.kind == "elementwise":
            assert site.action == "skip" and re.search("no 2-bit form|keeps only its output", site.reason), site
            continue
        assert site.option == "approx", site.module
        assert not is_activation_module(converted.get_submodule(site.module)), (
            f"{site.module} was planned approx but left"
        )
    assert "APPROXIMATE (2-bit, activations='approx')" in str(converted.lowmembp_report)
    inputs = family.inputs(1, 3)
    with torch.no_grad():  # the 2-bit option approximates the backward only
        assert relative_error(forward(original, inputs), forward(converted, inputs)) < FORWARD_RTOL


@pytest.mark.parametrize("norms", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_forward_equals_original(name: str, norms: str) -> None:
    family = FAMILIES[name]
    original, converted = _pair(name, norms)
    inputs = family.inputs(1, 3)
    with torch.no_grad():
        ref, got = forward(original, inputs), forward(converted, inputs)
    assert relative_error(ref, got) < FORWARD_RTOL
    args, kwargs = inputs
    if "input_ids" in kwargs or "pixel_values" in kwargs:  # transformers: every hidden state stays exact
        with torch.no_grad():
            ref_h = original(*args, **kwargs, output_hidden_states=True).hidden_states
            got_h = converted(*args, **kwargs, output_hidden_states=True).hidden_states
        assert len(ref_h) == len(got_h) > 0
        for a, b in zip(ref_h, got_h, strict=True):
            assert relative_error(a, b) < FORWARD_RTOL
    else:  # timm: forward_features is a model output too
        with torch.no_grad():
            assert relative_error(original.forward_features(*args), converted.forward_features(*args)) < FORWARD_RTOL


@pytest.mark.parametrize("norms", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_training_steps_run_and_descend(name: str, norms: str) -> None:
    family = FAMILIES[name]
    original, converted = (copy.deepcopy(m).train() for m in _pair(name, norms))
    inputs = family.inputs(2, 4)
    losses: dict[str, list[float]] = {}
    for label, model in (("original", original), ("converted", converted)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[label] = []
        for step in range(3):
            torch.manual_seed(step)  # same dropout masks in both models
            loss = cross_entropy(forward(model, inputs))
            optimizer.zero_grad()
            loss.backward()
            grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            assert all(torch.isfinite(g).all() for g in grads.values()), label
            if label == "converted" and step == 0:
                had_grad = {n for n, p in original.named_parameters() if p.grad is not None}
                # every trainable parameter of the original still trains (folded norm affines are gone;
                # the default folds nothing, so every one of them)
                folded = {s.weight for s in converted.lowmembp_report.plan.norms if s.action == "fold"} | {
                    s.bias for s in converted.lowmembp_report.plan.norms if s.action == "fold" and s.fold_bias
                }
                assert had_grad - folded == set(grads), label
            optimizer.step()
            losses[label].append(loss.item())
    # the forward is exact, so the first loss (train mode, same dropout masks) is the original's
    assert losses["converted"][0] == pytest.approx(losses["original"][0], rel=FORWARD_RTOL)
    assert losses["converted"][-1] < losses["converted"][0], losses
    if norms == "share":  # same parameters, exact gradients: the stock trajectory
        assert losses["converted"] == pytest.approx(losses["original"], rel=TRAJECTORY_RTOL), losses


@pytest.mark.parametrize("norms", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_norm_only_conversion_gradients_follow_the_chain_rule(name: str, norms: str) -> None:
    """Under the default the converted gradients are the original's (nothing folded: the oracle
    reduces to equality); under norms="fold" they follow the chain rule through the fold."""
    family = FAMILIES[name]
    original = copy.deepcopy(_original(name))
    converted = convert(copy.deepcopy(original), activations=False, norms=norms)
    plan = converted.lowmembp_report.plan
    assert not plan.activations and any(s.action != "skip" for s in plan.norms)
    if norms == "share":
        assert not any(s.action == "fold" for s in plan.norms)
    inputs = family.inputs(3, 2)
    for model in (original, converted):
        projection_loss(forward(model, inputs)).backward()
    expected = expected_original_grads(original, converted, plan, family.weight_offset)
    original_params = dict(original.named_parameters())
    assert set(expected) == {n for n, p in original_params.items() if p.grad is not None}
    assert original_params[family.embedding].grad.abs().sum() > 0
    assert_grads_match({n: original_params[n].grad for n in expected}, expected)


VERIFY_FIRST_CONSUMER = {
    "llama": "model.layers.0.self_attn.q_proj",
    "gpt2": "transformer.h.0.attn.c_attn",
    "timm_vit": "blocks.0.attn.qkv",
    "convnext_conv_mlp": "stages.0.blocks.0.mlp.fc1",
}


@pytest.mark.parametrize("name", sorted(VERIFY_FIRST_CONSUMER))
def test_verify_names_the_first_diverging_module(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from lowmembp_convert.rewrites import apply

    fold = apply.fold_affine_into

    def wrong_fold(*args, **kwargs):
        weight, bias = fold(*args, **kwargs)
        return weight * 2, bias  # a scaling bug in every folded weight

    monkeypatch.setattr(apply, "fold_affine_into", wrong_fold)
    model = copy.deepcopy(_original(name))
    with pytest.raises(ConversionError, match=rf"first diverging module: {re.escape(VERIFY_FIRST_CONSUMER[name])} "):
        convert(model, verify=True, norms="fold")


def test_public_api_is_exported() -> None:
    assert lowmembp_convert.convert is convert
    assert callable(lowmembp_convert.plan_conversion)
