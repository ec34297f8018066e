"""Tests of lowmembp_convert.memory on cases whose saved bytes can be computed by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lowmembp_convert.memory import SavedBytes, activation_memory, per_block_bytes, saved_in_graph


def test_linear_saves_its_input_exactly() -> None:
    layer = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    got = activation_memory(lambda: layer(x).sum(), params=layer)
    assert got.total == x.nbytes
    assert got.storages == 1
    assert got.by_dtype == {"float32": x.nbytes}


def test_parameters_count_unless_excluded() -> None:
    layer = nn.Linear(16, 8, bias=False)
    x = torch.randn(4, 16, requires_grad=True)
    # dx needs W, dW needs x: with nothing excluded both count, the weight once (W.t() is a view).
    assert activation_memory(lambda: layer(x).sum()).total == x.nbytes + layer.weight.nbytes
    assert activation_memory(lambda: layer(x).sum(), params=layer).total == x.nbytes
    assert activation_memory(lambda: layer(x).sum(), params=[layer.weight]).total == x.nbytes


def test_frozen_linear_saves_nothing_but_its_weight() -> None:
    layer = nn.Linear(16, 8).requires_grad_(False)
    x = torch.randn(4, 16, requires_grad=True)
    assert activation_memory(lambda: layer(x).sum(), params=layer).total == 0


def test_view_and_base_count_once() -> None:
    x = torch.randn(8, 8, requires_grad=True)
    got = activation_memory(lambda: (x * x.view(64).view(8, 8)).sum())
    assert (got.total, got.storages) == (x.nbytes, 1)
    # A slice saves its whole storage: the memory stays allocated while the slice is held.
    base = torch.randn(8, 8, requires_grad=True)
    got = activation_memory(lambda: (base[:2] * base[2:4]).sum())
    assert (got.total, got.storages) == (base.nbytes, 1)


def test_gelu_then_linear_saves_two_tensors() -> None:
    model = nn.Sequential(nn.GELU(), nn.Linear(32, 32))
    x = torch.randn(5, 32, requires_grad=True)
    got = activation_memory(lambda: model(x).sum(), params=model)
    assert (got.total, got.storages) == (2 * x.nbytes, 2)


def test_autocast_weight_copies_count() -> None:
    layer = nn.Linear(16, 8, bias=False)
    x = torch.randn(4, 16, requires_grad=True)

    def run() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(x).float().sum()

    got = activation_memory(run, params=layer)
    assert got.by_dtype == {"bfloat16": x.numel() * 2 + layer.weight.numel() * 2}


def test_peak_survives_backward_inside_run() -> None:
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    x = torch.randn(5, 32)
    forward_only = activation_memory(lambda: model(x).sum(), params=model)
    with_backward = activation_memory(lambda: model(x).sum().backward(), params=model)
    assert forward_only.total == with_backward.total == 4 * (5 * 32 + 2 * 5 * 64)


def test_checkpointed_block_saves_only_its_input() -> None:
    block = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    x = torch.randn(5, 32, requires_grad=True)

    def run() -> None:
        torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False).sum().backward()

    assert activation_memory(run, params=block).total == x.nbytes


def test_explain_names_module_and_op() -> None:
    model = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16))
    x = torch.randn(3, 16, requires_grad=True)
    got = activation_memory(lambda: model(x).sum(), params=model, explain=True)
    savers = [s for t in got.tensors for s in t.savers]
    assert any(s.startswith("0 (LayerNorm) layer_norm") for s in savers)
    assert any(s.startswith("1 (Linear) linear") for s in savers)
    assert "MiB" in str(got) and "MiB" in str(got.tensors[0])


def test_per_block_bytes_recovers_bilinear_terms() -> None:
    got = per_block_bytes(lambda d, b: 7 * d * b + 3 * d + 5 * b + 11, depths=(2, 5), batches=(1, 3))
    assert (got.per_block_per_sample, got.per_block, got.per_sample, got.constant) == (7, 3, 5, 11)
    with pytest.raises(ValueError):
        per_block_bytes(lambda d, b: 0, depths=(1, 1))


def test_per_block_bytes_on_a_stack_of_blocks() -> None:
    hidden = 24

    def measure(depth: int, batch: int) -> SavedBytes:
        torch.manual_seed(0)
        blocks = [nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden)) for _ in range(depth)]
        model = nn.Sequential(nn.Linear(hidden, hidden), *blocks)  # the stem saves its input too
        x = torch.randn(batch, hidden)
        return activation_memory(lambda: F.mse_loss(model(x), torch.zeros(batch, hidden)), params=model)

    got = per_block_bytes(measure)
    # GELU input and Linear input, fp32, per sample: 2 * hidden * 4 bytes.
    assert got.per_block_per_sample == 2 * hidden * 4
    assert got.per_block == 0
    assert got.by_dtype == {"float32": 2 * hidden * 4}


class _Stash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.x = x  # escapes saved-tensor hooks on purpose
        return x * x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return 2 * ctx.x * grad


def test_graph_walk_agrees_and_finds_stashed_tensors() -> None:
    model = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    x = torch.randn(4, 16, requires_grad=True)
    outs = []
    hooked = activation_memory(lambda: outs.append(model(x).sum()), params=model)
    walked, stashed = saved_in_graph(outs[0], params=model)
    assert (walked.total, walked.storages) == (hooked.total, hooked.storages)
    assert stashed.total == 0

    y = torch.randn(4, 16, requires_grad=True)
    outs.clear()
    assert activation_memory(lambda: outs.append(_Stash.apply(y))).total == 0
    assert saved_in_graph(outs[0])[1].total == y.nbytes


@pytest.mark.slow
def test_hooks_see_what_a_compiled_graph_saves() -> None:
    """torch.compile saves through CompiledFunction's ctx.save_for_backward, which hooks see."""
    torch._dynamo.reset()
    model = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    compiled = torch.compile(model)
    x = torch.randn(32, 64, requires_grad=True)
    compiled(x).sum().backward()  # compile outside the measurement
    outs = []
    hooked = activation_memory(lambda: outs.append(compiled(x).sum()), params=model)
    walked, stashed = saved_in_graph(outs[0], params=model)
    assert hooked.total > 0
    assert (walked.total, walked.storages) == (hooked.total, hooked.storages)
    assert stashed.total == 0
