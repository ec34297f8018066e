"""PyTorch pickle checkpoints (.bin / .pth / .pt): read memory-mapped, written back in the same shape.

Files are loaded with ``weights_only=True`` (no arbitrary code runs) and ``mmap=True`` where the
file is in the zip format, so a tensor's bytes are paged in only when it is used. Training
checkpoints that wrap the state dict (``{"state_dict": ..., "epoch": ...}``, ``{"model": ...}``) are
understood; everything around the state dict is written back unchanged. The few classes training
scripts put around it and that rebuild without running code are allowed as well (timm's
``train.py`` stores its ``argparse.Namespace`` under ``args``); any other object is refused, by name.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .metadata import METADATA_KEY

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_REDO = "re-save it with torch.save(model.state_dict(), path) or download it again"
# classes rebuilt from plain values (no code of the file runs) that training checkpoints carry
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")


@dataclass
class TorchFile:
    """A loaded pickle checkpoint: the whole object and where its state dict sits in it."""

    path: Path
    container: Any  # what torch.load returned
    wrapper_key: str | None  # key of the state dict inside ``container``; None when it *is* one
    tensors: dict[str, torch.Tensor]
    other_state_dicts: list[str] = field(default_factory=list)  # e.g. timm's "state_dict_ema": left as is


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
            obj = _weights_only_load(path, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # legacy (non-zip) files cannot be memory-mapped
                raise
            obj = _weights_only_load(path, mmap=False)
    except pickle.UnpicklingError as exc:
        names = _refused_globals(path, exc)
        if names:
            raise CheckpointError(
                path,
                f"not a plain tensor checkpoint: it holds {_some(names)} object(s), which a weights-only "
                "load refuses (lowmembp-convert never runs code from a checkpoint)",
                "save the state dict alone with torch.save(model.state_dict(), path) and convert that file",
            ) from exc
        raise CheckpointError(path, f"not a plain tensor checkpoint or corrupt ({_first_line(exc)})", _REDO) from exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(path, f"corrupt or truncated PyTorch file ({_first_line(exc)})", _REDO) from exc
    if _is_state_dict(obj):
        return TorchFile(path, obj, None, obj)
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if _is_state_dict(obj.get(key)):
                others = [k for k, v in obj.items() if k != key and isinstance(k, str) and _is_state_dict(v)]
                return TorchFile(path, obj, key, obj[key], others)
    raise CheckpointError(
        path,
        "no state dict found (expected a dict of tensors, or one under 'state_dict'/'model')",
        "save the weights with torch.save(model.state_dict(), path)",
    )


def _weights_only_load(path: Path, mmap: bool) -> object:
    safe = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5: scoped allow-list
    if safe is None:
        torch.serialization.add_safe_globals(list(SAFE_GLOBALS))
    with safe(list(SAFE_GLOBALS)) if safe is not None else nullcontext():
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _some(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _first_line(exc: BaseException) -> str:
    """The most telling line of an exception message, without terminal colour codes."""
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    for line in lines:  # torch's weights-only errors put the actual problem on a later line
        if line.startswith("WeightsUnpickler error:"):
            return line[len("WeightsUnpickler error:") :].strip()[:200]
    return lines[0][:200] if lines else type(exc).__name__


def _refused_globals(path: Path, exc: BaseException) -> list[str]:
    """The classes/functions a weights-only load refused in ``path`` (all of them when torch can list them)."""
    allowed = {f"{t.__module__}.{t.__qualname__}" for t in SAFE_GLOBALS}
    lister = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    names: list[str] = []
    if lister is not None:
        try:
            names = [n for n in lister(path) if n not in allowed]
        except Exception:  # a corrupt file: fall back to the message
            names = []
    if not names:
        names = _UNSAFE_GLOBAL.findall(_ANSI.sub("", str(exc)))
    return list(dict.fromkeys(names))


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
        new_meta[METADATA_KEY] = record
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
    record = meta.get(METADATA_KEY) if isinstance(meta, dict) else None
    return record if isinstance(record, dict) else None
