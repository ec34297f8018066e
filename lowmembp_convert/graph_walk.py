"""Following a norm's output through the graph to the layers that consume it.

Each user of the output is classified: a Linear-like consumer (its input channels are the norm's
channels), an op that commutes with a per-channel affine (reshape/permute keeping the channel dim,
token slicing, roll, mean pooling, zero padding...), or a blocker with its reason. The channel dim is
tracked through every op from the fake tensors' shapes; a path also records whether the consumer
receives the norm's output storage itself (views only), which is what lets the two share memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx

aten = torch.ops.aten

# Ops that never matter for dataflow (shape assertions, size queries).
_IGNORED = {"_assert_tensor_metadata", "sym_size", "sym_stride", "sym_numel", "_assert_scalar"}
# Ops that preserve every dim and return the same storage.
_VIEW_SAME_DIMS = {"alias", "detach", "lift_fresh_copy"}


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


def _op_name(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


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


def _transfer(node: fx.Node, src: fx.Node, pos: int) -> tuple[str, int | None, bool, str]:
    """Classify one user. Returns (kind, new_pos, is_view, note); kind in pass/bias/block/break/ignore."""
    op = _op_name(node)
    args = node.args
    src_val, out_val = _val(src), _val(node)
    if op in _IGNORED:
        return "ignore", None, False, ""
    if node.op == "output":
        return "block", None, False, "returned from the model's forward"
    if node.op != "call_function":
        return "block", None, False, _where(node)
    if op == "getitem":
        return "pass", pos, True, ""
    if src_val is None:
        return "block", None, False, _where(node)
    ndim = src_val.dim()
    if op in _VIEW_SAME_DIMS:
        return "pass", pos, True, ""
    if op in ("to", "_to_copy", "type_as"):
        same = out_val is not None and out_val.dtype == src_val.dtype and out_val.device == src_val.device
        return "pass", pos, same, ""
    if op == "clone":
        return "pass", pos, False, ""
    if op == "contiguous":
        return "pass", pos, _meta_like(src_val).is_contiguous(), ""
    if op in ("view", "_unsafe_view", "reshape", "flatten", "unflatten") and out_val is not None:
        new = _reshape_channel(list(src_val.shape), list(out_val.shape), pos)
        if new is None:
            return "block", None, False, f"{_where(node)} mixes the normalized channels with other dims"
        return "pass", new, _reshape_is_view(src_val, out_val.shape), ""
    if op == "permute":
        dims = [_norm_dim(d, ndim) for d in args[1]]
        return "pass", dims.index(pos), True, ""
    if op in ("transpose", "swapaxes"):
        a, b = _norm_dim(args[1], ndim), _norm_dim(args[2], ndim)
        new = b if pos == a else a if pos == b else pos
        return "pass", new, True, ""
    if op == "t":
        return "pass", 1 - pos if ndim == 2 else pos, True, ""
    if op == "unsqueeze":
        d = _norm_dim(args[1], ndim + 1)
        return "pass", pos + 1 if d <= pos else pos, True, ""
    if op == "squeeze" and out_val is not None:
        dims = args[1] if len(args) > 1 else [i for i, s in enumerate(src_val.shape) if s == 1]
        dims = [dims] if isinstance(dims, int) else dims
        removed = [_norm_dim(d, ndim) for d in dims if src_val.shape[_norm_dim(d, ndim)] == 1]
        if pos in removed:
            return "block", None, False, f"{_where(node)} squeezes the channel dim"
        return "pass", pos - sum(d < pos for d in removed), True, ""
    if op == "expand":
        new_ndim = len(args[1])
        return "pass", pos + (new_ndim - ndim), True, ""
    if op == "slice":
        dim = _norm_dim(args[1] if len(args) > 1 else 0, ndim)
        if dim == pos and out_val is not None and out_val.shape[dim] != src_val.shape[dim]:
            return "block", None, False, f"{_where(node)} slices the normalized channels"
        return "pass", pos, True, ""
    if op == "select":
        dim = _norm_dim(args[1], ndim)
        if dim == pos:
            return "block", None, False, f"{_where(node)} selects one channel"
        return "pass", pos - (dim < pos), True, ""
    if op in ("split", "split_with_sizes", "unbind", "chunk", "tensor_split"):
        dim = _norm_dim(args[2] if len(args) > 2 else node.kwargs.get("dim", 0), ndim)
        if op == "unbind":
            dim = _norm_dim(args[1] if len(args) > 1 else 0, ndim)
            if dim == pos:
                return "block", None, False, f"{_where(node)} splits the channels"
            return "pass", pos - (dim < pos), True, ""
        if dim == pos:
            return "block", None, False, f"{_where(node)} splits the channels"
        return "pass", pos, True, ""
    if op == "index" and out_val is not None:
        indices = list(args[1])
        if pos != ndim - 1 or len(indices) > pos or any(i is not None for i in indices[pos:]):
            return "block", None, False, f"{_where(node)} indexes the channel dim"
        return "pass", out_val.dim() - 1, False, ""
    if op in ("roll", "flip"):
        dims = args[2] if op == "roll" and len(args) > 2 else (args[1] if op == "flip" else [])
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if op == "roll" and not dims:
            return "block", None, False, f"{_where(node)} rolls across channels"
        if pos in [_norm_dim(d, ndim) for d in dims]:
            return "block", None, False, f"{_where(node)} reorders channels"
        return "pass", pos, False, ""
    if op in ("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d"):
        if pos != 1:
            return "block", None, False, f"{_where(node)} pools over the normalized channels"
        return "pass", pos, False, ""
    if op in ("mean", "sum", "amax", "amin"):
        dims = args[1] if len(args) > 1 else None
        if dims is None:
            return "block", None, False, f"{_where(node)} reduces over channels"
        dims = [_norm_dim(d, ndim) for d in ([dims] if isinstance(dims, int) else dims)]
        if pos in dims:
            return "block", None, False, f"{_where(node)} reduces over channels"
        keepdim = (args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)) or False
        new = pos if keepdim else pos - sum(d < pos for d in dims)
        if op == "sum":
            return "bias", new, False, f"{_where(node)} sums (commutes with a scale, not a shift)"
        if op in ("amax", "amin"):
            return "block", None, False, f"{_where(node)} max/min does not commute with a negative scale"
        return "pass", new, False, ""
    if op in ("constant_pad_nd", "pad"):
        pads = list(args[1])
        value = args[2] if len(args) > 2 else 0.0
        if not any(pads):
            return "pass", pos, False, ""
        # pads run from the last dim backwards, two entries per dim
        padded = {ndim - 1 - i // 2 for i, p in enumerate(pads) if p}
        if pos in padded or (value or 0.0) != 0.0:
            return "block", None, False, f"{_where(node)} pads the channels or pads with a nonzero value"
        return "bias", pos, False, f"{_where(node)} pads with zeros (commutes with a scale, not a shift)"
    if op in ("dropout", "native_dropout", "feature_dropout", "alpha_dropout"):
        p = args[1] if len(args) > 1 else 0.5
        train = args[2] if len(args) > 2 else True
        if not p or not train:
            return "pass", pos, True, ""
        return "break", pos, False, f"{_where(node)} (p={p}) sits between the norm and its consumer"
    return "block", None, False, _where(node)


def _linear_use(node: fx.Node, src: fx.Node, pos: int, ndim: int, shares: bool) -> LinearUse | None:
    op = _op_name(node)
    if op == "linear" and node.args[0] is src and pos == ndim - 1:
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return LinearUse(node, node.args[1], bias, "linear", shares)
    if op == "addmm" and len(node.args) >= 3 and node.args[1] is src and pos == ndim - 1:
        return LinearUse(node, node.args[2], node.args[0], "conv1d", shares)
    if op in ("conv1d", "conv2d", "conv3d") and node.args[0] is src and pos == 1:
        args = list(node.args) + [None] * 7
        bias, padding, groups = args[2], args[4], args[6] or 1
        padded = isinstance(padding, str) and padding == "same" or (not isinstance(padding, str) and any(padding or []))
        return LinearUse(node, node.args[1], bias, "conv", shares, int(groups), bool(padded))
    return None


def walk_from(start: fx.Node, channel_dim: int) -> WalkResult:
    """Classify everything downstream of ``start`` up to the first linear-like consumers."""
    result = WalkResult()
    start_val = _val(start)
    ndim = start_val.dim() if start_val is not None else 1
    todo = [(start, _norm_dim(channel_dim, ndim), True)]
    seen: set[fx.Node] = set()
    while todo:
        src, pos, shares = todo.pop()
        if src in seen:
            continue
        seen.add(src)
        src_val = _val(src)
        for user in list(src.users):
            use = _linear_use(user, src, pos, src_val.dim() if src_val is not None else 0, shares)
            if use is not None:
                result.uses.append(use)
                if use.zero_padded:
                    result.bias_blockers.append(f"{_where(user)} pads with zeros (a shift would leak into the border)")
                continue
            if shares and _op_name(user) in ("linear", "matmul", "mm", "bmm") and user.args and user.args[0] is src:
                ndim = src_val.dim() if src_val is not None else 0
                if pos == ndim - 1:  # contracts the channels, but with no Linear/Conv1D/conv weight to fold into
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
            todo.append((user, new_pos, shares and is_view))
    return result
