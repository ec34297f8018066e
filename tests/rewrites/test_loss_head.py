"""The exact loss head (lm_head + transformers' causal-LM loss) keeps nothing of rows x vocabulary.

Oracles: the stock model (a deep copy) for loss, logits and every gradient; a float64 copy for the
size of the rounding in bf16; saved-tensor hooks for the bytes.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from lowmembp_convert import activation_memory, convert
from lowmembp_convert.nn.loss_head import ExactHeadLoss, LossHeadLinear
from lowmembp_convert.ops.linear_cross_entropy import chunk_rows_for, linear_cross_entropy

tr = pytest.importorskip("transformers")
VOCAB, SEQ = 2000, 24


def _llama(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tr.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=VOCAB, **kwargs,
    )  # fmt: skip
    model = tr.LlamaForCausalLM(cfg).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    return model


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    labels = ids.clone()
    labels[0, :5] = -100  # prompt tokens
    return ids, labels


def _step(model, loss_of=lambda out: out.loss, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**kwargs)
    loss_of(out).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


def _pair(**kwargs):
    stock = _llama(**kwargs)
    model = convert(copy.deepcopy(stock))
    site = model.lowmembp_report.plan.loss_heads[0]
    assert site.action == "exact", site.reason
    assert isinstance(model.lm_head, LossHeadLinear) and isinstance(model.loss_function, ExactHeadLoss)
    return stock, model


def _assert_close(g0: dict, g1: dict, rtol: float = 2e-5) -> None:
    assert g0.keys() == g1.keys()
    for n in g0:
        err = (g0[n] - g1[n]).abs().max().item()
        assert err <= rtol * g0[n].abs().max().item() + 1e-12, (n, err)


@pytest.mark.parametrize("tie", [False, True])
def test_loss_logits_and_every_gradient_are_stock(tie: bool) -> None:
    stock, model = _pair(tie_word_embeddings=tie)
    ids, labels = _batch()
    l0, y0, g0 = _step(stock, input_ids=ids, labels=labels)
    l1, y1, g1 = _step(model, input_ids=ids, labels=labels)
    assert model.loss_function.calls == {"exact": 1, "stock": 0}
    assert torch.equal(y0, y1)
    assert abs(l0 - l1) <= 2e-6 * abs(l0)  # the order of a float32 sum
    _assert_close(g0, g1)


def test_nothing_of_rows_times_vocabulary_is_kept() -> None:
    stock, model = _pair()
    ids, labels = _batch()
    saved = [
        activation_memory(lambda m=m: m(input_ids=ids, labels=labels).loss, params=m).total for m in (stock, model)
    ]
    rows = ids.numel()
    assert saved[0] - saved[1] >= 4 * rows * VOCAB  # at least the float32 log-probabilities
    assert saved[1] < 4 * rows * VOCAB / 2  # and everything else is far smaller than one of them


def test_num_items_in_batch_shift_labels_and_logits_to_keep() -> None:
    stock, model = _pair()
    ids, labels = _batch()
    n = torch.tensor(17)
    cases = [
        dict(input_ids=ids, labels=labels, num_items_in_batch=n),  # gradient accumulation's sum / n
        dict(input_ids=ids, labels=labels, shift_labels=torch.roll(labels, -2, 1)),
        dict(input_ids=ids, labels=labels[:, -6:], logits_to_keep=6),
    ]
    for kwargs in cases:
        l0, y0, g0 = _step(stock, **kwargs)
        l1, y1, g1 = _step(model, **kwargs)
        assert torch.equal(y0, y1) and abs(l0 - l1) <= 2e-6 * abs(l0), kwargs.keys()
        _assert_close(g0, g1)
    assert model.loss_function.calls["stock"] == 0


def test_logits_used_by_the_user_keep_their_gradient() -> None:
    stock, model = _pair()
    ids, labels = _batch()

    def both(out):
        return out.loss + 0.1 * out.logits.float().square().mean()

    _, _, g0 = _step(stock, both, input_ids=ids, labels=labels)
    _, _, g1 = _step(model, both, input_ids=ids, labels=labels)
    _assert_close(g0, g1)


def test_eval_and_no_grad_take_the_stock_loss() -> None:
    stock, model = _pair()
    ids, labels = _batch()
    with torch.no_grad():
        l0, l1 = stock(input_ids=ids, labels=labels).loss, model(input_ids=ids, labels=labels).loss
    assert torch.equal(l0, l1)  # the very stock function
    assert model.loss_function.calls == {"exact": 0, "stock": 1}


def test_logits_changed_after_the_head_take_the_stock_loss() -> None:
    """A hook that edits the head's output in place: the loss gets something the mailbox did not see."""
    stock, model = _pair()
    ids, labels = _batch()
    for m in (stock, model):
        m.lm_head.register_forward_hook(lambda mod, args, out: out.mul_(0.5))
    l0, _, g0 = _step(stock, input_ids=ids, labels=labels)
    l1, _, g1 = _step(model, input_ids=ids, labels=labels)
    assert torch.equal(l0, l1)
    _assert_close(g0, g1)
    assert model.loss_function.calls["exact"] == 0


def test_bf16_gradients_within_stock_rounding_against_float64() -> None:
    stock = _llama().to(torch.bfloat16)
    model = convert(copy.deepcopy(stock))
    oracle = copy.deepcopy(stock).double()
    ids, labels = _batch()
    _, _, g64 = _step(oracle, input_ids=ids, labels=labels)
    _, _, g0 = _step(stock, input_ids=ids, labels=labels)
    _, _, g1 = _step(model, input_ids=ids, labels=labels)
    assert model.loss_function.calls["exact"] == 1
    scale = max(g.abs().max().item() for g in g64.values())
    for n in g64:
        ref = g64[n]
        floor = max(ref.abs().max().item(), 1e-2 * scale)
        ours, theirs = [(g[n].double() - ref).abs().max().item() / floor for g in (g1, g0)]
        assert ours <= 2 * theirs + 4e-3, (n, ours, theirs)  # bf16: 2^-8 per rounding


def test_gradient_accumulation_trains_like_stock() -> None:
    """Two micro-batches with num_items_in_batch, then an SGD step, three times (a Trainer's loop)."""
    stock, model = _pair()
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (stock, model)]
    losses = [[], []]
    for step in range(3):
        micro = [_batch(10 * step + k) for k in range(2)]
        n = sum(int((labels[:, 1:] != -100).sum()) for _, labels in micro)
        for i, (m, opt) in enumerate(zip((stock, model), opts, strict=True)):
            opt.zero_grad()
            for ids, labels in micro:
                loss = m(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(n)).loss
                loss.backward()
                losses[i].append(loss.item())
            opt.step()
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def _gemma2():
    torch.manual_seed(0)
    cfg = tr.Gemma2Config(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_hidden_layers=1, vocab_size=300, final_logit_softcapping=30.0,
    )  # fmt: skip
    return tr.Gemma2ForCausalLM(cfg).train()


def test_softcapped_logits_replay_the_softcap() -> None:
    """Gemma 2: logits = 30 tanh(lm_head(h) / 30) before the loss. The graph gives the recipe; backward
    replays it for its derivative; the loss and every gradient are the stock ones."""
    stock = _gemma2()
    model = convert(copy.deepcopy(stock))
    (site,) = model.lowmembp_report.plan.loss_heads
    assert site.action == "exact" and [op for op, _a, _k in site.recipe] == [
        "aten.div.Tensor", "aten.tanh.default", "aten.mul.Tensor",
    ]  # fmt: skip
    assert "then div, tanh, mul" in str(model.lowmembp_report)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    l0, y0, g0 = _step(stock, input_ids=ids, labels=ids)
    l1, y1, g1 = _step(model, input_ids=ids, labels=ids)
    assert model.loss_function.calls == {"exact": 1, "stock": 0}
    assert torch.equal(y0, y1) and abs(l0 - l1) <= 2e-6 * abs(l0)
    _assert_close(g0, g1)


def test_a_softcap_changed_after_convert_takes_the_stock_loss() -> None:
    stock = _gemma2()
    model = convert(copy.deepcopy(stock))
    for m in (stock, model):
        m.config.final_logit_softcapping = 5.0
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    l0, _, g0 = _step(stock, input_ids=ids, labels=ids)
    l1, _, g1 = _step(model, input_ids=ids, labels=ids)
    assert model.loss_function.calls == {"exact": 0, "stock": 1}  # the recipe no longer reproduces the logits
    assert torch.equal(l0, l1)
    _assert_close(g0, g1)


def test_a_peft_lm_head_stays_stock() -> None:
    peft = pytest.importorskip("peft")
    base = _llama()
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    convert(model)
    (site,) = model.lowmembp_report.plan.loss_heads
    assert site.action == "skip" and "not a plain nn.Linear" in site.reason


def test_pickle_and_deepcopy_keep_the_pair() -> None:
    _, model = _pair()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.loss_function._head() is clone.lm_head
        ids, labels = _batch()
        clone(input_ids=ids, labels=labels).loss.backward()
        assert clone.loss_function.calls["exact"] >= 1


def test_loss_head_false_leaves_it() -> None:
    model = convert(_llama(), loss_head=False)
    assert not model.lowmembp_report.plan.loss_heads
    assert type(model.lm_head) is not LossHeadLinear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_the_op_against_cross_entropy(dtype, chunk) -> None:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(50, 16, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(300, 16, generator=gen) * 0.3).to(dtype).requires_grad_()
    b = torch.randn(300, generator=gen).to(dtype).requires_grad_()
    t = torch.randint(0, 300, (50,), generator=gen)
    t[::4] = -100
    logits = F.linear(h, w, b)
    l0 = F.cross_entropy(logits.float(), t)
    g0 = torch.autograd.grad(l0, (h, w, b))
    l1 = linear_cross_entropy(h, w, b, logits, t, chunk=chunk)
    g1 = torch.autograd.grad(l1, (h, w, b))
    assert abs(l0 - l1) <= 1e-6 * abs(l0)
    tol = 1e-6 if dtype == torch.float32 else 8e-3  # bf16 weight gradient: one rounding of a sum
    for a, c in zip(g0, g1, strict=True):
        assert ((a - c).abs().max() / a.abs().max()).item() <= tol
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(linear_cross_entropy(h, w, b, F.linear(h, w, b), t), h, create_graph=True)


def test_chunk_rows_follow_the_vocabulary() -> None:
    assert chunk_rows_for(10, 300) == 10
    assert chunk_rows_for(100_000, 151_936) == 64  # 64 MiB of float32 logits, 64 rows at least
    assert chunk_rows_for(100_000, 1000) == 16384


def test_hf_trainer_with_gradient_accumulation_logs_the_stock_losses(tmp_path) -> None:
    """transformers' Trainer passes num_items_in_batch with gradient accumulation: the converted model's
    logged losses and final weights are the stock run's."""
    pytest.importorskip("accelerate")
    gen = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(8):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=gen)
        labels = ids.clone()
        labels[: int(torch.randint(1, 8, (1,), generator=gen))] = -100  # prompts of different lengths
        rows.append({"input_ids": ids, "labels": labels})

    def train(model) -> tuple[list[float], dict]:
        args = tr.TrainingArguments(
            output_dir=str(tmp_path / str(id(model))), per_device_train_batch_size=2, gradient_accumulation_steps=2,
            max_steps=2, learning_rate=0.05, optim="sgd", lr_scheduler_type="constant", logging_steps=1,
            report_to=[], save_strategy="no", use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
        )  # fmt: skip
        trainer = tr.Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}

    stock, model = _pair()
    l0, w0 = train(stock)
    l1, w1 = train(model)
    assert model.loss_function.calls["exact"] >= 4 and len(l0) == 2
    assert l0 == pytest.approx(l1, rel=1e-5)
    for k in w0:
        assert torch.allclose(w0[k], w1[k], rtol=1e-5, atol=1e-6), k
