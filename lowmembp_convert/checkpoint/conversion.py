"""``convert_checkpoint``: convert a checkpoint on disk into one the stock library loads unchanged.

Steps, in order, so every check happens before anything is written:
1. detect what ``ckpt_in`` is and check ``ckpt_out`` (exists? inside ckpt_in? writable?); remove
   temporary directories that killed runs left for the same ``ckpt_out`` (see :mod:`.atomic`);
2. read the shard headers (corrupt or truncated files fail here);
3. build the model skeleton on ``meta``, check every tensor's shape against it (a wrong head size
   fails here), and plan the conversion (``plan_conversion`` with ``norms="fold"``: on disk the
   affine is folded, the paper's form); a norm that cannot be folded keeps its affine untouched;
4. turn the plan into tensor edits on checkpoint keys (missing keys, dtypes, shapes fail here); a
   plan that folds nothing (a post-norm model) writes nothing unless ``force_copy``;
5. stream the shards into a temporary directory beside ``ckpt_out``, copy the other files, write
   config.json and the index with the conversion record, give every file the permissions of its
   input, optionally verify, then rename into place.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import ConvertConfig
from ..plan import Plan
from ..report import CheckpointSummary, Report
from .atomic import (
    TEMP_MARKER,
    atomic_output,
    deferred_interrupts,
    find_stale_temp_dirs,
    interrupt_guard,
    remove_tree,
)
from .edits import EditPlan, edits_from_plan
from .errors import CheckpointError
from .formats import CONFIG_FILE, CheckpointLayout, detect_checkpoint, weight_format_of
from .load import MetaModel, build_meta_model, check_shapes, describe_model, match_keys, tied_groups
from .metadata import (
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
Log = Callable[[str], None]


def _default_planner(model, config: ConvertConfig) -> Plan:
    from ..analysis import plan_conversion

    return plan_conversion(model, config)


def check_paths(layout: CheckpointLayout, ckpt_out: str | os.PathLike, force: bool) -> Path:
    """Refuse an output that exists (without ``force``), overlaps the input, has the wrong kind, or
    cannot be created (its nearest existing parent is read-only): checked before any work, naming ckpt_out."""
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
    if not layout.is_directory:
        fmt = weight_format_of(out)
        if fmt != layout.format:
            suffix = ".safetensors" if layout.format == "safetensors" else ".pth / .bin / .pt / .pth.tar"
            raise CheckpointError(
                out, f"ckpt_out must be a {layout.format} file like ckpt_in", f"name it with {suffix}"
            )
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError(out, f"{parent} is a file, not a directory", "choose another ckpt_out")
            if not os.access(parent, os.W_OK | os.X_OK):
                where = f"in {parent}" if parent == out.parent else f"{out.parent} in {parent}"
                raise CheckpointError(
                    out,
                    f"cannot create {where}: read-only or permission denied",
                    "choose a ckpt_out in a directory you can write to",
                )
            break
    return out


def _human(nbytes: int) -> str:
    if nbytes < 1024:
        return f"{nbytes} B"
    size = nbytes / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def clear_stale_temp_dirs(out: Path, dry_run: bool, log: Log | None) -> list[dict[str, Any]]:
    """Remove the temporary directories killed runs left for ``out`` (report the doubtful ones)."""
    found = []
    for stale in find_stale_temp_dirs(out):
        size = _human(stale.nbytes)
        if stale.removable and not dry_run:
            remove_tree(stale.path)
            action = "left" if os.path.lexists(stale.path) else "removed"
            reason = stale.reason if action == "removed" else f"{stale.reason}, but it could not be removed"
        else:
            action = "would remove" if stale.removable else "left"
            reason = stale.reason
        message = {
            "removed": f"removed stale temporary directory {stale.path} ({size}): {reason}",
            "would remove": f"would remove stale temporary directory {stale.path} ({size}): {reason}",
            "left": f"left temporary directory {stale.path} ({size}) in place: {reason}",
        }[action]
        if log is not None:
            log(message)
        found.append({"path": str(stale.path), "bytes": stale.nbytes, "action": action, "reason": reason})
    return found


_ACTIVATIONS_STILL = "convert() at training time still swaps the activations"


def _nothing_to_fold(edits: EditPlan) -> str | None:
    """Why the output would be a mere copy, or None when some norm is (or was) folded."""
    if any(site["action"] == "fold" for site in edits.sites):
        return None
    keep = sum(site["action"] == "keep_affine" for site in edits.sites)
    skip = len(edits.sites) - keep
    if keep:
        return (
            f"nothing to fold in a post-norm model ({keep} norm(s) keep their affine, {skip} skipped: see the "
            "plan); memory savings come from convert() at training time"
        )
    if skip:
        return f"nothing to fold ({skip} norm(s), all skipped: see the plan); {_ACTIVATIONS_STILL}"
    return f"nothing to fold (no LayerNorm/RMSNorm found); {_ACTIVATIONS_STILL}"


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


def _copy_mode(src: Path, dst: Path) -> None:
    """Give ``dst`` the permission bits of ``src``."""
    try:
        os.chmod(dst, stat.S_IMODE(os.stat(src).st_mode) & 0o777)
    except OSError:
        pass


def _copy_modes(layout: CheckpointLayout, staged: Path) -> None:
    """Output files get the permissions of the input files they come from (carried files keep theirs)."""
    if not layout.is_directory:
        _copy_mode(layout.path, staged)
        return
    for name in [*layout.shards, layout.index_file, CONFIG_FILE]:
        if name and (layout.path / name).exists() and (staged / name).exists():
            _copy_mode(layout.path / name, staged / name)


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
    _copy_modes(layout, staged)


def _write_error(exc: OSError, out: Path) -> CheckpointError:
    """A failed write names ckpt_out (never the temporary directory); a failed read names the input."""
    name = os.fspath(exc.filename) if exc.filename is not None else None
    reading = name is not None and TEMP_MARKER not in name and not name.startswith(os.fspath(out))
    what = exc.strerror or str(exc) or type(exc).__name__
    if reading:
        return CheckpointError(name, f"cannot read ({what}); nothing was written", "check the file and its permissions")
    return CheckpointError(
        out, f"writing failed ({what}); nothing was written", f"check free space and permissions in {out.parent}"
    )


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def convert_checkpoint(
    ckpt_in: str | os.PathLike,
    ckpt_out: str | os.PathLike | None,
    *,
    arch: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    untie_embeddings: bool = False,
    force: bool = False,
    force_copy: bool = False,
    dry_run: bool = False,
    verify: bool = False,
    verify_rtol: float | None = None,
    progress: bool = True,
    planner: Planner | None = None,
    log: Log | None = None,
    on_commit: Callable[[Path], None] | None = None,
) -> Report:
    """Convert ``ckpt_in`` into ``ckpt_out`` (see the module docstring); return the
    :class:`~lowmembp_convert.report.Report` (its ``checkpoint`` says what was read and written).

    Args:
        ckpt_in: a transformers/timm model directory, or a state-dict file (then ``arch`` is needed).
        ckpt_out: where to write a checkpoint of the same kind; may be None with ``dry_run``.
        arch: timm model name or transformers config directory for a bare state dict.
        model_kwargs: extra ``timm.create_model`` arguments (e.g. ``{"num_classes": 10}``), or config
            attribute overrides when ``arch`` is a transformers config directory.
        untie_embeddings: fold into an output layer tied to the input embedding by untying it.
        force: replace an existing ``ckpt_out``.
        force_copy: write the output even when nothing can be folded (a post-norm model); without
            it such a run writes nothing and the report has ``written: False``.
        dry_run: plan and report, write nothing.
        verify: compare outputs of both checkpoints (before the output is moved into place).
        verify_rtol: tolerance of ``verify``; None picks one by dtype.
        progress: show a tqdm progress bar.
        planner: ``planner(model, ConvertConfig) -> Plan``; defaults to ``plan_conversion``.
        log: called with one-line notes as they happen (stale temporary directories removed...).
        on_commit: called with the output path the moment it is in place (interrupts are held).
    Raises:
        CheckpointError: for any bad input, or a failed ``verify`` (nothing is written then).
        KeyboardInterrupt: on SIGINT/SIGTERM; the output is in place only if ``on_commit`` was called.
    """
    with interrupt_guard(log):
        return _convert(
            ckpt_in, ckpt_out, arch, model_kwargs, untie_embeddings, force, force_copy, dry_run, verify,
            verify_rtol, progress, planner or _default_planner, log, on_commit,
        )  # fmt: skip


def _convert(
    ckpt_in: str | os.PathLike,
    ckpt_out: str | os.PathLike | None,
    arch: str | None,
    model_kwargs: dict[str, Any] | None,
    untie_embeddings: bool,
    force: bool,
    force_copy: bool,
    dry_run: bool,
    verify: bool,
    verify_rtol: float | None,
    progress: bool,
    planner: Planner,
    log: Log | None,
    on_commit: Callable[[Path], None] | None,
) -> Report:
    start = time.perf_counter()
    if ckpt_out is None and not dry_run:
        raise CheckpointError(ckpt_in, "no ckpt_out given", "say where to write the output, or pass --dry-run")
    layout = detect_checkpoint(ckpt_in)
    out = check_paths(layout, ckpt_out, force) if ckpt_out is not None else None
    stale = clear_stale_temp_dirs(out, dry_run, log) if out is not None else []
    store = TensorStore(layout)
    meta = build_meta_model(layout, arch, model_kwargs, set(store.keys()))
    keymap = match_keys(meta.model, set(store.keys()), layout.path, meta.library)
    check_shapes(meta, keymap, {k: e.shape for k, e in store.entries.items()}, layout.path, layout.kind)
    # On disk the affine is folded (the paper's form): the checkpoint loads into the stock class with
    # identity norms, which a later convert() shares as they are.
    config = ConvertConfig(
        activations=False, norms="fold", adapter_inputs=False, untie_embeddings=untie_embeddings, loss_head=False
    )
    with deferred_interrupts():  # a KeyboardInterrupt inside fake-tensor tracing can abort the process
        plan = planner(meta.model, config)
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
    summary = report.checkpoint
    summary.stale_temp_dirs = stale
    summary.nothing_to_fold = _nothing_to_fold(edits)
    if dry_run or (summary.nothing_to_fold and not force_copy):
        store.close()
        summary.seconds = round(time.perf_counter() - start, 3)
        return report
    assert out is not None
    try:
        with atomic_output(out, replace=force, on_commit=on_commit) as staged:
            _write(layout, store, edits, record, staged, progress)
            if verify:
                summary.verify = _verify(meta, layout, staged, store, verify_rtol, out)
    except OSError as exc:
        raise _write_error(exc, out) from exc
    if layout.is_directory:
        _copy_mode(layout.path, out)  # after the rename: a read-only directory could not be moved
    summary.written = True
    store.close()
    summary.seconds = round(time.perf_counter() - start, 3)
    return report


def _verify(
    meta: MetaModel, layout: CheckpointLayout, staged: Path, store: TensorStore, rtol: float | None, out: Path
) -> dict[str, Any]:
    try:
        result = verify_outputs(meta, layout, layout.path, staged, _main_dtype(store), store.total_bytes(), rtol)
    except CheckpointError:
        raise
    except Exception as exc:  # loading or running a model: one line, not a traceback
        raise CheckpointError(
            out,
            f"--verify could not load or run the models ({_first_line(exc)})",
            "nothing was written; convert without --verify, or report this with the plan (--dry-run --json)",
        ) from exc
    if result["status"] == "failed":
        raise CheckpointError(
            out,
            f"--verify failed: outputs differ by {result['max_rel_error']:.3g} (relative) > {result['rtol']:.3g}",
            "nothing was written; report this with the plan (--dry-run --json)",
        )
    return result


def _report(
    layout: CheckpointLayout,
    store: TensorStore,
    meta: MetaModel,
    plan: Plan,
    edits: EditPlan,
    out: Path | None,
    key_rule: str,
    record: dict,
    dry_run: bool,
) -> Report:
    summary = CheckpointSummary(
        input=str(layout.path),
        output=str(out) if out is not None else None,
        dry_run=dry_run,
        kind=layout.kind,
        format=layout.format,
        architecture=meta.arch,
        shards=list(layout.shards),
        index=layout.index_file,
        tensors=len(store.entries),
        bytes=store.total_bytes(),
        key_rule=key_rule,
        norms=edits.sites,
        folded=edits.folded,
        already_folded=edits.already_folded,
        untied=edits.untied,
        changed_tensors=sorted(edits.edits),
        added_tensors=sorted(edits.added),
        carried_files=list(layout.carried_files),
        skipped_files=list(layout.skipped_files),
        unconverted_state_dicts=[k for f in store.torch_files.values() for k in f.other_state_dicts],
        record=record,
    )
    return Report(model=describe_model(meta), plan=plan, checkpoint=summary)
