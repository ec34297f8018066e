"""CPU benchmark: bytes saved for backward per transformer block per sample, one training step.

For each workload (bench/workloads.py) and each column (eager, converted, norms only, activations
only, gradient checkpointing, torch.compile with the default partitioner, torch.compile with
``activation_memory_budget=0.5``, converted + compile) the forward and loss of one training step
run under ``lowmembp_convert.memory.activation_memory`` at two depths and two batch sizes; the
double difference (``per_block_bytes``) leaves bytes per block per sample, with embeddings, head,
loss and autocast weight copies cancelled. Backward is not run: everything it will need is saved by
the end of the forward. (With gradient checkpointing the one-block recompute during backward is
depth-independent and cancels the same way.)

Compiled columns are measured with the same hooks: AOTAutograd's compiled autograd.Function saves
through ``ctx.save_for_backward``, which saved-tensor hooks see. Every cell except gradient
checkpointing is cross-checked by walking the autograd graph (``saved_in_graph``); a cell whose two
counts disagree, or whose model dynamo did not actually compile, is reported as n/a with the reason.

    python bench/cpu_memory.py --markdown            # full sizes (tens of minutes on 2 cores)
    python bench/cpu_memory.py --tiny --markdown     # tiny sizes, same code paths
    python bench/cpu_memory.py --explain vit-amp-full  # saved tensors of one block, eager vs converted
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from workloads import Column, Workload, build_model, compute_loss, enable_grad_checkpointing, make_batch, workloads

from lowmembp_convert.memory import MIB, PerBlock, SavedBytes, activation_memory, per_block_bytes, saved_in_graph


def _convert(model: nn.Module, **overrides: bool) -> nn.Module:
    import lowmembp_convert

    return lowmembp_convert.convert(model, **overrides)


def _checkpointed(workload: Workload, model: nn.Module) -> nn.Module:
    enable_grad_checkpointing(workload, model)
    return model


def _compiled(model: nn.Module) -> nn.Module:
    return torch.compile(model, dynamic=False)


COLUMNS = [
    Column("eager", "eager", lambda w, m: m),
    Column("converted", "converted", lambda w, m: _convert(m)),
    Column("norms", "norms only", lambda w, m: _convert(m, activations=False)),
    Column("activations", "activations only", lambda w, m: _convert(m, norms=False)),
    Column("ckpt", "grad ckpt", _checkpointed),
    Column("compile", "compile", lambda w, m: _compiled(m), compiles=True),
    Column("compile_budget", "compile, budget 0.5", lambda w, m: _compiled(m), compiles=True, memory_budget=0.5),
    Column("converted_compile", "converted + compile", lambda w, m: _compiled(_convert(m)), compiles=True),
]


@dataclass
class Cell:
    """One measured cell: a PerBlock, or why there is none."""

    per_block: PerBlock | None = None
    reason: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def value(self) -> float | None:
        return None if self.per_block is None else self.per_block.per_block_per_sample


class NotMeasurable(Exception):
    """The cell cannot be measured soundly; the message says why."""


@contextlib.contextmanager
def _memory_budget(budget: float | None) -> Iterator[None]:
    if budget is None:
        yield
        return
    import torch._functorch.config as functorch_config

    with functorch_config.patch(activation_memory_budget=budget):
        yield


def _has_compiled_node(loss: torch.Tensor) -> bool:
    stack, seen = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if "CompiledFunction" in type(node).__name__:
            return True
        stack.extend(fn for fn, _ in node.next_functions)
    return False


def measure_once(
    workload: Workload,
    column: Column,
    model: nn.Module,
    runnable: nn.Module,
    batch: int,
    tiny: bool,
    explain: bool = False,
) -> SavedBytes:
    """Saved bytes of one forward + loss, checked against the autograd graph."""
    inputs = make_batch(workload, batch, tiny)
    losses: list[torch.Tensor] = []
    with _memory_budget(column.memory_budget):
        saved = activation_memory(
            lambda: losses.append(compute_loss(workload, runnable, inputs)), params=model, explain=explain
        )
    loss = losses.pop()
    if not loss.requires_grad:
        raise NotMeasurable("the loss does not require grad: nothing would be trained")
    if column.compiles and not _has_compiled_node(loss):
        raise NotMeasurable("dynamo did not compile the model (no CompiledFunction in the graph)")
    if column.key != "ckpt":  # reading a checkpointed node's saved tensors would trigger its recompute
        walked, stashed = saved_in_graph(loss, params=model)
        if walked.total != saved.total:
            raise NotMeasurable(f"hooks counted {saved.total} B but the graph holds {walked.total} B")
        if stashed.total:
            raise NotMeasurable(f"{stashed.total} B stashed on ctx outside save_for_backward")
    return saved


def measure_cell(workload: Workload, column: Column, tiny: bool) -> Cell:
    """Per-block bytes of one workload under one column, or the reason it is n/a."""
    built: dict[int, tuple[nn.Module, nn.Module]] = {}

    def measure(depth: int, batch: int) -> SavedBytes:
        if depth not in built:
            built.clear()
            gc.collect()
            if column.compiles:
                torch._dynamo.reset()  # fresh caches: no recompile limit, no stale guards
            model = build_model(workload, depth, tiny)
            built[depth] = (model, column.prepare(workload, model))
        model, runnable = built[depth]
        return measure_once(workload, column, model, runnable, batch, tiny)

    try:
        return Cell(per_block_bytes(measure, depths=workload.depths, batches=workload.batches))
    except NotMeasurable as exc:
        return Cell(reason=str(exc))
    except Exception as exc:  # a failing column must not hide the others; the reason is printed
        return Cell(reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
    finally:
        built.clear()
        gc.collect()


def run_benchmark(
    tiny: bool, only: Sequence[str] = (), columns: Sequence[str] = (), log: Callable[[str], None] = print
) -> dict[str, dict[str, Cell]]:
    """``{workload name: {column key: Cell}}`` for the selected workloads and columns."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    results: dict[str, dict[str, Cell]] = {}
    for workload in workloads(tiny):
        if only and workload.name not in only:
            continue
        row = results.setdefault(workload.name, {})
        for column in COLUMNS:
            if columns and column.key not in columns:
                continue
            start = time.perf_counter()
            row[column.key] = cell = measure_cell(workload, column, tiny)
            shown = f"{cell.value / MIB:.3f} MiB/block/sample" if cell.value is not None else f"n/a ({cell.reason})"
            log(f"{workload.name:28} {column.key:18} {shown}  [{time.perf_counter() - start:.0f} s]")
    return results


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment(argv: Sequence[str]) -> str:
    """Machine, library versions, date and the exact command: printed with every table."""
    import peft
    import timm
    import transformers

    command = " ".join(["python", "bench/cpu_memory.py", *argv])
    return (
        f"- machine: {platform.platform()}, {_cpu_name()}, {os.cpu_count()} logical CPUs, "
        f"torch threads {torch.get_num_threads()}\n"
        f"- torch {torch.__version__}, transformers {transformers.__version__}, timm {timm.__version__}, "
        f"peft {peft.__version__}, python {platform.python_version()}\n"
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
        f"- command: `{command}`"
    )


def _fmt(cell: Cell | None, eager: Cell | None) -> str:
    if cell is None:
        return "-"
    if cell.value is None:
        return "n/a"
    text = f"{cell.value / MIB:.3f}"
    if eager is not None and eager.value and cell is not eager:
        text += f" ({100 * (cell.value - eager.value) / eager.value:+.1f}%)"
    return text


def markdown(results: dict[str, dict[str, Cell]], tiny: bool, argv: Sequence[str]) -> str:
    """The results as markdown tables, with environment header and n/a reasons."""
    rows = {w.name: w for w in workloads(tiny)}
    used = COLUMNS  # every column, always: one not run shows "-"
    lines = [environment(argv), ""]
    lines.append("MiB saved for backward per block per sample (change vs eager); '-' = not run:\n")
    lines.append("| workload | " + " | ".join(c.title for c in used) + " |")
    lines.append("|---|" + "---:|" * len(used))
    reasons: list[str] = []
    for name, row in results.items():
        eager = row.get("eager")
        cells = []
        for c in used:
            cell = row.get(c.key)
            cells.append(_fmt(cell, eager))
            if cell is not None and cell.value is None:
                reasons.append(f"- {name} / {c.title}: n/a: {cell.reason}")
        lines.append(f"| {rows[name].title} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Bytes per token per block in units of the width d (eager -> converted), the batch-",
        "independent bytes per block (autocast weight copies) and the issue's target:",
        "",
    ]
    lines.append(
        "| workload | d | tokens | depths | batches | eager | converted | change | target "
        "| per block, batch-independent |"
    )
    lines.append("|---|---:|---:|---|---|---:|---:|---:|---:|---:|")
    for name, row in results.items():
        w, eager, conv = rows[name], row.get("eager"), row.get("converted")
        unit = w.tokens * w.hidden

        def per_token(cell: Cell | None, unit: int = unit) -> str:
            return f"{cell.value / unit:.2f}d" if cell is not None and cell.value is not None else "n/a"

        change = "n/a"
        if eager is not None and conv is not None and eager.value and conv.value is not None:
            change = f"{100 * (conv.value - eager.value) / eager.value:+.1f}%"
        fixed = "n/a" if eager is None or eager.per_block is None else f"{eager.per_block.per_block / MIB:.2f} MiB"
        target = f"-{100 * w.target:.0f}%" if w.target else "-"
        lines.append(
            f"| {w.title} | {w.hidden} | {w.tokens} | {w.depths} | {w.batches} | {per_token(eager)} "
            f"| {per_token(conv)} | {change} | "
            f"{target} | {fixed} |"
        )
    if reasons:
        lines += ["", "n/a cells:", *reasons]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model sizes (fast dry run)")
    parser.add_argument("--markdown", action="store_true", help="print the markdown table")
    parser.add_argument("--only", nargs="*", default=[], help="workload names (default: all)")
    parser.add_argument("--columns", nargs="*", default=[], help=f"column keys of {[c.key for c in COLUMNS]}")
    parser.add_argument("--explain", metavar="WORKLOAD", help="list one block's saved tensors, eager vs converted")
    args = parser.parse_args(argv)
    if args.explain:
        from explain_memory import explain

        print(explain(args.explain, args.tiny))
        return 0
    results = run_benchmark(args.tiny, args.only, args.columns, log=lambda s: print(s, file=sys.stderr, flush=True))
    if args.markdown:
        print(markdown(results, args.tiny, argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
