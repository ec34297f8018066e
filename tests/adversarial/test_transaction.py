"""Causes 8 and 9: convert() is all or nothing, verifies by default without copying the model, and
its own measuring and verifying forwards leave no trace (buffers, RNG)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from rule import assert_same_fingerprint, fingerprint

import lowmembp_convert.rewrites.apply as apply_module
import lowmembp_convert.verify as verify_module
from lowmembp_convert import ConversionError, convert

D = 8


def _x() -> tuple[tuple, dict]:
    return (torch.randn(2, 3, D, generator=torch.Generator().manual_seed(0)),), {}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.fc1, self.act, self.fc2 = nn.LayerNorm(D), nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D)
        self.norm2, self.head = nn.LayerNorm(D), nn.Linear(D, D)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        x = self.bn(x)
        x = x + self.fc2(self.act(self.fc1(self.norm1(x))))
        return self.head(self.norm2(x))


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = Block()
    with torch.no_grad():
        for norm in (model.norm1, model.norm2):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0, 0.3)
    model.fc1.register_forward_hook(lambda m, i, o: None)  # a user's hook must survive a rollback
    return model


# Every stage of apply, and the verification after it: fail at the first and the last call. The
# activation swap runs in the paper's mode; the default mode recomputes this MLP (a class swap). The
# fold runs only with norms="fold"; the norm swaps run under both norm modes (the default keeps the
# affine, so its MS norms hold the stock Parameters).
STAGES = [
    (apply_module, "fold_affine_into", "auto", "fold"),
    (apply_module, "_ms_norm_for", "auto", "share"),
    (apply_module, "_ms_norm_for", "auto", "fold"),
    (apply_module, "replace_module", "auto", "share"),
    (apply_module, "replace_module", "auto", "fold"),
    (apply_module, "_activation_for", "approx", "share"),
    (apply_module, "rewrite_container", "auto", "share"),
    (verify_module.Recording, "compare", "auto", "share"),
    (verify_module.Recording, "compare", "auto", "fold"),
]


@pytest.mark.parametrize("owner,name,mode,norms", STAGES, ids=[f"{n}-{norms}" for _o, n, _m, norms in STAGES])
@pytest.mark.parametrize("when", ["first", "last"])
def test_a_failure_at_any_stage_leaves_the_model_exactly_as_it_was(monkeypatch, owner, name, mode, norms, when) -> None:
    model = _model()
    real = getattr(owner, name)
    calls = {"n": 0}
    total = _count_calls(owner, name, mode, norms)
    fail_at = 1 if when == "first" else total

    def failing(*args, **kwargs):
        calls["n"] += 1
        result = real(*args, **kwargs)  # do the work first: a half-done stage must be undone too
        if calls["n"] == fail_at:
            raise RuntimeError("injected failure")
        return result

    monkeypatch.setattr(owner, name, failing)
    before = fingerprint(model)
    rng = torch.get_rng_state()
    classes = [type(m) for m in model.modules()]
    with pytest.raises(RuntimeError, match="injected failure"):
        convert(model, example_inputs=_x(), activations=mode, norms=norms)
    assert_same_fingerprint(before, fingerprint(model))
    assert [type(m) for m in model.modules()] == classes
    assert not hasattr(model, "lowmembp_report")
    assert torch.equal(torch.get_rng_state(), rng)


def _count_calls(owner, name, mode, norms) -> int:
    model, count = _model(), {"n": 0}
    real = getattr(owner, name)

    def counting(*args, **kwargs):
        count["n"] += 1
        return real(*args, **kwargs)

    setattr(owner, name, counting)
    try:
        convert(model, example_inputs=_x(), activations=mode, norms=norms)
    finally:
        setattr(owner, name, real)
    assert count["n"] >= 1, f"{name} was never called"
    return count["n"]


def test_a_keyboard_interrupt_rolls_back_too(monkeypatch) -> None:
    model = _model()
    before = fingerprint(model)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(apply_module, "_activation_for", interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(model, example_inputs=_x(), activations="approx")
    assert_same_fingerprint(before, fingerprint(model))


def test_a_verify_failure_names_the_module_rolls_back_and_suggests_filter_fn(monkeypatch) -> None:
    model = _model()
    before = fingerprint(model)
    real = apply_module.fold_affine_into

    def wrong_fold(*args, **kwargs):  # a bug in a rewrite: the fold forgets the shift
        weight, bias = real(*args, **kwargs)
        return weight, None if bias is None else bias + 1.0

    monkeypatch.setattr(apply_module, "fold_affine_into", wrong_fold)
    with pytest.raises(ConversionError, match="first diverging module") as info:
        convert(model, example_inputs=_x(), norms="fold")
    assert "filter_fn" in str(info.value) and "rolled back" in str(info.value)
    assert_same_fingerprint(before, fingerprint(model))


def test_a_verify_failure_in_a_kept_affine_norm_names_it_and_rolls_back(monkeypatch) -> None:
    """The default edits no weight; a wrong MS norm (here: the wrong eps) is still caught and undone."""
    model = _model()
    before = fingerprint(model)
    real = apply_module._ms_norm_for

    def wrong_norm(*args, **kwargs):
        ms = real(*args, **kwargs)
        ms.eps = 1.0
        return ms

    monkeypatch.setattr(apply_module, "_ms_norm_for", wrong_norm)
    with pytest.raises(ConversionError, match="first diverging module") as info:
        convert(model, example_inputs=_x(), activations=False)
    assert "norm1" in str(info.value)
    assert "filter_fn" in str(info.value) and "rolled back" in str(info.value)
    assert_same_fingerprint(before, fingerprint(model))


def test_verify_is_on_by_default_and_copies_nothing(monkeypatch) -> None:
    monkeypatch.setattr(copy, "deepcopy", _no_model_copies(copy.deepcopy))
    model = _model()
    params = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    convert(model, example_inputs=_x())
    assert any(n.startswith("verified:") for n in model.lowmembp_report.notes)
    assert {s.action for s in model.lowmembp_report.plan.norms} == {"keep_affine"}
    # the default reparameterizes nothing: the same Parameter objects, the same values
    assert list(dict(model.named_parameters())) == list(params)
    for name, p in model.named_parameters():
        assert p is params[name][0] and torch.equal(p, params[name][1]), name


def _no_model_copies(real):
    def deepcopy(obj, *args, **kwargs):
        assert not isinstance(obj, Block), "convert() must not copy the model"
        return real(obj, *args, **kwargs)

    return deepcopy


def test_measuring_and_verifying_leave_batchnorm_statistics_and_rng_alone() -> None:
    model = _model().train()
    stats = {k: v.clone() for k, v in model.bn.state_dict().items()}
    rng = torch.get_rng_state()
    convert(model, example_inputs=_x(), measure_memory=True)
    for key, value in model.bn.state_dict().items():
        assert torch.equal(value, stats[key]), f"bn.{key} changed"
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and model.bn.training, "train/eval flags restored"
    assert model.lowmembp_report.bytes_before > model.lowmembp_report.bytes_after > 0


class RandomMask(nn.Module):
    """ViTMAE-style: the forward draws a random mask even in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(D), nn.Linear(D, D)

    def forward(self, x):
        keep = torch.rand(x.shape[:2]) > 0.5
        return self.fc(self.norm(x)) * keep[..., None]


def test_random_masking_is_replayed_no_false_alarm() -> None:
    convert(RandomMask(), example_inputs=_x())


class InplaceAfterModule(nn.Module):
    """A later in-place op rewrites a module's output (EfficientNet's in-place activations)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc, self.fc2 = nn.LayerNorm(D), nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        h = self.fc(self.norm(x))
        h.mul_(3.0).add_(1.0)
        return self.fc2(h)


def test_recorded_outputs_are_cloned_no_false_alarm() -> None:
    convert(InplaceAfterModule(), example_inputs=_x())


def test_a_meta_model_skips_verification_with_a_note() -> None:
    with torch.device("meta"):
        model = Block()
    convert(model, example_inputs=((_x()[0][0].to("meta"),), {}))
    assert any("meta device" in n for n in model.lowmembp_report.notes)
    assert {s.action for s in model.lowmembp_report.plan.norms} == {"keep_affine"}  # converted, unverified


def test_bfloat16_models_are_judged_at_bfloat16_rounding() -> None:
    model = _model().to(torch.bfloat16)
    x = (_x()[0][0].to(torch.bfloat16),)
    convert(model, example_inputs=(x, {}))  # default tolerance: no false alarm
    assert any(n.startswith("verified:") for n in model.lowmembp_report.notes)


def test_default_example_inputs_leave_the_global_rng_alone() -> None:
    """Without example_inputs convert() builds its own batch (verify): from a private generator."""
    from tiny_zoo import FAMILIES

    model = FAMILIES["llama"].make()
    rng = torch.get_rng_state()
    convert(model)
    assert any(n.startswith("verified:") for n in model.lowmembp_report.notes)
    assert torch.equal(torch.get_rng_state(), rng)
