"""The exact recompute across modules (nn/handoff.py): BERT-style MLPs split over two modules.

Oracles: the stock model (a deep copy run the same way) for forward (bit for bit) and gradients,
saved-tensor hooks for the bytes, and readers the captured graph did not show (hooks) applied to both.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn

from lowmembp_convert import activation_memory, convert
from lowmembp_convert.nn import HandoffActivation, HandoffLinear

D, HIDDEN = 16, 40


class Intermediate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense, self.act = nn.Linear(D, HIDDEN), nn.GELU()

    def forward(self, x):
        return self.act(self.dense(x))


class Output(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(HIDDEN, D)

    def forward(self, h, x):
        return self.dense(h) + x


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.intermediate, self.output = Intermediate(), Output()

    def forward(self, x):
        return self.output(self.intermediate(x), x)


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Layer(), Layer()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _x() -> torch.Tensor:
    return torch.randn(3, 5, D, generator=torch.Generator().manual_seed(0))


def _run(model: nn.Module, extra_loss=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = _x().requires_grad_(True)
    y = model(x)
    loss = (y * torch.linspace(-1, 1, D)).sum() + (extra_loss() if extra_loss else 0)
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, [x, *params])
    return y.detach(), list(grads)


def _converted(stock: nn.Module) -> nn.Module:
    return convert(copy.deepcopy(stock), example_inputs=((_x(),), {}), norms=False, activations="recompute")


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    stock = Stack().train()
    return stock, _converted(stock)


def _assert_same(stock: nn.Module, model: nn.Module, stock_loss=None, model_loss=None) -> None:
    """Outputs bit for bit, gradients within 1e-5; ``*_loss``: an extra loss term for each model."""
    (y0, g0), (y1, g1) = _run(stock, stock_loss), _run(model, model_loss)
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1, strict=True):
        assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5


def test_split_mlp_recomputes_exactly_and_keeps_fewer_bytes() -> None:
    stock, model = _pair()
    sites = model.lowmembp_report.plan.activations
    assert [s.recompute.layout for s in sites] == ["handoff", "handoff"], [s.reason for s in sites]
    assert type(model.layers[0].intermediate.act) is HandoffActivation
    assert type(model.layers[0].output.dense) is HandoffLinear
    assert model.state_dict().keys() == stock.state_dict().keys()
    _assert_same(stock, model)
    approx = convert(copy.deepcopy(stock), example_inputs=((_x(),), {}), norms=False, activations="approx")

    def saved(m):
        return activation_memory(lambda: m(_x()).sum().backward(), params=m).total

    assert saved(model) < saved(approx) < saved(stock)
    assert all(m._mailbox.pending is None for m in model.modules() if hasattr(m, "_mailbox")), "nothing stays"


def test_readers_the_graph_did_not_show_get_their_stock_results() -> None:
    """A hook that replaces the activation's output, and one that keeps it for a later loss term."""
    stock, model = _pair()
    for m in (stock, model):
        m.layers[0].intermediate.register_forward_hook(lambda mod, args, out: out * 2)
    _assert_same(stock, model)
    kept = {}
    for name, m in (("stock", stock), ("model", model)):
        m.layers[1].intermediate.register_forward_hook(lambda mod, args, out, name=name: kept.__setitem__(name, out))
    _assert_same(stock, model, lambda: kept["stock"].square().sum(), lambda: kept["model"].square().sum())


def test_no_grad_takes_the_plain_path() -> None:
    stock, model = _pair()
    with torch.no_grad():
        assert torch.equal(stock(_x()), model(_x()))
    assert all(m._mailbox.pending is None for m in model.modules() if hasattr(m, "_mailbox"))


def test_compile_fullgraph_hands_over_too() -> None:
    stock, model = _pair()
    compiled = torch.compile(model, fullgraph=True)
    assert torch.allclose(compiled(_x()), stock(_x()), rtol=1e-5, atol=1e-6)

    def saved(m):
        return activation_memory(lambda: m(_x()).sum().backward(), params=model).total

    assert saved(compiled) <= saved(model)
    assert all(m._mailbox.pending is None for m in model.modules() if hasattr(m, "_mailbox"))


def test_copies_and_pickles_keep_the_pair_linked() -> None:
    torch.manual_seed(0)
    model = _converted(Stack().train())
    for again in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        layer = again.layers[0]
        assert layer.intermediate.act._mailbox is layer.output.dense._mailbox
        assert layer.intermediate.act._mailbox is not model.layers[0].intermediate.act._mailbox
        _assert_same(model, again)


@pytest.mark.parametrize("family", ["roberta", "bert"])
def test_bert_family_intermediate_hands_over_to_output_dense(family: str) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config_cls, model_cls = {
        "roberta": (transformers.RobertaConfig, transformers.RobertaForMaskedLM),
        "bert": (transformers.BertConfig, transformers.BertForMaskedLM),
    }[family]
    config = config_cls(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    stock = model_cls(config).train()
    model = convert(copy.deepcopy(stock), norms=False, activations="recompute")  # exact: the head's GELU stays
    sites = [s for s in model.lowmembp_report.plan.activations if ".intermediate." in s.module]
    assert len(sites) == 2 and all(s.option == "recompute" and s.recompute.layout == "handoff" for s in sites)
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(1))

    def step(m):
        m.zero_grad(set_to_none=True)
        out = m(input_ids=ids).logits
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return out.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    (y0, g0), (y1, g1) = step(stock), step(model)
    assert torch.equal(y0, y1) and g0.keys() == g1.keys()
    for name in g0:
        assert ((g0[name] - g1[name]).abs().max() / g0[name].abs().max()).item() < 1e-5, name


def _in_place_on_intermediate(m):
    m.layers[0].intermediate.register_forward_hook(lambda mod, args, out: out.mul_(0.5))


def _in_place_pre_hook_on_consumer(m):
    m.layers[1].output.dense.register_forward_pre_hook(lambda mod, args: args[0].clamp_(max=0.1))


def _checkpointed_output_only(m):
    from torch.utils.checkpoint import checkpoint

    for layer in m.layers:
        forward = layer.output.forward
        layer.output.forward = lambda *a, forward=forward: checkpoint(forward, *a, use_reentrant=False)


CHANGES = [_in_place_on_intermediate, _in_place_pre_hook_on_consumer, _checkpointed_output_only]


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__)
def test_in_place_edits_and_a_checkpoint_around_the_consumer_alone_take_the_plain_path(change) -> None:
    """An in-place edit keeps the same tensor object (caught by its version), and a checkpoint around
    the consumer alone would recompute it without the hand-off (caught by the saved-tensor hooks)."""
    stock, model = _pair()
    change(stock)
    change(model)
    _assert_same(stock, model)
    compiled = torch.compile(model, fullgraph=True) if change is not _checkpointed_output_only else None
    if compiled is not None:  # compiled code cannot read versions: the hook on the path switches it off
        assert torch.allclose(compiled(_x()), stock(_x()), rtol=1e-5, atol=1e-6)


class UntraceableLayer(nn.Module):
    """BART / Whisper encoder layer's shape: fc1 -> act -> dropout(p=0) -> fc2 in one forward that
    torch.fx cannot trace (a Python branch on a tensor's dtype), so the container is not rewritten
    and the pair hands over instead."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(D, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, D)
        self.activation_dropout = 0.0

    def forward(self, x):
        h = self.act(self.fc1(x))
        h = nn.functional.dropout(h, p=self.activation_dropout, training=self.training)
        y = self.fc2(h) + x
        if y.dtype == torch.float16:  # as BART: a branch on a tensor's dtype, which torch.fx cannot trace
            y = y.clamp(-1e4, 1e4)
        return y


def test_a_container_fx_cannot_trace_hands_over_between_its_children() -> None:
    torch.manual_seed(0)
    stock = nn.Sequential(UntraceableLayer(), UntraceableLayer()).train()
    model = convert(copy.deepcopy(stock), example_inputs=((_x(),), {}), norms=False)
    sites = model.lowmembp_report.plan.activations
    assert all(s.option == "recompute" and s.recompute.layout == "handoff" for s in sites), [s.reason for s in sites]
    assert isinstance(model[0].act, HandoffActivation) and isinstance(model[0].fc2, HandoffLinear)
    x = _x()
    y0, y1 = stock(x), model(x)
    assert torch.equal(y0, y1)
    g0 = torch.autograd.grad(y0.square().sum(), list(stock.parameters()))
    g1 = torch.autograd.grad(y1.square().sum(), list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))
    saved = [activation_memory(lambda m=m: m(x).sum(), params=m).total for m in (stock, model)]
    assert saved[1] < saved[0]
    # a dropout switched on later: another tensor reaches fc2, which then runs plainly (exact)
    for m in (stock, model):
        for layer in m:
            layer.activation_dropout = 0.5
    torch.manual_seed(1)
    z0 = stock(x)
    torch.manual_seed(1)
    z1 = model(x)
    assert torch.equal(z0, z1)
