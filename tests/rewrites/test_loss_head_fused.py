"""The fused loss head (``loss_head="fused"``): no B x T x V tensor at any time of a training step.

Oracles: the stock model (a deep copy) for the loss and every gradient; a float64 copy for the size
of the rounding in bf16; saved-tensor hooks for what is kept; a TorchDispatchMode that sees every
tensor any op returns, for what is ever allocated.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from test_loss_head import SEQ, VOCAB, _assert_close, _batch, _gemma2, _llama, _step
from torch.utils._python_dispatch import TorchDispatchMode

from lowmembp_convert import convert, plan_conversion
from lowmembp_convert.nn.fused_logits import FusedLogits, FusedLogitsError
from lowmembp_convert.nn.loss_head import ExactHeadLoss, LossHeadLinear
from lowmembp_convert.ops.fused_linear_cross_entropy import fused_linear_cross_entropy
from lowmembp_convert.plan import Plan
from lowmembp_convert.rewrites.loss_head import find_loss_heads, plan_loss_heads

tr = pytest.importorskip("transformers")
ROWS = 2 * SEQ  # the batch of _batch()


def _fused(stock: torch.nn.Module) -> torch.nn.Module:
    model = convert(copy.deepcopy(stock), loss_head="fused")
    (site,) = model.lowmembp_report.plan.loss_heads
    assert site.action == "fused", site.reason
    assert isinstance(model.lm_head, LossHeadLinear) and isinstance(model.loss_function, ExactHeadLoss)
    return model


def _fused_step(model, **kwargs):
    """A training step on the fused model: (loss, the placeholder, every gradient)."""
    model.zero_grad(set_to_none=True)
    out = model(**kwargs)
    assert isinstance(out.logits, FusedLogits)
    out.loss.backward()
    return out.loss.detach(), out.logits, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _same_loss(l0: torch.Tensor, l1: torch.Tensor) -> None:
    assert abs(l0 - l1) <= 2e-6 * abs(l0), (l0, l1)  # the order of a float32 sum


@pytest.mark.parametrize("tie", [False, True])
def test_loss_and_every_gradient_are_stock(tie: bool) -> None:
    stock = _llama(tie_word_embeddings=tie)
    model = _fused(stock)
    ids, labels = _batch()
    l0, y0, g0 = _step(stock, input_ids=ids, labels=labels)
    l1, y1, g1 = _fused_step(model, input_ids=ids, labels=labels)
    assert model.loss_function.calls == {"exact": 0, "stock": 0, "fused": 1}
    assert (y1.shape, y1.dtype, y1.device) == (y0.shape, y0.dtype, y0.device)
    _same_loss(l0, l1)
    _assert_close(g0, g1, rtol=1e-6)


def test_ignore_index_shift_labels_num_items_and_logits_to_keep() -> None:
    stock = _llama()
    model = _fused(stock)
    ids, labels = _batch()
    cases = [
        dict(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(17)),  # gradient accumulation's sum / n
        dict(input_ids=ids, labels=labels, shift_labels=torch.roll(labels, -2, 1)),
        dict(input_ids=ids, labels=labels[:, -6:], logits_to_keep=6),
        dict(input_ids=ids, labels=torch.where((labels == -100) | (labels % 3 == 0), 7, labels), ignore_index=7),
    ]
    for kwargs in cases:
        l0, y0, g0 = _step(stock, **kwargs)
        l1, y1, g1 = _fused_step(model, **kwargs)
        assert y1.shape == y0.shape, kwargs.keys()
        _same_loss(l0, l1)
        _assert_close(g0, g1, rtol=1e-6)
    assert model.loss_function.calls == {"exact": 0, "stock": 0, "fused": len(cases)}


def test_bf16_gradients_within_stock_rounding_against_float64() -> None:
    stock = _llama().to(torch.bfloat16)
    model = _fused(stock)
    oracle = copy.deepcopy(stock).double()
    ids, labels = _batch()
    _, _, g64 = _step(oracle, input_ids=ids, labels=labels)
    l0, _, g0 = _step(stock, input_ids=ids, labels=labels)
    l1, y1, g1 = _fused_step(model, input_ids=ids, labels=labels)
    assert y1.dtype == torch.bfloat16 and abs(l0 - l1) <= 1e-4 * abs(l0)  # the converted blocks round in bf16 too
    scale = max(g.abs().max().item() for g in g64.values())
    for n in g64:
        ref = g64[n]
        floor = max(ref.abs().max().item(), 1e-2 * scale)
        ours, theirs = [(g[n].double() - ref).abs().max().item() / floor for g in (g1, g0)]
        assert ours <= 2 * theirs + 4e-3, (n, ours, theirs)  # bf16: 2^-8 per rounding


def test_cpu_autocast_gives_the_autocast_dtype_and_stock_gradients() -> None:
    stock = _llama()
    model = _fused(stock)
    oracle = copy.deepcopy(stock).double()
    ids, labels = _batch()
    _, _, g64 = _step(oracle, input_ids=ids, labels=labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        l0, y0, g0 = _step(stock, input_ids=ids, labels=labels)
        l1, y1, g1 = _fused_step(model, input_ids=ids, labels=labels)
    assert y1.dtype == y0.dtype == torch.bfloat16
    assert abs(l0 - l1) <= 1e-5 * abs(l0)
    for n in g64:
        ref = g64[n]
        ours, theirs = [(g[n].double() - ref).abs().max().item() / ref.abs().max().item() for g in (g1, g0)]
        assert ours <= 2 * theirs + 4e-3, (n, ours, theirs)


def test_gemma2_softcap_is_recorded_on_the_placeholder_and_replayed() -> None:
    stock = _gemma2()
    model = _fused(stock)
    assert "fused (asked)" in str(model.lowmembp_report) and "then div, tanh, mul" in str(model.lowmembp_report)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    l0, _, g0 = _step(stock, input_ids=ids, labels=ids)
    l1, y1, g1 = _fused_step(model, input_ids=ids, labels=ids)
    assert "after div, tanh, mul" in repr(y1)
    _same_loss(l0, l1)
    _assert_close(g0, g1, rtol=1e-6)
    model.config.final_logit_softcapping = 5.0  # not what the planner saw: refused at the op, loudly
    with pytest.raises(FusedLogitsError, match=r"aten\.div\.Tensor\(x, 30\.0\).*aten\.div\.Tensor\(x, 5\.0\)"):
        model(input_ids=ids, labels=ids)


def test_the_placeholder_is_loud_on_every_use_and_says_why() -> None:
    model = _fused(_llama())
    ids, labels = _batch()
    out = model(input_ids=ids, labels=labels)
    logits = out.logits
    assert out["loss"] is out.loss and logits.shape == (2, SEQ, VOCAB) and logits.size(-1) == VOCAB
    text = repr(logits)
    assert text.startswith("FusedLogits(shape=[2, 24, 2000]") and "no values" in text and str(logits) == text
    for use in (
        lambda: logits.argmax(-1),
        lambda: logits + 1,
        lambda: logits.cpu(),
        lambda: logits.to("cpu"),
        lambda: logits[:, -1],
        lambda: logits.view(-1, VOCAB),
        lambda: logits.tolist(),
        lambda: logits.numpy(),
        lambda: F.cross_entropy(logits.flatten(0, 1), labels.flatten()),
        lambda: torch.save(logits, "/dev/null"),
    ):
        with pytest.raises(FusedLogitsError, match=r'loss_head="fused".*torch\.no_grad\(\).*loss_head=True'):
            use()
    # copies that read no values stay placeholders (accelerate's fp32 output conversion, DDP's pass-through)
    for copied in (logits.float(), logits.to(torch.bfloat16), logits.detach(), logits.clone()):
        assert isinstance(copied, FusedLogits)
        with pytest.raises(FusedLogitsError):
            copied.sum()
    with pytest.raises(FusedLogitsError, match="computed already"):  # one loss per placeholder
        model.loss_function(logits, labels, VOCAB)
    out.loss.backward()


def test_without_labels_the_placeholder_holds_the_place_and_eval_or_no_grad_give_real_logits() -> None:
    stock = _llama()
    model = _fused(stock)
    ids, labels = _batch()
    assert isinstance(model(input_ids=ids).logits, FusedLogits)
    with torch.no_grad():
        y0, y1 = stock(input_ids=ids).logits, model(input_ids=ids, labels=labels).logits
    assert type(y1) is torch.Tensor and torch.equal(y0, y1)
    model.eval()
    stock.eval()
    l0, y0, g0 = _step(stock, input_ids=ids, labels=labels)
    l1, y1, g1 = _step(model, input_ids=ids, labels=labels)  # eval with autograd: real logits, the exact path
    assert type(y1) is torch.Tensor and torch.equal(y0, y1)
    assert model.loss_function.calls == {"exact": 1, "stock": 1, "fused": 0}
    _assert_close(g0, g1)


def test_a_hooked_head_returns_real_logits() -> None:
    stock = _llama()
    model = _fused(stock)
    seen = []
    model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(type(out)))
    ids, labels = _batch()
    l0, y0, g0 = _step(stock, input_ids=ids, labels=labels)
    l1, y1, g1 = _step(model, input_ids=ids, labels=labels)
    assert seen == [torch.Tensor] and torch.equal(y0, y1) and torch.equal(l0, l1)
    _assert_close(g0, g1)


def test_a_frozen_head_keeps_no_weight_gradient() -> None:
    stock = _llama()
    stock.lm_head.weight.requires_grad_(False)
    model = _fused(stock)
    ids, labels = _batch()
    l0, _, g0 = _step(stock, input_ids=ids, labels=labels)
    kept = _saved_shapes(lambda: model(input_ids=ids, labels=labels).loss)
    l1, _, g1 = _fused_step(model, input_ids=ids, labels=labels)
    assert "lm_head.weight" not in g1
    assert not any(VOCAB in s for s in kept), kept  # no dW (vocab x hidden), nothing of rows x vocab
    _same_loss(l0, l1)
    _assert_close(g0, g1, rtol=1e-6)


def _saved_shapes(run) -> list[tuple[int, ...]]:
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return shapes


def test_nothing_of_rows_times_vocabulary_is_kept() -> None:
    stock = _llama()
    model = _fused(stock)
    ids, labels = _batch()
    kept = [_saved_shapes(lambda m=m: m(input_ids=ids, labels=labels).loss) for m in (stock, model)]
    big = [s for s in kept[0] if torch.Size(s).numel() >= ROWS * VOCAB]
    assert big, "the meter sees stock's rows x vocabulary"
    assert max(torch.Size(s).numel() for s in kept[1]) < ROWS * VOCAB, kept[1]
    hidden = model.config.hidden_size
    assert (ROWS, hidden) in kept[1] and (VOCAB, hidden) in kept[1]  # float32 dh and dW, as documented


class _Allocations(TorchDispatchMode):
    """The shape of every tensor any op returns (placeholders, which have no storage, aside)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not isinstance(t, FusedLogits):
                self.shapes.append(tuple(t.shape))
        return out


def test_no_tensor_of_rows_times_vocabulary_is_ever_allocated() -> None:
    stock = _llama()
    model = _fused(stock)
    model.loss_function.chunk = 8
    ids, labels = _batch()
    seen = []
    for m in (stock, model):
        with _Allocations() as meter:
            m(input_ids=ids, labels=labels).loss.backward()
        seen.append(meter.shapes)
    assert max(torch.Size(s).numel() for s in seen[0]) >= ROWS * VOCAB  # stock's logits and log-probabilities
    hidden = model.config.hidden_size
    with_vocab = [s for s in seen[1] if VOCAB in s]
    assert with_vocab and all(torch.Size(s).numel() <= max(8, hidden) * VOCAB for s in with_vocab), with_vocab
    assert (8, VOCAB) in seen[1]  # one chunk of logits at a time


def test_grad_accumulation_loop_trains_like_stock() -> None:
    """Two optimizer steps of two micro-batches each, num_items_in_batch as a Trainer passes it."""
    stock = _llama()
    model = _fused(stock)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (stock, model)]
    losses = [[], []]
    for step in range(2):
        micro = [_batch(10 * step + k) for k in range(2)]
        n = sum(int((labels[:, 1:] != -100).sum()) for _, labels in micro)
        for i, (m, opt) in enumerate(zip((stock, model), opts, strict=True)):
            opt.zero_grad()
            for ids, labels in micro:
                out = m(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(n))
                out["loss"].backward()
                losses[i].append(out["loss"].item())
            opt.step()
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for (name, p0), p1 in zip(stock.named_parameters(), model.parameters(), strict=True):
        assert torch.allclose(p0, p1, rtol=1e-5, atol=1e-6), name
    assert model.loss_function.calls["fused"] == 4


def test_hf_trainer_reads_the_loss_and_trains_like_stock(tmp_path) -> None:
    pytest.importorskip("accelerate")
    gen = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(4):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=gen)
        rows.append({"input_ids": ids, "labels": ids.clone()})

    stock = _llama()
    model = _fused(stock)
    logs = {}
    for name, m in (("stock", stock), ("fused", model)):
        args = tr.TrainingArguments(
            output_dir=str(tmp_path / name), per_device_train_batch_size=2, max_steps=2, learning_rate=0.05,
            optim="sgd", lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no",
            use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
        )  # fmt: skip
        trainer = tr.Trainer(model=m, args=args, train_dataset=rows)
        trainer.train()
        logs[name] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(logs["stock"]) == 2 and logs["stock"] == pytest.approx(logs["fused"], rel=1e-5)
    assert model.loss_function.calls["fused"] == 2


def test_options_plan_and_report() -> None:
    with pytest.raises(ValueError, match=r"loss_head must be one of \('exact', 'fused', True, False\)"):
        convert(_llama(), loss_head="chunked")
    exact = convert(_llama(), loss_head="exact")
    (site,) = exact.lowmembp_report.plan.loss_heads
    assert site.action == "exact" and site.extra_head_gemms == {"stock": 0, "exact": 1, "fused": 0}
    assert "loss_head='fused' would keep" in str(exact.lowmembp_report)
    model = _fused(_llama())
    (site,) = model.lowmembp_report.plan.loss_heads
    hidden, rows = model.config.hidden_size, site.estimate["stock"] // (4 * VOCAB)
    assert site.estimate == {"stock": 4 * rows * VOCAB, "exact": 0, "fused": 4 * rows * hidden + 4 * VOCAB * hidden}
    assert site.chunk_rows == rows and site.max_chunk_rows == 8192
    fixed, breakeven = 4 * VOCAB * hidden, site.fused_breakeven_rows  # dW; stock 4 R V against fused 4 R H + dW
    assert 4 * breakeven * VOCAB > 4 * breakeven * hidden + fixed >= 4 * (breakeven - 1) * (VOCAB - hidden)
    line = next(x for x in str(model.lowmembp_report).splitlines() if "loss head" in x)
    assert "fused (asked)" in line and "exact 0 MiB with +1 head GEMM" in line and "chunks of" in line
    assert "fused with the loss" in repr(model.lm_head)


def test_without_the_graph_fused_falls_back_to_exact_and_says_so() -> None:
    model = _llama()
    plan = Plan()
    find_loss_heads(model, plan)
    plan_loss_heads(model, plan, None, None, "fused")  # what a failed capture leaves
    (site,) = plan.loss_heads
    assert site.action == "exact" and "fused was asked" in site.reason
    assert plan_conversion(_llama(), loss_head="fused").loss_heads[0].action == "fused"


def test_measure_memory_runs_with_a_fused_head() -> None:
    model = convert(_llama(), loss_head="fused", measure_memory=True)
    report = model.lowmembp_report
    assert report.bytes_after is not None and report.bytes_after < report.bytes_before


def test_a_loss_called_by_hand_takes_the_placeholder_and_its_float32_cast() -> None:
    stock = _llama().to(torch.bfloat16)
    model = _fused(stock)
    ids, labels = _batch()
    l0 = stock(input_ids=ids, labels=labels).loss
    logits = model(input_ids=ids).logits  # no labels: the model computed no loss
    assert logits.dtype == torch.bfloat16
    l1 = model.loss_function(logits.float(), labels, VOCAB)  # the stock loss upcasts first anyway
    assert abs(l0 - l1) <= 1e-4 * abs(l0)
    with pytest.raises(FusedLogitsError, match="cast to"):
        model.loss_function(model(input_ids=ids).logits.half(), labels, VOCAB)


def test_pickle_and_deepcopy_keep_the_fused_pair() -> None:
    model = _fused(_llama())
    ids, labels = _batch()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.loss_function._head() is clone.lm_head and clone.loss_function.fused
        out = clone(input_ids=ids, labels=labels)
        assert isinstance(out.logits, FusedLogits)
        out.loss.backward()
        assert clone.loss_function.calls["fused"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, None])
def test_the_op_against_cross_entropy(dtype, chunk) -> None:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(50, 16, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(300, 16, generator=gen) * 0.3).to(dtype).requires_grad_()
    b = torch.randn(300, generator=gen).to(dtype).requires_grad_()
    t = torch.randint(0, 300, (50,), generator=gen)
    t[::4] = -100
    l0 = F.cross_entropy(F.linear(h, w, b).float(), t)
    g0 = torch.autograd.grad(l0 * 3.0, (h, w, b))
    l1 = fused_linear_cross_entropy(h, w, b, t, chunk=chunk)
    g1 = torch.autograd.grad(l1 * 3.0, (h, w, b))
    assert abs(l0 - l1) <= 1e-6 * abs(l0)
    tol = 1e-6 if dtype == torch.float32 else 8e-3  # bf16 weight gradient: one rounding of a sum
    for a, c in zip(g0, g1, strict=True):
        assert c.dtype == a.dtype and ((a - c).abs().max() / a.abs().max()).item() <= tol
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(fused_linear_cross_entropy(h, w, b, t), h, create_graph=True)


def test_float16_gradients_survive_a_grad_scaler_scale() -> None:
    """float16, sum / 20000 (num_items_in_batch of a large batch) times 65536 (a GradScaler's scale): the
    1/divisor-sized dlogits would sit in float16's subnormals unscaled (error 1.8e-2 on dh); rescaled by a
    power of two they are as close to a float64 reference as stock's."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(64, 16, generator=gen).half().requires_grad_()
    w = (torch.randn(3000, 16, generator=gen) * 0.3).half().requires_grad_()
    t = torch.randint(0, 3000, (64,), generator=gen)
    n, scale = 20000.0, 65536.0
    h64, w64 = (x.detach().double().requires_grad_() for x in (h, w))
    g64 = torch.autograd.grad(F.cross_entropy(F.linear(h64, w64), t, reduction="sum") / n * scale, (h64, w64))
    g0 = torch.autograd.grad(F.cross_entropy(F.linear(h, w).float(), t, reduction="sum") / n * scale, (h, w))
    l1 = fused_linear_cross_entropy(h, w, None, t, divisor=torch.tensor(n), chunk=16)
    g1 = torch.autograd.grad(l1 * scale, (h, w))
    for ref, theirs, ours in zip(g64, g0, g1, strict=True):
        err = [(g.double() - ref).abs().max().item() / ref.abs().max().item() for g in (theirs, ours)]
        assert ours.isfinite().all() and err[1] <= 2 * err[0] + 2e-4, err


def test_a_bf16_model_keeps_its_head_gradients_in_bf16_and_the_planner_says_so() -> None:
    """The gradients computed in the forward are rounded once to the parameters' dtype (as stock's GEMM
    rounds its result): half the bytes of float32 in a bf16 model, as the planner's estimate states."""
    stock = _llama().to(torch.bfloat16)
    model = _fused(stock)
    (site,) = model.lowmembp_report.plan.loss_heads
    assert site.fused_keeps.startswith("bfloat16 dh [rows, hidden], dW [vocab, hidden]")
    ids, labels = _batch()
    kept = []

    def pack(t):
        kept.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=labels).loss
    assert loss.requires_grad
    hidden = model.config.hidden_size
    assert ((VOCAB, hidden), torch.bfloat16) in kept and ((ROWS, hidden), torch.bfloat16) in kept
    assert not any(shape == (VOCAB, hidden) and dtype == torch.float32 for shape, dtype in kept)
