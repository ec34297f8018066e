"""``convert_checkpoint``: convert a checkpoint on disk into one the stock library loads unchanged.

Steps, in order, so every check happens before anything is written:
1. detect what ``ckpt_in`` is and check ``ckpt_out`` (exists? inside ckpt_in?);
2. read the shard headers (corrupt or truncated files fail here);
3. build the model skeleton on ``meta`` and plan the conversion (``plan_conversion``);
4. turn the plan into tensor edits on checkpoint keys (missing keys, dtypes, shapes fail here);
5. stream the shards into a temporary directory beside ``ckpt_out``, copy the other files, write
   config.json and the index with the conversion record, optionally verify, then rename into place.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import ConvertConfig
from ..plan import Plan
from .atomic import atomic_output
from .edits import EditPlan, edits_from_plan
from .errors import CheckpointError
from .formats import CONFIG_FILE, CheckpointLayout, detect_checkpoint, weight_format_of
from .load import MetaModel, build_meta_model, describe_model, match_keys, tied_groups
from .metadata import (
    METADATA_KEY,
    conversion_record,
    record_from_config,
    record_from_safetensors_metadata,
    updated_config,
)
from .store import TensorStore
from .streaming import write_index, write_shards
from .torch_file import read_torch_record
from .verify import verify_outputs

Planner = Callable[..., Plan]


def _default_planner(model, config: ConvertConfig) -> Plan:
    try:
        from .. import plan_conversion
    except ImportError as exc:  # the analysis is not installed in this build
        raise CheckpointError(
            "lowmembp_convert", "this build has no plan_conversion", "install a complete lowmembp_convert"
        ) from exc
    return plan_conversion(model, config)


def check_paths(layout: CheckpointLayout, ckpt_out: str | os.PathLike, force: bool) -> Path:
    """Refuse an output that exists (without ``force``), overlaps the input, or has the wrong kind."""
    out = Path(os.path.abspath(os.fspath(ckpt_out)))
    src = layout.path
    real_out, real_src = Path(os.path.realpath(out)), Path(os.path.realpath(src))
    if real_out == real_src:
        raise CheckpointError(out, "ckpt_out is ckpt_in", "write the converted checkpoint to a new path")
    if layout.is_directory and real_src in real_out.parents:
        raise CheckpointError(out, f"ckpt_out is inside ckpt_in ({src})", "choose a path outside ckpt_in")
    if real_out in real_src.parents:
        raise CheckpointError(
            out, f"ckpt_in ({src}) is inside ckpt_out, which --force would delete", "choose another ckpt_out"
        )
    if os.path.lexists(out) and not force:
        raise CheckpointError(out, "ckpt_out already exists", "choose a new path, or pass --force to replace it")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError(out, f"{parent} is a file, not a directory", "choose another ckpt_out")
            break
    if not layout.is_directory:
        fmt = weight_format_of(out)
        if fmt != layout.format:
            suffix = ".safetensors" if layout.format == "safetensors" else ".pth / .bin / .pt"
            raise CheckpointError(
                out, f"ckpt_out must be a {layout.format} file like ckpt_in", f"name it with {suffix}"
            )
    return out


def _previous_record(layout: CheckpointLayout, store: TensorStore) -> dict | None:
    record = record_from_config(layout.config)
    if record is not None:
        return record
    for header in store.headers.values():
        record = record_from_safetensors_metadata(header.metadata)
        if record is not None:
            return record
    for loaded in store.torch_files.values():
        record = read_torch_record(loaded.tensors)
        if record is not None:
            return record
    return None


def _main_dtype(store: TensorStore) -> str:
    counts: Counter[str] = Counter()
    for e in store.entries.values():
        counts[e.dtype] += e.nbytes
    floats = [(n, d) for d, n in counts.items() if d in ("F64", "F32", "F16", "BF16")]
    return max(floats)[1] if floats else "F32"


def _copy_other_files(layout: CheckpointLayout, staged: Path) -> None:
    for rel in layout.carried_files:
        dst = staged / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(layout.path / rel, dst)


def _write(
    layout: CheckpointLayout,
    store: TensorStore,
    edits: EditPlan,
    record: dict,
    staged: Path,
    progress: bool,
) -> None:
    from tqdm.auto import tqdm

    total = sum(e.nbytes for e in store.entries.values()) + sum(store.entries[s].nbytes for s in edits.added.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="lowmembp-convert", disable=not progress) as bar:
        if layout.is_directory:
            staged.mkdir()
            weight_map = write_shards(store, edits, staged, record, bar.update)
            if layout.index_file is not None:
                write_index(store, weight_map, staged / layout.index_file, edits)
            _copy_other_files(layout, staged)
            config = updated_config(layout.config or {}, record, untied=bool(edits.untied))
            with open(staged / CONFIG_FILE, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2)
                f.write("\n")
        else:
            staged.parent.mkdir(parents=True, exist_ok=True)
            write_shards(store, edits, staged.parent, record, bar.update, {layout.shards[0]: staged.name})


def convert_checkpoint(
    ckpt_in: str | os.PathLike,
    ckpt_out: str | os.PathLike,
    *,
    arch: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    untie_embeddings: bool = False,
    force: bool = False,
    dry_run: bool = False,
    verify: bool = False,
    verify_rtol: float | None = None,
    progress: bool = True,
    planner: Planner | None = None,
) -> dict[str, Any]:
    """Convert ``ckpt_in`` into ``ckpt_out`` (see the module docstring); return the report.

    Args:
        ckpt_in: a transformers/timm model directory, or a state-dict file (then ``arch`` is needed).
        ckpt_out: where to write a checkpoint of the same kind.
        arch: timm model name or transformers config directory for a bare state dict.
        model_kwargs: extra ``timm.create_model`` arguments (e.g. ``{"num_classes": 10}``).
        untie_embeddings: fold into an output layer tied to the input embedding by untying it.
        force: replace an existing ``ckpt_out``.
        dry_run: plan and report, write nothing.
        verify: compare outputs of both checkpoints (before the output is moved into place).
        verify_rtol: tolerance of ``verify``; None picks one by dtype.
        progress: show a tqdm progress bar.
        planner: ``planner(model, ConvertConfig) -> Plan``; defaults to ``plan_conversion``.
    Raises:
        CheckpointError: for any bad input, or a failed ``verify`` (nothing is written then).
    """
    start = time.perf_counter()
    layout = detect_checkpoint(ckpt_in)
    out = check_paths(layout, ckpt_out, force)
    store = TensorStore(layout)
    meta = build_meta_model(layout, arch, model_kwargs, set(store.keys()))
    keymap = match_keys(meta.model, set(store.keys()), layout.path, meta.library)
    config = ConvertConfig(activations=False, untie_embeddings=untie_embeddings)
    plan = (planner or _default_planner)(meta.model, config)
    if plan.capture.startswith("failed"):
        raise CheckpointError(
            layout.path,
            f"the model's graph could not be traced on the meta device, so no norm can be planned ({plan.capture})",
            "load the model and use lowmembp_convert.convert(model, example_inputs=...), then save it",
        )
    edits = edits_from_plan(plan, keymap, store, tied_groups(meta.model), untie_embeddings)
    record = conversion_record(
        meta.arch, edits.folded + edits.already_folded, edits.untied, _previous_record(layout, store)
    )
    report = _report(layout, store, meta, plan, edits, out, keymap.rule, record, dry_run)
    if dry_run:
        report["seconds"] = round(time.perf_counter() - start, 3)
        return report
    with atomic_output(out, replace=force) as staged:
        _write(layout, store, edits, record, staged, progress)
        if verify:
            result = verify_outputs(
                meta, layout, layout.path, staged, _main_dtype(store), store.total_bytes(), verify_rtol
            )
            report["verify"] = result
            if result["status"] == "failed":
                raise CheckpointError(
                    out,
                    f"--verify failed: outputs differ by {result['max_rel_error']:.3g} (relative) "
                    f"> {result['rtol']:.3g}",
                    "nothing was written; report this with the plan (--dry-run --json)",
                )
    store.close()
    report["seconds"] = round(time.perf_counter() - start, 3)
    return report


def _report(
    layout: CheckpointLayout,
    store: TensorStore,
    meta: MetaModel,
    plan: Plan,
    edits: EditPlan,
    out: Path,
    key_rule: str,
    record: dict,
    dry_run: bool,
) -> dict[str, Any]:
    return {
        "input": str(layout.path),
        "output": str(out),
        "dry_run": dry_run,
        "kind": layout.kind,
        "format": layout.format,
        "model": describe_model(meta),
        "architecture": meta.arch,
        "shards": list(layout.shards),
        "index": layout.index_file,
        "tensors": len(store.entries),
        "bytes": store.total_bytes(),
        "key_rule": key_rule,
        "capture": plan.capture,
        "notes": list(plan.notes),
        "norms": edits.sites,
        "folded": edits.folded,
        "already_folded": edits.already_folded,
        "untied": edits.untied,
        "changed_tensors": sorted(edits.edits),
        "added_tensors": sorted(edits.added),
        "carried_files": list(layout.carried_files),
        "skipped_files": list(layout.skipped_files),
        METADATA_KEY: record,
    }
