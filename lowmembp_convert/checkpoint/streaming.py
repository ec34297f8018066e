"""Apply tensor edits to a checkpoint shard by shard, writing shards and index like the input's.

Memory: a safetensors shard is written one tensor at a time; unchanged tensors are copied as byte
ranges and never become tensors, an edited one is computed from the (lazily read) input tensors it
needs and dropped once written. Peak memory is therefore about one edit's inputs and output, whatever
the shard or model size. PyTorch pickle shards are memory-mapped and re-saved whole (torch.save
needs the whole dict), so for them the bound is one shard.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import BinaryIO

from .edits import EditPlan, TensorEdit, compute_edit, edit_blocks
from .errors import CheckpointError
from .metadata import safetensors_metadata
from .safetensors_file import OutputTensor, copy_byte_range, tensor_bytes, write_safetensors
from .store import TensorStore
from .torch_file import save_torch_file

Progress = Callable[[int], None]


def _compute(edit: TensorEdit, key: str, store: TensorStore):
    try:
        return compute_edit(edit, store)
    except ValueError as exc:  # fold_affine_into's shape checks
        raise CheckpointError(store.layout.path, f"cannot fold into {key!r}: {exc}", "check --arch") from exc


def _write_edited(edit: TensorEdit, key: str, store: TensorStore, f: BinaryIO) -> None:
    try:
        for block in edit_blocks(edit, store):  # one block of rows in memory at a time
            f.write(tensor_bytes(block))
    except ValueError as exc:  # fold_affine_into's shape checks
        raise CheckpointError(store.layout.path, f"cannot fold into {key!r}: {exc}", "check --arch") from exc


def shard_assignment(store: TensorStore, edits: EditPlan) -> dict[str, list[str]]:
    """Output shard -> output keys: every input key stays in its shard, added keys join their source's."""
    assignment = {shard: store.keys_in(shard) for shard in store.layout.shards}
    for out_key, source in edits.added.items():
        assignment[store.entries[source].shard].append(out_key)
    return assignment


def write_shards(
    store: TensorStore,
    edits: EditPlan,
    out_dir: Path,
    record: dict,
    progress: Progress | None = None,
    output_names: dict[str, str] | None = None,
) -> dict[str, str]:
    """Write every converted shard into ``out_dir``; return the weight map (key -> shard name).

    Args:
        store: the input checkpoint.
        edits: what changes.
        out_dir: an existing directory.
        record: the conversion record (see :mod:`.metadata`).
        progress: called with a byte count as tensors are written.
        output_names: input shard name -> output file name (a single-file output may be renamed).
    """
    output_names = output_names or {}
    weight_map: dict[str, str] = {}
    for shard, keys in shard_assignment(store, edits).items():
        name = output_names.get(shard, shard)
        path = out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if store.layout.format == "safetensors":
            _write_safetensors_shard(store, edits, shard, keys, path, record, progress)
        else:
            _write_torch_shard(store, edits, shard, keys, path, record, progress)
        weight_map.update(dict.fromkeys(keys, name))
    return weight_map


def _write_safetensors_shard(
    store: TensorStore,
    edits: EditPlan,
    shard: str,
    keys: list[str],
    path: Path,
    record: dict,
    progress: Progress | None,
) -> None:
    tensors = []
    for key in keys:
        edit = edits.edits.get(key)
        source = store.entries[edits.added.get(key, key)]
        if edit is None:
            assert source.location is not None
            write = partial(copy_byte_range, store.path_of(source.shard), source.location.start, source.location.end)
        else:
            write = partial(_write_edited, edit, key, store)
        tensors.append(OutputTensor(key, source.dtype, source.shape, source.nbytes, write))
    metadata = safetensors_metadata(store.headers[shard].metadata, record)
    write_safetensors(path, tensors, metadata, on_bytes=progress)


def _write_torch_shard(
    store: TensorStore,
    edits: EditPlan,
    shard: str,
    keys: list[str],
    path: Path,
    record: dict,
    progress: Progress | None,
) -> None:
    source_file = store.torch_files[shard]
    out = {}
    for key in keys:
        edit = edits.edits.get(key)
        out[key] = store.get(edits.added.get(key, key)) if edit is None else _compute(edit, key, store)
    save_torch_file(source_file, out, path, record)
    if progress is not None:
        progress(sum(store.entries[edits.added.get(k, k)].nbytes for k in keys))


def write_index(store: TensorStore, weight_map: dict[str, str], path: Path, edits: EditPlan) -> None:
    """Write the index like the input's: same metadata, sizes updated for added tensors."""
    index = dict(store.layout.index or {})
    metadata = dict(index.get("metadata") or {})
    added = [store.entries[src] for src in edits.added.values()]
    if "total_size" in metadata:
        metadata["total_size"] = int(metadata["total_size"]) + sum(e.nbytes for e in added)
    if "total_parameters" in metadata:
        count = 0
        for e in added:
            n = 1
            for d in e.shape:
                n *= d
            count += n
        metadata["total_parameters"] = int(metadata["total_parameters"]) + count
    index["metadata"] = metadata
    index["weight_map"] = dict(sorted(weight_map.items()))
    with open(path, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
