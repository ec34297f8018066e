"""Exact recompute across modules: the activation hands its input to the Linear that reads its output.

Where an MLP's activation and its consumer live in different modules (BERT, RoBERTa, HF ViT:
``intermediate.intermediate_act_fn`` feeds ``output.dense``), no one forward can be rewritten. The
activation becomes a :class:`HandoffActivation` (the stock op, bit for bit) that leaves, in a
:class:`Mailbox` it shares with its consumer, the output it returns and the input it computed it
from; the consumer becomes a :class:`HandoffLinear` (the same object and Parameters, class swapped)
that, given exactly that output, computes ``linear(act(a))`` through the fused op of
:mod:`lowmembp_convert.ops.recompute`, keeping only a. Under torch.compile the same code is traced
(fullgraph; the mailbox is an ordinary Python object).

Anything else takes the plain path, exact as stock: another tensor (a hook's replacement, a copy),
a second reader (the first one emptied the mailbox), no autograd, or torch.func. The
activation's output is not detached, so a reader the captured graph did not show still gets its
gradient through the activation's own backward; with the one proven reader, that backward node
becomes unreachable and is freed with the output when the forward returns.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowmembp_convert.ops.recompute import act_linear

__all__ = ["HandoffActivation", "HandoffLinear", "Mailbox", "link"]


class Mailbox:
    """What a :class:`HandoffActivation` leaves for its consumer: (its output, its input), one at a time.

    Shared by the two modules as a plain attribute (not a submodule: state_dict and ``print`` are
    unchanged). Eager code leaves a weak reference to the output, so an output nobody reads frees the
    entry with it; compiled code (which cannot hold weak references) leaves the tensors, and the
    consumer, traced in the same graph, empties the box again.
    """

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending: tuple | None = None

    def __reduce__(self):  # a copy starts empty (shared between the two modules through the memo)
        return (Mailbox, ())

    def _drop(self, ref: weakref.ref) -> None:
        if self.pending is not None and self.pending[0] is ref:
            self.pending = None


def _functorch_or_no_grad() -> bool:
    return not torch.is_grad_enabled() or (
        not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()
    )


class HandoffActivation(nn.Module):
    """GELU / tanh-GELU / SiLU (the stock op) that hands its input to a :class:`HandoffLinear`."""

    lowmembp_converted = True  # the converter leaves modules carrying this alone
    exact_forward = True
    exact_backward = True

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind not in ("gelu", "gelu_tanh", "silu"):
            raise ValueError(f"HandoffActivation: kind must be 'gelu', 'gelu_tanh' or 'silu', got {kind!r}")
        self.kind = kind

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if self.kind == "silu":
            h = F.silu(a)
        else:
            h = F.gelu(a, approximate="tanh" if self.kind == "gelu_tanh" else "none")
        box = getattr(self, "_mailbox", None)
        if box is not None:
            if _functorch_or_no_grad() or not h.requires_grad:
                box.pending = None
            elif torch.compiler.is_compiling():
                box.pending = (h, a)
            else:  # eager: also the output's version (an in-place edit after this) and the saved-tensor hooks
                hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
                box.pending = (weakref.ref(h, box._drop), a, h._version, hooks)
        return h

    def extra_repr(self) -> str:
        return f"{self.kind}, hands its input to the Linear reading its output (exact recompute there)"


class HandoffLinear(nn.Linear):
    """``nn.Linear`` that, given a :class:`HandoffActivation`'s output, computes from its input instead:
    the same result bit for bit, keeping the activation's input rather than its own."""

    exact_forward = True
    exact_backward = True

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        box = getattr(self, "_mailbox", None)
        pending = None
        if box is not None:
            pending, box.pending = box.pending, None
        if pending is not None and not _functorch_or_no_grad() and not _path_untouched(self):
            from lowmembp_convert.observers import note_switched_off

            note_switched_off(f"the hand-off to {type(self).__name__}")
        elif pending is not None and not _functorch_or_no_grad():
            handed = pending[0]
            if isinstance(handed, weakref.ref):  # left by eager code (compiled code leaves the tensor)
                handed = handed()
                same = (
                    handed is input
                    and input._version == pending[2]  # not edited in place since
                    and torch._C._autograd._top_saved_tensors_default_hooks(False) == pending[3]
                )  # the same saved-tensor hooks: a checkpoint around this module alone recomputes it plainly
            else:
                same = handed is input
            if same:
                return act_linear(pending[1], None, self.weight, self.bias, self.lowmembp_kind)
        return F.linear(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", recomputes its input from the activation before it"


def _path_untouched(consumer: HandoffLinear) -> bool:
    """No hook and no instance-level ``forward`` on the modules between the activation and its consumer
    (a hook could edit the output in place, which compiled code cannot see by version)."""
    from lowmembp_convert.observers import hooked

    return not hooked(*getattr(consumer, "_lowmembp_path", ()))


def link(activation: HandoffActivation, consumer: HandoffLinear, path: tuple[nn.Module, ...] = ()) -> None:
    """Give the pair one mailbox (plain attributes) and the consumer the activation's kind and the
    modules from the activation to itself (their hooks switch the hand-off off)."""
    box = Mailbox()
    activation._mailbox = box
    consumer._mailbox = box
    consumer.lowmembp_kind = activation.kind
    consumer._lowmembp_path = tuple(path)
