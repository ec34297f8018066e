"""Post-norm blocks under autocast: one saved low-precision tensor for the norm and its Linears.

In a post-norm block (BERT, RoBERTa) the norm output y feeds a residual add, which must stay in
full precision, and Linear layers, which under autocast each save a new low-precision cast of y.
Stock, that is two saved tensors (the norm's input and the cast); a memory-sharing norm that saves
y in full precision would still leave two. Here the norm and its Linears keep one tensor, the
*twin* ``y.to(autocast dtype)``: the very cast autocast would have made, so forward values are
unchanged, and backward rebuilds x_hat from it at the precision autocast gives the Linears anyway.

Custom ops:

- ``lowmembp::ms_norm_twin_fwd`` (x, weight, bias, ...) -> (y, twin, rstd): the memory-sharing norm
  that also returns the twin. Saved for backward: the twin, rstd and the parameters, not y. Backward
  adds the gradients of y and of the twin.
- ``lowmembp::linear_on_twin`` (input, twin, weight, bias) -> out: ``F.linear(input)`` as autocast
  computes it, given ``twin == input.to(twin.dtype)``. It reads and saves ``twin`` instead of making
  its own cast, and sends the input gradient to ``input`` (whatever autograd path led there). Its
  backward is one more op, ``lowmembp::linear_on_twin_bwd``.

How the twin reaches the Linear (:func:`publish_twin` / :func:`autocast_twin_of`, called by the
norm module and by ``nn.linear.TwinLinear``): the module graph only carries y, so in eager the norm
publishes ``(y, twin)`` in a small table keyed by y's storage, and the Linear looks its input up
there. Its input is y or any tensor viewing y's storage (reshape, transpose, slicing, ``detach``):
y is a fresh contiguous buffer covering its whole storage, so ``twin.as_strided`` with the input's
own sizes, strides and offset is exactly ``input.to(low)``. The pairing reads plain tensor metadata
(storage, strides, dtype, the version counter that views share) and no autograd state: no
``grad_fn``, no saved tensors, no ``_base``. So it holds under saved-tensor hooks
(``save_on_cpu`` is handed the same twin by the norm and by every Linear),
``checkpoint(use_reentrant=False)`` (the first forward and the recomputation take the same path,
so they save the same tensors) and any view chain. A y modified in place after the norm (its
version moved on) is never paired with a stale twin. The table holds the twin while y lives and
until the norm's backward has run; an entry dies with y (weak reference).

Under ``torch.compile`` the table is not consulted: the norm op is called with ``twin_output=False``
(it returns an empty twin; its autograd saves ``y.to(low)``, cast outside the opaque op) and the
Linear takes the cast of its input, replaying the input's view chain (trace-time metadata, nothing
at step time) on the cast of y. After AOTAutograd's CSE both casts are one graph node, and the
partitioner saves that one low-precision tensor (tests/ops/test_norm_twin.py measures it).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from .norms import (
    DEFAULT_KEEP_BELOW,
    _stats_dtype,
    grads_from_output,
    kept_channels_size,
    ms_norm_fwd,
    refuse_double_backward,
)

__all__ = [
    "autocast_twin_of",
    "linear_on_twin",
    "linear_on_twin_bwd",
    "ms_norm_twin_fwd",
    "ms_norm_with_twin",
    "publish_twin",
]

# Eager pairing of a norm output with its twin: (device, storage address) -> _Published. An entry
# lives while y lives (weak reference with a removal callback) and until the norm's backward ran.
_PUBLISHED: dict[tuple[torch.device, int], _Published] = {}


class _Published:
    """One published twin: y (weakly), the twin (strongly) and y's version when it was made."""

    __slots__ = ("__weakref__", "key", "twin", "version", "y")

    def __init__(self, key: tuple[torch.device, int], y: Tensor, twin: Tensor) -> None:
        self.key, self.twin, self.version = key, twin, y._version
        self.y = weakref.ref(y, self._forget)

    def _forget(self, _ref=None) -> None:
        if _PUBLISHED.get(self.key) is self:
            del _PUBLISHED[self.key]


def _storage_key(t: Tensor) -> tuple[torch.device, int]:
    return t.device, t.untyped_storage().data_ptr()


def publish_twin(y: Tensor, twin: Tensor) -> _Published | None:
    """Make ``twin`` (``y.to(low)``) findable by :func:`autocast_twin_of` from y or any view of y.

    Only a y that is a fresh contiguous buffer covering its whole storage is published (what
    ``ms_norm_twin_fwd`` returns), so every tensor viewing that storage in y's dtype is a view of
    y's elements. Returns the entry (its ``release()`` drops it early), or None if not published.
    """
    if twin.numel() == 0 or twin.shape != y.shape or not (y.is_contiguous() and twin.is_contiguous()):
        return None
    if y.storage_offset() != 0 or y.numel() * y.element_size() != y.untyped_storage().nbytes():
        return None
    key = _storage_key(y)
    entry = _Published(key, y, twin)
    _PUBLISHED[key] = entry
    return entry


# --------------------------------------------------------------------------------------------------
# The norm that returns its twin
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("lowmembp::ms_norm_twin_fwd", mutates_args=())
def ms_norm_twin_fwd(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    weight_offset: float,
    rms: bool,
    low_dtype: torch.dtype,
    twin_output: bool,
    keep_below: float = DEFAULT_KEEP_BELOW,
    kept_capacity: int = -1,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Memory-sharing norm over the last dim that also returns y's low-precision twin.

    Args:
        x, weight, bias, eps, weight_offset, rms: as for ``lowmembp::ms_norm_fwd``.
        low_dtype: dtype of the twin (the autocast dtype); must differ from ``x.dtype``.
        twin_output: True (eager): return ``twin = y.to(low_dtype)`` and save it for backward.
            False (torch.compile): return an empty ``[0]`` twin and save ``y.to(low_dtype)`` made
            outside the op, a graph node the consumer Linears' own casts of y merge with (CSE).

    Returns (y, twin, rstd, kept_channels, kept_x_hat): y in ``x.dtype``, contiguous and not a view
    (so that :func:`publish_twin` can pair any view of it with the twin); twin in ``low_dtype``; the rest as for
    ``ms_norm_fwd`` (``keep_below`` and ``kept_capacity`` too).
    Saved for backward: the twin, rstd, the kept channels' x_hat, weight and bias; not y.
    """
    if low_dtype == x.dtype:
        raise ValueError(f"ms_norm_twin_fwd: low_dtype must differ from x.dtype ({x.dtype}); use ms_norm_fwd")
    y, rstd, kept_channels, kept_x_hat = ms_norm_fwd(
        x, weight, bias, eps, weight_offset, rms, None, keep_below, kept_capacity
    )
    # ms_norm_fwd returns a view of its row-major buffer; this output must be a base of its own
    y = torch.ops.aten._unsafe_view.default(y, x.shape)
    twin = y.to(low_dtype) if twin_output else x.new_empty((0,), dtype=low_dtype)
    return y, twin, rstd, kept_channels, kept_x_hat


@ms_norm_twin_fwd.register_fake
def _(
    x, weight, bias, eps, weight_offset, rms, low_dtype, twin_output, keep_below=DEFAULT_KEEP_BELOW, kept_capacity=-1
):  # noqa: E501
    y = x.new_empty(x.shape)
    twin = x.new_empty(x.shape if twin_output else (0,), dtype=low_dtype)
    k = kept_channels_size(weight, bias, kept_capacity)
    stats = _stats_dtype(x.dtype)
    kept_channels, kept_x_hat = x.new_empty((k,), dtype=torch.int64), x.new_empty((*x.shape[:-1], k), dtype=stats)
    return y, twin, x.new_empty(x.shape[:-1], dtype=stats), kept_channels, kept_x_hat


def _twin_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, _eps, weight_offset, rms, low_dtype, twin_output, _keep_below, _kept_capacity = inputs
    y, twin, rstd, kept_channels, kept_x_hat = output
    # Saved: the twin (shared with the consumer Linears), rstd, the kept channels' x_hat and the
    # parameters. Not y. Under compile the cast made here is a forward graph node, the same (after
    # CSE) as the consumers'.
    twin = twin if twin_output else y.to(low_dtype)
    ctx.save_for_backward(twin, rstd, kept_channels, kept_x_hat, weight, bias)
    ctx.weight_offset, ctx.rms, ctx.x_dtype, ctx.twin_output = weight_offset, rms, x.dtype, twin_output
    ctx.mark_non_differentiable(rstd, kept_channels, kept_x_hat)
    ctx.set_materialize_grads(False)
    # which y to unpublish after backward (weakly: the entry dies with y anyway)
    ctx.published_y = weakref.ref(y) if twin_output and not torch.compiler.is_compiling() else None


def _release(published_y: weakref.ref | None) -> None:
    """After this norm's backward no Linear can need its twin: drop the table's reference to it."""
    y = None if published_y is None else published_y()
    if y is None:
        return  # never published, or y died and took its entry with it
    try:
        entry = _PUBLISHED.get(_storage_key(y))
    except RuntimeError:  # a tensor without real storage (fake, traced): nothing was published
        return
    if entry is not None and entry.y() is y:
        entry._forget()


def _twin_backward(ctx, dy: Tensor | None, dtwin: Tensor | None, *_non_differentiable: Tensor | None):
    grads = [g for g in (dy, dtwin if ctx.twin_output else None) if g is not None]
    if not grads:
        return (None,) * 10
    refuse_double_backward(grads[0])
    twin, rstd, kept_channels, kept_x_hat, weight, bias = ctx.saved_tensors
    _release(ctx.published_y)
    g = grads[0].float() if len(grads) == 1 else grads[0].float() + grads[1].float()
    dx, dweight, dbias = grads_from_output(ctx, g, twin, rstd, kept_channels, kept_x_hat, weight, bias)
    return dx, dweight, dbias, *(None,) * 7


ms_norm_twin_fwd.register_autograd(_twin_backward, setup_context=_twin_setup_context)


def ms_norm_with_twin(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    weight_offset: float,
    rms: bool,
    low_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Memory-sharing norm over the last dim returning ``(y, y.to(low_dtype))``.

    Saved for backward: the twin ``y.to(low_dtype)`` and rstd (plus weight/bias), not y. Backward
    rebuilds x_hat from the twin, so gradients carry the twin's precision (that of autocast).
    """
    y, twin, *_ = ms_norm_twin_fwd(x, weight, bias, float(eps), float(weight_offset), bool(rms), low_dtype, True)
    publish_twin(y, twin)
    return y, twin


# --------------------------------------------------------------------------------------------------
# The Linear that reads the twin
# --------------------------------------------------------------------------------------------------


def _cast_layout(twin: Tensor) -> Tensor:
    """``twin`` laid out as autocast's cast of the input would be (``_to_copy`` keeps the strides
    of a dense input, else makes it contiguous), so F.linear sees the same operand bit for bit."""
    if torch.empty_like(twin, device="meta").stride() == twin.stride():
        return twin
    return twin.clone(memory_format=torch.preserve_format)


@torch.library.custom_op("lowmembp::linear_on_twin", mutates_args=())
def linear_on_twin(input: Tensor, twin: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear`` under autocast, computed from a ready low-precision copy of the input.

    Args:
        input: the Linear's input [..., in] (the norm output y or a view of it); only its gradient
            edge, dtype and shape are used.
        twin: ``input.to(low)``, equal to it element for element (any strides; typically a view of
            the norm's saved twin). Its dtype is the compute dtype.
        weight: [out, in], any float dtype; cast to ``twin.dtype`` as autocast does.
        bias: [out] or None; cast likewise.

    Returns ``F.linear(twin, weight.to(low), bias.to(low))`` in ``twin.dtype``: autocast's result.
    Saved for backward: ``twin`` (shared with the norm) and ``weight`` (a parameter), not input and
    not a low-precision weight copy (backward casts it again).
    """
    low = twin.dtype
    with torch.autocast(twin.device.type, enabled=False):
        return F.linear(_cast_layout(twin), weight.to(low), None if bias is None else bias.to(low))


@linear_on_twin.register_fake
def _(input, twin, weight, bias):
    return twin.new_empty((*input.shape[:-1], weight.shape[0]))


@torch.library.custom_op("lowmembp::linear_on_twin_bwd", mutates_args=())
def linear_on_twin_bwd(
    dout: Tensor,
    twin: Tensor,
    weight: Tensor,
    input_dtype: torch.dtype,
    bias_dtype: torch.dtype | None,
    need_input: bool,
    need_weight: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`linear_on_twin`: autocast's linear formulas (mm on 2-D rows, in the twin's
    dtype), each result cast back as autocast's casts are: (dinput in ``input_dtype``, dweight in
    weight's dtype, dbias in ``bias_dtype``); a gradient not asked for (or no bias) is ``[0]``.

    One opaque op, so a compiled graph keeps the twin itself for it, not a reshaped copy of a view.
    """
    low = twin.dtype
    dout2d = dout.reshape(-1, dout.shape[-1]).to(low)
    # custom op outputs may not alias one another: a fresh [0] tensor for each gradient not asked for
    dinput, dweight, dbias = (dout.new_empty((0,)) for _ in range(3))
    if need_input:
        dinput = dout2d.mm(weight.to(low)).view(*twin.shape[:-1], weight.shape[1]).to(input_dtype)
    if need_weight:
        # (x^T dout)^T, the product autocast's mm backward forms; laid out [out, in] as the weight
        dweight = twin.reshape(-1, twin.shape[-1]).t().mm(dout2d).t().to(weight.dtype).contiguous()
    if bias_dtype is not None:
        dbias = dout2d.sum(0).to(bias_dtype)
    return dinput, dweight, dbias


@linear_on_twin_bwd.register_fake
def _(dout, twin, weight, input_dtype, bias_dtype, need_input, need_weight):
    dinput = twin.new_empty(twin.shape[:-1] + (weight.shape[1],), dtype=input_dtype) if need_input else None
    dweight = weight.new_empty(weight.shape) if need_weight else None
    dbias = dout.new_empty((dout.shape[-1],), dtype=bias_dtype) if bias_dtype is not None else None
    return tuple(dout.new_empty((0,)) if t is None else t for t in (dinput, dweight, dbias))


def _linear_setup_context(ctx, inputs, output) -> None:
    input, twin, weight, bias = inputs
    ctx.save_for_backward(twin, weight)
    ctx.input_dtype = input.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _linear_backward(ctx, dout: Tensor):
    refuse_double_backward(dout)
    twin, weight = ctx.saved_tensors
    need_input, _, need_weight, need_bias = ctx.needs_input_grad
    bias_dtype = ctx.bias_dtype if need_bias else None
    dinput, dweight, dbias = linear_on_twin_bwd(
        dout, twin, weight, ctx.input_dtype, bias_dtype, need_input, need_weight
    )
    return (dinput if need_input else None), None, (dweight if need_weight else None), (dbias if need_bias else None)


linear_on_twin.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def autocast_twin_of(input: Tensor, low_dtype: torch.dtype) -> Tensor | None:
    """``input.to(low_dtype)`` as a view of a published twin, or None (the caller casts itself).

    Eager: when ``input`` views the storage of a y published by :func:`publish_twin` (y alive, in
    ``input``'s dtype, neither modified in place since), returns the twin viewed with the input's
    sizes, strides and offset. Under torch.compile: the cast of the input, its view chain replayed
    on the cast of its base at trace time, which the compiled graph merges with the cast of y that
    the norm's autograd saves.
    """
    if torch.compiler.is_compiling():
        base = input._base  # a FakeTensor's trace-time view metadata; nothing is read at step time
        if base is None or base.dtype != input.dtype:
            return input.to(low_dtype)
        return input._view_func_unsafe(base.to(low_dtype))
    entry = _PUBLISHED.get(_storage_key(input))
    y = None if entry is None else entry.y()
    if y is None or y.dtype != input.dtype or entry.twin.dtype != low_dtype:
        return None
    if input._version != entry.version or y._version != entry.version:
        return None  # y (or the input, through another alias) was modified in place after the norm
    return entry.twin.detach().as_strided(input.size(), input.stride(), input.storage_offset())
