"""FusedLogits: what a fused loss head (``loss_head="fused"``) returns as ``logits`` while training.

A tensor object of the logits' shape, dtype and device with no values (a wrapper subclass: no
storage is allocated). It carries what the model's loss needs to compute the loss and its gradients
from the head's input, one chunk of rows at a time (:class:`FusedSource`). What may be done with it:

- being handed to the model's ``loss_function`` (an :class:`~lowmembp_convert.nn.loss_head.ExactHeadLoss`):
  the fused path, once;
- the elementwise ops the planner found between the head and the loss, in that order and with the
  same constants (Gemma 2's softcapping: ``aten.div.Tensor(x, 30.0)``, ``aten.tanh.default(x)``,
  ``aten.mul.Tensor(x, 30.0)``): each gives the next placeholder, which the loss replays;
- what reads no values: metadata (shape, dtype, device, ``requires_grad``...), ``repr``, and copies that
  stay placeholders: a dtype cast (accelerate's fp32 output conversion), ``clone`` and ``detach``
  (DDP's output pass-through). A cast to float32/float64 may come before the loss (the loss upcasts
  to float32 anyway); any other cast leaves a placeholder the loss refuses.

Everything else (arithmetic, indexing, views, ``argmax``, ``.cpu()``, ``.numpy()``, ``print`` of the
values, pickling) raises :class:`FusedLogitsError` at that moment, saying what the object is, why and
how to get real logits.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_leaves

__all__ = ["FusedLogits", "FusedLogitsError", "FusedSource"]

_FIX = (
    "To read logits, run the model under torch.no_grad() or in eval mode (the head then returns real "
    "logits), or convert with loss_head=True (the exact head: real logits, still nothing of rows x "
    "vocabulary kept for backward)."
)


class FusedLogitsError(RuntimeError):
    """A fused head's placeholder logits were used for something other than the model's loss."""

    def __init__(self, message: str, op: str = "", detail: str = "") -> None:
        super().__init__(message)
        self.op, self.detail = op, detail  # the refused call, and what was planned instead


class FusedSource:
    """What the loss needs, shared by a placeholder and the placeholders derived from it: the head's
    input ``h`` (released once the loss has used it), weight, bias, the autocast state of the head's
    call, the planned elementwise ops between head and loss, and the head's name for messages."""

    __slots__ = ("autocast", "bias", "consumed", "h", "head", "recipe", "weight")

    def __init__(self, head: str, h, weight, bias, recipe: list, autocast: tuple) -> None:
        self.head, self.h, self.weight, self.bias = head, h, weight, bias
        self.recipe = recipe  # [(op name, args with "$x", kwargs)], as in the plan
        self.autocast = autocast  # (device type, enabled, dtype) when the head was called
        self.consumed = False


_METADATA = frozenset(
    [getattr(torch.Tensor, name).__get__ for name in (
        "shape", "dtype", "device", "ndim", "requires_grad", "is_leaf", "grad_fn", "grad", "layout",
        "is_cuda", "is_cpu", "is_meta", "is_sparse", "is_nested", "is_quantized", "is_mkldnn",
    )]
    + [getattr(torch.Tensor, name) for name in (
        "size", "dim", "ndimension", "numel", "nelement", "__len__", "is_floating_point", "is_complex",
        "stride", "is_contiguous", "element_size", "get_device", "__hash__",
    )]
)  # fmt: skip
# copies that read no values: each gives another placeholder (a cast of a float32 one may be itself)
_CASTS = frozenset(
    getattr(torch.Tensor, name) for name in ("float", "double", "half", "bfloat16", "to", "type_as", "clone", "detach")
)
_PLUMBING = frozenset({torch.ops.aten.detach.default, torch.ops.aten.alias.default, torch.ops.aten.clone.default})
_FLOATS = (torch.float32, torch.float64)


class FusedLogits(torch.Tensor):
    """Placeholder ``logits`` of a fused loss head: shape, dtype and device, no values (see the module)."""

    _source: FusedSource
    _step: int  # planned elementwise ops applied so far
    _casts: tuple  # dtypes it was cast to after them

    @staticmethod
    def __new__(cls, shape, dtype, device, source: FusedSource, step: int = 0, casts: tuple = ()):
        out = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device, requires_grad=False)
        out._source, out._step, out._casts = source, step, casts
        return out

    def _derive(self, shape=None, dtype=None, step=None, casts=None) -> FusedLogits:
        return FusedLogits(
            self.shape if shape is None else shape, dtype or self.dtype, self.device, self._source,
            self._step if step is None else step, self._casts if casts is None else casts,
        )  # fmt: skip

    # -- what it is -----------------------------------------------------------------------------
    def __repr__(self, *, tensor_contents=None) -> str:
        ops = self._source.recipe[: self._step] if hasattr(self, "_source") else []
        after = (" after " + ", ".join(op.split(".")[1] for op, _a, _k in ops)) if ops else ""
        with torch._C.DisableTorchFunctionSubclass():
            shape, dtype, device = list(self.shape), self.dtype, self.device
        return (
            f"FusedLogits(shape={shape}, dtype={dtype}, device={device}{after}: no values; "
            'loss_head="fused" computes the loss without logits while autograd records)'
        )

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __reduce_ex__(self, protocol):
        raise self.misuse("pickling (torch.save, deepcopy)")

    def __deepcopy__(self, memo):
        raise self.misuse("copy.deepcopy")

    def misuse(self, what: str, detail: str = "") -> FusedLogitsError:
        with torch._C.DisableTorchFunctionSubclass():
            shape, dtype = list(self.shape), self.dtype
        head = self._source.head if hasattr(self, "_source") else "lm_head"
        return FusedLogitsError(
            f"lowmembp_convert: {what} on the logits of a fused loss head. These logits are a placeholder with "
            f'no values (FusedLogits, shape {shape}, {dtype}): the model was converted with loss_head="fused", '
            f"so while autograd records (training) {head} computes no logits; the model's loss computes them "
            f"one chunk of rows at a time and keeps none of them.{detail} {_FIX}",
            what,
            detail,
        )

    # -- what may be done with it ---------------------------------------------------------------
    def ready_for_loss(self) -> str:
        """'' when the loss may use it, else why not."""
        if not hasattr(self, "_source"):
            return "it is a copy made outside the fused head's ops"
        if self._source.consumed:
            return "the loss of these logits was computed already (a fused head's logits feed one loss)"
        if self._step != len(self._source.recipe):
            return "the planned ops between the head and the loss did not all run: " + self._planned()
        if any(c not in _FLOATS for c in self._casts):
            return f"they were cast to {self._casts} (the loss takes the head's dtype, float32 or float64)"
        return ""

    def _planned(self) -> str:
        return ", ".join(_call(op, args, kwargs) for op, args, kwargs in self._source.recipe) or "(none)"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        mine = [a for a in tree_leaves((args, kwargs)) if isinstance(a, FusedLogits)]
        if not mine:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        if func is torch.Tensor.to and _moves(args, kwargs):
            raise mine[0].misuse(f".to({', '.join(map(str, args[1:]))}) (a move to a device)")
        try:
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
        except FusedLogitsError as exc:  # from __torch_dispatch__: name the call as the user wrote it
            raise mine[0].misuse(f"{name}() ({exc.op})", exc.detail) from None
        except Exception as exc:  # torch's own refusal (.tolist(), .numpy(), bool()...): say what this is
            raise mine[0].misuse(f"{name}()") from exc
        if any(out is a for a in mine) and func not in _CASTS:  # .cpu(), .contiguous()... on the same device
            raise mine[0].misuse(f"{name}()")
        return out

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        mine = [a for a in tree_leaves((args, kwargs)) if isinstance(a, FusedLogits)]
        x = mine[0]
        if len(mine) == 1 and hasattr(x, "_source"):
            alone = len(args) == 1 and args[0] is x
            if alone and func in _PLUMBING and set(kwargs) <= {"memory_format"}:
                return x._derive()
            if alone and func is torch.ops.aten._to_copy.default and _same_place(x, kwargs):
                dtype = kwargs.get("dtype") or x.dtype
                return x._derive(dtype=dtype, casts=x._casts + (dtype,))
            if x._is_next_step(func, args, kwargs):
                with torch._C.DisableTorchFunctionSubclass():
                    meta = torch.empty(x.shape, dtype=x.dtype, device="meta")
                result = func(*[meta if a is x else a for a in args], **kwargs)
                return x._derive(shape=result.shape, dtype=result.dtype, step=x._step + 1)
        detail = ""
        if hasattr(x, "_source") and x._source.recipe and not x._casts and x._step < len(x._source.recipe):
            detail = (
                f" Between the head and the loss the planner found {x._planned()}; this call is "
                f"{_call(str(func), ['$x' if a is x else a for a in args], kwargs)} (convert the model again "
                "after changing what the model does to its logits)."
            )
        raise x.misuse(f"{func}", detail)

    def _is_next_step(self, func, args, kwargs) -> bool:
        """``func(args)`` is the next planned op with the planned constants, before any cast."""
        steps = self._source.recipe
        if self._casts or self._step >= len(steps):
            return False
        name, planned, planned_kwargs = steps[self._step]
        if str(func) != name or len(args) != len(planned) or kwargs != planned_kwargs:
            return False
        return all((a is self) if p == "$x" else _same_constant(a, p) for a, p in zip(args, planned, strict=True))


def _moves(args, kwargs) -> bool:
    """``Tensor.to(...)`` names a device (even the current one: moving logits means reading them)."""
    try:
        return torch._C._nn._parse_to(*args[1:], **kwargs)[0] is not None
    except Exception:
        return False


def _same_constant(a, p) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(p, torch.Tensor) or isinstance(a, bool) != isinstance(p, bool):
        return False
    return a == p


def _same_place(x: FusedLogits, kwargs: dict) -> bool:
    """A ``_to_copy`` that only changes the floating dtype (no device move, layout or pinning)."""
    allowed = {"dtype", "device", "layout", "memory_format", "non_blocking", "pin_memory"}
    dtype = kwargs.get("dtype")
    return (
        set(kwargs) <= allowed
        and (dtype is None or dtype.is_floating_point)
        and kwargs.get("device") in (None, x.device)
        and kwargs.get("layout") in (None, torch.strided)
        and not kwargs.get("pin_memory")
    )


def _call(op: str, args, kwargs) -> str:
    def show(a) -> str:
        if isinstance(a, torch.Tensor):
            return f"<{type(a).__name__} {list(a.shape)}>"
        return "x" if isinstance(a, str) and a == "$x" else repr(a)

    inner = [*(show(a) for a in args), *(f"{k}={show(v)}" for k, v in kwargs.items())]
    return f"{op}({', '.join(inner)})"
