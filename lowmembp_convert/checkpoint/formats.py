"""What a checkpoint path holds: the layout detection for every input the converter accepts.

Accepted inputs:
- a transformers model directory: ``config.json`` with ``model.safetensors``, sharded
  ``model-0000x-of-0000n.safetensors`` + ``model.safetensors.index.json``, or the same with
  ``pytorch_model*.bin``;
- a timm hub directory: ``config.json`` with an ``architecture`` entry and ``model.safetensors`` or
  ``pytorch_model.bin``;
- a single state-dict file (``.safetensors``, ``.bin``, ``.pth``, ``.pt``, ``.pth.tar`` as timm's
  ``train.py`` names its checkpoints) together with ``--arch``.

Detection reads only ``config.json`` and index files; tensor headers are read by :mod:`.store`.
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import CheckpointError

CheckpointKind = Literal["transformers", "timm", "state_dict"]
WeightFormat = Literal["safetensors", "torch"]

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".bin", ".pth", ".pt", ".pth.tar", ".pt.tar")
CONFIG_FILE = "config.json"
# (index file, single file, format), in transformers' order of preference
_WEIGHT_FILES: tuple[tuple[str, str, WeightFormat], ...] = (
    ("model.safetensors.index.json", "model.safetensors", "safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin", "torch"),
)
# weights in formats this tool does not convert: left out of the output (they would be unconverted)
_OTHER_WEIGHT_PATTERNS = (
    "model*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "tf_model*.h5",
    "tf_model.h5.index.json",
    "flax_model*.msgpack",
    "flax_model.msgpack.index.json",
)
_ACCEPTED = (
    "pass a transformers model directory (config.json + model.safetensors or pytorch_model.bin), "
    "or a .safetensors/.bin/.pth/.pth.tar state dict with --arch"
)


@dataclass
class CheckpointLayout:
    """Where a checkpoint's weights, index, config and other files are."""

    path: Path  # ckpt_in as the user gave it, absolute
    kind: CheckpointKind
    format: WeightFormat
    shards: list[str]  # weight file names, relative to ``root``, in order
    index_file: str | None = None  # relative to ``root``
    index: dict | None = None  # parsed index JSON ({"metadata": ..., "weight_map": ...})
    config: dict | None = None  # parsed config.json
    carried_files: list[str] = field(default_factory=list)  # copied unchanged, relative to ``root``
    skipped_files: list[str] = field(default_factory=list)  # other-format weights, not written out

    @property
    def root(self) -> Path:
        """The directory that holds the shards (ckpt_in itself, or a single file's folder)."""
        return self.path if self.path.is_dir() else self.path.parent

    @property
    def is_directory(self) -> bool:
        return self.kind != "state_dict"


def read_json(path: Path) -> dict:
    """Read a JSON object file or raise a CheckpointError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"corrupt JSON ({exc})", "restore the file from the original checkpoint") from exc
    if not isinstance(data, dict):
        raise CheckpointError(path, "expected a JSON object", "restore the file from the original checkpoint")
    return data


def weight_format_of(path: Path) -> WeightFormat | None:
    """'safetensors' or 'torch' by file suffix, None for anything else."""
    name = path.name.lower()
    formats: tuple[tuple[tuple[str, ...], WeightFormat], ...] = (
        (SAFETENSORS_SUFFIXES, "safetensors"),
        (TORCH_SUFFIXES, "torch"),
    )
    for suffixes, fmt in formats:
        if any(name.endswith(s) and len(name) > len(s) for s in suffixes):  # ".pth" alone is a hidden name
            return fmt
    return None


def detect_checkpoint(path: str | os.PathLike) -> CheckpointLayout:
    """Classify ``path`` and list its weight files.

    Raises:
        CheckpointError: the path is missing, is not a checkpoint, or its index lists missing files.
    """
    path = Path(os.path.abspath(os.fspath(path)))
    if not path.exists():
        raise CheckpointError(path, "no such file or directory", "check the path of ckpt_in")
    if path.is_file():
        return _detect_file(path)
    if not path.is_dir():
        raise CheckpointError(path, "not a regular file or directory", _ACCEPTED)
    return _detect_directory(path)


def _detect_file(path: Path) -> CheckpointLayout:
    if path.name.endswith(".index.json") or path.name == CONFIG_FILE:
        raise CheckpointError(path, "is part of a model directory", f"pass the directory {path.parent} instead")
    fmt = weight_format_of(path)
    if fmt is None:
        raise CheckpointError(path, "not a checkpoint (unknown file type)", _ACCEPTED)
    return CheckpointLayout(path=path, kind="state_dict", format=fmt, shards=[path.name])


def _detect_directory(path: Path) -> CheckpointLayout:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        found = sorted(p.name for p in path.iterdir() if weight_format_of(p) is not None)
        hint = f" (it holds {', '.join(found[:3])}: pass one of them with --arch)" if found else ""
        raise CheckpointError(path, f"not a checkpoint: no config.json{hint}", _ACCEPTED)
    if (path / "adapter_config.json").exists():
        raise CheckpointError(
            path,
            "holds a PEFT adapter (adapter_config.json), whose lora_A would not match folded norms",
            "convert the base model before attaching adapters, or merge the adapter first",
        )
    config = read_json(config_path)
    if "architecture" in config and "model_type" not in config:
        kind: CheckpointKind = "timm"
    else:
        kind = "transformers"
    if config.get("quantization_config"):
        raise CheckpointError(
            path,
            "holds a quantized model (config.json has quantization_config); quantized weights cannot be folded",
            "convert the unquantized model, then quantize it",
        )
    layout = None
    for index_name, single_name, fmt in _WEIGHT_FILES:
        if (path / index_name).is_file():
            index = read_json(path / index_name)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(path / index_name, "index has no weight_map", "restore the index file")
            shards = sorted(set(weight_map.values()))
            layout = CheckpointLayout(path, kind, fmt, shards, index_name, index, config)
            break
        if (path / single_name).is_file():
            layout = CheckpointLayout(path, kind, fmt, [single_name], None, None, config)
            break
    if layout is None:
        raise CheckpointError(
            path, "no weights: neither model.safetensors(.index.json) nor pytorch_model.bin(.index.json)", _ACCEPTED
        )
    for shard in layout.shards:
        if not (path / shard).is_file():
            raise CheckpointError(
                path / shard, f"listed in {layout.index_file} but missing", "download the missing shard again"
            )
    _list_other_files(layout)
    return layout


def _list_other_files(layout: CheckpointLayout) -> None:
    own = set(layout.shards) | {CONFIG_FILE} | ({layout.index_file} if layout.index_file else set())
    for dirpath, dirnames, filenames in os.walk(layout.path):
        dirnames.sort()
        for name in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, name), layout.path)
            if rel in own:
                continue
            top_level = os.sep not in rel
            if top_level and any(fnmatch.fnmatch(name, pattern) for pattern in _OTHER_WEIGHT_PATTERNS):
                layout.skipped_files.append(rel)
            else:
                layout.carried_files.append(rel)
