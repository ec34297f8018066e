"""ConvertConfig: every knob of :func:`lowmembp_convert.convert`, in one frozen dataclass."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

FilterFn = Callable[[nn.Module, str], bool]
ACTIVATION_MODES = ("auto", "approx", "recompute", True, False)
NORM_MODES = ("share", "fold", True, False)
LOSS_HEAD_MODES = ("exact", "fused", True, False)


@dataclass(frozen=True)
class ConvertConfig:
    """Options of a conversion.

    Attributes:
        activations: what GELU/SiLU sites keep for backward. ``"auto"`` (``True``, the default):
            per site the option that keeps the fewest bytes, exact on ties (stock, exact recompute
            in the consumer's backward, or the 2-bit approximation); ``"recompute"``: exact recompute
            where the graph proves it, stock elsewhere; ``"approx"``: the paper's ReGELU2/ReSiLU2
            (exact forward, approximate 2-bit backward) everywhere; ``False``: leave them.
        norms: ``"share"`` (``True``, the default): memory-sharing norms that keep their own affine
            and recover x_hat from the saved output in backward; parameters, state dict, outputs
            and training trajectory stay the stock ones. ``"fold"``: the paper's form, the affine
            folded into the consumer Linears (a reparameterization: the parameter values change, so
            optimizers follow another trajectory and adapters trained on it do not fit the stock
            base); the checkpoint CLI folds on disk. ``False``: leave norms alone.
        adapter_inputs: where PEFT LoRA adapters are wider than their layer's input (PEFT's fp32
            adapters on a bf16/fp16 model), lora_A keeps the narrow input for backward and upcasts
            inside, instead of keeping PEFT's upcast copy (exact: the same values).
        filter_fn: ``filter_fn(module, fqn) -> bool``; a site is converted only when it returns True
            for the site's module (norm or activation). None converts everything eligible.
        verify: (default on) record the original's outputs on one small batch before rewriting,
            replay it after, and on a divergence roll the model back and raise ``ConversionError``
            naming the first diverging module. No copy of the model is made.
        verify_rtol: tolerance of ``verify`` (max |a-b| / max |a|); None picks one per dtype
            (float32 1e-5, float16 1e-2, bfloat16 5e-2).
        example_inputs: ``(args, kwargs)`` for graph capture; None builds them from the model's
            config (HF ``main_input_name``, timm ``pretrained_cfg['input_size']``).
        untie_embeddings: (``norms="fold"``) allow folding into an output layer whose weight is tied
            to the input embedding by giving that layer its own copy (reported). Otherwise such a
            norm keeps its affine (``keep_affine``) and the embedding is never touched.
        min_abs_weight: a norm that keeps its affine recovers x_hat = (y - b) / w in backward; the
            channels whose |w| is below this (or whose |b| exceeds 7 |w|) keep x_hat instead, in
            float32, chosen in every forward from the current weights. Nothing is skipped or raised.
        measure_memory: measure bytes saved for backward before and after (one extra
            forward+backward of each on a random batch) and put them in the report.
        loss_head: a transformers causal / masked LM's loss (``lm_head`` then
            ``ForCausalLMLoss``/``ForMaskedLMLoss``). ``"exact"`` (``True``, the default): keeps nothing
            of size rows x vocabulary for backward; the loss is computed from the logits the head
            returned and backward recomputes the head's GEMM in chunks of rows (one more head GEMM).
            Loss, logits and gradients are the stock ones (the loss up to the order of a float32 sum).
            ``"fused"`` (opt-in, for training loops that never read logits): while autograd records
            in training mode the head computes no logits and returns a ``FusedLogits`` placeholder
            (shape, dtype and device, no values; any use but the model's loss raises
            ``FusedLogitsError`` naming the fix); the loss computes the logits and their gradients
            chunk by chunk in one pass and keeps float32 dh (rows x hidden) and dW (vocab x hidden,
            when the head is trainable) for backward: the stock number of head GEMMs, and no tensor
            of rows x vocabulary at any time. Eval mode, ``torch.no_grad()``, ``torch.compile`` and
            ``torch.func`` get real logits (the exact path). ``False``: leave the loss alone.
    """

    activations: bool | str = True
    norms: bool | str = True
    adapter_inputs: bool = True
    filter_fn: FilterFn | None = None
    verify: bool = True
    verify_rtol: float | None = None
    example_inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None
    untie_embeddings: bool = False
    min_abs_weight: float = 1e-3
    measure_memory: bool = False
    loss_head: bool | str = True

    def __post_init__(self) -> None:
        validate(self)


def _bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"ConvertConfig.{name} must be True or False, got {value!r}")


def _positive(name: str, value: Any, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    accepted = ("a number >= 0" if allow_zero else "a positive number") + (" or None" if allow_none else "")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"ConvertConfig.{name} must be {accepted}, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"ConvertConfig.{name} must be {accepted}, got {value!r}")


def _example_inputs(value: Any) -> None:
    if value is None:
        return
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], (tuple, list))
        and isinstance(value[1], dict)
    ):
        return
    hint = " (a single tensor x goes as ((x,), {}))" if not isinstance(value, dict) else " (kwargs go as ((), {...}))"
    raise TypeError(
        "ConvertConfig.example_inputs must be a pair (args, kwargs), e.g. ((x,), {}) or ((), {'input_ids': ids}); "
        f"got {type(value).__name__}{hint}"
    )


def validate(config: ConvertConfig) -> None:
    """Raise TypeError/ValueError naming the option and its accepted forms."""
    if config.activations not in ACTIVATION_MODES or not isinstance(config.activations, (bool, str)):
        raise ValueError(
            f"ConvertConfig.activations must be one of {ACTIVATION_MODES} (True means 'auto'), "
            f"got {config.activations!r}"
        )
    if config.norms not in NORM_MODES or not isinstance(config.norms, (bool, str)):
        raise ValueError(
            f"ConvertConfig.norms must be one of {NORM_MODES} (True means 'share': keep the stock parameters; "
            f"'fold' reparameterizes), got {config.norms!r}"
        )
    if config.loss_head not in LOSS_HEAD_MODES or not isinstance(config.loss_head, (bool, str)):
        raise ValueError(
            f"ConvertConfig.loss_head must be one of {LOSS_HEAD_MODES} (True means 'exact': the stock logits, "
            f"nothing of rows x vocabulary kept; 'fused': no logits while training), got {config.loss_head!r}"
        )
    for name in ("adapter_inputs", "verify", "untie_embeddings", "measure_memory"):
        _bool(name, getattr(config, name))
    if config.filter_fn is not None and not callable(config.filter_fn):
        raise TypeError(f"ConvertConfig.filter_fn must be a callable (module, fqn) -> bool, got {config.filter_fn!r}")
    _positive("verify_rtol", config.verify_rtol, allow_none=True)
    _positive("min_abs_weight", config.min_abs_weight, allow_zero=True)
    _example_inputs(config.example_inputs)


def resolve_config(config: ConvertConfig | None, overrides: dict[str, Any]) -> ConvertConfig:
    """``config`` (default: ConvertConfig()) with keyword ``overrides`` applied; unknown keys raise."""
    if config is not None and not isinstance(config, ConvertConfig):
        raise TypeError(
            f"config must be a lowmembp_convert.ConvertConfig, got {type(config).__name__}; "
            "pass options as keywords instead (convert(model, verify=False, ...))"
        )
    config = config or ConvertConfig()
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ConvertConfig)}
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; see lowmembp_convert.ConvertConfig")
    return dataclasses.replace(config, **overrides) if overrides else config


def norm_mode(config: ConvertConfig) -> str | None:
    """ "share", "fold", or None (norms left alone). ``True`` means "share"."""
    if config.norms is False:
        return None
    return "share" if config.norms is True else config.norms


def loss_head_mode(config: ConvertConfig) -> str | None:
    """ "exact", "fused", or None (the loss left alone). ``True`` means "exact"."""
    if config.loss_head is False:
        return None
    return "exact" if config.loss_head is True else config.loss_head


def activation_mode(config: ConvertConfig) -> str | None:
    """ "auto", "approx", "recompute", or None (activations left alone). ``True`` means "auto"."""
    if config.activations is False:
        return None
    return "auto" if config.activations is True else config.activations
