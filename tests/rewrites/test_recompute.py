"""The exact recompute rewrite and the per-site planner, on toy MLPs and tiny real families.

Oracles: the stock model (a deep copy run by the test) for forward (bitwise) and gradients, and
saved-tensor hooks (``activation_memory``) for the bytes each option keeps.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from tiny_zoo import randomize_affine  # noqa: E402

from lowmembp_convert import activation_memory, convert  # noqa: E402

D, HIDDEN = 16, 40


class Plain(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.fc1, self.act, self.drop, self.fc2 = nn.Linear(D, HIDDEN), act, nn.Dropout(0.0), nn.Linear(HIDDEN, D)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.fc1(x))))


class Gated(nn.Module):
    def __init__(self, act: nn.Module, up_first: bool = False) -> None:
        super().__init__()
        self.gate, self.up = nn.Linear(D, HIDDEN, bias=False), nn.Linear(D, HIDDEN)
        self.down, self.act = nn.Linear(HIDDEN, D), act
        self.up_first = up_first

    def forward(self, x):
        if self.up_first:
            return self.down(self.up(x) * self.act(self.gate(x)))
        return self.down(self.act(self.gate(x)) * self.up(x))


class Fused(nn.Module):
    """timm GluMlp / Phi-3: one gate_up projection, chunked."""

    def __init__(self, act: nn.Module, gate_second: bool = False) -> None:
        super().__init__()
        self.gate_up, self.down, self.act = nn.Linear(D, 2 * HIDDEN), nn.Linear(HIDDEN, D), act
        self.gate_second = gate_second

    def forward(self, x):
        first, second = self.gate_up(x).chunk(2, dim=-1)
        gate, up = (second, first) if self.gate_second else (first, second)
        return self.down(self.act(gate) * up)


class Stack(nn.Module):
    def __init__(self, block) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([block(), block()])

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


def _x(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 5, D, generator=torch.Generator().manual_seed(0))


def _run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    y = model(x)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.shape[-1])).sum(), [x, *params])
    return y.detach(), list(grads)


def _bytes(model: nn.Module, x: torch.Tensor) -> int:
    return activation_memory(lambda: model(x).sum(), params=model).total


MODELS = {
    "plain_gelu": lambda: Stack(lambda: Plain(nn.GELU())),
    "plain_gelu_tanh": lambda: Stack(lambda: Plain(nn.GELU(approximate="tanh"))),
    "gated_silu": lambda: Stack(lambda: Gated(nn.SiLU())),
    "gated_up_first": lambda: Stack(lambda: Gated(nn.SiLU(), up_first=True)),
    "geglu_tanh": lambda: Stack(lambda: Gated(nn.GELU(approximate="tanh"))),
    "fused_chunk": lambda: Stack(lambda: Fused(nn.SiLU())),
    "fused_chunk_gate_second": lambda: Stack(lambda: Fused(nn.GELU(), gate_second=True)),
}


@pytest.mark.parametrize("name", MODELS)
def test_recompute_is_exact_and_keeps_fewer_bytes(name: str) -> None:
    torch.manual_seed(0)
    stock = MODELS[name]().train()
    model = convert(copy.deepcopy(stock), example_inputs=((_x(),), {}), activations="recompute", norms=False)
    sites = model.lowmembp_report.plan.activations
    assert sites and all(s.option == "recompute" and s.action == "convert" for s in sites), [s.reason for s in sites]
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in stock.named_parameters()]
    assert model.state_dict().keys() == stock.state_dict().keys()
    y0, g0 = _run(stock, _x())
    y1, g1 = _run(model, _x())
    assert torch.equal(y0, y1), "forward must be bitwise the stock one"
    for a, b in zip(g0, g1, strict=True):
        assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5
    assert _bytes(model, _x()) < _bytes(stock, _x())
    assert "recomputes act" in repr(model)


def test_gradients_match_a_float64_oracle() -> None:
    torch.manual_seed(0)
    stock = Stack(lambda: Gated(nn.GELU()))
    model = convert(copy.deepcopy(stock), example_inputs=((_x(),), {}), activations="recompute", norms=False)
    oracle = copy.deepcopy(stock).double()
    _, g64 = _run(oracle, _x().double())
    _, g32 = _run(model, _x())
    for a, b in zip(g64, g32, strict=True):
        assert ((a - b.double()).abs().max() / a.abs().max()).item() < 1e-5


class _SplitLayer(nn.Module):
    """BERT's shape: the activation in one child module, its consumer in another (the hand-off)."""

    def __init__(self) -> None:
        super().__init__()
        self.intermediate = nn.Sequential(nn.Linear(D, HIDDEN), nn.GELU())
        self.output = nn.Sequential(nn.Linear(HIDDEN, D))

    def forward(self, x):
        return self.output(self.intermediate(x))


def _estimate_case(case: str) -> nn.Module:
    torch.manual_seed(0)
    if case == "handoff":
        return Stack(_SplitLayer)
    stock = Stack(lambda: Gated(nn.SiLU()))
    if case == "lora_consumer":
        peft = pytest.importorskip("peft")
        stock = peft.get_peft_model(stock, peft.LoraConfig(r=2, target_modules=["down"], init_lora_weights=False))
    return stock


@pytest.mark.parametrize("case", ["gated", "lora_consumer", "handoff"])
def test_auto_picks_the_fewest_bytes_and_the_estimates_match_the_meter(case: str) -> None:
    """Per site: the estimate of each option against bytes measured with only that site converted
    (a plain consumer, a PEFT LoRA consumer, and a hand-off between two modules)."""
    stock = _estimate_case(case)
    model = convert(copy.deepcopy(stock), example_inputs=((_x(),), {}), norms=False)
    sites = model.lowmembp_report.plan.activations
    for site in sites:
        if case == "lora_consumer" and site.module.endswith("blocks.0.act"):
            # PEFT froze the base and the input needs no gradient: the first MLP keeps only lora_A's
            # input, and no option keeps less
            assert site.action == "skip" and site.estimate["approx"] == site.estimate["stock"], site.reason
            continue
        assert site.option == "recompute" and site.estimate["recompute"] == min(site.estimate.values())
    base = _bytes(stock, _x())
    for site in sites:
        for option in ("approx", "recompute"):
            if option not in site.estimate:
                continue
            one = convert(
                copy.deepcopy(stock), example_inputs=((_x(),), {}), norms=False, activations=option,
                filter_fn=lambda m, name, site=site: name == site.module,
            )  # fmt: skip
            measured = base - _bytes(one, _x())
            expected = site.estimate["stock"] - site.estimate[option]
            assert abs(measured - expected) <= 0.1 * abs(expected) + 64, (site.module, option, measured, expected)


def test_a_frozen_consumer_leaves_nothing_to_save_so_the_site_stays_exact() -> None:
    torch.manual_seed(0)
    stock = Stack(lambda: Plain(nn.GELU()))
    for block in stock.blocks:
        block.fc2.requires_grad_(False)
    model = convert(copy.deepcopy(stock), example_inputs=((_x(),), {}), norms=False)
    for site in model.lowmembp_report.plan.activations:
        # stock keeps a; recompute keeps a; 2-bit keeps codes: auto never approximates unasked, so stock,
        # saying that the codes would be smaller
        assert site.estimate["recompute"] == site.estimate["stock"] > site.estimate["approx"]
        assert site.action == "skip", site.reason
        assert site.reason.startswith("left stock: no exact option keeps fewer bytes"), site.reason
        assert site.reason.endswith("activations='approx' would keep fewer bytes with an approximate gradient")
    assert isinstance(model.blocks[0].act, nn.GELU)
    model = convert(copy.deepcopy(stock), example_inputs=((_x(),), {}), norms=False, activations="recompute")
    assert all(s.action == "skip" for s in model.lowmembp_report.plan.activations)
    model = convert(copy.deepcopy(stock), example_inputs=((_x(),), {}), norms=False, activations="approx")
    assert all((s.action, s.option) == ("convert", "approx") for s in model.lowmembp_report.plan.activations)


def test_an_activation_read_twice_is_not_recomputed() -> None:
    class TwoReaders(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(D, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, D)

        def forward(self, x):
            h = self.act(self.fc1(x))
            return self.fc2(h) + h.mean(-1, keepdim=True)

    model = convert(TwoReaders(), example_inputs=((_x(),), {}), norms=False, activations="recompute")
    (site,) = model.lowmembp_report.plan.activations
    assert site.action == "skip" and "several readers" in site.reason


def test_a_peft_wrapped_consumer_takes_the_recompute_through_its_adapter_path() -> None:
    """LoRA on the down projection: base and lora_A both get the rebuilt input (exact); with lora
    dropout the layer cannot, and the reason says so (tests/rewrites/test_recompute_lora.py has more)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    stock = peft.get_peft_model(Stack(lambda: Gated(nn.SiLU())), peft.LoraConfig(r=2, target_modules=["down"]))
    wrapped = convert(copy.deepcopy(stock), example_inputs=((_x(),), {}), norms=False, activations="recompute")
    first, *rest = wrapped.lowmembp_report.plan.activations
    assert first.action == "skip" and "needs a gradient" in first.reason  # frozen base, input without grad
    for site in rest:
        assert site.option == "recompute" and site.recompute.layout == "lora", site.reason
    assert torch.equal(stock(_x()), wrapped(_x()))
    config = peft.LoraConfig(r=2, target_modules=["down"], lora_dropout=0.1)
    dropped = peft.get_peft_model(Stack(lambda: Gated(nn.SiLU())), config)
    convert(dropped, example_inputs=((_x(),), {}), norms=False, activations="recompute")
    for site in dropped.lowmembp_report.plan.activations:
        assert site.action == "skip" and "PEFT-wrapped" in site.reason and "lora_dropout" in site.reason


def test_a_lora_added_after_converting_still_computes_exactly() -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    stock = Stack(lambda: Gated(nn.SiLU()))
    model = convert(copy.deepcopy(stock), example_inputs=((_x(),), {}), norms=False, activations="recompute")
    config = peft.LoraConfig(r=2, target_modules=["down"], init_lora_weights=False)
    a = peft.get_peft_model(copy.deepcopy(stock), config)
    torch.manual_seed(1)
    b = peft.get_peft_model(model, config)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(_x()), b(_x())), "the adapter path must not be skipped"


def test_compile_fullgraph_and_the_bytes_stay_down() -> None:
    torch.manual_seed(0)
    stock = Stack(lambda: Gated(nn.SiLU()))
    model = convert(copy.deepcopy(stock), example_inputs=((_x(),), {}), norms=False, activations="recompute")
    compiled = torch.compile(model, fullgraph=True)
    y = compiled(_x())
    assert torch.allclose(y, stock(_x()), rtol=1e-5, atol=1e-6)
    y.sum().backward()


def test_a_failed_rewrite_rolls_back_the_class_swap(monkeypatch) -> None:
    import lowmembp_convert.verify as verify_module

    torch.manual_seed(0)
    model = Stack(lambda: Gated(nn.SiLU()))
    classes = [type(m) for m in model.modules()]

    def fail(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(verify_module.Recording, "compare", fail)
    with pytest.raises(RuntimeError, match="injected"):
        convert(model, example_inputs=((_x(),), {}), norms=False)
    assert [type(m) for m in model.modules()] == classes


def test_a_real_family_llama_gated_mlp_is_recomputed_exactly() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    stock = randomize_affine(transformers.LlamaForCausalLM(config)).train()
    model = convert(copy.deepcopy(stock), norms=False)
    assert {s.option for s in model.lowmembp_report.plan.activations} == {"recompute"}
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    a, b = stock(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(a, b)
    a.square().sum().backward()
    b.square().sum().backward()
    for (name, p), q in zip(stock.named_parameters(), model.parameters(), strict=True):
        assert ((p.grad - q.grad).abs().max() / p.grad.abs().max()).item() < 1e-5, name


def _recomputed_pair(block) -> tuple[nn.Module, nn.Module]:
    """(stock, converted with the exact recompute only) of a two-block Stack in training mode."""
    torch.manual_seed(0)
    stock = Stack(block).train()
    return stock, convert(copy.deepcopy(stock), example_inputs=((_x(),), {}), activations="recompute", norms=False)


def _assert_bitwise_same(stock: nn.Module, model: nn.Module) -> None:
    torch.manual_seed(1)  # the same dropout masks in both
    y0, g0 = _run(stock, _x())
    torch.manual_seed(1)
    y1, g1 = _run(model, _x())
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1, strict=True):
        assert torch.equal(a, b)


def _changes_after_converting():
    """(name, change applied to both models) the rewritten forward must notice at run time."""

    def hook_on_consumer(m):
        m.blocks[0].fc2.register_forward_pre_hook(lambda mod, args: (args[0] * 2,))

    def hook_on_activation(m):
        m.blocks[1].act.register_forward_hook(lambda mod, args, out: out + 1)

    def dropout_switched_on(m):
        m.blocks[0].drop.p = 0.5

    def activation_swapped(m):
        m.blocks[0].act = nn.ReLU()

    def activation_attribute(m):
        m.blocks[1].act.approximate = "tanh"

    def consumer_replaced(m):
        m.blocks[0].fc2 = nn.Sequential(m.blocks[0].fc2, nn.Tanh())

    return [
        hook_on_consumer,
        hook_on_activation,
        dropout_switched_on,
        activation_swapped,
        activation_attribute,
        consumer_replaced,
    ]


@pytest.mark.parametrize("change", _changes_after_converting(), ids=lambda f: f.__name__)
def test_a_module_changed_after_converting_runs_the_stock_calls(change) -> None:
    """Hooks, dropout, the activation or the consumer changed after convert(): the rewritten container
    must not run the fused op that was proven for the old modules (it would skip or mis-compute them)."""
    stock, model = _recomputed_pair(lambda: Plain(nn.GELU()))
    assert all(s.option == "recompute" for s in model.lowmembp_report.plan.activations)
    change(stock)
    change(model)
    _assert_bitwise_same(stock, model)


def test_a_global_module_hook_runs_the_stock_calls() -> None:
    stock, model = _recomputed_pair(lambda: Plain(nn.GELU()))
    calls = []
    handle = nn.modules.module.register_module_forward_hook(lambda mod, args, out: calls.append(type(mod).__name__))
    try:
        model(_x())
        seen, calls[:] = list(calls), []
        stock(_x())
    finally:
        handle.remove()
    assert seen == calls and "GELU" in seen and "Linear" in seen


def test_a_lora_consumer_compiles_fullgraph_and_keeps_fewer_bytes() -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, target_modules=["down"], init_lora_weights=False)
    stock = peft.get_peft_model(Stack(lambda: Gated(nn.SiLU())), config)
    model = convert(copy.deepcopy(stock), example_inputs=((_x(),), {}), norms=False, activations="recompute")
    compiled = torch.compile(model, fullgraph=True)
    assert torch.allclose(compiled(_x()), stock(_x()), rtol=1e-5, atol=1e-6)
    assert _bytes(compiled, _x()) < _bytes(stock, _x())


def test_an_instance_level_forward_on_the_consumer_runs() -> None:
    """accelerate's hooks, quantizers and wrappers replace ``module.forward`` on the instance: the fused
    op must not bypass it."""
    stock, model = _recomputed_pair(lambda: Gated(nn.SiLU()))
    for m in (stock, model):
        down = m.blocks[0].down
        down.forward = lambda x, f=down.forward: f(x * 0.5)
    _assert_bitwise_same(stock, model)


def test_a_hook_that_switches_the_fused_op_off_warns_once_and_observers_do_not() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from lowmembp_convert import observers

    stock, model = _recomputed_pair(lambda: Gated(nn.SiLU()))
    with FlopCounterMode(display=False):  # torch's ModuleTracker only watches: the saving stays
        assert _bytes(model, _x()) < _bytes(stock, _x())
    observers._WARNED.clear()
    model.blocks[0].down.register_forward_hook(lambda mod, args, out: None)
    with pytest.warns(UserWarning, match="without the memory saving"):
        model(_x())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(_x())  # once


def test_convert_with_verify_runs_the_fused_op_without_warning() -> None:
    """verify's recorder hooks only watch: the replay runs the fused op (what training will run)."""
    import warnings

    from lowmembp_convert import observers

    observers._WARNED.clear()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = convert(Stack(lambda: Gated(nn.SiLU())).train(), example_inputs=((_x(),), {}), verify=True)
    assert all(s.option == "recompute" for s in model.lowmembp_report.plan.activations)


class _Settings:
    def __init__(self) -> None:
        self.double_it = False


class _StatefulMLP(nn.Module):
    """A container whose forward reads its own attributes: a scale and a config flag. torch.fx bakes
    both into the traced forward; changing either after convert() must take effect."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up, self.down, self.act = (
            nn.Linear(D, HIDDEN),
            nn.Linear(D, HIDDEN),
            nn.Linear(HIDDEN, D),
            nn.SiLU(),
        )
        self.scale = 1.0
        self.config = _Settings()

    def forward(self, x):
        y = self.down(self.act(self.gate(x)) * self.up(x)) * self.scale
        if self.config.double_it:
            y = y * 2
        return y


def test_container_attributes_changed_after_convert_take_effect() -> None:
    torch.manual_seed(0)
    stock = Stack(_StatefulMLP)
    model = convert(copy.deepcopy(stock), example_inputs=((_x(),), {}), norms=False)
    assert all(s.option == "recompute" for s in model.lowmembp_report.plan.activations)
    fused = _bytes(model, _x())
    assert fused < _bytes(stock, _x())
    for m in (stock, model):
        m.blocks[0].scale = 3.0
        m.blocks[1].config.double_it = True
    y0, g0 = _run(stock, _x())
    y1, g1 = _run(model, _x())
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))
    for m in (stock, model):  # back to what was traced: the fused path again
        m.blocks[0].scale = 1.0
        m.blocks[1].config.double_it = False
    assert torch.equal(stock(_x()), model(_x())) and _bytes(model, _x()) == fused
