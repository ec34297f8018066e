"""Following a norm's output through the graph to the layers that consume it.

Each user of the output is classified: a Linear-like consumer (its input channels are the norm's
channels), an op that commutes with a per-channel affine (reshape/permute keeping the channel dim,
token slicing, roll, mean pooling, zero padding...), or a blocker with its reason. The channel dim is
tracked through every op from the fake tensors' shapes; a path also records whether the consumer
receives the norm's output storage itself (views only), which is what lets the two share memory.

Ops are matched by their aten overload packet (``torch.ops.aten.view`` covers ``view.default``) in
two rule tables: ``_CONSUMERS`` (the linear-like layers a fold edits) and ``_RULES`` (how one op moves
the channel dim). An op in neither blocks, named with its module path.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.fx as fx

aten = torch.ops.aten

# Ops that never matter for dataflow (shape assertions, size queries).
_IGNORED = {aten._assert_tensor_metadata, aten.sym_size, aten.sym_stride, aten.sym_numel, aten._assert_scalar}
# Ops that contract their first argument's last dim with a second tensor.
_CONTRACTIONS = {aten.linear, aten.matmul, aten.mm, aten.bmm}


@dataclass(frozen=True)
class LinearUse:
    """A linear-like op that receives the norm's channels as its input features."""

    node: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    layout: str  # "linear" (weight [out, in]), "conv1d" (weight [in, out]) or "conv"
    shares_output: bool
    groups: int = 1
    zero_padded: bool = False  # a conv that pads with zeros: commutes with a scale, not a shift


@dataclass
class WalkResult:
    uses: list[LinearUse] = field(default_factory=list)
    blockers: list[str] = field(default_factory=list)  # users that need the norm's exact output
    bias_blockers: list[str] = field(default_factory=list)  # commute with a scale, not with a shift
    sharing_breakers: list[str] = field(default_factory=list)  # dropout p>0 before a consumer
    # users that keep the output itself for backward but cannot take a fold (a Linear mixing tokens,
    # as in MLP-Mixer): a norm that keeps its affine still shares its saved output with them
    exact_sharers: list[str] = field(default_factory=list)
    # dropout modules passed as identities (p = 0 or not training when captured): a fold with a shift
    # is only right while they stay identities
    identity_dropouts: list[str] = field(default_factory=list)


class Transfer(NamedTuple):
    """What one op does to the norm's output on its way to a consumer.

    kind: ``pass`` (commutes with the affine), ``bias`` (commutes with a scale, not a shift), ``break``
    (commutes, but the consumer no longer receives the norm's storage), ``block`` or ``ignore``.
    """

    kind: str
    pos: int | None = None  # where the channel dim is in the op's output
    is_view: bool = False  # the output is the input's storage (sharing survives)
    note: str = ""


Rule = Callable[[fx.Node, fx.Node, int], Transfer]


def _op_name(node: fx.Node) -> str:
    """The op as reasons name it: ``aten.view.default`` -> ``view``."""
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def _op_key(node: fx.Node) -> Any:
    """The rule-table key: an OpOverload's packet (``aten.view.default`` -> ``aten.view``), else the target."""
    target = node.target
    return target.overloadpacket if isinstance(target, torch._ops.OpOverload) else target


def _arg(node: fx.Node, name: str, default: Any = None) -> Any:
    """An aten call's argument by its schema name; export leaves out trailing defaults."""
    for i, argument in enumerate(node.target._schema.arguments):
        if argument.name == name:
            return node.args[i] if i < len(node.args) else node.kwargs.get(name, default)
    return default


def _val(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _meta_like(val: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(tuple(val.shape), tuple(val.stride()), dtype=val.dtype, device="meta")


def _reshape_is_view(src: torch.Tensor, shape) -> bool:
    try:
        _meta_like(src).view(tuple(shape))
    except RuntimeError:
        return False
    return True


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _dims(dims) -> list[int]:
    return [dims] if isinstance(dims, int) else list(dims or [])


def _reshape_channel(in_shape, out_shape, pos: int) -> int | None:
    """Where the channel dim lands after a reshape, if it survives intact."""
    channels = in_shape[pos]
    trailing = math.prod(in_shape[pos + 1 :])
    for k, size in enumerate(out_shape):
        if size == channels and math.prod(out_shape[k + 1 :]) == trailing:
            return k
    return None


def _where(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        return f"{_op_name(node)} in {path or '<root>'}"
    return _op_name(node)


_DROPOUT_NOTE = "identity dropout:"  # a pass note: the module that called it follows


def _caller_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else None


def _blocked(node: fx.Node, why: str = "") -> Transfer:
    return Transfer("block", None, False, f"{_where(node)} {why}" if why else _where(node))


# --- linear-like consumers: (node, src, pos, shares) -> LinearUse, or None when src is not their input features ---

_CONSUMERS: dict[Any, Callable[[fx.Node, fx.Node, int, bool], LinearUse | None]] = {}


def _consumer(*ops):
    def register(fn):
        _CONSUMERS.update(dict.fromkeys(ops, fn))
        return fn

    return register


@_consumer(aten.linear)
def _linear(node: fx.Node, src: fx.Node, pos: int, shares: bool) -> LinearUse | None:
    if node.args[0] is not src or pos != _val(src).dim() - 1:
        return None
    return LinearUse(node, node.args[1], _arg(node, "bias"), "linear", shares)


@_consumer(aten.addmm)
def _hf_conv1d(node: fx.Node, src: fx.Node, pos: int, shares: bool) -> LinearUse | None:
    """transformers' Conv1D: addmm(bias, x, W) with W [in, out]; a beta or alpha would scale the fold."""
    plain = node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1
    if not plain or node.args[1] is not src or pos != _val(src).dim() - 1:
        return None
    return LinearUse(node, node.args[2], node.args[0], "conv1d", shares)


_CONV_SPATIAL_DIMS = {aten.conv1d: 1, aten.conv2d: 2, aten.conv3d: 3}


@_consumer(*_CONV_SPATIAL_DIMS)
def _conv(node: fx.Node, src: fx.Node, pos: int, shares: bool) -> LinearUse | None:
    # channels are dim 1 of a batched input (an unbatched input has them at dim 0)
    if node.args[0] is not src or pos != 1 or _val(src).dim() != _CONV_SPATIAL_DIMS[_op_key(node)] + 2:
        return None
    padding = _arg(node, "padding", 0)
    padded = padding == "same" if isinstance(padding, str) else any(_dims(padding))
    return LinearUse(node, node.args[1], _arg(node, "bias"), "conv", shares, int(_arg(node, "groups", 1)), padded)


def _linear_use(node: fx.Node, src: fx.Node, pos: int, shares: bool) -> LinearUse | None:
    rule = _CONSUMERS.get(_op_key(node)) if node.op == "call_function" else None
    return rule(node, src, pos, shares) if rule is not None and _val(src) is not None else None


# --- ops between the norm and its consumers: (node, src, pos) -> Transfer ---

_RULES: dict[Any, Rule] = {}


def _rule(*ops):
    def register(fn: Rule) -> Rule:
        _RULES.update(dict.fromkeys(ops, fn))
        return fn

    return register


@_rule(operator.getitem)  # one output of split/unbind/native_dropout...: same dims as the tuple's tensors
@_rule(aten.alias, aten.detach, aten.lift_fresh_copy)
def _same_storage(node: fx.Node, src: fx.Node, pos: int) -> Transfer:
    return Transfer("pass", pos, True)


@_rule(aten.to, aten.type_as)
def _to(node: fx.Node, src: fx.Node, pos: int) -> Transfer:
    """Returns its input itself when nothing changes (dtype, device, layout), else a converted copy."""
    src_val, out_val = _val(src), _val(node)
    fmt = _arg(node, "memory_format")
    same = (
        out_val is not None
        and (out_val.dtype, out_val.device) == (src_val.dtype, src_val.device)
        and not _arg(node, "copy", False)
        and (fmt in (None, torch.preserve_format) or _meta_like(src_val).is_contiguous(memory_format=fmt))
    )
    return Transfer("pass", pos, same)


@_rule(aten._to_copy, aten.clone)
def _copy(node: fx.Node, src: fx.Node, pos: int) -> Transfer:
    return Transfer("pass", pos, False)


@_rule(aten.contiguous)
def _contiguous(node: fx.Node, src: fx.Node, pos: int) -> Transfer:
    fmt = _arg(node, "memory_format", torch.contiguous_format)
    return Transfer("pass", pos, _meta_like(_val(src)).is_contiguous(memory_format=fmt))


@_rule(aten.view, aten._unsafe_view, aten.reshape, aten.flatten, aten.unflatten)
def _reshape(node: fx.Node, src: fx.Node, pos: int) -> Transfer:
    src_val, out_val = _val(src), _val(node)
    if out_val is None:
        return _blocked(node)
    if isinstance(node.args[1], torch.dtype):  # view(dtype): the same bits read as another dtype
        return _blocked(node, "reinterprets the normalized values as another dtype")
    new = _reshape_channel(list(src_val.shape), list(out_val.shape), pos)
    if new is None:
        return _blocked(node, "mixes the normalized channels with other dims")
    return Transfer("pass", new, _reshape_is_view(src_val, out_val.shape))


@_rule(aten.permute)
def _permute(node: fx.Node, src: fx.Node, pos: int) -> Transfer:
    dims = [_norm_dim(d, _val(src).dim()) for d in node.args[1]]
    return Transfer("pass", dims.index(pos), True)


@_rule(aten.transpose, aten.swapaxes)
def _transpose(node: fx.Node, src: fx.Node, pos: int) -> Transfer:
    ndim = _val(src).dim()
    a, b = _norm_dim(node.args[1], ndim), _norm_dim(node.args[2], ndim)
    return Transfer("pass", b if pos == a else a if pos == b else pos, True)


@_rule(aten.t)
def _t(node: fx.Node, src: fx.Node, pos: int) -> Transfer:
    return Transfer("pass", 1 - pos if _val(src).dim() == 2 else pos, True)


@_rule(aten.unsqueeze)
def _unsqueeze(node: fx.Node, src: fx.Node, pos: int) -> Transfer:
    d = _norm_dim(node.args[1], _val(src).dim() + 1)
    return Transfer("pass", pos + 1 if d <= pos else pos, True)


@_rule(aten.squeeze)
def _squeeze(node: fx.Node, src: fx.Node, pos: int) -> Transfer:
    shape, ndim = _val(src).shape, _val(src).dim()
    if _val(node) is None:
        return _blocked(node)
    dim = _arg(node, "dim")  # squeeze.default: every size-1 dim
    dims = _dims(dim) if dim is not None else [i for i, s in enumerate(shape) if s == 1]
    removed = [_norm_dim(d, ndim) for d in dims if shape[_norm_dim(d, ndim)] == 1]
    if pos in removed:
        return _blocked(node, "squeezes the channel dim")
    return Transfer("pass", pos - sum(d < pos for d in removed), True)


@_rule(aten.expand)
def _expand(node: fx.Node, src: fx.Node, pos: int) -> Transfer:
    return Transfer("pass", pos + len(node.args[1]) - _val(src).dim(), True)


@_rule(aten.slice)
def _slice(node: fx.Node, src: fx.Node, pos: int) -> Transfer:
    src_val, out_val = _val(src), _val(node)
    dim = _norm_dim(_arg(node, "dim", 0), src_val.dim())
    if dim == pos and out_val is not None and out_val.shape[dim] != src_val.shape[dim]:
        return _blocked(node, "slices the normalized channels")
    return Transfer("pass", pos, True)


@_rule(aten.select)
def _select(node: fx.Node, src: fx.Node, pos: int) -> Transfer:
    dim = _norm_dim(node.args[1], _val(src).dim())
    if dim == pos:
        return _blocked(node, "selects one channel")
    return Transfer("pass", pos - (dim < pos), True)


@_rule(aten.split, aten.split_with_sizes, aten.chunk, aten.tensor_split)
def _split(node: fx.Node, src: fx.Node, pos: int) -> Transfer:
    """A tuple of views along ``dim``; its getitem users carry on from the same position."""
    if _norm_dim(_arg(node, "dim", 0), _val(src).dim()) == pos:
        return _blocked(node, "splits the channels")
    return Transfer("pass", pos, True)


@_rule(aten.unbind)
def _unbind(node: fx.Node, src: fx.Node, pos: int) -> Transfer:
    dim = _norm_dim(_arg(node, "dim", 0), _val(src).dim())
    if dim == pos:
        return _blocked(node, "splits the channels")
    return Transfer("pass", pos - (dim < pos), True)


@_rule(aten.index)
def _index(node: fx.Node, src: fx.Node, pos: int) -> Transfer:
    """Advanced indexing of leading dims only: the channels stay the (last) dim of the gathered copy."""
    out_val, indices = _val(node), list(node.args[1])
    if out_val is None:
        return _blocked(node)
    if pos != _val(src).dim() - 1 or len(indices) > pos or any(i is not None for i in indices[pos:]):
        return _blocked(node, "indexes the channel dim")
    return Transfer("pass", out_val.dim() - 1, False)


@_rule(aten.roll)
def _roll(node: fx.Node, src: fx.Node, pos: int) -> Transfer:
    dims = _dims(_arg(node, "dims"))
    if not dims:  # rolls the flattened tensor
        return _blocked(node, "rolls across channels")
    if pos in [_norm_dim(d, _val(src).dim()) for d in dims]:
        return _blocked(node, "reorders channels")
    return Transfer("pass", pos, False)


@_rule(aten.flip)
def _flip(node: fx.Node, src: fx.Node, pos: int) -> Transfer:
    if pos in [_norm_dim(d, _val(src).dim()) for d in _dims(node.args[1])]:
        return _blocked(node, "reorders channels")
    return Transfer("pass", pos, False)


_POOLED_DIMS = {
    aten.adaptive_avg_pool1d: 1,
    aten.adaptive_avg_pool2d: 2,
    aten._adaptive_avg_pool2d: 2,
    aten.adaptive_avg_pool3d: 3,
}


@_rule(*_POOLED_DIMS)
def _adaptive_avg_pool(node: fx.Node, src: fx.Node, pos: int) -> Transfer:
    """Averages over the trailing spatial dims: commutes with the affine of any other dim."""
    if pos >= _val(src).dim() - _POOLED_DIMS[_op_key(node)]:
        return _blocked(node, "pools over the normalized channels")
    return Transfer("pass", pos, False)


@_rule(aten.mean, aten.sum, aten.amax, aten.amin)
def _reduce(node: fx.Node, src: fx.Node, pos: int) -> Transfer:
    ndim = _val(src).dim()
    dims = [_norm_dim(d, ndim) for d in _dims(_arg(node, "dim"))]
    if pos in dims or not dims:  # no dims (or an empty list) reduces over every dim
        return _blocked(node, "reduces over channels")
    new = pos if _arg(node, "keepdim", False) else pos - sum(d < pos for d in dims)
    op = _op_key(node)
    if op is aten.sum:
        return Transfer("bias", new, False, f"{_where(node)} sums (commutes with a scale, not a shift)")
    if op in (aten.amax, aten.amin):
        return _blocked(node, "max/min does not commute with a negative scale")
    return Transfer("pass", new, False)


@_rule(aten.constant_pad_nd, aten.pad)
def _pad(node: fx.Node, src: fx.Node, pos: int) -> Transfer:
    pads, ndim = list(node.args[1]), _val(src).dim()
    if not any(pads):
        return Transfer("pass", pos, False)
    # pads run from the last dim backwards, two entries per dim
    padded = {ndim - 1 - i // 2 for i, p in enumerate(pads) if p}
    constant = _arg(node, "mode", "constant") == "constant"  # aten.pad also reflects, replicates, wraps
    if pos in padded or not constant or (_arg(node, "value") or 0.0) != 0.0:
        return _blocked(node, "pads the channels or pads with a nonzero value")
    return Transfer("bias", pos, False, f"{_where(node)} pads with zeros (commutes with a scale, not a shift)")


@_rule(aten.dropout, aten.native_dropout, aten.feature_dropout, aten.alpha_dropout)
def _dropout(node: fx.Node, src: fx.Node, pos: int) -> Transfer:
    p, train = _arg(node, "p", 0.5), _arg(node, "train")
    if not p or train is False:  # native_dropout's train=None means training
        return Transfer("pass", pos, True, _DROPOUT_NOTE + (_caller_path(node) or ""))
    return Transfer("break", pos, False, f"{_where(node)} (p={p}) sits between the norm and its consumer")


def _transfer(node: fx.Node, src: fx.Node, pos: int) -> Transfer:
    """Classify one user of ``src`` whose channel dim is ``pos``."""
    op = _op_key(node)
    if op in _IGNORED:
        return Transfer("ignore")
    if node.op == "output":
        return Transfer("block", None, False, "returned from the model's forward")
    rule = _RULES.get(op) if node.op == "call_function" else None
    # every rule follows its first argument: src used as another input (type_as's other) blocks
    if rule is None or not node.args or node.args[0] is not src:
        return _blocked(node)
    if op is not operator.getitem and _val(src) is None:
        return _blocked(node)
    return rule(node, src, pos)


def walk_from(start: fx.Node, channel_dim: int) -> WalkResult:
    """Classify everything downstream of ``start`` up to the first linear-like consumers."""
    result = WalkResult()
    start_val = _val(start)
    todo = [(start, _norm_dim(channel_dim, start_val.dim() if start_val is not None else 1), True)]
    seen: set[fx.Node] = set()
    while todo:
        src, pos, shares = todo.pop()
        if src in seen:
            continue
        seen.add(src)
        src_val = _val(src)
        for user in list(src.users):
            use = _linear_use(user, src, pos, shares)
            if use is not None:
                result.uses.append(use)
                if use.zero_padded:
                    result.bias_blockers.append(f"{_where(user)} pads with zeros (a shift would leak into the border)")
                continue
            if shares and _op_key(user) in _CONTRACTIONS and user.args and user.args[0] is src:
                if src_val is not None and pos == src_val.dim() - 1:
                    # contracts the channels, but with no Linear/Conv1D/conv weight to fold into
                    note = (
                        f"{_where(user)} multiplies the normalized channels by a tensor that is not a Linear, "
                        "Conv1D or convolution weight (e.g. x @ W.T), which a fold cannot edit"
                    )
                else:
                    note = f"{_where(user)} contracts a dim other than the normalized channels"
                result.blockers.append(note)
                result.exact_sharers.append(note)
                continue
            kind, new_pos, is_view, note = _transfer(user, src, pos)
            if kind == "ignore":
                continue
            if kind == "block":
                result.blockers.append(note)
                continue
            if kind == "bias":
                result.bias_blockers.append(note)
            if kind == "break":
                result.sharing_breakers.append(note)
            if kind == "pass" and note.startswith(_DROPOUT_NOTE) and note != _DROPOUT_NOTE:
                result.identity_dropouts.append(note[len(_DROPOUT_NOTE) :])
            todo.append((user, new_pos, shares and is_view))
    return result
