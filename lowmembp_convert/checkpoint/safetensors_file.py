"""The safetensors file format, read by its header and written one tensor at a time.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(``{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}}``) and then
the raw tensor bytes. Reading the header alone tells where every tensor lives, so an unchanged tensor
is copied as a byte range (in fixed-size chunks, never materialised) and a changed one is written
from memory: a shard is converted with memory for one tensor, not for the whole shard.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from .errors import CheckpointError

# safetensors dtype name -> (torch dtype or None when torch has none, bytes per element)
DTYPES: dict[str, tuple[torch.dtype | None, float]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U64": (getattr(torch, "uint64", None), 8),
    "U32": (getattr(torch, "uint32", None), 4),
    "U16": (getattr(torch, "uint16", None), 2),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "C64": (getattr(torch, "complex64", None), 8),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 1),
    "F8_E5M2": (getattr(torch, "float8_e5m2", None), 1),
    "F8_E8M0": (getattr(torch, "float8_e8m0fnu", None), 1),
    "F4": (None, 0.5),
    "F6_E2M3": (None, 0.75),
    "F6_E3M2": (None, 0.75),
}
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {dt: name for name, (dt, _) in DTYPES.items() if dt is not None}
COPY_CHUNK_BYTES = 64 * 1024 * 1024
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives inside a safetensors file (absolute byte offsets)."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed and validated header of one safetensors file."""

    path: Path
    metadata: dict[str, str] | None
    tensors: dict[str, TensorInfo]


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse a safetensors header and check that the file holds every byte it promises.

    Raises:
        CheckpointError: the file is truncated, its header is not valid JSON, or offsets disagree.
    """
    path = Path(path)
    fix = "download or save the checkpoint again"
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(path, f"truncated safetensors file ({size} bytes, no header)", fix)
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(path, "corrupt or truncated safetensors header", fix)
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(path, f"corrupt safetensors header ({exc})", fix) from exc
    metadata = header.pop("__metadata__", None)
    base = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    try:
        for name, entry in header.items():
            begin, end = (int(v) for v in entry["data_offsets"])
            shape = tuple(int(d) for d in entry["shape"])
            dtype = str(entry["dtype"])
            per_element = DTYPES.get(dtype, (None, None))[1]
            if per_element is not None and end - begin != math.ceil(math.prod(shape) * per_element):
                raise ValueError(f"tensor {name!r} has {end - begin} bytes for shape {list(shape)} {dtype}")
            if not 0 <= begin <= end:
                raise ValueError(f"tensor {name!r} has offsets {begin}..{end}")
            tensors[name] = TensorInfo(dtype, shape, base + begin, base + end)
            data_end = max(data_end, end)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(path, f"corrupt safetensors header ({exc})", fix) from exc
    if base + data_end > size:
        raise CheckpointError(
            path, f"truncated safetensors file: header promises {base + data_end} bytes, file has {size}", fix
        )
    if metadata is not None and not isinstance(metadata, dict):
        raise CheckpointError(path, "corrupt safetensors header (__metadata__ is not an object)", fix)
    return SafetensorsHeader(path, metadata, tensors)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, as safetensors stores them."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def copy_byte_range(src: str | os.PathLike, start: int, end: int, dst: BinaryIO) -> None:
    """Copy ``src[start:end]`` into ``dst`` in bounded chunks (memory: one chunk)."""
    with open(src, "rb") as f:
        f.seek(start)
        remaining = end - start
        while remaining > 0:
            chunk = f.read(min(COPY_CHUNK_BYTES, remaining))
            if not chunk:
                raise CheckpointError(src, "file ended early while copying a tensor", "check the input file")
            dst.write(chunk)
            remaining -= len(chunk)


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of an output file: its header entry and how to produce its bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    write: Callable[[BinaryIO], None]  # writes exactly ``nbytes`` bytes


def _alignment_key(tensor: OutputTensor) -> tuple[float, str]:
    # widest dtypes first (as the safetensors serializer does): every tensor starts aligned
    return (-DTYPES.get(tensor.dtype, (None, 1))[1], tensor.name)


def write_safetensors(
    path: str | os.PathLike,
    tensors: Iterable[OutputTensor],
    metadata: dict[str, str] | None,
    on_bytes: Callable[[int], None] | None = None,
) -> int:
    """Write a safetensors file tensor by tensor; return the number of bytes of tensor data.

    Args:
        path: the file to create.
        tensors: header entries with their byte producers; written widest dtype first.
        metadata: string-to-string metadata (``format: pt`` is what transformers expects).
        on_bytes: called with the size of each tensor after it is written (progress bars).
    """
    ordered = sorted(tensors, key=_alignment_key)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for t in ordered:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad so the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in ordered:
            before = f.tell()
            t.write(f)
            written = f.tell() - before
            if written != t.nbytes:
                raise RuntimeError(f"{path}: tensor {t.name!r} wrote {written} bytes, expected {t.nbytes}")
            if on_bytes is not None:
                on_bytes(t.nbytes)
    return offset
