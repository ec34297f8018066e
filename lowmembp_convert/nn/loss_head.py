"""The exact loss head: a transformers model's ``lm_head`` and ``loss_function``, without B x T x V kept.

transformers computes ``logits = self.lm_head(h)`` and then ``self.loss_function(logits, labels,
vocab_size, ...)`` (``ForCausalLMLoss``: shift the labels, upcast the logits to float32, cross-entropy
with ``ignore_index``, mean or sum / ``num_items_in_batch``). The float32 log-probabilities that
cross-entropy keeps for backward are the largest single tensor of a fine-tuning step for large
vocabularies. Two small pieces replace that, leaving every parameter, output and ``logits`` stock:

- :class:`LossHeadLinear`: the same ``lm_head`` object and Parameters (class swapped) that, while
  autograd records, leaves in a mailbox the logits it returned and the input it computed them from;
- :class:`ExactHeadLoss`: set as the model's ``loss_function``. Given exactly those logits (the same
  tensor object, unmodified), it computes the loss with
  :func:`lowmembp_convert.ops.linear_cross_entropy.linear_cross_entropy` from (h, weight, bias);
  given anything else (logits that were changed after the head, no autograd, ``torch.compile``,
  ``torch.func``), it calls the stock loss function. ``logits`` stay a stock, differentiable tensor:
  a user's own use of them goes through the head's own backward as before.

The fused head (``loss_head="fused"``, opt-in): while autograd records in training mode (outside
``torch.compile`` and ``torch.func``, no hooks on the head) the head computes no logits and returns a
:class:`~lowmembp_convert.nn.fused_logits.FusedLogits` placeholder (no values; every use other than
the model's loss, and the planned elementwise ops before it, raises); the loss computes the loss and
its gradients chunk by chunk with
:func:`lowmembp_convert.ops.fused_linear_cross_entropy.fused_linear_cross_entropy`, which keeps the
dh and dW for backward (bfloat16 in a bf16 model, else float32). In eval mode, under
``torch.no_grad()``, ``torch.compile`` or ``torch.func`` the head returns real logits and the exact
(or stock) path runs.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.fused_linear_cross_entropy import fused_linear_cross_entropy, linear_dtype
from ..ops.linear_cross_entropy import linear_cross_entropy
from .fused_logits import FusedLogits, FusedSource
from .handoff import Mailbox

__all__ = ["ExactHeadLoss", "LossHeadLinear"]


def _stock_context() -> bool:
    return not torch.is_grad_enabled() or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()


class LossHeadLinear(nn.Linear):
    """The output layer (same object and Parameters, its class swapped for a subclass of its own:
    ``nn.Linear`` or a ``TwinLinear``) that leaves (its output, its input) for the loss."""

    lowmembp_converted = True

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        fused = getattr(self, "_lowmembp_fused", None)  # the planned recipe when loss_head="fused"
        if fused is not None and self._fuses(input):
            box = getattr(self, "_lowmembp_mailbox", None)
            if box is not None:
                box.pending = None
            return self._placeholder(input, fused)
        out = super().forward(input)
        box = getattr(self, "_lowmembp_mailbox", None)
        if box is not None:
            box.pending = None
            if not _stock_context() and out.requires_grad:
                # weak references only: nothing here outlives the step (the caller's frame holds both
                # while it computes its loss)
                box.pending = (weakref.ref(out), weakref.ref(input), out._version)
        return out

    def _fuses(self, input: torch.Tensor) -> bool:
        """Fused only while autograd records a training step, on a head nobody hooks, with the dtypes
        the stock GEMM accepts (otherwise the stock call raises its own error)."""
        from ..observers import hooked

        params = [p for p in (self.weight, self.bias) if p is not None]
        if not self.training or _stock_context() or not (input.requires_grad or any(p.requires_grad for p in params)):
            return False
        device = input.device.type
        if not torch.is_autocast_enabled(device) and any(p.dtype != input.dtype for p in params):
            return False
        return not hooked(self)

    def _placeholder(self, input: torch.Tensor, recipe: list) -> FusedLogits:
        device = input.device.type
        autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        dtype = linear_dtype(input, autocast[1], autocast[2])
        name = getattr(self, "_lowmembp_name", "") or "lm_head"
        source = FusedSource(name, input, self.weight, self.bias, recipe, autocast)
        return FusedLogits((*input.shape[:-1], self.out_features), dtype, input.device, source)

    def extra_repr(self) -> str:
        if getattr(self, "_lowmembp_fused", None) is not None:
            return super().extra_repr() + ", fused with the loss: returns placeholder logits while training"
        return super().extra_repr() + ", hands its input to the exact loss head"

    def __reduce_ex__(self, protocol):
        # pickle by the importable class it was swapped from; loading swaps again
        return (_restore_head, (getattr(self, "_lowmembp_base", nn.Linear), self.__getstate__()))


def _restore_head(base: type, state: dict) -> nn.Module:
    head = base.__new__(base)
    head.__setstate__(state)
    _swap(head, base)
    return head


def _swap(head: nn.Module, base: type) -> None:
    head._lowmembp_base = base
    if base is nn.Linear:
        head.__class__ = LossHeadLinear
    else:  # a TwinLinear (post-norm autocast path): keep its forward under ours
        head.__class__ = type(f"LossHead{base.__name__}", (LossHeadLinear, base), {"__module__": base.__module__})


class ExactHeadLoss:
    """A transformers ``loss_function`` (``ForCausalLM`` or ``ForMaskedLM``) over a :class:`LossHeadLinear`.

    Picklable and deep-copyable with the model (the head is held by a weak reference; the mailbox
    travels with the head)."""

    def __init__(
        self, stock, head: LossHeadLinear, shift: bool, recipe: list | None = None, fused: bool = False
    ) -> None:
        self.stock = stock
        self.shift = shift
        self.recipe = Recipe(recipe or [])
        self.chunk: int | None = None  # rows per chunk; None: from the shapes
        self.fused = fused  # the head returns FusedLogits while training (loss_head="fused")
        self._head = weakref.ref(head)
        self.calls = {"exact": 0, "stock": 0, "fused": 0} if fused else {"exact": 0, "stock": 0}

    def __reduce__(self):
        return (ExactHeadLoss, (self.stock, self._head(), self.shift, self.recipe.steps, self.fused))

    def __deepcopy__(self, memo):
        import copy

        head = self._head()
        head = copy.deepcopy(head, memo) if head is not None else None
        return ExactHeadLoss(self.stock, head, self.shift, self.recipe.steps, self.fused)

    def _handed(self, logits: torch.Tensor):
        head = self._head()
        box = getattr(head, "_lowmembp_mailbox", None) if head is not None else None
        pending = box.pending if box is not None else None
        if pending is None or _stock_context() or not isinstance(head, LossHeadLinear):
            return None
        ref, h_ref, version = pending
        h = h_ref()
        if h is None or not logits.requires_grad:
            return None
        if not self.recipe.steps and (ref() is not logits or logits._version != version):
            return None
        if self.recipe.steps and not self._recipe_reproduces(head, h, logits):
            return None
        from ..observers import hooked

        if hooked(head):
            return None
        box.pending = None
        return head, h

    def _recipe_reproduces(self, head: nn.Linear, h: torch.Tensor, logits: torch.Tensor) -> bool:
        """The logits are the recipe applied to the head's output: checked bit for bit on the first and
        last rows (the head's GEMM for a few rows; a changed constant or a partial edit shows)."""
        if logits.shape[:-1] != h.shape[:-1] or logits.shape[-1] != head.out_features:
            return False
        h2d, y2d = h.reshape(-1, h.shape[-1]), logits.reshape(-1, logits.shape[-1])
        rows = min(8, h2d.shape[0])
        with torch.no_grad():
            for part in (slice(0, rows), slice(h2d.shape[0] - rows, h2d.shape[0])):
                if not torch.equal(self.recipe(F.linear(h2d[part], head.weight, head.bias)), y2d[part]):
                    return False
        return True

    def __call__(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        vocab_size: int,
        num_items_in_batch=None,
        ignore_index: int = -100,
        shift_labels: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if isinstance(logits, FusedLogits):
            return self._fused_loss(logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels)
        handed = self._handed(logits)
        if handed is None or logits.shape[-1] != vocab_size:
            self.calls["stock"] += 1
            extra = {"shift_labels": shift_labels} if self.shift else {}
            return self.stock(
                logits, labels, vocab_size, num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
                **extra, **kwargs,
            )  # fmt: skip
        head, h = handed
        target, divisor = self._target(logits, labels, num_items_in_batch, ignore_index, shift_labels)
        self.calls["exact"] += 1
        return linear_cross_entropy(
            h.reshape(-1, h.shape[-1]), head.weight, head.bias, logits.reshape(-1, vocab_size), target,
            ignore_index, divisor, self.chunk, self.recipe if self.recipe.steps else None,
        )  # fmt: skip

    def _target(self, logits, labels, num_items_in_batch, ignore_index, shift_labels):
        """The target per row and the divisor (None: the mean over the rows that count), as the stock loss."""
        if self.shift and shift_labels is None:  # as ForCausalLMLoss: tokens < n predict n
            labels = F.pad(labels, (0, 1), value=ignore_index)
            shift_labels = labels[..., 1:].contiguous()
        target = (shift_labels if self.shift else labels).reshape(-1).to(logits.device)
        divisor = None
        if num_items_in_batch is not None:
            divisor = torch.as_tensor(num_items_in_batch, device=logits.device)
        return target, divisor

    def _fused_loss(self, logits: FusedLogits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels):
        """The loss of a fused head's placeholder: computed from the head's input, chunk by chunk,
        with its gradients (kept: dh and dW). There is no stock path to fall back on."""
        why = logits.ready_for_loss()
        if not why and logits.shape[-1] != vocab_size:
            why = f"the head has {logits.shape[-1]} outputs but the loss was given vocab_size={vocab_size}"
        if why:
            raise logits.misuse("the model's loss", f" It cannot take them here: {why}.")
        source = logits._source
        h = source.h
        target, divisor = self._target(logits, labels, num_items_in_batch, ignore_index, shift_labels)
        source.consumed, source.h = True, None  # the placeholder holds nothing once the loss has run
        self.calls["fused"] = self.calls.get("fused", 0) + 1
        recipe = Recipe(source.recipe) if source.recipe else None
        return fused_linear_cross_entropy(
            h.reshape(-1, h.shape[-1]), source.weight, source.bias, target, ignore_index, divisor, self.chunk,
            recipe, source.autocast,
        )  # fmt: skip


class Recipe:
    """Elementwise ops with constant operands, from the captured graph: ``[(op name, args with "$x" for
    the running tensor, kwargs)]``, e.g. Gemma 2's ``div(x, 30.0), tanh(x), mul(x, 30.0)``."""

    def __init__(self, steps: list) -> None:
        self.steps = [(str(op), list(args), dict(kwargs)) for op, args, kwargs in steps]
        self._ops = [_resolve(op) for op, _a, _k in self.steps]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for op, (_name, args, kwargs) in zip(self._ops, self.steps, strict=True):
            x = op(*[x if a == "$x" else a for a in args], **kwargs)
        return x


def _resolve(name: str):
    namespace, op, overload = name.split(".")
    return getattr(getattr(getattr(torch.ops, namespace), op), overload)


def install(
    model: nn.Module,
    head: nn.Linear,
    stock,
    shift: bool,
    recipe: list | None = None,
    fused: bool = False,
    name: str = "",
) -> ExactHeadLoss:
    """Swap ``head``'s class, give it a mailbox and set the model's ``loss_function``; ``fused``: the
    head returns FusedLogits while training (``name`` is its name in messages)."""
    _swap(head, type(head))
    head._lowmembp_mailbox = Mailbox()
    if fused:
        head._lowmembp_fused = [(op, list(args), dict(kwargs)) for op, args, kwargs in recipe or []]
        head._lowmembp_name = name
    loss = ExactHeadLoss(stock, head, shift, recipe, fused)
    model.loss_function = loss
    return loss
