"""lowmembp_convert: automatic low-memory backpropagation rewriting for transformers and timm models.

``model = lowmembp_convert.convert(model)`` rewrites a model in place so that its backward keeps less
activation memory: memory-sharing LayerNorm/RMSNorm with the affine folded into the next Linear
layers, and per GELU/SiLU site the cheapest of an exact recompute in the consumer's backward or the
paper's 2-bit ReGELU2/ReSiLU2. See README.md.

The public names are imported on first use, so ``import lowmembp_convert`` (and the CLI's start)
does not import torch until something needs it.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_WHERE = {
    "CHECKPOINT_KEY": "api",
    "convert": "api",
    "plan_conversion": "analysis",
    "ConvertConfig": "config",
    "CaptureError": "errors",
    "ConversionError": "errors",
    "Plan": "plan",
    "Report": "report",
    "activation_memory": "memory",
    "SavedBytes": "memory",
}


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'lowmembp_convert' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = [
    "CHECKPOINT_KEY",
    "CaptureError",
    "ConversionError",
    "ConvertConfig",
    "Plan",
    "Report",
    "activation_memory",
    "convert",
    "plan_conversion",
]
