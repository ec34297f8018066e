"""GPU model benchmark: peak memory and throughput of whole training steps, and the largest batch.

For each model (ViT-B/16 LoRA r4 batch 64 under bf16 autocast, the paper's headline; ViT-B/16 full
fine-tuning; LLaMA-7B-shaped decoder layers in bf16, full, LoRA on q,v and LoRA on all linear layers;
Phi-3-mini-shaped layers (fused gate_up); RoBERTa-base) and each column (baseline; approx =
``convert(activations="approx")``, the paper; auto = ``convert()``, the default; recompute =
``convert(activations="recompute")``; gradient checkpointing; torch.compile; compile + auto) it runs
full training steps (forward, loss, backward, AdamW step), then reports
``torch.cuda.max_memory_allocated`` over timed steps (the peak counter is reset after warm-up) and
samples per second. Then, for the headline models, the largest batch whose
step fits a fixed memory budget, baseline vs auto vs approx.

Cells run in priority order (every row's eager columns, rows in order with the headline first; then
the largest batches; then the compiled columns) under a wall-clock deadline; a cell the deadline cuts is
reported as skipped, never estimated. ``--device cpu --tiny`` is a dry run of every code path (no memory
numbers: CPU has no peak counter).

    python bench/gpu_models.py --out out            # on the GPU machine, via bench/gpu.sh
    python bench/gpu_models.py --device cpu --tiny  # dry run
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

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


@dataclass(frozen=True)
class GpuModel:
    """One row: a workload at a fixed depth and batch."""

    key: str
    title: str
    workload: Workload
    depth: int
    batch: int
    tiny_depth: int = 2
    compile: bool = False  # run the compiled columns (compilation is the expensive part)
    find_max_batch: bool = False


def gpu_models(tiny: bool) -> list[GpuModel]:
    by_name = {w.name: w for w in workloads(tiny)}
    rows = [
        GpuModel(
            "vit-lora",
            "ViT-B/16 LoRA r4 (qkv), bf16 AMP",
            by_name["vit-amp-lora"],
            12,
            64,
            compile=True,
            find_max_batch=True,
        ),
        GpuModel(
            "vit-full",
            "ViT-B/16 full FT, bf16 AMP",
            by_name["vit-amp-full"],
            12,
            64,
            compile=True,
            find_max_batch=True,
        ),
        GpuModel("llama-full", "LLaMA-7B shape, bf16, full FT", by_name["llama-bf16-full"], 4, 8),
        GpuModel(
            "llama-lora",
            "LLaMA-7B shape, bf16, LoRA r8 (q,v)",
            by_name["llama-bf16-lora"],
            4,
            8,
        ),
        GpuModel(
            "llama-lora-all",
            "LLaMA-7B shape, bf16, LoRA r8 (all linear)",
            by_name["llama-bf16-lora-all"],
            4,
            8,
        ),
        GpuModel("phi3-full", "Phi-3-mini shape (fused gate_up), bf16, full FT", by_name["phi3-bf16-full"], 4, 8),
        GpuModel("roberta-full", "RoBERTa-base, bf16 AMP, full FT", by_name["roberta-amp-full"], 12, 32),
    ]
    if tiny:
        rows = [replace(r, depth=r.tiny_depth, batch=4, title="tiny " + r.title) for r in rows]
    return rows


def _convert(model: nn.Module, **options: object) -> nn.Module:
    return convert(model, None, **options)


def _ckpt(w: Workload, m: nn.Module) -> nn.Module:
    enable_grad_checkpointing(w, m)
    return m


COLUMNS = [
    Column("baseline", "baseline", lambda w, m: m),
    Column("auto", "auto (default)", lambda w, m: _convert(m)),
    Column("approx", "approx (paper)", lambda w, m: _convert(m, activations="approx")),
    Column("recompute", "recompute", lambda w, m: _convert(m, activations="recompute")),
    Column("ckpt", "grad ckpt", _ckpt),
    Column("compile", "torch.compile", lambda w, m: torch.compile(m), compiles=True),
    Column("compile_auto", "compile + auto", lambda w, m: torch.compile(_convert(m)), compiles=True),
]
MAX_BATCH_COLUMNS = ("baseline", "auto", "approx")


@dataclass
class Result:
    model: str
    column: str
    batch: int
    peak_mib: float | None = None
    samples_per_s: float | None = None
    status: str = "ok"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def train_steps(
    row: GpuModel, column: Column, batch: int, device: torch.device, tiny: bool, warmup: int, steps: int
) -> Result:
    """Build, prepare, warm up, then time ``steps`` training steps; peak memory over the timed steps."""
    result = Result(row.key, column.key, batch)
    _free(device)  # the previous cell's model is unreachable by now; give its memory back
    if column.compiles:
        torch._dynamo.reset()
    with torch.device(device):
        model = build_model(row.workload, row.depth, tiny)
    runnable = column.prepare(row.workload, model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    inputs = make_batch(row.workload, batch, tiny, device)

    def step() -> None:
        loss = compute_loss(row.workload, runnable, inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        for _ in range(warmup):
            step()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        elapsed = time.perf_counter() - start
        result.samples_per_s = steps * batch / elapsed
        if device.type == "cuda":
            result.peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
    except torch.cuda.OutOfMemoryError:
        result.status = "OOM"
    return result


def largest_batch(
    row: GpuModel, column: Column, budget_mib: float, device: torch.device, tiny: bool
) -> tuple[int | None, str]:
    """Largest batch whose training step peaks within ``budget_mib``: a linear fit, then checked."""
    small, large = row.batch // 2, row.batch
    a = train_steps(row, column, small, device, tiny, warmup=1, steps=1)
    b = train_steps(row, column, large, device, tiny, warmup=1, steps=1)
    if a.peak_mib is None or b.peak_mib is None:
        return None, f"no peak counter or OOM ({a.status}/{b.status})"
    slope = (b.peak_mib - a.peak_mib) / (large - small)
    if slope <= 0:
        return None, "peak memory did not grow with batch"
    guess = int((budget_mib - a.peak_mib) / slope) + small
    for _ in range(6):  # walk down until it really fits; report only a checked batch
        if guess < 1:
            return None, "even batch 1 does not fit"
        got = train_steps(row, column, guess, device, tiny, warmup=1, steps=1)
        if got.status == "ok" and got.peak_mib is not None and got.peak_mib <= budget_mib:
            return guess, f"checked: {got.peak_mib:.0f} MiB at batch {guess}"
        guess = int(guess * 0.97)
    return None, "did not find a fitting batch in 6 tries"


def environment(device: torch.device, argv: Sequence[str]) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    import timm
    import transformers

    return (
        f"- device: {name}; host {platform.node()} ({os.cpu_count()} CPUs)\n"
        f"- torch {torch.__version__}, CUDA {torch.version.cuda}, transformers {transformers.__version__}, "
        f"timm {timm.__version__}\n"
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
        f"- command: `python bench/gpu_models.py {' '.join(argv)}`"
    )


def markdown(results: list[Result], max_batches: list[dict], rows: list[GpuModel], header: str) -> str:
    titles = {r.key: f"{r.title}, {r.depth} blocks, {r.workload.tokens} tokens, batch {r.batch}" for r in rows}
    lines = [header, "", "Peak allocated MiB / samples per second of a training step (AdamW):", ""]
    lines.append("| model | " + " | ".join(c.title for c in COLUMNS) + " |")
    lines.append("|---|" + "---:|" * len(COLUMNS))
    for row in rows:
        cells = []
        for column in COLUMNS:
            got = next((r for r in results if r.model == row.key and r.column == column.key), None)
            if got is None:
                cells.append("-")
            elif got.status != "ok":
                cells.append(got.status)
            else:
                peak = "n/a" if got.peak_mib is None else f"{got.peak_mib:.0f}"
                cells.append(f"{peak} / {got.samples_per_s:.1f}")
        lines.append(f"| {titles[row.key]} | " + " | ".join(cells) + " |")
    if max_batches:
        lines += ["", "Largest batch within the memory budget (checked by running it):", ""]
        lines += ["| model | budget MiB | " + " | ".join(MAX_BATCH_COLUMNS) + " |", "|---|---:|---:|---:|---:|"]
        for entry in max_batches:
            cells = " | ".join(str(entry.get(k, "-")) for k in MAX_BATCH_COLUMNS)
            lines.append(f"| {titles[entry['model']]} | {entry['budget_mib']:.0f} | {cells} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models, batch 4 (dry run)")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"), help="folder for gpu_models.{md,json}")
    parser.add_argument("--deadline-s", type=float, default=240.0, help="stop starting new cells after this")
    parser.add_argument("--budget-gib", type=float, default=8.0, help="memory budget of the largest-batch search")
    parser.add_argument("--only", nargs="*", default=[], help="model keys")
    parser.add_argument("--columns", nargs="*", default=[], help=f"column keys of {[c.key for c in COLUMNS]}")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --device cpu --tiny for a dry run", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = [r for r in gpu_models(args.tiny) if not args.only or r.key in args.only]
    columns = [c for c in COLUMNS if not args.columns or c.key in args.columns]
    by_key = {c.key: c for c in COLUMNS}
    budget = args.budget_gib * 1024
    results: list[Result] = []
    max_batches = [{"model": r.key, "budget_mib": budget} for r in rows if r.find_max_batch]
    start = time.perf_counter()

    def cell(row: GpuModel, column: Column) -> None:
        try:
            warmup = 3 if column.compiles else 2
            got = train_steps(row, column, row.batch, device, args.tiny, warmup, args.steps)
        except Exception as exc:  # one broken cell must not lose the others
            got = Result(row.key, column.key, row.batch, status=f"error: {type(exc).__name__}")
            print(f"{row.key}/{column.key}: {exc!r}", file=sys.stderr)
        results.append(got)
        print(f"{row.key:14} {column.key:18} {got}", file=sys.stderr, flush=True)

    def max_batch(entry: dict, key: str) -> None:
        row = next(r for r in rows if r.key == entry["model"])
        try:
            batch, how = largest_batch(row, by_key[key], budget, device, args.tiny)
        except Exception as exc:
            batch, how = None, f"error: {type(exc).__name__}: {exc}"
        entry[key] = f"{batch} ({how})" if batch is not None else f"n/a ({how})"
        print(f"{row.key} largest batch, {key}: {entry[key]}", file=sys.stderr, flush=True)

    # Priority under the deadline: first every row's eager columns (rows in order, the paper's headline
    # first), then the largest batches, then the compiled columns (compiling is the slow part).
    tasks: list[tuple[Callable[[], None], Callable[[], None]]] = []
    for row in rows:
        for column in columns:
            if not column.compiles:
                tasks.append((lambda r=row, c=column: cell(r, c), lambda r=row, c=column: skipped(r, c)))
    for row in rows:
        for entry in (e for e in max_batches if e["model"] == row.key):
            for key in MAX_BATCH_COLUMNS:
                tasks.append((lambda e=entry, k=key: max_batch(e, k), lambda e=entry, k=key: e.update({k: "skipped"})))
    for row in rows:
        for column in columns:
            if column.compiles and row.compile:
                tasks.append((lambda r=row, c=column: cell(r, c), lambda r=row, c=column: skipped(r, c)))

    def skipped(row: GpuModel, column: Column) -> None:
        results.append(Result(row.key, column.key, row.batch, status="skipped (deadline)"))

    for run, skip in tasks:
        (skip if time.perf_counter() - start > args.deadline_s else run)()
    text = markdown(results, max_batches, rows, environment(device, argv))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_models.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "gpu_models.json"), "w") as f:
        json.dump({"results": [asdict(r) for r in results], "max_batches": max_batches}, f, indent=1)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
