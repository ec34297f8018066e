"""``--verify``: load the input and the output with the stock library and compare outputs.

Both models are loaded exactly as a user would load them (``from_pretrained`` for transformers
directories, ``timm.create_model`` + ``load_state_dict`` for state dicts), in float32, and run in
eval mode on one seeded random batch. The check is skipped, and says so, when the two models would
not fit in the available memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..capture import example_inputs_for
from ..verify import first_tensor
from .formats import CheckpointLayout
from .load import MetaModel, load_transformers_config, sync_timm_input_size
from .torch_file import load_torch_file

# default max |a - b| / max |a| by checkpoint dtype: one rounding per folded weight in that dtype
DEFAULT_RTOL = {"F64": 1e-10, "F32": 1e-4, "F16": 2e-3, "BF16": 1e-2}


def _available_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return 1 << 62  # unknown: try


def _load_state_dict(path: Path, fmt: str) -> dict[str, torch.Tensor]:
    if fmt == "safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return dict(load_torch_file(path).tensors)


def _load(meta: MetaModel, layout: CheckpointLayout, path: Path, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # weights missing from the checkpoint get the same init in both loads
    if meta.library == "timm":
        import timm

        model = timm.create_model(meta.arch, pretrained=False, **meta.model_kwargs)
        sync_timm_input_size(model, meta.model_kwargs)
        target = path / layout.shards[0] if layout.is_directory else path
        model.load_state_dict(_load_state_dict(target, layout.format))
        return model.eval().float()
    cls = type(meta.model)
    if layout.is_directory:
        return cls.from_pretrained(str(path), dtype=torch.float32).eval()
    assert meta.config_dir is not None
    config = load_transformers_config(meta.config_dir, path, meta.model_kwargs)
    model = cls._from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(_load_state_dict(path, layout.format), strict=False)
    if unexpected:
        raise RuntimeError(f"{path}: unexpected keys {unexpected[:3]}")
    model.tie_weights()
    return model.eval()


def example_batch(model: nn.Module, seed: int, batch: int = 2, seq_len: int = 16) -> dict[str, Any]:
    """A seeded random batch as keywords (``x`` for timm): the one builder ``convert()`` uses too."""
    args, kwargs = example_inputs_for(model, batch=batch, seq_len=seq_len, seed=seed, flags=False)
    return {"x": args[0], **kwargs} if args else kwargs


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No loading progress bars or load reports from transformers while verifying."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _first_tensor(out: Any) -> torch.Tensor:
    found = first_tensor(out)
    if found is None:
        raise RuntimeError("model returned no tensor")
    return found


def verify_outputs(
    meta: MetaModel,
    layout: CheckpointLayout,
    original: Path,
    converted: Path,
    dtype: str,
    total_bytes: int,
    rtol: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare the outputs of ``original`` and ``converted`` on one random batch.

    Returns:
        ``{"status": "passed"|"failed"|"skipped", "max_rel_error", "rtol", "reason"}``.
    """
    rtol = DEFAULT_RTOL.get(dtype, 1e-2) if rtol is None else rtol
    bytes_per = {"F64": 8, "F16": 2, "BF16": 2}.get(dtype, 4)
    need = int(2.5 * total_bytes * 4 / bytes_per)  # two float32 copies and the activations
    if need > 0.8 * _available_bytes():
        return {
            "status": "skipped",
            "rtol": rtol,
            "reason": f"two float32 copies need about {need / 2**30:.1f} GiB, more than is available",
        }
    with torch.no_grad(), _quiet_transformers():
        a_model = _load(meta, layout, original, seed)
        batch = example_batch(a_model, seed)
        a = _first_tensor(a_model(**batch)).double()
        del a_model
        b_model = _load(meta, layout, converted, seed)
        b = _first_tensor(b_model(**batch)).double()
        del b_model
    scale = a.abs().max().item()
    err = (a - b).abs().max().item() / (scale if scale > 0 else 1.0)
    ok = math.isfinite(err) and err <= rtol
    return {
        "status": "passed" if ok else "failed",
        "max_rel_error": err,
        "rtol": rtol,
        "inputs": {k: list(v.shape) for k, v in batch.items()},
    }
