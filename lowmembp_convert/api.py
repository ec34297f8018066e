"""``convert(model)``: analyse, then apply, in place, all or nothing; the report rides on the model.

The promise: after ``convert()`` returns, the model computes what it did before (outputs checked on
a small batch unless ``verify=False``), every norm affine that was trainable still trains, and
buffers and random state are as they were. If ``convert()`` raises, for whatever cause, the model is
exactly as it was: same module objects, parameter values, buffers, hooks and attributes.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from . import verify as verification
from .analysis import plan_conversion
from .capture import CaptureError, example_inputs_for
from .checkpoint.metadata import (
    METADATA_KEY as CHECKPOINT_KEY,  # config.json / metadata entry of a converted checkpoint
)
from .config import ConvertConfig, resolve_config
from .errors import ConversionError
from .plan import Plan
from .report import Report
from .rewrites.apply import apply_plan
from .transaction import ModelSnapshot, no_side_effects

REPORT_ATTR = "lowmembp_report"


def _on_meta(model: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"convert() cannot rewrite a TorchScript module ({type(model).__name__}): its code is compiled. "
            "Convert the Python model first, then script it"
        )
    from torch.nn.parameter import is_lazy

    lazy = [name for name, p in model.named_parameters() if is_lazy(p)]
    if lazy:
        raise ValueError(
            f"convert(): {lazy[0]} is an uninitialized (lazy) parameter, so the model's shapes are not known "
            "yet; run one forward pass first (which materialises it), then convert"
        )


def unwrap(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The model inside its wrappers (``DistributedDataParallel``, ``DataParallel``, accelerate's
    prepared model, ``torch.compile``'s ``OptimizedModule``), and the wrappers' names outermost first.

    These hold the model as one child and forward to it, so converting the child in place is
    converting the model: parameters are the same objects (the default changes none), and the
    wrapper's hooks and buckets still see them. A compiled wrapper recompiles on its next call (the
    rewritten modules' classes fail its guards). PEFT models are not wrappers here: their layers are
    analysed as they are. FSDP2's ``fully_shard`` changes the module in place (no wrapper):
    convert before sharding.
    """
    names = []
    while True:
        inner = None
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            inner = model._orig_mod
        if inner is None:
            return model, names
        names.append(type(model).__name__)
        model = inner


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _edited_tensors(model: nn.Module, plan: Plan) -> list[torch.Tensor]:
    """The parameters a fold writes into (consumer weights and biases)."""
    tensors = []
    for site in plan.norms:
        if site.action == "fold" and not site.already_folded:
            for consumer in site.consumers:
                tensors.append(model.get_parameter(consumer.weight))
                if consumer.bias:
                    tensors.append(model.get_parameter(consumer.bias))
    return tensors


def convert(model: nn.Module, config: ConvertConfig | None = None, **overrides) -> nn.Module:
    """Rewrite ``model`` in place for low-memory backpropagation and return it.

    GELU/SiLU modules become ReGELU2/ReSiLU2 (exact forward, 2-bit saved state); LayerNorm/RMSNorm
    modules whose output feeds Linear layers get their affine folded into those layers and become
    memory-sharing norms. ``model.lowmembp_report`` holds the :class:`Report` (``print`` it).

    Args:
        model: any ``nn.Module`` (transformers, timm, PEFT-wrapped...), possibly on ``meta``.
        config: a :class:`ConvertConfig`; keyword ``overrides`` replace its fields.
    Raises:
        TypeError, ValueError: a bad option or model (nothing was touched).
        ConversionError: verification found a divergence; the model was rolled back.
        Any exception raised while converting leaves the model exactly as it was.
    """
    _check_model(model)
    inner, wrappers = unwrap(model)
    if wrappers:  # DDP, DataParallel, torch.compile: the model inside is what computes
        convert(inner, config, **overrides)
        report = getattr(inner, REPORT_ATTR)
        report.notes.append(f"converted the model inside {' -> '.join(wrappers)}; the wrapper is unchanged")
        setattr(model, REPORT_ATTR, report)
        return model
    config = resolve_config(config, overrides)
    notes: list[str] = []
    meta = _on_meta(model)
    inputs = _inputs_for_checks(model, config, meta, notes)
    previous = getattr(model, REPORT_ATTR, None)
    trainable_before = _trainable(model)
    snapshot = ModelSnapshot(model)
    progress = _Progress(model)
    try:
        progress.stage("recording the original's outputs")
        recording = _record(model, inputs, config, notes) if config.verify and inputs is not None else None
        if recording is None and not config.example_inputs:
            inputs = None  # the model rejected the inputs built from its config
        before = _measure(model, inputs) if config.measure_memory and inputs is not None else None
        loaded_from = getattr(getattr(model, "config", None), CHECKPOINT_KEY, None)
        if loaded_from:
            from .checkpoint.metadata import describe_record

            record = describe_record(loaded_from)
            notes.append(f"loaded from a lowmembp-convert checkpoint ({record}); its norms are folded already")
        progress.stage("analysing (detect, trace on fake tensors, plan)")
        plan = plan_conversion(model, config)
        if plan.capture.startswith("failed"):
            _warn_capture_failed(model, plan)
        progress.stage("rewriting")
        snapshot.keep_values(_edited_tensors(model, plan))
        notes += apply_plan(model, plan, untie_embeddings=config.untie_embeddings, min_abs_weight=config.min_abs_weight)
        report = Report(model=type(model).__name__, plan=plan, notes=notes, previous=previous)
        report.trainable_before = len(trainable_before)
        report.trainable_after = len(_trainable(model))
        progress.stage("verifying")
        if recording is not None:
            folded = [s for s in plan.norms if s.action == "fold"]
            try:
                error = recording.compare(
                    model,
                    rtol=config.verify_rtol,
                    folded_norms=[s.module for s in folded],
                    consumers=[c.module for s in folded for c in s.consumers],
                )
            except ConversionError as exc:
                raise ConversionError(
                    f"{exc} The model was rolled back to its original state. Exclude the site(s) feeding that module "
                    "with filter_fn=lambda module, name: ..., or pass verify=False to skip the check."
                ) from None
            report.notes.append(
                f"verified: max relative output error {error:.2e} (one batch, replayed after the rewrite)"
            )
        if before is not None:
            report.bytes_before, report.bytes_after = before, _measure(model, inputs)
        setattr(model, REPORT_ATTR, report)
        progress.close()
    except BaseException:
        progress.close()
        snapshot.restore()
        raise
    return model


class _Progress:
    """A stage line on a terminal for large models (seconds of tracing would otherwise be silence);
    nothing for small models or when stderr is not a terminal (tqdm's ``disable=None``)."""

    STAGES = 4  # recording, analysing, rewriting, verifying

    def __init__(self, model: nn.Module, min_parameters: int = 100_000_000) -> None:
        self._bar = None
        if sum(p.numel() for p in model.parameters()) >= min_parameters:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.STAGES, desc="lowmembp_convert", disable=None, leave=False)

    def stage(self, what: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(what)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _record(model: nn.Module, inputs, config: ConvertConfig, notes: list[str]):
    """The original's outputs on ``inputs``; None (verify skipped, warned) when the model rejects
    inputs built from its config. The model's own exception never reaches the user raw."""
    try:
        return verification.record(model, inputs)
    except ConversionError:
        raise
    except Exception as exc:
        cause = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if config.example_inputs is not None:
            raise ConversionError(
                f"verify: {type(model).__name__} raised on the example_inputs passed to convert() ({cause}); pass "
                "example_inputs=((args...), {kwargs...}) that its forward accepts, or verify=False"
            ) from exc
        message = (
            f"verify skipped: {type(model).__name__} rejected the example inputs built from its config ({cause}); "
            "pass example_inputs=((args...), {kwargs...}) that its forward accepts to check the conversion"
        )
        warnings.warn(message, stacklevel=4)
        notes.append(message)
        return None


def _warn_capture_failed(model: nn.Module, plan: Plan) -> None:
    """Loud, not silent: a failed capture leaves every graph-proven site stock (exact, nothing saved)."""
    stock = [s.module for s in (*plan.norms, *plan.activations) if s.action == "skip"]
    warnings.warn(
        f"lowmembp_convert: could not capture the graph of {type(model).__name__} ({plan.capture}); "
        f"{len(stock)} site(s) left stock (exact, no memory saved), e.g. {stock[0] if stock else '-'}. "
        "Pass example_inputs=((args...), {kwargs...}) that the model's forward accepts.",
        stacklevel=3,
    )


def _inputs_for_checks(model: nn.Module, config: ConvertConfig, meta: bool, notes: list[str]):
    """The batch for verify / measure_memory, or None (with a note) when there is none."""
    if not (config.verify or config.measure_memory):
        return None
    if meta:
        notes.append("verify/measure_memory skipped: the model is on the meta device")
        return None
    if config.example_inputs is not None:
        return config.example_inputs
    try:
        return example_inputs_for(model)
    except CaptureError as exc:
        if config.measure_memory:
            raise CaptureError(f"{exc} (needed by measure_memory)") from exc
        message = (
            f"verify skipped: cannot build example inputs for {type(model).__name__}; pass example_inputs=((args...), "
            "{kwargs...}) to check the conversion (or verify=False to silence this)"
        )
        warnings.warn(message, stacklevel=3)
        notes.append(message)
        return None


def _measure(model: nn.Module, inputs) -> int:
    """Bytes saved for backward by one training-mode forward of ``model`` on ``inputs``, leaving no
    trace (buffers such as BatchNorm statistics, RNG, train/eval flags are restored)."""
    from .memory import activation_memory
    from .nn.fused_logits import FusedLogits

    def run():
        out = verification.first_tensor(model(*args, **kwargs))
        # a fused loss head's placeholder logits (no labels here, so no loss) have nothing to sum
        return out if isinstance(out, FusedLogits) else out.float().sum()

    args, kwargs = inputs
    with no_side_effects(model):
        model.train()
        saved = activation_memory(run, params=model)
    return saved.total
