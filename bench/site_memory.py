"""Does any single site keep more bytes for backward than stock? Measured one site at a time.

For each workload (bench/workloads.py) the model is built with three blocks (five for Swin's stage
3), and for every site that the default ``convert()`` ("auto") converts in the middle block (``--all``:
in the whole model), the bytes saved for backward by one forward + loss at batch 1 are measured
(``activation_memory``, cross-checked against the autograd graph, as in cpu_memory.py) for:

- ``alone``: only that site converted (``filter_fn`` selects it), minus stock: what the site's
  conversion changes on its own;
- ``in context``: every site converted, minus every site but that one: what it changes given the
  others (a memory-sharing norm and its consumer's recompute interact).

Both must be <= 0 for the claim "no site keeps more bytes than stock". Activation sites also show the
planner's own per-option estimate (stock / recompute / 2-bit, on its example batch) and its choice.

    python bench/site_memory.py --markdown             # the issue's rows at full size
    python bench/site_memory.py --tiny --all --markdown
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from cpu_memory import COLUMNS, DEFAULT_WORKLOADS, environment, measure_once
from workloads import Workload, build_model, convert, workloads

from lowmembp_convert.memory import MIB

EAGER = next(c for c in COLUMNS if c.key == "eager")


@dataclass
class SiteResult:
    module: str
    kind: str  # "norm: fold", "norm: keep_affine", "activation: recompute", "activation: approx"
    alone: int  # bytes saved with only this site converted, minus stock
    in_context: int  # bytes saved with every site converted, minus every site but this one
    estimate: dict[str, int] = field(default_factory=dict)


@dataclass
class WorkloadSites:
    workload: Workload
    stock: int
    auto: int
    sites: list[SiteResult]
    notes: list[str]


def _saved(workload: Workload, model: nn.Module, tiny: bool) -> int:
    return measure_once(workload, EAGER, model, model, batch=1, tiny=tiny).total


def _convert(model: nn.Module, notes: list[str], **options: object) -> nn.Module:
    return convert(model, notes, **options)


def check_sites(
    workload: Workload, tiny: bool, every_block: bool = False, log: Callable[[str], None] = print
) -> WorkloadSites:
    depth = workload.depths[1] + 1
    stock_model = build_model(workload, depth, tiny)
    notes: list[str] = []
    stock = _saved(workload, stock_model, tiny)
    full = _convert(copy.deepcopy(stock_model), notes)
    auto = _saved(workload, full, tiny)
    report = full.lowmembp_report
    block = workload.block.format(1)
    chosen: list[tuple[str, str, dict[str, int]]] = []
    for site in report.plan.norms:
        if site.action != "skip":
            chosen.append((site.module, f"norm: {site.action}", {}))
    for site in report.plan.activations:
        if site.action == "convert":
            chosen.append((site.module, f"activation: {site.option}", dict(site.estimate)))
    del full
    results = []
    for module, kind, estimate in chosen:
        if not every_block and block not in module + ".":
            continue
        alone_model = _convert(copy.deepcopy(stock_model), notes, filter_fn=lambda m, fqn, s=module: fqn == s)
        alone = _saved(workload, alone_model, tiny) - stock
        del alone_model
        others_model = _convert(copy.deepcopy(stock_model), notes, filter_fn=lambda m, fqn, s=module: fqn != s)
        in_context = auto - _saved(workload, others_model, tiny)
        del others_model
        gc.collect()
        results.append(SiteResult(module, kind, alone, in_context, estimate))
        log(f"{workload.name:24} {module:60} {kind:22} alone {alone:+d} B, in context {in_context:+d} B")
    return WorkloadSites(workload, stock, auto, results, list(dict.fromkeys(notes)))


def _kib(n: int) -> str:
    return f"{n / 1024:+.1f}"


def markdown(checked: list[WorkloadSites], header: str) -> str:
    lines = [header, ""]
    worst = max((max(s.alone, s.in_context) for w in checked for s in w.sites), default=0)
    verdict = "no site keeps more than stock" if worst <= 0 else f"**a site keeps {worst} B more than stock**"
    lines.append(f"Per-site change of the bytes saved for backward (KiB, batch 1; <= 0 everywhere: {verdict}):\n")
    lines.append("| workload | site | choice | alone | in context | planner estimate (stock / recompute / 2-bit) |")
    lines.append("|---|---|---|---:|---:|---|")
    for w in checked:
        for s in w.sites:
            est = " / ".join(
                f"{s.estimate[k] / 1024:.1f}" if k in s.estimate else "-" for k in ("stock", "recompute", "approx")
            )
            lines.append(
                f"| {w.workload.title} | `{s.module}` | {s.kind} | {_kib(s.alone)} | {_kib(s.in_context)} "
                f"| {est if s.estimate else ''} |"
            )
    lines += ["", "| workload | blocks | stock MiB | auto MiB | change |", "|---|---:|---:|---:|---:|"]
    for w in checked:
        change = 100 * (w.auto - w.stock) / w.stock if w.stock else float("nan")
        lines.append(
            f"| {w.workload.title} | {w.workload.depths[1] + 1} | {w.stock / MIB:.3f} | {w.auto / MIB:.3f} "
            f"| {change:+.1f}% |"
        )
    notes = [f"- {w.workload.name}: {n}" for w in checked for n in w.notes]
    if notes:
        lines += ["", "notes:", *notes]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--all", action="store_true", help="every site of the model, not only the middle block's")
    parser.add_argument("--only", nargs="*", default=[], help=f"workload names (default {DEFAULT_WORKLOADS})")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    header = environment(argv).replace("bench/cpu_memory.py", "bench/site_memory.py")  # the date it started
    only = args.only or DEFAULT_WORKLOADS
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    checked = [check_sites(w, args.tiny, args.all, log) for w in workloads(args.tiny) if w.name in only]
    if args.markdown:
        print(markdown(checked, header))
    worst = max((max(s.alone, s.in_context) for w in checked for s in w.sites), default=0)
    return 0 if worst <= 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
