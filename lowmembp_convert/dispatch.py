"""The one dispatch point of every op: Triton kernels or the PyTorch reference.

CUDA tensors take the Triton kernels; everything else takes the torch reference (which is also the
test oracle). Set ``LOWMEMBP_FORCE_TRITON=1`` (or use :func:`force_triton`) to send CPU tensors
through the Triton kernels too; on a machine without a GPU that needs ``TRITON_INTERPRET=1`` set
before Triton is first imported. ``LOWMEMBP_DISABLE_TRITON=1`` sends CUDA tensors to the reference.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

_forced: bool | None = None  # set by force_triton(); None means "read the environment"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` works (it is an optional dependency)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def use_triton(x: torch.Tensor) -> bool:
    """Decide, for one input tensor, whether the Triton kernels run.

    Args:
        x: the op's main input. Its device decides unless a switch forces a path.
    """
    forced = _forced if _forced is not None else _env_flag("LOWMEMBP_FORCE_TRITON")
    if forced:
        if not triton_available():
            raise RuntimeError("LOWMEMBP_FORCE_TRITON is set but triton is not importable; pip install triton")
        return True
    if _env_flag("LOWMEMBP_DISABLE_TRITON"):
        return False
    return x.is_cuda and triton_available()


@contextlib.contextmanager
def force_triton(enabled: bool = True) -> Iterator[None]:
    """Force (or forbid, with ``enabled=False``) the Triton path inside the block."""
    global _forced
    previous = _forced
    _forced = enabled
    try:
        yield
    finally:
        _forced = previous
