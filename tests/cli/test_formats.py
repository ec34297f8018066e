"""File formats: the streaming safetensors writer, header validation, PyTorch pickle wrappers."""

from __future__ import annotations

import json
import struct
from functools import partial

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lowmembp_convert.checkpoint.errors import CheckpointError
from lowmembp_convert.checkpoint.safetensors_file import (
    TORCH_TO_SAFETENSORS,
    OutputTensor,
    copy_byte_range,
    read_header,
    tensor_bytes,
    write_safetensors,
)
from lowmembp_convert.checkpoint.torch_file import load_torch_file, read_torch_record, save_torch_file


def _odd_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "bf16.odd": torch.randn(3, 5, generator=gen).to(torch.bfloat16),
        "f32.weight": torch.randn(9, 41, generator=gen),
        "f16.vec": torch.randn(7, generator=gen).half(),
        "f64.scalar": torch.tensor(3.5, dtype=torch.float64),
        "i64.ids": torch.arange(5),
        "bool.mask": torch.tensor([True, False, True]),
        "u8.empty": torch.zeros(0, dtype=torch.uint8),
    }


def test_streaming_writer_round_trip(tmp_path):
    tensors = _odd_tensors()
    path = tmp_path / "out.safetensors"
    entries = [
        OutputTensor(k, TORCH_TO_SAFETENSORS[t.dtype], tuple(t.shape), t.numel() * t.element_size(),
                     partial(lambda t, f: f.write(tensor_bytes(t)), t))
        for k, t in tensors.items()
    ]  # fmt: skip
    written = []
    write_safetensors(path, entries, {"format": "pt", "x": "y"}, on_bytes=written.append)
    assert sum(written) == sum(e.nbytes for e in entries)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "x": "y"}
        for k, t in tensors.items():
            assert torch.equal(f.get_tensor(k), t), k
    header = read_header(path)
    starts = sorted(info.start for info in header.tensors.values())
    assert starts[0] % 8 == 0  # data starts aligned
    assert {k: info.dtype for k, info in header.tensors.items()}["bf16.odd"] == "BF16"


def test_byte_range_copy_matches_source(tmp_path):
    tensors = _odd_tensors()
    src = tmp_path / "src.safetensors"
    save_file(tensors, src, metadata={"format": "pt"})
    header = read_header(src)
    entries = [
        OutputTensor(k, i.dtype, i.shape, i.nbytes, partial(copy_byte_range, src, i.start, i.end))
        for k, i in header.tensors.items()
    ]
    dst = tmp_path / "dst.safetensors"
    write_safetensors(dst, entries, header.metadata)
    with safe_open(str(dst), "pt") as f:
        for k, t in tensors.items():
            assert torch.equal(f.get_tensor(k), t)


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda b: b[:4], "truncated safetensors file"),
        (lambda b: struct.pack("<Q", 10**9) + b[8:], "corrupt or truncated"),
        (lambda b: b[:-3], "truncated safetensors file"),
        (lambda b: b[:8] + b"[" + b[9:], "corrupt safetensors header"),
    ],
)
def test_header_validation(tmp_path, mutate, fragment):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(4, 4)}, path)
    path.write_bytes(mutate(path.read_bytes()))
    with pytest.raises(CheckpointError) as info:
        read_header(path)
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_header_with_inconsistent_sizes(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match="has 8 bytes for shape"):
        read_header(path)


def test_training_checkpoint_wrapper_is_kept(tmp_path):
    state = {"w": torch.randn(3, 3)}
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 7, "state_dict": state, "optimizer": {"lr": 0.1}}, path)
    loaded = load_torch_file(path)
    assert loaded.wrapper_key == "state_dict"
    out = tmp_path / "out.pth"
    save_torch_file(loaded, {"w": state["w"] * 2}, out, {"folded": ["x"]})
    again = torch.load(out, weights_only=True)
    assert again["epoch"] == 7 and again["optimizer"] == {"lr": 0.1}
    assert torch.equal(again["state_dict"]["w"], state["w"] * 2)
    assert read_torch_record(load_torch_file(out).tensors) == {"folded": ["x"]}


def test_plain_state_dict_record_does_not_break_load_state_dict(tmp_path):
    module = torch.nn.Linear(3, 2)
    path = tmp_path / "w.pth"
    torch.save(module.state_dict(), path)
    loaded = load_torch_file(path)
    out = tmp_path / "o.pth"
    save_torch_file(loaded, dict(loaded.tensors), out, {"folded": []})
    torch.nn.Linear(3, 2).load_state_dict(torch.load(out, weights_only=True))  # strict, no extra keys


def test_torch_messages_lose_colour_codes_and_keep_the_cause():
    import pickle

    from lowmembp_convert.checkpoint.torch_file import _first_line

    exc = pickle.UnpicklingError(
        "Weights only load failed. This file can still be loaded, \x1b[1mdo those steps only if you trust it\x1b[0m.\n"
        "\t(1) Re-running `torch.load` with `weights_only` set to `False` will likely succeed.\n"
        "\tWeightsUnpickler error: Unsupported global: GLOBAL my.Config was not an allowed global by default."
    )
    assert _first_line(exc) == "Unsupported global: GLOBAL my.Config was not an allowed global by default."
    assert _first_line(RuntimeError("\x1b[31mPytorchStreamReader failed\x1b[0m\nmore")) == "PytorchStreamReader failed"


@pytest.mark.parametrize(
    "name, fmt",
    [("model_best.pth.tar", "torch"), ("ckpt.PT.TAR", "torch"), ("w.pth", "torch"), ("w.safetensors", "safetensors"),
     (".pth", None), ("weights.tar", None), ("w.txt", None)],
)  # fmt: skip
def test_weight_format_by_name(name, fmt):
    from pathlib import Path

    from lowmembp_convert.checkpoint.formats import weight_format_of

    assert weight_format_of(Path(name)) == fmt
