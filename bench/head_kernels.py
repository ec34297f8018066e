"""The loss head alone, side by side: stock, our exact and fused heads, Liger's fused linear cross-entropy.

One training step of the head and its loss on random data, ``h [rows, hidden] -> logits [rows, vocab]
-> cross-entropy`` with ``loss.backward()``, in bf16 (the head's weight trainable, as in full
fine-tuning), for model-shaped rows, hidden sizes and vocabularies:

- ``stock``: ``F.linear`` then ``F.cross_entropy(logits.float(), target)``, as transformers' loss does;
- ``exact``: ``ops.linear_cross_entropy`` (stock forward; backward recomputes the logits per chunk);
- ``fused``: ``ops.fused_linear_cross_entropy`` (gradients in the forward, chunk by chunk, no logits;
  on a GPU each chunk goes through the Triton row kernel ``ce_rows_kernel``);
- ``liger``: ``LigerFusedLinearCrossEntropyLoss`` when ``liger_kernel`` is installed (else n/a).

For each: peak memory above the inputs (``bench/peak_meter.py``: ``max_memory_allocated`` on a GPU,
the profiler's memory events on a CPU), median step time over ``--reps`` timed steps after a warm-up,
and the loss and the weight gradient against stock (max relative difference).

    python bench/head_kernels.py --device cuda --markdown        # what bench/gpu.sh runs
    python bench/head_kernels.py --device cpu --tiny             # a check of the script on a CPU
    python bench/head_kernels.py --device cpu --shape 2048,1024,32000 --reps 1   # float32 on a CPU
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_meter import peak_bytes  # noqa: E402

from lowmembp_convert.ops.fused_linear_cross_entropy import fused_linear_cross_entropy  # noqa: E402
from lowmembp_convert.ops.linear_cross_entropy import linear_cross_entropy  # noqa: E402

# name: (rows = batch x tokens, hidden, vocabulary)
SHAPES = {
    "qwen2_0.5b": (4096, 896, 151_936),
    "llama3_8b": (4096, 4096, 128_256),
    "gemma2_2b": (4096, 2304, 256_000),
}
TINY = {"tiny": (256, 64, 5000)}


def _stock(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t)


def _exact(h, w, t):
    logits = F.linear(h, w)
    return linear_cross_entropy(h, w, None, logits, t)


def _fused(h, w, t):
    return fused_linear_cross_entropy(h, w, None, t)


def _liger() -> Callable | None:
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception:
        return None
    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda h, w, t: loss(w, h, t)


def _data(rows: int, hidden: int, vocab: int, device: str, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    h = (torch.randn(rows, hidden, generator=gen) / hidden**0.25).to(device, dtype).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(device, dtype).requires_grad_(True)
    t = torch.randint(0, vocab, (rows,), generator=gen).to(device)
    t[::7] = -100
    return h, w, t


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def measure(name: str, fn: Callable, shape: tuple[int, int, int], device: str, dtype: torch.dtype, reps: int) -> dict:
    h, w, t = _data(*shape, device, dtype)

    def step():
        loss = fn(h, w, t)
        loss.backward()
        return loss

    step()  # warm-up (Triton compiles on its first launch)
    # the previous step's gradients are freed before measuring: their free inside the measured code
    # would lower the running sum (the CPU profiler counts frees of blocks it did not see allocated)
    h.grad = w.grad = None
    peak = peak_bytes(step, device)
    times = []
    for _ in range(reps):
        h.grad = w.grad = None
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"variant": name, "peak": peak, "ms": 1e3 * sorted(times)[len(times) // 2], "loss": loss.detach(),
            "dw": w.grad.detach().clone(), "dh": h.grad.detach().clone()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="*", help="shape names (default: all)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="one small shape (a CPU check of the script)")
    parser.add_argument("--shape", help="ROWS,HIDDEN,VOCAB: this shape only")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    shapes = TINY if args.tiny else {k: v for k, v in SHAPES.items() if not args.only or k in args.only}
    if args.shape:
        rows, hidden, vocab = (int(v) for v in args.shape.split(","))
        shapes = {"custom": (rows, hidden, vocab)}
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    variants = {"stock": _stock, "exact": _exact, "fused": _fused}
    liger = _liger()
    if liger is not None and args.device.startswith("cuda"):
        variants["liger"] = liger
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# loss head alone: {device_name}, {dtype}, torch {torch.__version__}, {when}")
    print("liger_kernel:", "installed" if liger is not None else "not installed (column n/a)")
    columns = ["shape (rows x hidden x vocab)", "variant", "peak MiB", "vs stock", "step ms", "vs stock"]
    print("| " + " | ".join([*columns, "loss rel.", "dW rel.", "dh rel."]) + " |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for shape_name, shape in shapes.items():
        results = []
        for name, fn in variants.items():
            try:
                results.append(measure(name, fn, shape, args.device, dtype, args.reps))
            except Exception as exc:  # one variant failing (out of memory, missing kernel) must not hide the rest
                print(f"| {shape_name} | {name} | failed: {type(exc).__name__}: {str(exc)[:80]} | | | | | | |")
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
        stock = next((r for r in results if r["variant"] == "stock"), None)
        for r in results:
            label = f"{shape_name} ({' x '.join(str(s) for s in shape)})"
            vs_peak = f"{r['peak'] / stock['peak']:.2f}x" if stock else "-"
            vs_ms = f"{r['ms'] / stock['ms']:.2f}x" if stock else "-"
            rels = [f"{_rel(r[k], stock[k]):.1e}" if stock else "-" for k in ("loss", "dw", "dh")]
            print(
                f"| {label} | {r['variant']} | {r['peak'] / 2**20:.1f} | {vs_peak} | {r['ms']:.1f} | {vs_ms} | "
                + " | ".join(rels)
                + " |"
            )


if __name__ == "__main__":
    main()
