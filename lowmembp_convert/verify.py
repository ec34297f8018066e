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


def _record(model: nn.Module, store: dict[str, torch.Tensor]) -> list:
    handles = []
    for name, module in model.named_modules():

        def hook(_m, _inputs, output, name=name):
            tensor = first_tensor(output)
            if tensor is not None and tensor.is_floating_point() and name not in store:
                store[name] = tensor.detach()

        handles.append(module.register_forward_hook(hook))
    return handles


def _run(model: nn.Module, args: tuple, kwargs: dict, store: dict) -> torch.Tensor | None:
    handles = _record(model, store)
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
) -> float:
    """Compare every module's output; raise ConversionError naming the first that diverges.

    A folded norm's own output is x_hat by design, so it (and modules that pass that very tensor
    on, such as Identity or eval-mode Dropout) is not compared; everything else is. Returns the
    relative error of the model's output.
    """
    args, kwargs = example_inputs
    ref_store: dict[str, torch.Tensor] = {}
    new_store: dict[str, torch.Tensor] = {}
    ref = _run(original, args, kwargs, ref_store)
    new = _run(converted, args, kwargs, new_store)
    if ref is None or new is None:
        raise ConversionError("verify: the model returned no floating-point tensor to compare")
    error = relative_error(ref, new)
    # Every module, not only the final output: a small fold error can hide behind a head.
    folded = set(folded_norms)
    folded_ptrs = {new_store[n].untyped_storage().data_ptr() for n in folded if n in new_store}
    for name, tensor in ref_store.items():
        other = new_store.get(name)
        if other is None or name in folded or other.untyped_storage().data_ptr() in folded_ptrs:
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
