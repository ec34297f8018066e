"""ConvertConfig: every knob of :func:`lowmembp_convert.convert`, in one frozen dataclass."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

FilterFn = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class ConvertConfig:
    """Options of a conversion.

    Attributes:
        activations: replace GELU/SiLU modules by ReGELU2/ReSiLU2 (approximate backward).
        norms: fold norm affines into consumers and swap in memory-sharing norms (exact).
        filter_fn: ``filter_fn(module, fqn) -> bool``; a site is converted only when it returns True
            for the site's module (norm or activation). None converts everything eligible.
        verify: run the original and the converted model on one random batch and raise
            ``ConversionError`` naming the first diverging module if outputs differ.
        verify_rtol: relative tolerance of ``verify`` (max |a-b| / max |a|).
        example_inputs: ``(args, kwargs)`` for graph capture; None builds them from the model's
            config (HF ``main_input_name``, timm ``pretrained_cfg['input_size']``).
        untie_embeddings: allow folding into an output layer whose weight is tied to the input
            embedding by giving that layer its own copy (reported). Otherwise such a norm keeps its
            affine (``keep_affine``) and the embedding is never touched.
        min_abs_weight: a ``keep_affine`` norm recovers x_hat = (y - b) / w in backward; a norm
            with any |w| below this is skipped rather than risk an ill-conditioned division.
        measure_memory: measure bytes saved for backward before and after (one extra
            forward+backward of each on a random batch) and put them in the report.
    """

    activations: bool = True
    norms: bool = True
    filter_fn: FilterFn | None = None
    verify: bool = False
    verify_rtol: float = 1e-4
    example_inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None
    untie_embeddings: bool = False
    min_abs_weight: float = 1e-3
    measure_memory: bool = False


def resolve_config(config: ConvertConfig | None, overrides: dict[str, Any]) -> ConvertConfig:
    """``config`` (default: ConvertConfig()) with keyword ``overrides`` applied; unknown keys raise."""
    config = config or ConvertConfig()
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ConvertConfig)}
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; see lowmembp_convert.ConvertConfig")
    return dataclasses.replace(config, **overrides) if overrides else config
