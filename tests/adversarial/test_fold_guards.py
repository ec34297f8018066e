"""norms='fold' is a reparameterization: where it cannot keep the stock behaviour it refuses at once,
with nothing changed (issue 15, item 4). The default keeps the stock parameters and needs no guard."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from lowmembp_convert import convert
from lowmembp_convert.demo import _randomise_norms
from lowmembp_convert.nn.norms import FoldedNormsGuard


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 8)  # loaded before the norm: a late refusal would have changed it
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.embed(x)))


def _pair() -> tuple[nn.Module, nn.Module, tuple]:
    torch.manual_seed(0)
    stock = _randomise_norms(_Block())
    return stock, copy.deepcopy(stock), ((torch.randn(3, 8),), {})


def test_a_stock_state_dict_is_refused_whole_by_a_folded_model() -> None:
    stock, model, inputs = _pair()
    convert(model, norms="fold", example_inputs=inputs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    incoming = copy.deepcopy(stock.state_dict())
    incoming["embed.weight"] += 1.0
    with pytest.raises(RuntimeError, match="norm.weight: this norm's affine was folded.*nothing was loaded"):
        model.load_state_dict(incoming)
    for key, value in model.state_dict().items():
        assert torch.equal(before[key], value), f"{key} changed by a refused load"


def test_the_guard_is_registered_once_and_only_for_folds() -> None:
    _stock, model, inputs = _pair()
    convert(model, norms="fold", example_inputs=inputs)
    convert(model, norms="fold", example_inputs=inputs)  # converting again adds no second guard
    assert len(FoldedNormsGuard.registered_on(model)) == 1
    _stock, shared, inputs = _pair()
    convert(shared, example_inputs=inputs)
    assert not shared._load_state_dict_pre_hooks


def test_the_default_loads_a_stock_state_dict_like_the_stock_model() -> None:
    stock, model, inputs = _pair()
    convert(model, example_inputs=inputs)
    incoming = copy.deepcopy(stock.state_dict())
    incoming["norm.weight"] *= 1.5
    stock.load_state_dict(incoming)
    model.load_state_dict(incoming)
    x = inputs[0][0]
    torch.testing.assert_close(model(x), stock(x), rtol=1e-6, atol=1e-6)


def _folded() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    stock, model, inputs = _pair()
    convert(model, norms="fold", example_inputs=inputs)
    assert model.lowmembp_report.plan.norm("norm").action == "fold"
    return stock, model, inputs[0][0]


def test_a_rescale_of_the_folded_weight_raises_before_computing() -> None:
    """AWQ/SmoothQuant-style ``ln.weight /= s; fc.weight *= s`` is a no-op on the stock model; on a
    folded one the first half is ignored, so the function would change: refused at the next forward."""
    _, model, x = _folded()
    y = model(x)
    with torch.no_grad():
        model.norm.weight /= 2.0
    with pytest.raises(RuntimeError, match=r"norm\.weight was changed after norms='fold' folded it into fc"):
        model(x)
    with torch.no_grad():
        model.norm.weight.fill_(1.0)  # identity again: accepted
    assert torch.equal(model(x), y)


def test_functional_call_with_stock_weights_raises_and_with_its_own_works() -> None:
    stock, model, x = _folded()
    with pytest.raises(RuntimeError, match="functional_call with stock weights"):
        torch.func.functional_call(model, dict(stock.state_dict()), (x,))
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert torch.equal(torch.func.functional_call(model, own, (x,)), model(x))


@pytest.mark.parametrize("where", ["norm", "fc"])
def test_a_hook_added_after_folding_raises_naming_the_module(where: str) -> None:
    _, model, x = _folded()
    model.get_submodule(where).register_forward_hook(lambda m, args, out: None)
    with pytest.raises(RuntimeError, match=f"a forward hook was added to {where} after norms='fold'"):
        model(x)


def test_moves_copies_and_pickles_keep_the_watch_quiet_and_awake() -> None:
    import pickle

    _, model, x = _folded()
    y = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), copy.deepcopy(model).double().float()):
        assert torch.allclose(clone(x), y, rtol=1e-6, atol=1e-6)
        clone.fc.register_forward_pre_hook(lambda m, args: None)
        with pytest.raises(RuntimeError, match="a forward hook was added to fc"):
            clone(x)
    assert torch.equal(model(x), y)  # the original is not affected by its copies' hooks


class _DropoutBlock(nn.Module):
    """norm -> Dropout(p=0) -> fc: with p = 0 the dropout commutes with the norm's shift, so a fold moves
    the shift into fc's bias; a fine-tuning schedule that raises p later must not meet a stale fold."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.drop, self.fc = nn.LayerNorm(8), nn.Dropout(0.0), nn.Linear(8, 4)
        self.other = nn.Dropout(0.0)  # not between the norm and fc: free to change

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.other(self.fc(self.drop(self.norm(x))))


def test_a_dropout_switched_on_between_a_shift_folded_norm_and_its_consumer_raises() -> None:
    torch.manual_seed(0)
    stock = _randomise_norms(_DropoutBlock()).train()
    x = ((torch.randn(3, 8),), {})
    model = convert(copy.deepcopy(stock), example_inputs=x, norms="fold", activations=False)
    site = model.lowmembp_report.plan.norm("norm")
    assert site.action == "fold" and site.fold_bias and site.dropouts == ("drop",)
    expected = stock(*x[0])
    torch.testing.assert_close(model(*x[0]), expected, rtol=1e-5, atol=1e-5)
    model.other.p = 0.5  # elsewhere: no concern of the fold
    model(*x[0])
    model.other.p = 0.0
    model.drop.p = 0.1
    with pytest.raises(RuntimeError, match=r"drop now drops \(p=0.1\) between norm and its consumers"):
        model(*x[0])
    model.eval()  # not dropping: the fold is right again
    torch.testing.assert_close(model(*x[0]), stock.eval()(*x[0]), rtol=1e-5, atol=1e-5)
    # the default keeps the shift in the norm: any p is the stock behaviour
    shared = convert(copy.deepcopy(stock).train(), example_inputs=x, activations=False)
    shared.drop.p = 0.1
    torch.manual_seed(1)
    got = shared(*x[0])
    stock.train().drop.p = 0.1
    torch.manual_seed(1)
    torch.testing.assert_close(got, stock(*x[0]), rtol=1e-5, atol=1e-5)
