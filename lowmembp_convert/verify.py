"""``verify=True``: run the original and the converted model on one batch and name a divergence."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from .errors import ConversionError


def first_tensor(out: Any) -> torch.Tensor | None:
    """The first tensor of a model output (tensor, tuple, dict or transformers ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for item in out:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item() if a.numel() else 0.0


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _Recorder:
    """Records each module's first output tensor, in call order.

    With ``folded``/``consumers`` given it also marks outputs that are x_hat-derived by design: a
    folded norm's output, and the output of any non-consumer module fed such a tensor (Identity,
    Dropout, a pooling module between the norm and its Linear). Those are not compared.
    """

    def __init__(self, folded: set[str] = frozenset(), consumers: set[str] = frozenset()):
        self.outputs: dict[str, torch.Tensor] = {}
        self.by_design: set[str] = set()
        self.folded, self.consumers = folded, consumers
        self._tainted: set[int] = set()

    def hook(self, name: str):
        def record(_module, inputs, output):
            tensor = first_tensor(output)
            if tensor is None or not tensor.is_floating_point() or name in self.outputs:
                return
            fed = any(isinstance(t, torch.Tensor) and _storage(t) in self._tainted for t in inputs)
            passes_on = _storage(tensor) in self._tainted  # e.g. a parent returning the norm's output
            if name in self.folded or passes_on or (fed and name not in self.consumers):
                self._tainted.add(_storage(tensor))
                self.by_design.add(name)
            self.outputs[name] = tensor.detach()

        return record


def _run(model: nn.Module, args: tuple, kwargs: dict, recorder: _Recorder) -> torch.Tensor | None:
    handles = [m.register_forward_hook(recorder.hook(name)) for name, m in model.named_modules()]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            return first_tensor(model(*args, **kwargs))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training


def verify_conversion(
    original: nn.Module,
    converted: nn.Module,
    example_inputs: tuple[tuple, dict],
    *,
    rtol: float,
    folded_norms: Iterable[str] = (),
    consumers: Iterable[str] = (),
) -> float:
    """Compare every module's output; raise ConversionError naming the first that diverges.

    A folded norm's output is x_hat by design, and so is whatever a non-consumer module between
    it and its consumers makes of it; those are not compared, everything else is. Returns the
    relative error of the model's output.
    """
    args, kwargs = example_inputs
    reference, candidate = _Recorder(), _Recorder(set(folded_norms), set(consumers))
    ref = _run(original, args, kwargs, reference)
    new = _run(converted, args, kwargs, candidate)
    if ref is None or new is None:
        raise ConversionError("verify: the model returned no floating-point tensor to compare")
    error = relative_error(ref, new)
    # Every module, not only the final output: a small fold error can hide behind a head.
    for name, tensor in reference.outputs.items():
        other = candidate.outputs.get(name)
        if other is None or name in candidate.by_design:
            continue
        if other.shape == tensor.shape and relative_error(tensor, other) > rtol:
            raise ConversionError(
                f"verify: first diverging module: {name or '<root>'} "
                f"({type(converted.get_submodule(name)).__name__}, relative error "
                f"{relative_error(tensor, other):.2e} > rtol {rtol:.0e}; model output error {error:.2e}). "
                "Exclude it with filter_fn or report a bug."
            )
    if error > rtol:
        raise ConversionError(
            f"verify: outputs differ (relative error {error:.2e} > rtol {rtol:.0e}) but no single module's output "
            "does; report a bug with the model's config"
        )
    return error
