"""PyTorch pickle checkpoints (.bin / .pth / .pt): read memory-mapped, written back in the same shape.

Files are loaded with ``weights_only=True`` (no arbitrary code runs) and ``mmap=True`` where the
file is in the zip format, so a tensor's bytes are paged in only when it is used. Training
checkpoints that wrap the state dict (``{"state_dict": ..., "epoch": ...}``, ``{"model": ...}``) are
understood; everything around the state dict is written back unchanged.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_REDO = "re-save it with torch.save(model.state_dict(), path) or download it again"


@dataclass
class TorchFile:
    """A loaded pickle checkpoint: the whole object and where its state dict sits in it."""

    path: Path
    container: Any  # what torch.load returned
    wrapper_key: str | None  # key of the state dict inside ``container``; None when it *is* one
    tensors: dict[str, torch.Tensor]


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_torch_file(path: str | os.PathLike) -> TorchFile:
    """Load a pickle checkpoint lazily (memory-mapped) and find its state dict.

    Raises:
        CheckpointError: the file is truncated or corrupt, holds arbitrary objects, or no state dict.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise CheckpointError(path, "empty file", _REDO)
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # legacy (non-zip) files cannot be memory-mapped
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(path, f"not a plain tensor checkpoint or corrupt ({first[:200]})", _REDO) from exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(path, f"corrupt or truncated PyTorch file ({first[:200]})", _REDO) from exc
    if _is_state_dict(obj):
        return TorchFile(path, obj, None, obj)
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if _is_state_dict(obj.get(key)):
                return TorchFile(path, obj, key, obj[key])
    raise CheckpointError(
        path,
        "no state dict found (expected a dict of tensors, or one under 'state_dict'/'model')",
        "save the weights with torch.save(model.state_dict(), path)",
    )


def save_torch_file(
    source: TorchFile, tensors: dict[str, torch.Tensor], path: str | os.PathLike, record: dict | None
) -> None:
    """Write ``tensors`` in place of ``source``'s state dict, keeping its wrapper and key order.

    ``record`` goes into the state dict's ``_metadata`` (the attribute ``nn.Module.state_dict()``
    sets and ``load_state_dict`` reads per module prefix; an extra key is ignored on load).
    """
    out = OrderedDict(tensors)
    meta = getattr(source.tensors, "_metadata", None)
    new_meta = OrderedDict(meta) if meta is not None else OrderedDict()
    if record is not None:
        new_meta["lowmembp_convert"] = record
    if new_meta:
        out._metadata = new_meta  # type: ignore[attr-defined]
    if source.wrapper_key is None:
        container: Any = out
    else:
        container = dict(source.container)
        container[source.wrapper_key] = out
    torch.save(container, path)


def read_torch_record(tensors: dict[str, torch.Tensor]) -> dict | None:
    """The conversion record of a state dict written by :func:`save_torch_file`, if any."""
    meta = getattr(tensors, "_metadata", None)
    record = meta.get("lowmembp_convert") if isinstance(meta, dict) else None
    return record if isinstance(record, dict) else None
