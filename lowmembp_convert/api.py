"""``convert(model)``: analyse, then apply, in place; the report rides on the model."""

from __future__ import annotations

import copy

import torch.nn as nn

from .analysis import plan_conversion
from .capture import CaptureError, example_inputs_for
from .config import ConvertConfig, resolve_config
from .report import Report
from .rewrites.apply import apply_plan
from .verify import verify_conversion

CHECKPOINT_KEY = "lowmembp_convert"  # config.json / safetensors metadata entry of converted checkpoints


def _on_meta(model: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def convert(model: nn.Module, config: ConvertConfig | None = None, **overrides) -> nn.Module:
    """Rewrite ``model`` in place for low-memory backpropagation and return it.

    GELU/SiLU modules become ReGELU2/ReSiLU2 (exact forward, 2-bit saved state); LayerNorm/RMSNorm
    modules whose output feeds Linear layers get their affine folded into those layers and become
    memory-sharing norms. ``model.lowmembp_report`` holds the :class:`Report` (``print`` it).

    Args:
        model: any ``nn.Module`` (transformers, timm, PEFT-wrapped...), possibly on ``meta``.
        config: a :class:`ConvertConfig`; keyword ``overrides`` replace its fields.
    Raises:
        ConversionError: ``verify=True`` and the converted model's output diverges.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() expects a torch.nn.Module, got {type(model).__name__}")
    config = resolve_config(config, overrides)
    notes: list[str] = []
    meta = _on_meta(model)
    inputs = config.example_inputs
    wants_inputs = (config.verify or config.measure_memory) and not meta
    if wants_inputs and inputs is None:
        try:
            inputs = example_inputs_for(model)
        except CaptureError as exc:
            raise CaptureError(f"{exc} (needed by verify/measure_memory)") from exc
    original = copy.deepcopy(model) if config.verify and not meta else None
    before = _measure(model, inputs) if config.measure_memory and not meta else None

    previous = getattr(getattr(model, "config", None), CHECKPOINT_KEY, None)
    if previous:
        notes.append(f"loaded from a lowmembp-convert checkpoint ({previous}); its norms are folded already")
    plan = plan_conversion(model, config)
    notes += apply_plan(model, plan, untie_embeddings=config.untie_embeddings)
    report = Report(model=type(model).__name__, plan=plan, notes=notes)
    if meta and (config.verify or config.measure_memory):
        report.notes.append("verify/measure_memory skipped: the model is on the meta device")
    if original is not None:
        folded = [s for s in plan.norms if s.action == "fold"]
        error = verify_conversion(
            original,
            model,
            inputs,
            rtol=config.verify_rtol,
            folded_norms=[s.module for s in folded],
            consumers=[c.module for s in folded for c in s.consumers],
        )
        report.notes.append(f"verified: max relative output error {error:.2e} (rtol {config.verify_rtol:.0e})")
    if before is not None:
        report.bytes_before, report.bytes_after = before, _measure(model, inputs)
    model.lowmembp_report = report
    return model


def _measure(model: nn.Module, inputs) -> int:
    """Bytes saved for backward by one forward of ``model`` on ``inputs`` (training mode)."""
    from .memory import activation_memory
    from .verify import first_tensor

    args, kwargs = inputs
    modes = {m: m.training for m in model.modules()}
    model.train()
    try:
        saved = activation_memory(lambda: first_tensor(model(*args, **kwargs)).float().sum(), params=model)
    finally:
        for m, training in modes.items():
            m.training = training
    return saved.total
