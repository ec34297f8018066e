"""Exact recompute across modules: the activation hands its input to the Linear that reads its output.

Where an MLP's activation and its consumer live in different modules (BERT, RoBERTa, HF ViT:
``intermediate.intermediate_act_fn`` feeds ``output.dense``), no one forward can be rewritten. The
activation becomes a :class:`HandoffActivation` (the stock op, bit for bit) that remembers, for the
output tensor it returns, the input it computed it from; the consumer becomes a :class:`HandoffLinear`
(the same object and Parameters, class swapped) that, given exactly that tensor, computes
``linear(act(a))`` through the fused op of :mod:`lowmembp_convert.ops.recompute`, keeping only a.

Anything else takes the plain path, exact as stock: another tensor (a hook's replacement, a copy),
a second reader (the first one took the hand-off), no autograd, torch.compile or torch.func. The
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

__all__ = ["HandoffActivation", "HandoffLinear"]

# id(output) -> (weak reference to the output, the activation's input, kind); an entry leaves when the
# consumer takes it or when the output is freed
_PENDING: dict[int, tuple[weakref.ref, torch.Tensor, str]] = {}


def _remember(h: torch.Tensor, a: torch.Tensor, kind: str) -> None:
    key = id(h)
    _PENDING[key] = (weakref.ref(h, lambda _ref: _PENDING.pop(key, None)), a, kind)


def _take(x: torch.Tensor) -> tuple[torch.Tensor, str] | None:
    entry = _PENDING.get(id(x))
    if entry is None or entry[0]() is not x:
        return None
    del _PENDING[id(x)]
    return entry[1], entry[2]


def _plain_only() -> bool:
    return torch.compiler.is_compiling() or not torch.is_grad_enabled() or torch._C._are_functorch_transforms_active()


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
        if not _plain_only() and h.requires_grad:
            _remember(h, a, self.kind)
        return h

    def extra_repr(self) -> str:
        return f"{self.kind}, hands its input to the Linear reading its output (exact recompute there)"


class HandoffLinear(nn.Linear):
    """``nn.Linear`` that, given a :class:`HandoffActivation`'s output, computes from its input instead:
    the same result bit for bit, keeping the activation's input rather than its own."""

    exact_forward = True
    exact_backward = True

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        handed = None if _plain_only() else _take(input)
        if handed is None:
            return F.linear(input, self.weight, self.bias)
        a, kind = handed
        return act_linear(a, None, self.weight, self.bias, kind)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", recomputes its input from the activation before it"
