"""Where the saved bytes of one block go, stock vs approx vs auto, and where memory sharing is lost.

``python bench/cpu_memory.py --explain WORKLOAD`` runs the workload with three blocks (five for
Swin's stage 3), batch 1, under ``activation_memory(explain=True)``, keeps the storages that a module
of block 1 saved first (a middle block: the first one's input may not need grad under LoRA, the last one
feeds the head), and prints them (size, dtype, shape, every module/op that saved the storage). Then, for each norm
that ``convert()`` turned into a memory-sharing norm, it checks that every consumer saved the very
storage the norm saved; a consumer that saved a different tensor of the same number of elements
(an autocast or PEFT dtype cast, a copy) is where sharing is lost, and is named.
"""

from __future__ import annotations

from cpu_memory import COLUMNS, measure_once
from workloads import Workload, build_model, workloads

from lowmembp_convert.memory import MIB, SavedTensor


def _fqn(label: str) -> str:
    return label.split(" (", 1)[0]


def _in_block(t: SavedTensor, block: str) -> bool:
    # The first saver owns the storage: a norm output that the next block's Linear also saves
    # belongs to the norm's block, so no storage is counted in two blocks.
    return block in _fqn(t.savers[0])


def _numel(t: SavedTensor) -> int:
    n = 1
    for d in t.shape:
        n *= d
    return n


def explain_depth(workload: Workload) -> int:
    return workload.depths[1] + 1


def saved_tensors(workload: Workload, column_key: str, tiny: bool) -> tuple[list[SavedTensor], object]:
    """Every storage saved at :func:`explain_depth`, batch 1, and the model's conversion report."""
    column = next(c for c in COLUMNS if c.key == column_key)
    model = build_model(workload, explain_depth(workload), tiny)
    runnable = column.prepare(workload, model)
    saved = measure_once(workload, column, model, runnable, batch=1, tiny=tiny, explain=True)
    return list(saved.tensors), getattr(model, "lowmembp_report", None)


def sharing_diagnosis(tensors: list[SavedTensor], report: object, block: str) -> list[str]:
    """One line per (norm of the block, consumer): shared, or what the consumer saved instead.

    ``tensors`` must be every saved storage (a norm's consumers may sit in the next block).
    """
    if report is None:
        return ["no conversion report on the model"]
    lines = []
    for site in report.plan.norms:
        if block not in site.module:
            continue
        if site.action == "skip":
            lines.append(f"{site.module}: skipped ({site.reason})")
            continue
        own = [t for t in tensors if any(_fqn(s) == site.module for s in t.savers)]
        output = max(own, key=lambda t: t.nbytes, default=None)
        if output is None:
            lines.append(f"{site.module}: saved nothing?")
            continue
        for consumer in site.consumers:
            savers = {_fqn(s) for s in output.savers}
            if any(s == consumer.module or s.startswith(consumer.module + ".") for s in savers):
                lines.append(f"shared   {site.module} -> {consumer.module}: one {output.dtype} storage")
                continue
            copies = [
                t
                for t in tensors
                if t is not output
                and _numel(t) == _numel(output)
                and any(_fqn(s) == consumer.module or _fqn(s).startswith(consumer.module + ".") for s in t.savers)
            ]
            if not copies:
                lines.append(f"no copy  {site.module} -> {consumer.module}: consumer saves no input (frozen)")
            for t in copies:
                lines.append(
                    f"LOST     {site.module} ({output.dtype}) -> {consumer.module}: consumer saved its own "
                    f"{t.dtype} [{'x'.join(map(str, t.shape))}] {t.nbytes / MIB:.3f} MiB via {' | '.join(t.savers)}"
                )
    return lines


def explain(name: str, tiny: bool = False) -> str:
    """The printable explanation for workload ``name``."""
    chosen = {w.name: w for w in workloads(tiny)}
    if name not in chosen:
        raise SystemExit(f"unknown workload {name!r}; choose from {sorted(chosen)}")
    workload = chosen[name]
    block = workload.block.format(1)
    out = [f"{workload.title}: storages saved by block '{block}' (depth {explain_depth(workload)}, batch 1)"]
    for key in ("eager", "approx", "auto"):
        tensors, report = saved_tensors(workload, key, tiny)
        mine = [t for t in tensors if _in_block(t, block)]
        total = sum(t.nbytes for t in mine)
        out += ["", f"== {key}: {total / MIB:.3f} MiB in {len(mine)} storages"]
        out += [str(t) for t in mine]
        if key != "eager":
            out += ["", f"== memory sharing of {key}'s converted norms"]
            out += sharing_diagnosis(tensors, report, block)
    return "\n".join(out)
