"""convert() on a model already wrapped (DDP, DataParallel, torch.compile) converts the model inside.

Oracle: the stock model (a deep copy, unwrapped) for outputs and gradients; the wrapper must be
returned as it was (same object, same inner object) with the inner model rewritten.
"""

from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from tiny_zoo import FAMILIES, assert_grads_match, forward, projection_loss

from lowmembp_convert import convert
from lowmembp_convert.api import unwrap


def _stock_and_inputs():
    family = FAMILIES["llama"]
    model = family.make().train()
    return model, family.inputs(0, 2)


def _grads(model: nn.Module, inputs) -> dict[str, torch.Tensor]:
    model.zero_grad()
    projection_loss(forward(model, inputs)).backward()
    return {n.removeprefix("module.").removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}


def _check(wrapper: nn.Module, stock: nn.Module, inputs) -> None:
    inner_before, names = unwrap(wrapper)
    assert names
    assert convert(wrapper) is wrapper
    assert unwrap(wrapper)[0] is inner_before
    report = wrapper.lowmembp_report
    assert report is inner_before.lowmembp_report
    assert report.converted_norms and any(s.option == "recompute" for s in report.plan.activations), str(report)
    assert any(names[0] in note for note in report.notes)
    assert_grads_match(_grads(inner_before, inputs), _grads(stock, inputs))


def test_data_parallel() -> None:
    stock, inputs = _stock_and_inputs()
    _check(nn.DataParallel(copy.deepcopy(stock)), stock, inputs)


def test_compiled_module_is_converted_inside_without_compiling() -> None:
    stock, inputs = _stock_and_inputs()
    compiled = torch.compile(copy.deepcopy(stock))
    _check(compiled, stock, inputs)


def test_nested_wrappers() -> None:
    stock, inputs = _stock_and_inputs()
    wrapper = nn.DataParallel(torch.compile(copy.deepcopy(stock)))
    assert unwrap(wrapper)[1] == ["DataParallel", "OptimizedModule"]
    _check(wrapper, stock, inputs)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed without gloo")
def test_distributed_data_parallel_one_process() -> None:
    stock, inputs = _stock_and_inputs()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(stock))
        _check(ddp, stock, inputs)
        # DDP's reducer still owns the same parameters: a step through the wrapper averages and applies
        ddp.zero_grad()
        projection_loss(forward(ddp, inputs)).backward()
        assert all(p.grad is not None for p in ddp.parameters() if p.requires_grad)
    finally:
        dist.destroy_process_group()
