"""graph_walk's rule tables, one toy graph per rule.

Each case is ``head(op(norm(x)))``: a norm whose channels sit at a known dim, the op under test inside
a module named ``op`` (so reasons read "view in op ..."), then usually a Linear or convolution named
``head``. The exported graph is walked from the norm's output and the whole WalkResult is compared:
the consumers found (layout, weight, bias, whether they receive the norm's storage itself) and every
blocker, bias blocker, sharing breaker and exact sharer with its reason.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lowmembp_convert.graph_walk import _CONSUMERS, _RULES, WalkResult, _op_key, walk_from

aten = torch.ops.aten
B, T, C = 2, 6, 16


class Op(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.fn(y)


class HFConv1D(nn.Module):
    """transformers' Conv1D: weight [in, out], ``addmm(bias, x, weight)``; ``beta`` scales the bias."""

    def __init__(self, n_in: int, n_out: int, beta: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))
        self.bias = nn.Parameter(torch.randn(n_out))
        self.beta = beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kwargs = {"beta": self.beta} if self.beta != 1.0 else {}
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight, **kwargs)
        return out.view(*x.shape[:-1], -1)


class Toy(nn.Module):
    def __init__(self, fn, norm: nn.Module, head: nn.Module | None):
        super().__init__()
        self.norm, self.op, self.head = norm, Op(fn), head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.op(self.norm(x))
        return self.head(y) if self.head is not None else y


def linear(shares: bool, bias: bool = True) -> tuple:
    return ("linear", "p_head_weight", "p_head_bias" if bias else None, shares, 1, False)


def conv(shares: bool = True, groups: int = 1, padded: bool = False) -> tuple:
    return ("conv", "p_head_weight", "p_head_bias", shares, groups, padded)


@dataclass
class Case:
    """``head(fn(norm(x)))``; ``first``: channels at dim 1 (GroupNorm), else last (LayerNorm)."""

    op: Any  # the rule-table key this case exercises
    fn: Callable[[torch.Tensor], torch.Tensor]
    uses: list[tuple] = field(default_factory=list)
    blockers: list[str] = field(default_factory=list)
    bias: list[str] = field(default_factory=list)
    breakers: list[str] = field(default_factory=list)
    exact: list[str] = field(default_factory=list)
    x: tuple[int, ...] = (B, T, C)
    first: bool = False
    head: Callable[[int], nn.Module | None] = lambda c: nn.Linear(c, 4)


def _case(id_: str, *args, **kwargs):
    return pytest.param(Case(*args, **kwargs), id=id_)


NO_HEAD = {"head": lambda c: None}
MIXES = "mixes the normalized channels with other dims"
ZERO_PAD = "pads with zeros (commutes with a scale, not a shift)"
BAD_PAD = "pads the channels or pads with a nonzero value"
FIRST = {"x": (B, C, T), "first": True}  # channels at dim 1 (GroupNorm)
IMAGE = {"x": (B, C, 4, 4), "first": True}
VOLUME = {"x": (B, C, 2, 2, 2), "first": True}
OTHER_DIM = "contracts a dim other than the normalized channels"
CONV_PAD = "pads with zeros (a shift would leak into the border)"
MAX_MIN = "max/min does not commute with a negative scale"
DROPOUT = "(p=0.1) sits between the norm and its consumer"
MATMUL = "multiplies the normalized channels by a tensor that is not a Linear, Conv1D or convolution weight"
MATMUL += " (e.g. x @ W.T), which a fold cannot edit"


# fmt: off
CASES = [
    # --- linear-like consumers (_CONSUMERS) and the contraction branch of walk_from ---
    _case("linear", aten.linear, lambda y: y, uses=[linear(True)]),
    _case("linear-no-bias", aten.linear, lambda y: y, uses=[linear(True, bias=False)],
          head=lambda c: nn.Linear(c, 4, bias=False)),
    _case("linear-other-dim", aten.linear, lambda y: y, **FIRST, head=lambda c: nn.Linear(T, 4),
          blockers=[f"linear in head {OTHER_DIM}"], exact=[f"linear in head {OTHER_DIM}"]),
    _case("matmul", aten.matmul, lambda y: y @ torch.ones(C, 4), **NO_HEAD,
          blockers=[f"matmul in op {MATMUL}"], exact=[f"matmul in op {MATMUL}"]),
    _case("mm", aten.mm, lambda y: y.view(-1, C).mm(torch.ones(C, 4)), **NO_HEAD,
          blockers=[f"mm in op {MATMUL}"], exact=[f"mm in op {MATMUL}"]),
    _case("bmm", aten.bmm, lambda y: torch.bmm(y, torch.ones(B, C, 4)), **NO_HEAD,
          blockers=[f"bmm in op {MATMUL}"], exact=[f"bmm in op {MATMUL}"]),
    # a copy keeps no storage to share: the contraction is a plain blocker
    _case("matmul-of-a-copy", aten.matmul, lambda y: y.clone() @ torch.ones(C, 4), **NO_HEAD,
          blockers=["matmul in op"]),
    _case("addmm-hf-conv1d", aten.addmm, lambda y: y, head=lambda c: HFConv1D(c, 4),
          uses=[("conv1d", "p_head_weight", "p_head_bias", True, 1, False)]),
    # a beta scales the bias a fold moves into: not a Conv1D consumer
    _case("addmm-beta", aten.addmm, lambda y: y, head=lambda c: HFConv1D(c, 4, beta=0.5),
          blockers=["addmm in head"]),
    _case("conv1d", aten.conv1d, lambda y: y, **FIRST, head=lambda c: nn.Conv1d(c, 4, 1), uses=[conv()]),
    _case("conv2d-padded", aten.conv2d, lambda y: y, **IMAGE, head=lambda c: nn.Conv2d(c, 4, 3, padding=1),
          uses=[conv(padded=True)], bias=[f"conv2d in head {CONV_PAD}"]),
    _case("conv2d-same", aten.conv2d, lambda y: y, **IMAGE, head=lambda c: nn.Conv2d(c, 4, 3, padding="same"),
          uses=[conv(padded=True)], bias=[f"conv2d in head {CONV_PAD}"]),
    _case("conv2d-groups", aten.conv2d, lambda y: y, **IMAGE, head=lambda c: nn.Conv2d(c, 4, 1, groups=2),
          uses=[conv(groups=2)]),
    _case("conv3d", aten.conv3d, lambda y: y, **VOLUME, head=lambda c: nn.Conv3d(c, 4, 1), uses=[conv()]),
    # an unbatched (C, L) input: conv1d's channels are its dim 0, not the norm's dim 1
    _case("conv1d-unbatched", aten.conv1d, lambda y: y, x=(C, T), first=True, head=lambda c: nn.Conv1d(C, 4, 1),
          blockers=["conv1d in head"]),
    # --- the graph's output, unknown and ignored ops ---
    _case("output", "output", lambda y: y, **NO_HEAD, blockers=["returned from the model's forward"]),
    _case("unknown-op", aten.mul, lambda y: y * 2, blockers=["mul in op"]),
    _case("ignored", aten._assert_tensor_metadata,
          lambda y: aten._assert_tensor_metadata(y, dtype=torch.float32) or y, uses=[linear(True)]),
    # --- ops between the norm and its consumers (_RULES) ---
    _case("getitem", operator.getitem, lambda y: aten.native_dropout(y, 0.0, False)[0], uses=[linear(True)]),
    _case("alias", aten.alias, lambda y: aten.alias(y), uses=[linear(True)]),
    _case("detach", aten.detach, lambda y: y.detach(), uses=[linear(True)]),
    _case("lift_fresh_copy", aten.lift_fresh_copy, lambda y: aten.lift_fresh_copy(y), uses=[linear(True)]),
    _case("to-same-dtype", aten.to, lambda y: y.to(torch.float32), uses=[linear(True)]),
    _case("to-other-dtype", aten.to, lambda y: y.to(torch.float64).float(), uses=[linear(False)]),
    _case("to-copy", aten.to, lambda y: y.to(torch.float32, copy=True), uses=[linear(False)]),
    _case("_to_copy", aten._to_copy, lambda y: aten._to_copy(y), uses=[linear(False)]),
    _case("type_as", aten.type_as, lambda y: y.type_as(torch.zeros(())), uses=[linear(True)]),
    # the norm's output only lends its dtype: what the Linear consumes is another tensor
    _case("type_as-other", aten.type_as, lambda y: torch.ones(B, T, C).type_as(y), blockers=["type_as in op"]),
    _case("clone", aten.clone, lambda y: y.clone(), uses=[linear(False)]),
    _case("contiguous", aten.contiguous, lambda y: aten.contiguous(y), uses=[linear(True)]),
    _case("contiguous-copy", aten.contiguous, lambda y: y.transpose(0, 1).contiguous(), uses=[linear(False)]),
    _case("contiguous-channels-last", aten.contiguous, lambda y: y.contiguous(memory_format=torch.channels_last),
          **IMAGE, head=lambda c: nn.Conv2d(c, 4, 1), uses=[conv(shares=False)]),
    _case("view", aten.view, lambda y: y.view(B * T, C), uses=[linear(True)]),
    _case("view-mixing", aten.view, lambda y: y.view(B, T * C), **NO_HEAD, blockers=[f"view in op {MIXES}"]),
    _case("view-dtype", aten.view, lambda y: y.view(torch.int32).float(),
          blockers=["view in op reinterprets the normalized values as another dtype"]),
    _case("_unsafe_view", aten._unsafe_view, lambda y: aten._unsafe_view(y, [B * T, C]), uses=[linear(True)]),
    _case("reshape-copy", aten.reshape, lambda y: y.transpose(0, 1).reshape(T * B, C), uses=[linear(False)]),
    _case("flatten", aten.flatten, lambda y: y.flatten(0, 1), uses=[linear(True)]),
    _case("unflatten", aten.unflatten, lambda y: y.unflatten(1, (2, 3)), uses=[linear(True)]),
    _case("unflatten-channels", aten.unflatten, lambda y: y.unflatten(-1, (4, 4)), **NO_HEAD,
          blockers=[f"unflatten in op {MIXES}"]),
    _case("permute", aten.permute, lambda y: y.permute(0, 2, 1), **FIRST, uses=[linear(True)]),
    _case("transpose", aten.transpose, lambda y: y.transpose(1, 2), **FIRST, uses=[linear(True)]),
    _case("swapaxes", aten.swapaxes, lambda y: y.swapaxes(-1, 1), **FIRST, uses=[linear(True)]),
    _case("t", aten.t, lambda y: y.t().t(), x=(T, C), uses=[linear(True)]),
    _case("unsqueeze", aten.unsqueeze, lambda y: y.unsqueeze(1), uses=[linear(True)]),
    _case("squeeze", aten.squeeze, lambda y: y.unsqueeze(1).squeeze(1), uses=[linear(True)]),
    _case("squeeze-channels", aten.squeeze, lambda y: y.squeeze(-1), x=(B, T, 1), **NO_HEAD,
          blockers=["squeeze in op squeezes the channel dim"]),
    _case("expand", aten.expand, lambda y: y.unsqueeze(0).expand(3, -1, -1, -1), uses=[linear(True)]),
    _case("slice-tokens", aten.slice, lambda y: y[:, 1:], uses=[linear(True)]),
    _case("slice-channels", aten.slice, lambda y: y[..., : C // 2], **NO_HEAD,
          blockers=["slice in op slices the normalized channels"]),
    _case("select-token", aten.select, lambda y: y[:, 0], uses=[linear(True)]),
    _case("select-channel", aten.select, lambda y: y[..., 0], **NO_HEAD, blockers=["select in op selects one channel"]),
    _case("split", aten.split, lambda y: y.split(3, dim=1)[1], uses=[linear(True)]),
    _case("split-channels", aten.split, lambda y: y.split(C // 2, dim=-1)[0], **NO_HEAD,
          blockers=["split in op splits the channels"]),
    _case("split_with_sizes", aten.split_with_sizes, lambda y: y.split([2, 4], dim=1)[1], uses=[linear(True)]),
    _case("chunk", aten.chunk, lambda y: y.chunk(2, 1)[0], uses=[linear(True)]),
    _case("tensor_split", aten.tensor_split, lambda y: torch.tensor_split(y, 2, dim=1)[0], uses=[linear(True)]),
    _case("unbind", aten.unbind, lambda y: y.unbind(1)[0], uses=[linear(True)]),
    _case("unbind-channels", aten.unbind, lambda y: y.unbind(-1)[0], **NO_HEAD,
          blockers=["unbind in op splits the channels"]),
    _case("index-tokens", aten.index, lambda y: y[:, torch.tensor([0, 2])], uses=[linear(False)]),
    _case("index-channels", aten.index, lambda y: y[..., torch.tensor([0, 2])], **NO_HEAD,
          blockers=["index in op indexes the channel dim"]),
    _case("roll-tokens", aten.roll, lambda y: torch.roll(y, 1, dims=1), uses=[linear(False)]),
    _case("roll-flat", aten.roll, lambda y: torch.roll(y, 1), blockers=["roll in op rolls across channels"]),
    _case("roll-channels", aten.roll, lambda y: torch.roll(y, 1, dims=-1), blockers=["roll in op reorders channels"]),
    _case("flip-tokens", aten.flip, lambda y: y.flip(1), uses=[linear(False)]),
    _case("flip-channels", aten.flip, lambda y: y.flip(-1), blockers=["flip in op reorders channels"]),
    _case("adaptive_avg_pool1d", aten.adaptive_avg_pool1d, lambda y: F.adaptive_avg_pool1d(y, 1).flatten(1),
          **FIRST, uses=[linear(False)]),
    _case("adaptive_avg_pool2d", aten.adaptive_avg_pool2d, lambda y: F.adaptive_avg_pool2d(y, 1).flatten(1),
          **IMAGE, uses=[linear(False)]),
    _case("adaptive_avg_pool3d", aten.adaptive_avg_pool3d, lambda y: F.adaptive_avg_pool3d(y, 1).flatten(1),
          **VOLUME, uses=[linear(False)]),
    _case("_adaptive_avg_pool2d", aten._adaptive_avg_pool2d,
          lambda y: aten._adaptive_avg_pool2d(y, [1, 1]).flatten(1), **IMAGE, uses=[linear(False)]),
    _case("adaptive_avg_pool1d-channels", aten.adaptive_avg_pool1d, lambda y: F.adaptive_avg_pool1d(y, 1),
          **NO_HEAD, blockers=["adaptive_avg_pool1d in op pools over the normalized channels"]),
    # an unbatched (C, H, W) input pools its dims 1 and 2: the norm's dim 1 is pooled
    _case("adaptive_avg_pool2d-unbatched", aten.adaptive_avg_pool2d, lambda y: F.adaptive_avg_pool2d(y, 1),
          x=(T, C, 4), first=True, **NO_HEAD,
          blockers=["adaptive_avg_pool2d in op pools over the normalized channels"]),
    _case("mean-tokens", aten.mean, lambda y: y.mean(1), uses=[linear(False)]),
    _case("mean-keepdim", aten.mean, lambda y: y.mean(1, keepdim=True), uses=[linear(False)]),
    _case("mean-channels", aten.mean, lambda y: y.mean(-1), **NO_HEAD, blockers=["mean in op reduces over channels"]),
    _case("mean-all", aten.mean, lambda y: y.mean(), **NO_HEAD, blockers=["mean in op reduces over channels"]),
    # dim=() reduces over every dim
    _case("mean-empty-dims", aten.mean, lambda y: y.mean(dim=()), **NO_HEAD,
          blockers=["mean in op reduces over channels"]),
    _case("sum-tokens", aten.sum, lambda y: y.sum(1), uses=[linear(False)],
          bias=["sum in op sums (commutes with a scale, not a shift)"]),
    _case("amax", aten.amax, lambda y: y.amax(1), blockers=[f"amax in op {MAX_MIN}"]),
    _case("amin", aten.amin, lambda y: y.amin(1), blockers=[f"amin in op {MAX_MIN}"]),
    _case("pad-tokens", aten.pad, lambda y: F.pad(y, (0, 0, 1, 1)), uses=[linear(False)],
          bias=[f"pad in op {ZERO_PAD}"]),
    _case("pad-zero-value", aten.pad, lambda y: F.pad(y, (0, 0, 1, 1), value=0.0), uses=[linear(False)],
          bias=[f"pad in op {ZERO_PAD}"]),
    _case("pad-nothing", aten.pad, lambda y: F.pad(y, (0, 0, 0, 0)), uses=[linear(False)]),
    _case("pad-channels", aten.pad, lambda y: F.pad(y, (1, 1)), **NO_HEAD, blockers=[f"pad in op {BAD_PAD}"]),
    _case("pad-one", aten.pad, lambda y: F.pad(y, (0, 0, 1, 1), value=1.0), blockers=[f"pad in op {BAD_PAD}"]),
    _case("pad-reflect", aten.pad, lambda y: F.pad(y, (1, 1), mode="reflect"), **FIRST, **NO_HEAD,
          blockers=[f"pad in op {BAD_PAD}"]),
    _case("constant_pad_nd", aten.constant_pad_nd, lambda y: aten.constant_pad_nd(y, [0, 0, 1, 1]),
          uses=[linear(False)], bias=[f"constant_pad_nd in op {ZERO_PAD}"]),
    _case("dropout-p0", aten.dropout, lambda y: F.dropout(y, 0.0, True), uses=[linear(True)]),
    _case("dropout-eval", aten.dropout, lambda y: aten.dropout(y, 0.1, False), uses=[linear(True)]),
    _case("dropout", aten.dropout, lambda y: F.dropout(y, 0.1, True), uses=[linear(False)],
          breakers=[f"dropout in op {DROPOUT}"]),
    _case("native_dropout", aten.native_dropout, lambda y: aten.native_dropout(y, 0.1, True)[0],
          uses=[linear(False)], breakers=[f"native_dropout in op {DROPOUT}"]),
    # train=None is training mode for native_dropout
    _case("native_dropout-train-none", aten.native_dropout, lambda y: aten.native_dropout(y, 0.1, None)[0],
          uses=[linear(False)], breakers=[f"native_dropout in op {DROPOUT}"]),
    _case("feature_dropout", aten.feature_dropout, lambda y: F.dropout1d(y, 0.1, True), uses=[linear(False)],
          breakers=[f"feature_dropout in op {DROPOUT}"]),
    _case("alpha_dropout", aten.alpha_dropout, lambda y: F.alpha_dropout(y, 0.1, True), uses=[linear(False)],
          breakers=[f"alpha_dropout in op {DROPOUT}"]),
]
# fmt: on


def _walk(case: Case) -> tuple[WalkResult, set[Any]]:
    channels = case.x[1] if case.first else case.x[-1]
    norm = nn.GroupNorm(1, channels) if case.first else nn.LayerNorm(channels)
    model = Toy(case.fn, norm, case.head(channels)).train()
    graph = torch.export.export(model, (torch.randn(case.x),), strict=False).graph
    in_norm = [n for n in graph.nodes if list((n.meta.get("nn_module_stack") or {"": ("",)}).values())[-1][0] == "norm"]
    keys = {_op_key(n) if n.op == "call_function" else n.op for n in graph.nodes}
    return walk_from(in_norm[-1], 1 if case.first else -1), keys


def _summary(result: WalkResult) -> dict[str, list]:
    return {
        "uses": [
            (u.layout, u.weight.name, getattr(u.bias, "name", None), u.shares_output, u.groups, u.zero_padded)
            for u in result.uses
        ],
        "blockers": result.blockers,
        "bias": result.bias_blockers,
        "breakers": result.sharing_breakers,
        "exact": result.exact_sharers,
    }


@pytest.mark.parametrize("case", CASES)
def test_rule(case: Case) -> None:
    result, keys = _walk(case)
    assert case.op in keys, f"the toy graph does not call {case.op}"
    expected = {"uses": case.uses, "blockers": case.blockers, "bias": case.bias, "breakers": case.breakers}
    assert _summary(result) == expected | {"exact": case.exact}


def test_every_rule_has_a_toy_graph() -> None:
    covered = {p.values[0].op for p in CASES}
    assert set(_RULES) | set(_CONSUMERS) <= covered, (set(_RULES) | set(_CONSUMERS)) - covered
