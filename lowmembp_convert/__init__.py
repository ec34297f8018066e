"""lowmembp_convert: automatic LowMemoryBP rewriting for transformers and timm models.

``model = lowmembp_convert.convert(model)`` swaps GELU/SiLU for ReGELU2/ReSiLU2 (exact forward,
2-bit saved state) and LayerNorm/RMSNorm for memory-sharing norms whose affine is folded into the
following Linear layers, in place. See README.md.
"""

from .analysis import plan_conversion
from .api import CHECKPOINT_KEY, convert
from .config import ConvertConfig
from .errors import CaptureError, ConversionError
from .plan import Plan
from .report import Report

__version__ = "0.1.0"


def __getattr__(name: str):
    # memory measurement pulls in nothing heavy, but keep the import of the package itself minimal
    if name in ("activation_memory", "SavedBytes"):
        from . import memory

        return getattr(memory, name)
    raise AttributeError(f"module 'lowmembp_convert' has no attribute {name!r}")


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
