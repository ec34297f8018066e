"""Lazy, read-only access to every tensor of a checkpoint, whichever shard holds it.

Only headers are read up front (safetensors) or pickles memory-mapped (PyTorch files); a tensor's
bytes, or a block of its rows, are read when :meth:`TensorStore.get` / :meth:`TensorStore.get_rows`
ask for them, with a positioned read of exactly that byte range (not ``safe_open``: its memory map
keeps every page it touched resident, which made peak RSS grow with the number of folded weights).
A fold whose norm weight sits in another shard than its consumer reads that one small vector there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError
from .formats import CheckpointLayout
from .safetensors_file import DTYPES, TORCH_TO_SAFETENSORS, SafetensorsHeader, TensorInfo, read_header
from .torch_file import TorchFile, load_torch_file

FOLDABLE_DTYPES = ("F64", "F32", "F16", "BF16")
_REDO = "download or save the checkpoint again"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the checkpoint: its shard, dtype (safetensors name) and shape."""

    key: str
    shard: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    location: TensorInfo | None  # byte range inside a safetensors shard; None for PyTorch files


class TensorStore:
    """Every tensor of a checkpoint by key; bytes are read on demand.

    Args:
        layout: what :func:`.formats.detect_checkpoint` found.
    Raises:
        CheckpointError: a shard is corrupt or truncated, a key appears in two shards, or the index
            disagrees with the shards.
    """

    def __init__(self, layout: CheckpointLayout) -> None:
        self.layout = layout
        self.entries: dict[str, TensorEntry] = {}
        self.headers: dict[str, SafetensorsHeader] = {}
        self.torch_files: dict[str, TorchFile] = {}
        for shard in layout.shards:
            self._index_shard(shard)
        self._check_index()

    def _index_shard(self, shard: str) -> None:
        path = self.path_of(shard)
        if self.layout.format == "safetensors":
            header = read_header(path)
            self.headers[shard] = header
            items = [(k, info.dtype, info.shape, info.nbytes, info) for k, info in header.tensors.items()]
        else:
            loaded = load_torch_file(path)
            self.torch_files[shard] = loaded
            items = []
            for k, t in loaded.tensors.items():
                dtype = TORCH_TO_SAFETENSORS.get(t.dtype, str(t.dtype))
                items.append((k, dtype, tuple(t.shape), t.numel() * t.element_size(), None))
        for key, dtype, shape, nbytes, info in items:
            if key in self.entries:
                raise CheckpointError(
                    path, f"tensor {key!r} also appears in {self.entries[key].shard}", "restore the checkpoint"
                )
            self.entries[key] = TensorEntry(key, shard, dtype, shape, nbytes, info)

    def _check_index(self) -> None:
        index = self.layout.index
        if index is None:
            return
        index_path = self.layout.root / (self.layout.index_file or "")
        for key, shard in index["weight_map"].items():
            entry = self.entries.get(key)
            if entry is None:
                raise CheckpointError(
                    self.path_of(shard), f"index lists {key!r} but the shard lacks it", "download the shard again"
                )
            if entry.shard != shard:
                raise CheckpointError(index_path, f"{key!r} is in {entry.shard}, not {shard}", "restore the index file")

    def path_of(self, shard: str) -> Path:
        return self.layout.root / shard

    def keys(self) -> list[str]:
        return list(self.entries)

    def keys_in(self, shard: str) -> list[str]:
        return [k for k, e in self.entries.items() if e.shard == shard]

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def torch_dtype(self, key: str) -> torch.dtype | None:
        return DTYPES.get(self.entries[key].dtype, (None, 0))[0]

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (a fresh CPU tensor for safetensors; memory-mapped for PyTorch files)."""
        entry = self.entries[key]
        if self.layout.format == "torch":
            return self.torch_files[entry.shard].tensors[key]
        return self._read(entry, 0, entry.shape[0] if entry.shape else 1)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor, reading only those bytes from a safetensors shard."""
        entry = self.entries[key]
        if self.layout.format == "torch":
            return self.torch_files[entry.shard].tensors[key][start:stop]
        return self._read(entry, start, stop)

    def _read(self, entry: TensorEntry, start: int, stop: int) -> torch.Tensor:
        # A positioned read of just these bytes into fresh memory, freed with the tensor. (safe_open
        # memory-maps the shard, and every page it touches stays resident for the process.)
        dtype = DTYPES.get(entry.dtype, (None, 0))[0]
        path = self.path_of(entry.shard)
        if dtype is None or entry.location is None:
            raise CheckpointError(path, f"tensor {entry.key!r} has dtype {entry.dtype}, which torch cannot read", _REDO)
        whole = not entry.shape
        shape = entry.shape if whole else (stop - start, *entry.shape[1:])
        row_bytes = entry.nbytes // entry.shape[0] if not whole and entry.shape[0] else 0
        offset = entry.location.start + start * row_bytes
        nbytes = entry.nbytes if whole else (stop - start) * row_bytes
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        buffer = bytearray(nbytes)
        with open(path, "rb") as f:
            f.seek(offset)
            if f.readinto(buffer) != nbytes:
                raise CheckpointError(path, f"file ended inside tensor {entry.key!r}", _REDO)
        return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(shape)

    def close(self) -> None:
        """Drop the memory-mapped PyTorch shards."""
        self.torch_files.clear()
