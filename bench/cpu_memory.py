"""CPU benchmark: bytes saved for backward per transformer block per sample, and training-step time.

For each workload (bench/workloads.py) and each column (stock, the paper's approximation, the default
``convert()`` ("auto"), gradient checkpointing, torch.compile under ``activation_memory_budget`` 1.0 /
0.5 / 0.3, compile + auto; more with ``--columns``) the forward and loss of one training step run
under ``lowmembp_convert.memory.activation_memory`` at two depths and two batch sizes; the double
difference (``per_block_bytes``) leaves bytes per block per sample, with embeddings, head, loss and
autocast weight copies cancelled. Backward is not run for the memory figure: everything it will need
is saved by the end of the forward. (With gradient checkpointing the one-block recompute during
backward is depth-independent and cancels the same way.)

Compiled columns are measured with the same hooks: AOTAutograd's compiled autograd.Function saves
through ``ctx.save_for_backward``, which saved-tensor hooks see. Every cell except gradient
checkpointing is cross-checked by walking the autograd graph (``saved_in_graph``); a cell whose two
counts disagree, or whose model dynamo did not actually compile, is reported as n/a with the reason.

Time: each cell also times whole training steps (forward, loss, backward; no optimizer) of its
shallower model (``depths[0]`` blocks) at the workload's ``time_batch``, on one thread: warm-up (two
steps when compiled: the first compiles), then five steps alternated with five of a stock model of the
same depth; the ratio of the medians is the cell's time relative to stock. On a shared CPU it is noisy.

    python bench/cpu_memory.py --markdown            # full sizes (hours on 2 cores)
    python bench/cpu_memory.py --tiny --markdown     # tiny sizes, same code paths
    python bench/cpu_memory.py --markdown --json out.json --pareto bench/pareto.png
    python bench/cpu_memory.py --replot out.json [more.json] --markdown --pareto bench/pareto.png  # no measuring
    python bench/cpu_memory.py --explain vit-amp-full  # saved tensors of one block, stock vs converted
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from workloads import (
    Column,
    Workload,
    build_model,
    compute_loss,
    convert,
    enable_grad_checkpointing,
    make_batch,
    workloads,
)

from lowmembp_convert.memory import MIB, PerBlock, SavedBytes, activation_memory, per_block_bytes, saved_in_graph

_NOTES: list[str] = []  # what a column's preparation had to work around, collected into its Cell


def _convert(model: nn.Module, **options: object) -> nn.Module:
    return convert(model, _NOTES, **options)


def _checkpointed(workload: Workload, model: nn.Module) -> nn.Module:
    enable_grad_checkpointing(workload, model)
    return model


def _compiled(model: nn.Module) -> nn.Module:
    return torch.compile(model, dynamic=False)


COLUMNS = [
    Column("eager", "stock", lambda w, m: m),
    Column("approx", "approx (paper)", lambda w, m: _convert(m, activations="approx")),
    Column("auto", "auto (default)", lambda w, m: _convert(m)),
    Column("recompute", "recompute", lambda w, m: _convert(m, activations="recompute")),
    Column("norms", "norms only", lambda w, m: _convert(m, activations=False)),
    # the previous default, for comparison: auto with the norm affines folded (the paper's form)
    Column("fold", "auto + fold", lambda w, m: _convert(m, norms="fold")),
    Column("ckpt", "grad ckpt", _checkpointed),
    Column("compile", "compile (budget 1.0)", lambda w, m: _compiled(m), compiles=True),
    Column("compile_budget_0.5", "compile, budget 0.5", lambda w, m: _compiled(m), compiles=True, memory_budget=0.5),
    Column("compile_budget_0.3", "compile, budget 0.3", lambda w, m: _compiled(m), compiles=True, memory_budget=0.3),
    Column(
        "compile_approx", "compile + approx", lambda w, m: _compiled(_convert(m, activations="approx")), compiles=True
    ),
    Column("compile_auto", "compile + auto", lambda w, m: _compiled(_convert(m)), compiles=True),
]
# run unless --columns says otherwise; "recompute", "norms", "fold" and "compile_approx" are on request
DEFAULT_COLUMNS = [
    "eager",
    "approx",
    "auto",
    "ckpt",
    "compile",
    "compile_budget_0.5",
    "compile_budget_0.3",
    "compile_auto",
]  # fmt: skip
# rows run unless --only says otherwise: the rows (the others locate shortfalls, on request)
DEFAULT_WORKLOADS = [
    "vit-amp-full",
    "vit-fp32-full",
    "llama-bf16-full",
    "llama-bf16-lora",
    "phi3-bf16-full",
    "roberta-amp-full",
]  # fmt: skip
TIME_REPEATS = 5


@dataclass
class Cell:
    """One measured cell: a PerBlock (or why there is none) and the timed training steps."""

    per_block: PerBlock | None = None
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)  # seconds of each timed training step
    stock_s: list[float] = field(default_factory=list)  # the stock model's steps, alternated with those
    time_reason: str = ""  # why there is no time, if there is none

    @property
    def value(self) -> float | None:
        return None if self.per_block is None else self.per_block.per_block_per_sample

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.step_s) if self.step_s else None

    @property
    def ratio(self) -> float | None:
        """Median step time over the median of the stock steps alternated with it."""
        if not self.step_s or not self.stock_s:
            return None
        return statistics.median(self.step_s) / statistics.median(self.stock_s)

    def to_json(self) -> dict:
        pb = self.per_block
        return {
            "per_block_per_sample": None if pb is None else pb.per_block_per_sample,
            "per_block": None if pb is None else pb.per_block,
            "reason": self.reason,
            "step_s": self.step_s,
            "stock_s": self.stock_s,
            "time_reason": self.time_reason,
            "notes": self.notes,
        }

    @classmethod
    def from_json(cls, data: dict) -> Cell:
        pb = None
        if data["per_block_per_sample"] is not None:
            pb = PerBlock(data["per_block_per_sample"], data["per_block"], 0.0, 0.0, {}, {})
        return cls(
            pb, data["reason"], list(data["notes"]), list(data["step_s"]), list(data["stock_s"]), data["time_reason"]
        )


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


def time_steps(
    workload: Workload,
    column: Column,
    model: nn.Module,
    runnable: nn.Module,
    tiny: bool,
    stock: nn.Module | None,
    repeats: int = TIME_REPEATS,
) -> tuple[list[float], list[float]]:
    """Seconds of ``repeats`` training steps (forward, loss, backward) of ``runnable`` after warm-up, and of
    the same number of steps of the stock model ``stock`` alternated with them (empty when None).

    One thread: with two threads on a shared 2-core machine, one descheduled OpenMP thread stalls the
    other at every barrier, and a step's time then says more about the neighbours than about the model.
    """
    inputs = make_batch(workload, workload.time_batch, tiny)
    stock_params = [] if stock is None else [p for p in stock.parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]

    def step(run: nn.Module, trained: list[torch.Tensor]) -> float:
        start = time.perf_counter()
        compute_loss(workload, run, inputs).backward()
        elapsed = time.perf_counter() - start
        for p in trained:
            p.grad = None
        return elapsed

    times, stock_times = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _memory_budget(column.memory_budget):  # a new batch size recompiles: same partitioner setting
            for _ in range(2 if column.compiles else 1):
                step(runnable, params)
            if stock is not None:
                step(stock, stock_params)
            for _ in range(repeats):  # alternated, so that both see the same load on a shared machine
                if stock is not None:
                    stock_times.append(step(stock, stock_params))
                times.append(step(runnable, params))
    finally:
        torch.set_num_threads(threads)
    return times, stock_times


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def measure_cell(workload: Workload, column: Column, tiny: bool, timed: bool = True) -> Cell:
    """Per-block bytes of one workload under one column (or the reason it is n/a), and its step time.

    The steps are timed on the shallower model (``depths[0]`` blocks) once its memory is measured,
    alternated with a stock model of the same depth (ratio to stock within the cell).
    """
    built: dict[int, tuple[nn.Module, nn.Module]] = {}
    cell = Cell()

    def time_cell() -> None:
        stock = None
        try:
            if column.key != "eager":
                stock = build_model(workload, workload.depths[0], tiny)
            cell.step_s, cell.stock_s = time_steps(workload, column, *built[workload.depths[0]], tiny, stock)
            if column.key == "eager":
                cell.stock_s = list(cell.step_s)
        except Exception as exc:
            cell.time_reason = _reason(exc)
        del stock

    def measure(depth: int, batch: int) -> SavedBytes:
        if depth not in built:
            if timed and workload.depths[0] in built:
                time_cell()
            built.clear()
            gc.collect()
            if column.compiles:
                torch._dynamo.reset()  # fresh caches: no recompile limit, no stale guards
            model = build_model(workload, depth, tiny)
            built[depth] = (model, column.prepare(workload, model))
        model, runnable = built[depth]
        return measure_once(workload, column, model, runnable, batch, tiny)

    _NOTES.clear()
    try:
        cell.per_block = per_block_bytes(measure, depths=workload.depths, batches=workload.batches)
    except NotMeasurable as exc:
        cell.reason = str(exc)
    except Exception as exc:  # a failing column must not hide the others; the reason is printed
        cell.reason = _reason(exc)
    if timed and not cell.step_s and not cell.time_reason:
        cell.time_reason = "not timed: the memory measurement failed first"
    cell.notes = list(dict.fromkeys(_NOTES))
    built.clear()
    gc.collect()
    return cell


def run_benchmark(
    tiny: bool,
    only: Sequence[str] = (),
    columns: Sequence[str] = (),
    log: Callable[[str], None] = print,
    timed: bool = True,
    on_cell: Callable[[dict[str, dict[str, Cell]]], None] | None = None,
) -> dict[str, dict[str, Cell]]:
    """``{workload name: {column key: Cell}}`` for the selected workloads and columns.

    Empty ``only`` / ``columns`` select DEFAULT_WORKLOADS / DEFAULT_COLUMNS. ``on_cell`` is called with
    the results so far after every cell (a long run keeps what it measured if it is stopped).
    """
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    only, columns = list(only) or DEFAULT_WORKLOADS, list(columns) or DEFAULT_COLUMNS
    unknown = set(columns) - {c.key for c in COLUMNS}
    if unknown:
        raise SystemExit(f"unknown column(s) {sorted(unknown)}; choose from {[c.key for c in COLUMNS]}")
    results: dict[str, dict[str, Cell]] = {}
    for workload in workloads(tiny):
        if workload.name not in only:
            continue
        row = results.setdefault(workload.name, {})
        for column in COLUMNS:
            if column.key not in columns:
                continue
            start = time.perf_counter()
            row[column.key] = cell = measure_cell(workload, column, tiny, timed)
            shown = f"{cell.value / MIB:.3f} MiB/block/sample" if cell.value is not None else f"n/a ({cell.reason})"
            if cell.median_s is not None:
                shown += f", step {cell.median_s:.3f} s"
            elif timed:
                shown += f", no time ({cell.time_reason})"
            log(f"{workload.name:28} {column.key:18} {shown}  [{time.perf_counter() - start:.0f} s]")
            if on_cell is not None:
                on_cell(results)
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
        f"torch threads {torch.get_num_threads()} (shared with other jobs: step times are noisy)\n"
        f"- torch {torch.__version__}, transformers {transformers.__version__}, timm {timm.__version__}, "
        f"peft {peft.__version__}, python {platform.python_version()}\n"
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
        f"- command: `{command}`"
    )


def _change(cell: Cell | None, eager: Cell | None) -> float | None:
    if cell is None or eager is None or cell.value is None or not eager.value:
        return None
    return (cell.value - eager.value) / eager.value


def _fmt(cell: Cell | None, eager: Cell | None) -> str:
    if cell is None:
        return "-"
    if cell.value is None:
        return "n/a"
    text = f"{cell.value / MIB:.3f}"
    change = _change(cell, eager)
    if change is not None and cell is not eager:
        text += f" ({100 * change:+.1f}%)"
    return text


def _fmt_time(cell: Cell | None, eager: Cell | None) -> str:
    if cell is None:
        return "-"
    if cell.median_s is None:
        return "n/a"
    text = f"{cell.median_s:.3g} s"
    if cell is not eager and cell.ratio is not None:
        text += f" ({cell.ratio:.2f}x)"
    return text


def _used_columns(results: dict[str, dict[str, Cell]]) -> list[Column]:
    present = {k for row in results.values() for k in row}
    return [c for c in COLUMNS if c.key in present]


def markdown(results: dict[str, dict[str, Cell]], tiny: bool, argv: Sequence[str], header: str | None = None) -> str:
    """The results as markdown tables, with environment header and n/a reasons."""
    rows = {w.name: w for w in workloads(tiny)}
    used = _used_columns(results)
    lines = [header if header is not None else environment(argv), ""]
    lines.append("MiB saved for backward per block per sample (change vs stock); '-' = not run:\n")
    lines.append("| workload | " + " | ".join(c.title for c in used) + " |")
    lines.append("|---|" + "---:|" * len(used))
    reasons: list[str] = []
    notes: list[str] = []
    for name, row in results.items():
        eager = row.get("eager")
        cells = []
        for c in used:
            cell = row.get(c.key)
            cells.append(_fmt(cell, eager))
            if cell is not None and cell.value is None:
                reasons.append(f"- {name} / {c.title}: n/a: {cell.reason}")
            if cell is not None and cell.median_s is None and cell.time_reason:
                reasons.append(f"- {name} / {c.title}: no time: {cell.time_reason}")
            if cell is not None:  # one line per distinct note (the two depths report other error figures)
                distinct = dict.fromkeys(re.sub(r": relative error [^;]*", "", note) for note in cell.notes)
                notes += [f"- {name} / {c.title}: {note}" for note in distinct]
        lines.append(f"| {rows[name].title} | " + " | ".join(cells) + " |")
    if any(cell.step_s or cell.time_reason for row in results.values() for cell in row.values()):
        lines += [
            "",
            f"Training step (forward + loss + backward, no optimizer), median of {TIME_REPEATS} on one thread, of the "
            "shallower model at the batch shown; in brackets its ratio to a stock model timed in alternation with it "
            "(shared CPU: noisy):",
            "",
            "| workload | blocks x batch | " + " | ".join(c.title for c in used) + " |",
            "|---|---|" + "---:|" * len(used),
        ]
        for name, row in results.items():
            w, eager = rows[name], row.get("eager")
            cells = [_fmt_time(row.get(c.key), eager) for c in used]
            lines.append(f"| {w.title} | {w.depths[0]} x {w.time_batch} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Bytes per token per block in units of the width d, against the issue's target (met: the change",
        "is at or below the target), and the batch-independent bytes per block of stock (autocast copies):",
        "",
        "| workload | d | tokens | depths | batches | stock | approx | auto | approx change | auto change "
        "| target | auto meets it | per block, batch-independent |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, row in results.items():
        w, eager = rows[name], row.get("eager")
        unit = w.tokens * w.hidden

        def per_token(cell: Cell | None, unit: int = unit) -> str:
            return f"{cell.value / unit:.2f}d" if cell is not None and cell.value is not None else "n/a"

        def pct(key: str, row: dict[str, Cell] = row, eager: Cell | None = eager) -> str:
            change = _change(row.get(key), eager)
            return "n/a" if change is None else f"{100 * change:+.1f}%"

        auto = _change(row.get("auto"), eager)
        met = "-" if not w.target or auto is None else ("met" if auto <= -w.target else "**missed**")
        fixed = "n/a" if eager is None or eager.per_block is None else f"{eager.per_block.per_block / MIB:.2f} MiB"
        target = f"-{100 * w.target:.0f}%" if w.target else "-"
        lines.append(
            f"| {w.title} | {w.hidden} | {w.tokens} | {w.depths} | {w.batches} | {per_token(eager)} "
            f"| {per_token(row.get('approx'))} | {per_token(row.get('auto'))} | {pct('approx')} | {pct('auto')} "
            f"| {target} | {met} | {fixed} |"
        )
    if reasons:
        lines += ["", "n/a cells:", *reasons]
    if notes:
        lines += ["", "notes:", *notes]
    return "\n".join(lines)


# Pareto plot: which columns, in which style (columns absent from the results are left out)
PARETO_STYLE = {
    "eager": ("stock", "black", "o"),
    "approx": ("approx (paper)", "tab:orange", "s"),
    "auto": ("auto (default)", "tab:green", "D"),
    "recompute": ("recompute", "tab:olive", "d"),
    "norms": ("norms only", "tab:cyan", "v"),
    "fold": ("auto + fold", "tab:olive", "s"),
    "ckpt": ("grad ckpt", "tab:red", "^"),
    "compile": ("compile, budget 1.0", "tab:blue", "P"),
    "compile_budget_0.5": ("compile, budget 0.5", "tab:purple", "P"),
    "compile_budget_0.3": ("compile, budget 0.3", "tab:pink", "P"),
    "compile_approx": ("compile + approx", "tab:brown", "X"),
    "compile_auto": ("compile + auto", "tab:gray", "X"),
}


def pareto_plot(results: dict[str, dict[str, Cell]], tiny: bool, path: str, caption: str) -> bool:
    """Memory (per block, % of stock) vs step time (x stock), one panel per workload; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no Pareto plot", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {w.name: w.title for w in workloads(tiny)}
    names = [n for n, row in results.items() if row.get("eager") and row["eager"].value]
    if not names:
        return False
    ncols = min(3, len(names))
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.2 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        row, eager = results[name], results[name]["eager"]
        points = []
        for key, (label, color, marker) in PARETO_STYLE.items():
            cell = row.get(key)
            if cell is None or cell.value is None or cell.ratio is None:
                continue
            x, y = cell.ratio, 100 * cell.value / eager.value
            points.append((x, y))
            ax.scatter([x], [y], color=color, marker=marker, s=55, label=label, zorder=3)
        frontier, best = [], float("inf")
        for x, y in sorted(points):
            if y < best:
                frontier.append((x, y))
                best = y
        if len(frontier) > 1:
            ax.plot(*zip(*frontier, strict=True), color="gray", linewidth=0.8, linestyle="--", zorder=2)
        ax.set_title(titles[name], fontsize=8.5)
        ax.set_xlabel("training-step time, x stock (CPU, 1 thread)")
        ax.set_ylabel("saved for backward per block, % of stock")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    handles, labels = {}, {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
            labels[lab] = lab
    fig.legend(list(handles.values()), list(labels), loc="lower center", ncol=min(6, len(labels)), fontsize=8)
    wrapped = textwrap.fill(caption, width=int(13 * fig.get_figwidth()))
    fig.suptitle(wrapped, fontsize=7.5)
    fig.tight_layout(rect=(0, 0.07, 1, 1 - 0.035 * (wrapped.count("\n") + 1) * 4.2 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def save_json(results: dict[str, dict[str, Cell]], path: str, tiny: bool, header: str) -> None:
    data = {
        "tiny": tiny,
        "environment": header,
        "results": {w: {k: c.to_json() for k, c in row.items()} for w, row in results.items()},
    }
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def load_json(path: str) -> tuple[dict[str, dict[str, Cell]], bool, str]:
    with open(path) as f:
        data = json.load(f)
    results = {w: {k: Cell.from_json(c) for k, c in row.items()} for w, row in data["results"].items()}
    return results, data["tiny"], data["environment"]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model sizes (fast dry run)")
    parser.add_argument("--markdown", action="store_true", help="print the markdown tables")
    parser.add_argument("--only", nargs="*", default=[], help=f"workload names (default: {DEFAULT_WORKLOADS})")
    keys = [c.key for c in COLUMNS]
    parser.add_argument("--columns", nargs="*", default=[], help=f"column keys of {keys} (default {DEFAULT_COLUMNS})")
    parser.add_argument("--no-time", action="store_true", help="memory only: do not time training steps")
    parser.add_argument("--json", metavar="PATH", help="write every cell (bytes, step times, reasons) as JSON")
    parser.add_argument("--pareto", metavar="PNG", help="plot memory vs step time (needs matplotlib)")
    parser.add_argument(
        "--replot", metavar="JSON", nargs="+", help="tables and plot from --json file(s), merged, measuring nothing"
    )
    parser.add_argument("--explain", metavar="WORKLOAD", help="list one block's saved tensors, stock vs converted")
    args = parser.parse_args(argv)
    if args.explain:
        from explain_memory import explain

        print(explain(args.explain, args.tiny))
        return 0
    if args.replot:
        results, tiny, headers = {}, False, []
        for path in args.replot:  # later files add rows and cells to earlier ones
            more, tiny, header = load_json(path)
            for name, row in more.items():
                results.setdefault(name, {}).update(row)
            headers.append(header)
        header = "\n".join(dict.fromkeys(headers))
    else:
        log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
        tiny, header = args.tiny, environment(argv)
        save = (lambda r: save_json(r, args.json, tiny, header)) if args.json else None
        results = run_benchmark(args.tiny, args.only, args.columns, log=log, timed=not args.no_time, on_cell=save)
    if args.markdown:
        print(markdown(results, tiny, argv, header))
    if args.pareto:
        caption = header.replace("\n- ", "; ").removeprefix("- ").replace("`", "")
        if pareto_plot(results, tiny, args.pareto, caption):
            print(f"Pareto plot written to {args.pareto}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
