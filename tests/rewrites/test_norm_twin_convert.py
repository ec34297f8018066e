"""convert() on post-norm toy blocks: the consumer Linears become TwinLinear (visible, same Parameters),
and under autocast the norm and its Linears keep one bf16 tensor, through a view, eager and compiled."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from lowmembp_convert import convert
from lowmembp_convert.memory import activation_memory
from lowmembp_convert.nn.linear import TwinLinear

B, T, C = 2, 8, 32


class PostNorm(nn.Module):
    """BERT-style: norm(x + inner(x)) feeds the residual and two Linears, through views that keep the
    channel dim (a sequence-first transpose, a flatten of batch and tokens)."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(C, C)
        self.norm = nn.LayerNorm(C)
        self.q, self.fc = nn.Linear(C, C), nn.Linear(C, C)

    def forward(self, x):
        y = self.norm(x + self.inner(x))
        q = self.q(y.transpose(0, 1)).transpose(0, 1)
        return self.fc(y.flatten(0, 1)).view(B, T, C) + q + y


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = PostNorm()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.normal_()
    return model.train()


def _x() -> torch.Tensor:
    return torch.randn(B, T, C, generator=torch.Generator().manual_seed(1)) * 2


def _autocast_step(model, x, params=None):
    params = model if params is None else params
    params.zero_grad()
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().pow(2).mean().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in params.named_parameters()}


def test_consumers_become_twin_linears_holding_the_same_parameters():
    model = _model()
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    convert(model, example_inputs=((_x(),), {}), activations=False)
    site = model.lowmembp_report.plan.norm("norm")
    assert site.action == "keep_affine" and not site.autocast_output
    assert type(model.q) is TwinLinear and type(model.fc) is TwinLinear
    assert type(model.inner) is nn.Linear, "only the norm's consumers are swapped"
    assert dict(model.named_parameters()) == params and all(params[n] is p for n, p in model.named_parameters())
    assert list(model.state_dict()) == keys
    printed = str(model)
    assert "(q): TwinLinear(" in printed and "(fc): TwinLinear(" in printed and "autocast_twin=True" in printed
    assert any(
        "2 Linear layer(s) fed by a post-norm MS norm became TwinLinear" in n for n in model.lowmembp_report.notes
    )


def test_converted_block_is_exact_and_keeps_one_bf16_tensor_for_norm_and_linears():
    stock = _model()
    model = convert(copy.deepcopy(stock), example_inputs=((_x(),), {}), activations=False)
    x = _x()
    out_stock, dx_stock, _ = _autocast_step(stock, x)
    out, dx, _ = _autocast_step(model, x)
    torch.testing.assert_close(out, out_stock, rtol=1e-5, atol=1e-5)  # the MS norm's fp32 rounding
    assert (dx - dx_stock).norm() <= 0.01 * dx_stock.norm()

    def saved_by(m):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                m(x.clone().requires_grad_(True)).float().sum()

        return activation_memory(run, params=m, explain=True)

    saved = saved_by(model)
    # (no channel is ill-conditioned here: the kept-channel buffers the norm saves beside them are empty)
    by_norm = [t for t in saved.tensors if any(s.startswith("norm (MSLayerNorm)") for s in t.savers) and t.nbytes]
    twin = [t for t in by_norm if t.dtype == "bfloat16"]
    assert len(by_norm) == 2 and len(twin) == 1, [str(t) for t in by_norm]  # the twin and rstd
    assert {s.split(" ")[0] for s in twin[0].savers} == {"norm", "q", "fc"}, str(twin[0])
    assert not any(t.dtype == "float32" and t.nbytes == B * T * C * 4 for t in by_norm), "no fp32 y"
    assert saved.total < saved_by(stock).total


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_converted_block_compiles_fullgraph_and_keeps_no_more_than_eager(backend):
    model = convert(_model(), example_inputs=((_x(),), {}), activations=False)
    x = _x()
    eager = _autocast_step(model, x)

    def saved_by(m):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                m(x.clone().requires_grad_(True)).float().sum()

        return activation_memory(run, params=model).total

    eager_bytes = saved_by(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    got = _autocast_step(compiled, x, params=model)
    torch.testing.assert_close(got[0], eager[0], rtol=2e-2, atol=2e-2)
    assert (got[1] - eager[1]).norm() <= 0.01 * eager[1].norm()
    assert saved_by(compiled) <= eager_bytes


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=32,
    )  # fmt: skip
    model = BertModel(config).train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    return model


def _bert_step(model, ids):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids).last_hidden_state
    out.float().pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_bert_under_save_on_cpu_and_non_reentrant_checkpointing_shares_and_matches():
    """HF BERT (post-norm) converted, under bf16 autocast: offloading is handed one twin per norm and
    its Linears, and HF's non-reentrant gradient checkpointing recomputes the same step."""
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    model = convert(_tiny_bert(), example_inputs=((), {"input_ids": ids}))
    assert sum(type(m) is TwinLinear for m in model.modules()) >= 4
    out, grads = _bert_step(model, ids)

    packs = {}

    def pack(t):
        if t.dtype == torch.bfloat16 and t.dim() == 3:
            packs[t.untyped_storage().data_ptr()] = packs.get(t.untyped_storage().data_ptr(), 0) + 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        got, got_grads = _bert_step(model, ids)
    assert torch.equal(got, out) and all(torch.equal(got_grads[n], g) for n, g in grads.items())
    # each post-norm norm's twin is packed once by the norm and once by each consumer Linear
    assert sorted(packs.values()).count(4) >= 2 and sorted(packs.values()).count(2) >= 2, packs
    with torch.autograd.graph.save_on_cpu():
        got, got_grads = _bert_step(model, ids)
    assert torch.equal(got, out) and all(torch.equal(got_grads[n], g) for n, g in grads.items())

    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    got, got_grads = _bert_step(model, ids)
    assert torch.equal(got, out) and all(torch.equal(got_grads[n], g) for n, g in grads.items())
