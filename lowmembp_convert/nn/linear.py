"""Linear layers the converter swaps in, holding the stock layer's Parameters.

:class:`TwinLinear` reads a post-norm MS norm's autocast twin (:mod:`lowmembp_convert.ops.norm_twin`);
:class:`UpcastInputLinear` takes a narrower input than its weight and upcasts inside, keeping the
narrow input for backward (PEFT adapters: :mod:`lowmembp_convert.rewrites.adapter_inputs`).

The converter swaps each ``nn.Linear`` fed by a post-norm memory-sharing norm (plan action
``keep_affine`` without ``autocast_output``) for a :class:`TwinLinear` holding the same Parameter
objects. Outside autocast, or when its input is not a live twin norm's output, it is ``nn.Linear``.
Under autocast it computes what autocast would (the same operands, so the same result bit for bit)
from the low-precision twin the norm already saved, instead of saving a cast of its own.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowmembp_convert.ops.norm_twin import autocast_twin_of, linear_on_twin
from lowmembp_convert.ops.recompute import exact_upcast, upcast_linear

__all__ = ["TwinLinear", "UpcastInputLinear"]


class TwinLinear(nn.Linear):
    """``nn.Linear`` that, under autocast, reads its input's low-precision twin when autograd keeps one.

    Saved for backward under autocast with a twin: the twin (shared with the norm that made it; any
    view of it) and the weight Parameter. Otherwise: what ``nn.Linear`` saves.
    """

    exact_forward = True
    exact_backward = False  # autocast's formulas, but dweight may round differently from stock's GEMM

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> TwinLinear:
        """A TwinLinear registering ``linear``'s own Parameters (no copies; same state_dict keys)."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"TwinLinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.register_parameter("bias", linear.bias)
        new.train(linear.training)
        return new

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        device = input.device.type
        if (
            torch.is_autocast_enabled(device)
            and torch.is_grad_enabled()
            and input.requires_grad
            and input.dtype not in (torch.get_autocast_dtype(device), torch.float64)  # autocast casts neither
            and self.weight.dtype != torch.float64
            and (torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active())
        ):
            twin = autocast_twin_of(input, torch.get_autocast_dtype(device))
            if twin is not None:
                return linear_on_twin(input, twin, self.weight, self.bias)
        return F.linear(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", reads the autocast twin of a post-norm MS norm"


class UpcastInputLinear(nn.Linear):
    """``nn.Linear`` that accepts an input narrower than its weight (bf16 into an fp32 adapter).

    ``y = linear(x.to(weight.dtype))``, computed by one op that keeps x (narrow, usually the very
    tensor the layer before keeps anyway) for backward instead of the upcast copy. The upcast is
    exact, so outputs and gradients are those of the cast followed by ``nn.Linear``. An input in the
    weight's dtype takes the plain ``nn.Linear`` path. The converter turns a plain ``nn.Linear`` into
    this class in place (``__class__``), so the object, its Parameters and hooks stay.
    """

    exact_forward = True
    exact_backward = True

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dtype != self.weight.dtype and exact_upcast(input.dtype, self.weight.dtype):
            return upcast_linear(input, self.weight, self.bias)
        return F.linear(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", upcasts a narrower input inside (keeps it narrow for backward)"
