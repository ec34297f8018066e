"""The default ``convert()`` (``norms="share"``) keeps the stock model; only what autograd saves changes.

Every parameter, buffer, state_dict key and value, requires_grad flag and every value a hook can see
stays the stock one, so whatever a user does with the stock model - load a state dict, call it
functionally, hook a layer, rescale a norm into its consumer (AWQ), change a dropout rate, put a
PEFT adapter on it and move that adapter to an unconverted base, train it - gives the stock result.
The oracle is always an unconverted copy of the same model, run by the test. The models are tiny
2-block ones from tests/models/tiny_zoo.py, whose ``Family.make`` gives every norm weight and bias
random values first (ones and zeros would hide a changed affine).

``norms="fold"`` (the paper's reparameterization) is the contrast: it changes consumer weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from rule import tensors_of
from tiny_zoo import FAMILIES, cross_entropy, forward, relative_error

from lowmembp_convert import convert
from lowmembp_convert.demo import _randomise_norms

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/adversarial/conftest.py

peft = pytest.importorskip("peft")


def ms_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if type(m).__name__.startswith("MS")]


def converted_pair(name: str, **options) -> tuple[nn.Module, nn.Module]:
    """(stock, converted): a tiny family model and a converted deep copy of it (eval mode)."""
    stock = FAMILIES[name].make()
    model = convert(copy.deepcopy(stock), **options).eval()
    assert ms_modules(model), "no norm became a memory-sharing norm"
    return stock, model


def logits(model: nn.Module, inputs) -> torch.Tensor:
    with torch.no_grad():
        return forward(model, inputs)


def perturbed(state: dict[str, torch.Tensor], seed: int = 5) -> dict[str, torch.Tensor]:
    """Every floating tensor of a state dict, scaled and shifted by random amounts."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, t in state.items():
        if t.is_floating_point():
            t = t * (1 + 0.2 * torch.randn(t.shape, generator=gen)) + 0.05 * torch.randn(t.shape, generator=gen)
        out[key] = t
    return out


# --------------------------------------------------------------------------------------------------
# Parameters, state dict, load_state_dict, functional_call
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["timm_vit", "bert"])
def test_state_dict_parameters_and_functional_call_are_stock(name):
    family = FAMILIES[name]
    stock = family.make()
    stock.get_parameter(family.embedding).requires_grad_(False)  # a frozen parameter among trainable ones
    model = copy.deepcopy(stock)
    params_before = [(n, p, p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)]
    buffers_before = [(n, b) for n, b in model.named_buffers(remove_duplicate=False)]
    convert(model).eval()
    assert ms_modules(model)

    # the very same Parameter objects under the same names, flags kept; the same buffers
    params_after = [(n, p, p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)]
    assert [(n, id(p), g) for n, p, g in params_after] == [(n, id(p), g) for n, p, g in params_before]
    assert [(n, id(b)) for n, b in model.named_buffers(remove_duplicate=False)] == [
        (n, id(b)) for n, b in buffers_before
    ]
    # state dict: keys (in order) and values
    ours, theirs = model.state_dict(), stock.state_dict()
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key

    x = family.inputs(0, 2)
    expected = logits(stock, x)
    assert relative_error(expected, logits(model, x)) < 1e-5

    # functional_call: the stock state dict, and a different one, are read as the stock model reads them
    args, kwargs = x
    call = torch.func.functional_call
    with torch.no_grad():
        assert relative_error(expected, tensors_of(call(model, theirs, args, kwargs))[0]) < 1e-5
        other = perturbed(theirs)
        want = tensors_of(call(stock, other, args, kwargs))[0]
        got = tensors_of(call(model, other, args, kwargs))[0]
    assert relative_error(want, expected) > 1e-2, "the perturbed state dict changes the output"
    assert relative_error(want, got) < 1e-5

    # load_state_dict (strict) of another stock model's state dict: the same outputs as that model
    donor = family.make(seed=1)
    model.load_state_dict(donor.state_dict())
    assert [id(p) for _, p in model.named_parameters()] == [id(p) for _, p, _ in params_before]
    assert relative_error(logits(donor, x), logits(model, x)) < 1e-5


# --------------------------------------------------------------------------------------------------
# Forward hooks registered after convert
# --------------------------------------------------------------------------------------------------

HOOKED = {
    # norm, a Linear that consumes its output
    "llama": [("model.layers.0.input_layernorm", "model.layers.0.self_attn.q_proj")],
    # post-norm: the consumer becomes a TwinLinear
    "bert": [("bert.encoder.layer.0.attention.output.LayerNorm", "bert.encoder.layer.0.intermediate.dense")],
}


@pytest.mark.parametrize("name", sorted(HOOKED))
def test_forward_hooks_after_convert_see_stock_values(name):
    stock, model = converted_pair(name)
    x = FAMILIES[name].inputs(0, 2)
    captures = {}
    for tag, m in (("stock", stock), ("ours", model)):
        seen = captures[tag] = {}
        for norm, consumer in HOOKED[name]:
            for path in (norm, consumer):

                def hook(_mod, args, out, path=path, seen=seen):
                    seen[path] = (args[0].detach().clone(), out.detach().clone())

                m.get_submodule(path).register_forward_hook(hook)
        m.train()
        torch.manual_seed(0)  # BERT's dropout: the same masks
        cross_entropy(forward(m, x)).backward()  # a training forward, as the hooks would see it
    assert set(captures["ours"]) == set(captures["stock"]) and captures["stock"]
    for path, (a_in, a_out) in captures["stock"].items():
        b_in, b_out = captures["ours"][path]
        assert a_in.shape == b_in.shape and a_out.shape == b_out.shape, path
        assert relative_error(a_in, b_in) < 1e-6, f"{path}: input differs"
        assert relative_error(a_out, b_out) < 1e-6, f"{path}: output differs"


# --------------------------------------------------------------------------------------------------
# AWQ-style rescaling of a norm into its consumers
# --------------------------------------------------------------------------------------------------


def test_awq_rescale_after_convert_acts_on_the_stock_parameters():
    stock, model = converted_pair("timm_vit")
    x = FAMILIES["timm_vit"].inputs(0, 2)
    before = logits(stock, x)
    gen = torch.Generator().manual_seed(3)
    pairs = {"blocks.0.norm1": ["blocks.0.attn.qkv"], "blocks.1.norm2": ["blocks.1.mlp.fc1"]}
    scales = {norm: torch.rand(32, generator=gen) * 1.5 + 0.5 for norm in pairs}
    for m in (stock, model):
        with torch.no_grad():
            for norm, consumers in pairs.items():
                s = scales[norm]
                m.get_submodule(norm).weight.div_(s)
                m.get_submodule(norm).bias.div_(s)
                for consumer in consumers:
                    m.get_submodule(consumer).weight.mul_(s)  # [out, in]: per input column
    assert relative_error(model.state_dict()["blocks.0.norm1.weight"], stock.state_dict()["blocks.0.norm1.weight"]) == 0
    after_stock, after_ours = logits(stock, x), logits(model, x)
    assert relative_error(before, after_stock) < 1e-5, "the rescale keeps the stock function"
    assert relative_error(after_stock, after_ours) < 1e-5
    assert relative_error(before, after_ours) < 1e-5


# --------------------------------------------------------------------------------------------------
# A dropout rate changed after convert
# --------------------------------------------------------------------------------------------------


class NormDropLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.drop, self.fc = nn.LayerNorm(16), nn.Dropout(p=0.0), nn.Linear(16, 8)

    def forward(self, x):
        return self.fc(self.drop(self.norm(x)))


def test_dropout_rate_raised_after_convert_gives_stock_outputs_and_gradients():
    torch.manual_seed(0)
    stock = _randomise_norms(NormDropLinear())
    x = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(1))
    model = convert(copy.deepcopy(stock), example_inputs=((x,), {}))
    assert type(model.norm).__name__.startswith("MS"), type(model.norm)
    with torch.no_grad():
        undropped = stock(x)
    results = []
    for m in (stock, model):
        m.drop.p = 0.5
        m.train()
        xs = x.clone().requires_grad_()
        torch.manual_seed(42)
        out = m(xs)
        out.square().sum().backward()
        results.append((out.detach(), xs.grad, m.norm.weight.grad, m.norm.bias.grad, m.fc.weight.grad))
    (out_a, *grads_a), (out_b, *grads_b) = results
    assert relative_error(undropped, out_a) > 0.1, "the dropout is active"
    assert relative_error(out_a, out_b) < 1e-6
    for name, a, b in zip(("x", "norm.weight", "norm.bias", "fc.weight"), grads_a, grads_b, strict=True):
        assert relative_error(a, b) < 1e-5, f"gradient of {name} differs"


# --------------------------------------------------------------------------------------------------
# PEFT
# --------------------------------------------------------------------------------------------------

LORA_TARGETS = ["q_proj", "v_proj"]


def lora(base: nn.Module, **kwargs) -> nn.Module:
    torch.manual_seed(0)  # the same adapter init on every model
    return peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, **kwargs))


def train_steps(model: nn.Module, inputs, steps: int, optimizer_cls, lr: float) -> list[float]:
    model.train()
    optimizer = optimizer_cls([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = cross_entropy(forward(model, inputs))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("order", ["convert_then_lora", "lora_then_convert"])
def test_lora_trained_on_converted_model_is_the_stock_adapter(order, tmp_path):
    family = FAMILIES["llama"]
    base = family.make()
    x = family.inputs(1, 2)
    stock = lora(copy.deepcopy(base))
    if order == "convert_then_lora":
        model = lora(convert(copy.deepcopy(base)))
    else:
        model = convert(lora(copy.deepcopy(base)))
    assert ms_modules(model)
    # Plain SGD: its step is the gradient itself, so the adapters agree to gradient rounding. (AdamW's
    # normalized step turns 1e-7 of rounding into ~5e-5 of adapter weight in 3 steps, even between two
    # stock models whose norm weight differs by 1e-7, and it is blind to a gradient's scale.)
    ours_loss = train_steps(model, x, 3, torch.optim.SGD, lr=1.0)
    assert ours_loss == pytest.approx(train_steps(stock, x, 3, torch.optim.SGD, lr=1.0), rel=1e-5)
    ours, theirs = trainable(model), trainable(stock)
    assert list(ours) == list(theirs) and all("lora_" in n for n in ours)
    for n in theirs:
        assert relative_error(theirs[n], ours[n]) < 1e-5, f"{n} trained differently"
    assert any(t.abs().sum() > 0 for n, t in ours.items() if "lora_B" in n), "the adapter moved"

    # the adapter saved from the converted model, loaded onto a fresh stock base
    model.eval().save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert not ms_modules(loaded)
    assert relative_error(logits(model, x), logits(loaded, x)) < 1e-5
    assert relative_error(logits(base, x), logits(loaded, x)) > 1e-4, "the adapter changes the output"


def test_ln_tuning_after_convert_trains_the_norms():
    family = FAMILIES["llama"]
    base = family.make()
    x = family.inputs(2, 2)
    config = dict(target_modules=["input_layernorm", "post_attention_layernorm"])
    stock = peft.get_peft_model(copy.deepcopy(base), peft.LNTuningConfig(**config))
    model = peft.get_peft_model(convert(copy.deepcopy(base)), peft.LNTuningConfig(**config))
    assert ms_modules(model)
    before = trainable(model)
    assert before and all("ln_tuning_layers" in n for n in before)
    losses = []
    for m in (model, stock):
        m.train()
        optimizer = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        loss = cross_entropy(forward(m, x))
        loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), "a tuned norm got no gradient"
        optimizer.step()
        losses.append(loss.item())
    after = trainable(model)
    assert all(not torch.equal(before[n], after[n]) for n in before), "every tuned norm parameter moved"
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    theirs = trainable(stock)
    for n in theirs:
        assert relative_error(theirs[n], after[n]) < 1e-5, f"{n} trained differently"


def test_modules_to_save_and_disable_adapter_give_stock_logits():
    family = FAMILIES["llama"]
    base = family.make()
    x = family.inputs(3, 2)
    saved = ["post_attention_layernorm", "lm_head"]
    stock = lora(copy.deepcopy(base), modules_to_save=saved)
    model = lora(convert(copy.deepcopy(base)), modules_to_save=saved)
    assert ms_modules(model)
    for m in (stock, model):  # the same nonzero lora_B and edited saved copies in both
        gen = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n or "modules_to_save" in n:
                    p.add_(0.3 * torch.randn(p.shape, generator=gen))
    stock.eval()
    model.eval()
    expected = logits(base, x)
    with_adapter = logits(model, x)
    assert relative_error(logits(stock, x), with_adapter) < 1e-5
    assert relative_error(expected, with_adapter) > 1e-3, "the adapter and saved modules change the output"
    with model.disable_adapter():
        assert relative_error(expected, logits(model, x)) < 1e-5
    with stock.disable_adapter():
        assert relative_error(expected, logits(stock, x)) < 1e-5
    assert relative_error(with_adapter, logits(model, x)) < 1e-6, "re-enabled"


# --------------------------------------------------------------------------------------------------
# Training, and the fold contrast
# --------------------------------------------------------------------------------------------------


def test_adamw_training_follows_stock_and_fold_reparameterizes():
    stock, model = converted_pair("llama")
    x = FAMILIES["llama"].inputs(4, 2)
    original = {k: v.clone() for k, v in stock.state_dict().items()}
    fold = convert(copy.deepcopy(stock), norms="fold")

    ours = train_steps(model, x, 20, torch.optim.AdamW, lr=1e-3)
    theirs = train_steps(stock, x, 20, torch.optim.AdamW, lr=1e-3)
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a == pytest.approx(b, rel=1e-4), f"step {step}: loss {a} vs stock {b}"
    assert theirs[-1] < theirs[0]

    # fold rewrote the consumers' weights (and left identity values under the norms' keys)
    folded = [s for s in fold.lowmembp_report.plan.norms if s.action == "fold"]
    assert folded
    fold_state = fold.state_dict()
    assert list(fold_state) == list(original)
    changed = [
        c.weight for s in folded for c in s.consumers if not torch.equal(fold_state[c.weight], original[c.weight])
    ]
    assert changed, "fold changes at least one consumer weight"
    assert any(not torch.equal(fold_state[s.weight], original[s.weight]) for s in folded if s.weight)


def test_sites_left_stock_say_so_in_the_report() -> None:
    """ConvNeXt with conv_mlp: the GELU feeds a 1x1 convolution, which no recompute is proven for, and
    auto never approximates: its sites are stock, and the report (object and JSON) must not call
    them 2-bit."""
    model = convert(FAMILIES["convnext_conv_mlp"].make())
    sites = model.lowmembp_report.to_dict()["plan"]["activations"]
    assert sites and all(s["action"] == "skip" and s["option"] is None for s in sites), sites
    assert "gradients: exact" in str(model.lowmembp_report)
