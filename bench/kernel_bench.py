"""GPU microbenchmark of the elementwise kernels against their torch counterparts and the copy roofline.

For each shape and dtype it measures, in the same run, the device-copy bandwidth of a plain
``y.copy_(x)`` and then every entry's forward or backward; it reports GB/s (by the bytes floor of
docs/method.md section 6), the floor time at the measured copy bandwidth, the fraction of copy bandwidth
reached, the speed relative to the torch counterpart, and whether the target is met:

- ReGELU2 / ReSiLU2 (fwd and bwd): >= 85% of copy bandwidth, and no slower than torch's op.
- MS LayerNorm / RMSNorm (fwd and bwd): >= 75% of copy bandwidth, and no slower than torch's op.
- Recompute passes (rebuild act(a) [* u], activation gradients): >= 85% of copy bandwidth, and no
  slower than the same math in torch ops.

Run ``python bench/kernel_bench.py [--markdown]`` on a CUDA machine; import and call :func:`run` to get
the rows as dicts. Without CUDA it exits with a message.

``python bench/kernel_bench.py --aot [--markdown]`` needs no GPU: it compiles every kernel configuration the
launchers can choose for sm_80 and sm_90 (:mod:`lowmembp_convert.aot`) and prints registers, shared
memory and spills from the cubins, and the bytes each kernel moves per element against the floor.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SHAPES: list[tuple[int, int]] = [(4096, 16384), (8192, 4096)]
DTYPES: list[torch.dtype] = [torch.bfloat16, torch.float32]
ELEMENTWISE_TARGET = 0.85  # fraction of the measured copy bandwidth
NORM_TARGET = 0.75


@dataclass(frozen=True)
class Entry:
    """One timed operation.

    Attributes:
        name: row label, e.g. ``"regelu2 fwd"``.
        make: given the input x (2-D, requires_grad False), returns the no-argument callable timed.
        floor_bytes: bytes per element that must cross DRAM, as a function of x's element size.
        baseline: name of the torch entry this one must not be slower than (None for baselines).
        target: required fraction of copy bandwidth (None for baselines).
    """

    name: str
    make: Callable[[torch.Tensor], Callable[[], object]]
    floor_bytes: Callable[[int], float]
    baseline: str | None = None
    target: float | None = None


# Bytes per element (docs/method.md section 6): an elementwise fwd reads x and writes y (2e), a stock
# bwd reads dy and x and writes dx (3e); the 2-bit variants add or replace x by 1/4 byte of codes.
def _read_write(e: int) -> float:
    return 2 * e


def _read_write_codes(e: int) -> float:
    return 2 * e + 0.25


def _stock_bwd(e: int) -> float:
    return 3 * e


def _grad_like(x: torch.Tensor) -> torch.Tensor:
    return torch.randn_like(x)


def _regelu2_fwd(x: torch.Tensor) -> Callable[[], object]:
    return lambda: torch.ops.lowmembp.regelu2_fwd(x, "none")


def _regelu2_bwd(x: torch.Tensor) -> Callable[[], object]:
    codes, g = torch.ops.lowmembp.regelu2_fwd(x, "none")[1], _grad_like(x)
    return lambda: torch.ops.lowmembp.step_bwd(g, codes, "regelu2")


def _resilu2_fwd(x: torch.Tensor) -> Callable[[], object]:
    return lambda: torch.ops.lowmembp.resilu2_fwd(x)


def _resilu2_bwd(x: torch.Tensor) -> Callable[[], object]:
    codes, g = torch.ops.lowmembp.resilu2_fwd(x)[1], _grad_like(x)
    return lambda: torch.ops.lowmembp.step_bwd(g, codes, "resilu2")


def _gelu_bwd(x: torch.Tensor) -> Callable[[], object]:
    g = _grad_like(x)
    return lambda: torch.ops.aten.gelu_backward(g, x, approximate="none")


def _silu_bwd(x: torch.Tensor) -> Callable[[], object]:
    g = _grad_like(x)
    return lambda: torch.ops.aten.silu_backward(g, x)


ACTIVATION_ENTRIES: list[Entry] = [
    Entry("torch gelu fwd", lambda x: lambda: F.gelu(x), _read_write),
    Entry("regelu2 fwd", _regelu2_fwd, _read_write_codes, "torch gelu fwd", ELEMENTWISE_TARGET),
    Entry("torch gelu bwd", _gelu_bwd, _stock_bwd),
    Entry("regelu2 bwd", _regelu2_bwd, _read_write_codes, "torch gelu bwd", ELEMENTWISE_TARGET),
    Entry("torch silu fwd", lambda x: lambda: F.silu(x), _read_write),
    Entry("resilu2 fwd", _resilu2_fwd, _read_write_codes, "torch silu fwd", ELEMENTWISE_TARGET),
    Entry("torch silu bwd", _silu_bwd, _stock_bwd),
    Entry("resilu2 bwd", _resilu2_bwd, _read_write_codes, "torch silu bwd", ELEMENTWISE_TARGET),
]


# ==================================================================================================
# NORM ENTRIES: the memory-sharing norms of lowmembp_convert.ops.norms (another module; imported in a
# try so this file runs before it exists). Bytes floor per docs/method.md section 6: fwd 2e (read x, write
# y; one fp32 rstd per row is negligible), bwd 3e (read dy and y, write dx). Add norm benchmarks here.
# ==================================================================================================


def _timed_backward(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], Callable]:
    def make(x: torch.Tensor) -> Callable[[], object]:
        xg = x.detach().requires_grad_(True)
        y = forward(xg)
        g = _grad_like(y)
        return lambda: torch.autograd.grad(y, xg, g, retain_graph=True)

    return make


def _norm_entries() -> list[Entry]:
    try:
        from lowmembp_convert.ops.norms import ms_layer_norm, ms_rms_norm
    except ImportError as error:
        print(f"[bench] skipping the norm entries: {error}", file=sys.stderr)
        return []
    eps = 1e-5
    layer_norm = lambda x: F.layer_norm(x, x.shape[-1:], eps=eps)
    rms_norm = lambda x: F.rms_norm(x, x.shape[-1:], eps=eps)
    ms_ln = lambda x: ms_layer_norm(x, eps=eps)
    ms_rms = lambda x: ms_rms_norm(x, eps=eps)
    return [
        Entry("torch layer_norm fwd", lambda x: lambda: layer_norm(x), _read_write),
        Entry("ms_layer_norm fwd", lambda x: lambda: ms_ln(x), _read_write, "torch layer_norm fwd", NORM_TARGET),
        Entry("torch layer_norm bwd", _timed_backward(layer_norm), _stock_bwd),
        Entry("ms_layer_norm bwd", _timed_backward(ms_ln), _stock_bwd, "torch layer_norm bwd", NORM_TARGET),
        Entry("torch rms_norm fwd", lambda x: lambda: rms_norm(x), _read_write),
        Entry("ms_rms_norm fwd", lambda x: lambda: ms_rms(x), _read_write, "torch rms_norm fwd", NORM_TARGET),
        Entry("torch rms_norm bwd", _timed_backward(rms_norm), _stock_bwd),
        Entry("ms_rms_norm bwd", _timed_backward(ms_rms), _stock_bwd, "torch rms_norm bwd", NORM_TARGET),
    ]


# ==================================================================================================
# RECOMPUTE ENTRIES: the two elementwise passes of the exact recompute in the consumer's backward
# (lowmembp_convert.ops.recompute_launch; docs/method.md section 7), against the same math in torch ops.
# Floors: rebuild p = act(a) reads a, writes p (2e); gated p = act(g) * u reads g, u, writes p (3e);
# grads plain read dp, a, write da (3e); gated read dp, g, u, write dg, du (5e).
# ==================================================================================================


def _gated_fwd(e: int) -> float:
    return 3 * e


def _gated_bwd(e: int) -> float:
    return 5 * e


def _recompute_entries() -> list[Entry]:
    try:
        from lowmembp_convert.ops.recompute_launch import (
            reference_act_grads,
            reference_rebuild,
            triton_act_grads,
            triton_rebuild,
        )
    except ImportError as error:
        print(f"[bench] skipping the recompute entries: {error}", file=sys.stderr)
        return []

    def gated(fn: Callable) -> Callable[[torch.Tensor], Callable[[], object]]:
        def make(x: torch.Tensor) -> Callable[[], object]:
            u = torch.randn_like(x)
            return lambda: fn(x, u)

        return make

    def grads(fn: Callable, with_u: bool) -> Callable[[torch.Tensor], Callable[[], object]]:
        def make(x: torch.Tensor) -> Callable[[], object]:
            dp, u = _grad_like(x), torch.randn_like(x) if with_u else None
            return lambda: fn(dp, x, u)

        return make

    t = ELEMENTWISE_TARGET
    return [
        Entry(
            "recompute rebuild gelu",
            lambda x: lambda: triton_rebuild(x, None, "gelu"),
            _read_write,
            "torch gelu fwd",
            t,
        ),
        Entry("torch silu*up fwd", gated(lambda x, u: reference_rebuild(x, u, "silu")), _gated_fwd),
        Entry(
            "recompute rebuild silu*up",
            gated(lambda x, u: triton_rebuild(x, u, "silu")),
            _gated_fwd,
            "torch silu*up fwd",
            t,
        ),
        Entry(
            "recompute grads gelu",
            grads(lambda dp, x, u: triton_act_grads(dp, x, None, "gelu"), False),
            _stock_bwd,
            "torch gelu bwd",
            t,
        ),
        Entry("torch silu*up bwd", grads(lambda dp, x, u: reference_act_grads(dp, x, u, "silu"), True), _gated_bwd),
        Entry(
            "recompute grads silu*up",
            grads(lambda dp, x, u: triton_act_grads(dp, x, u, "silu"), True),
            _gated_bwd,
            "torch silu*up bwd",
            t,
        ),
    ]


# ==================================================================================================


def _time_ms(fn: Callable[[], object], device: str) -> float:
    if device != "cuda":  # smoke tests of this script only; CPU numbers mean nothing here
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def run(
    rows_out: list[dict],
    shapes: list[tuple[int, int]] = SHAPES,
    dtypes: list[torch.dtype] = DTYPES,
    entries: list[Entry] | None = None,
    device: str = "cuda",
) -> list[dict]:
    """Time every entry on every shape and dtype; append one dict per measurement to ``rows_out``.

    Args:
        rows_out: list the rows are appended to (also returned).
        shapes: 2-D input shapes [rows, hidden].
        dtypes: input dtypes.
        entries: what to time; default the activation entries plus the norm and recompute entries when
            importable.
        device: "cuda"; anything else only smoke-tests this script (one untimed-quality call each).

    Each row: shape, dtype, op, ms, GB/s, floor_ms, copy_GB/s, of_copy (fraction of copy bandwidth),
    vs_torch (torch time / this time; > 1 is faster), target (text), ok (bool or None).
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench/kernel_bench.py needs a CUDA GPU (it times Triton kernels and DRAM bandwidth)")
    import lowmembp_convert.ops.activations  # noqa: F401  (registers the lowmembp:: custom ops)

    entries = entries if entries is not None else ACTIVATION_ENTRIES + _norm_entries() + _recompute_entries()
    for rows, hidden in shapes:
        for dtype in dtypes:
            x = torch.randn(rows, hidden, device=device, dtype=dtype)
            n, e = x.numel(), x.element_size()
            y = torch.empty_like(x)
            copy_gbs = 2 * n * e / _time_ms(functools.partial(y.copy_, x), device) / 1e6
            del y
            times: dict[str, float] = {}
            for entry in entries:
                ms = _time_ms(entry.make(x), device)
                times[entry.name] = ms
                floor_bytes = entry.floor_bytes(e) * n
                gbs = floor_bytes / ms / 1e6
                of_copy = gbs / copy_gbs
                vs_torch = times[entry.baseline] / ms if entry.baseline in times else None
                ok = None
                target = ""
                if entry.target is not None:
                    target = f">={entry.target:.0%} copy, >=1.00x torch"
                    ok = of_copy >= entry.target and (vs_torch is None or vs_torch >= 1.0)
                rows_out.append(
                    {
                        "shape": f"{rows}x{hidden}",
                        "dtype": str(dtype).removeprefix("torch."),
                        "op": entry.name,
                        "ms": ms,
                        "GB/s": gbs,
                        "floor_ms": floor_bytes / copy_gbs / 1e6,
                        "copy_GB/s": copy_gbs,
                        "of_copy": of_copy,
                        "vs_torch": vs_torch,
                        "target": target,
                        "ok": ok,
                    }
                )
            del x
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows_out


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:.0f}"
    return str(value)


def format_markdown(rows: list[dict]) -> str:
    """The rows as a markdown table (for BENCHMARKS.md)."""
    columns = [
        "shape",
        "dtype",
        "op",
        "ms",
        "floor_ms",
        "GB/s",
        "copy_GB/s",
        "of_copy",
        "vs_torch",
        "target",
        "ok",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [_fmt(row[c]) for c in columns]
        cells[columns.index("of_copy")] = f"{row['of_copy']:.0%}"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ==================================================================================================
# --aot: compiled for sm_80 / sm_90 on any machine, not run
# ==================================================================================================

_AOT_KERNEL_ORDER = [
    "ms_norm_fwd_kernel",
    "ms_norm_bwd_kernel",
    "ms_norm_bwd_affine_kernel",
    "ms_norm_kept_fwd_kernel",
    "ms_norm_kept_correction_kernel",
    "ms_norm_kept_dx_kernel",
    "_step_activation_fwd_kernel",
    "_step_activation_bwd_kernel",
    "_rebuild_kernel",
    "_act_grads_kernel",
    "ce_rows_kernel",
]
# Floor per docs/method.md section 6, by element size. The affine (dweight / dbias) pass has none of its
# own: section 6's norm bwd figure (3e) is the whole backward, dx and the parameter gradients.
_AOT_FLOOR: dict[str, Callable[[int], float] | None] = {
    "ms_norm_fwd_kernel": _read_write,
    "ms_norm_bwd_kernel": _stock_bwd,
    "ms_norm_bwd_affine_kernel": None,
    # the ill-conditioned channels' passes: a few columns per row, launched only when some are kept
    "ms_norm_kept_fwd_kernel": None,
    "ms_norm_kept_correction_kernel": None,
    "ms_norm_kept_dx_kernel": None,
    "_step_activation_fwd_kernel": _read_write_codes,
    "_step_activation_bwd_kernel": _read_write_codes,
    # the exact recompute passes (ops/recompute.py): no figure in section 6; they move only their operands
    "_rebuild_kernel": None,
    "_act_grads_kernel": None,
    # the loss head's rows (ops/cross_entropy_rows.py): no figure in section 6
    "ce_rows_kernel": None,
}


def _span(values: list) -> str:
    lo, hi = min(values), max(values)
    text = (lambda v: f"{v:g}") if isinstance(lo, float) else str
    return text(lo) if lo == hi else f"{text(lo)}-{text(hi)}"


def aot_rows(results: list) -> list[dict]:
    """Fold compile results (:func:`lowmembp_convert.aot.compile_configs`) into table rows.

    One row per kernel, dtype, launch configuration and target; the caller-chosen flags (RMS,
    HAS_WEIGHT, HAS_BIAS, COMPUTE_DW / DB, ACTIVATION) are folded: registers and bytes show their
    range, shared memory and spills their maximum.
    """
    from lowmembp_convert import aot

    groups: dict[tuple, list] = {}
    for r in results:
        c = r.config
        groups.setdefault((c.kernel, c.dtype, c.launch, c.num_warps, r.target), []).append(r)
    rows = []
    for (kernel, dtype, _launch, _warps, target), rs in groups.items():
        config = rs[0].config
        floor = _AOT_FLOOR[kernel]
        rows.append(
            {
                "kernel": kernel,
                "dtype": dtype,
                "config": f"{config.launch_label()} (N={', '.join(map(str, rs[0].ns))})",
                "flag sets": len(rs),
                "target": f"sm_{target}",
                "regs/thread": _span([r.registers for r in rs]),
                "2 programs/SM": all(aot.fits_two_programs_per_sm(r) for r in rs),
                "shared B (dyn+static)": f"{max(r.dynamic_shared for r in rs)}+{max(r.static_shared for r in rs)}",
                "spills (local B)": max(r.local_bytes for r in rs),
                "B/elem moved": _span([aot.issued_bytes_per_element(r.config) for r in rs]),
                "B/elem floor (METHOD 6)": f"{floor(aot.ELEMENT_SIZE[dtype]):g}" if floor else "(in bwd)",
                "_sort": (_AOT_KERNEL_ORDER.index(kernel), aot.DTYPES.index(dtype), rs[0].ns, target),
            }
        )
    rows.sort(key=lambda row: row.pop("_sort"))
    return rows


def format_aot_markdown(rows: list[dict]) -> str:
    """The --aot rows as a markdown table."""
    columns = [c for c in rows[0] if not c.startswith("_")] if rows else []
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def aot_summary(results: list) -> str:
    """One line: how many configurations, the largest register count, spills."""
    from lowmembp_convert import aot

    top = max(results, key=lambda r: r.registers)
    spilling = [r for r in results if r.local_bytes]
    over = [r for r in results if not aot.fits_two_programs_per_sm(r)]
    over_kernels = sorted({f"{r.config.kernel} ({r.config.launch_label()})" for r in over})
    return (
        f"{len({r.config for r in results})} configurations x {len({r.target for r in results})} targets = "
        f"{len(results)} cubins; max {top.registers} registers/thread ({top.config.kernel}, {top.config.dtype}, "
        f"{top.config.flags_label()}, {top.config.launch_label()}, sm_{top.target}); "
        f"{len(spilling)} with local memory (spills); {len(over)} over the two-programs-per-SM register budget"
        + (f": {'; '.join(over_kernels)}" if over_kernels else "")
        + f"; resource usage read with {', '.join(sorted({r.tool for r in results}))}"
    )


def _aot_environment(argv: list[str]) -> str:
    import datetime
    import os
    import platform
    import subprocess

    import triton

    ptxas = triton.knobs.nvidia.ptxas.path
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    release = next((line.split("release", 1)[1].strip() for line in version.splitlines() if "release" in line), "?")
    return (
        f"- machine: {platform.machine()} {platform.system()}, {os.cpu_count()} logical CPUs, "
        f"CUDA device: {'yes' if torch.cuda.is_available() else 'none'} (compiled, not run)\n"
        f"- triton {triton.__version__} and its bundled ptxas / cuobjdump (CUDA {release}), torch {torch.__version__}\n"
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
        f"- command: `{' '.join(['python', 'bench/kernel_bench.py', *argv])}`"
    )


def main_aot(markdown: bool, jobs: int, argv: list[str]) -> int:
    """--aot: compile every configuration for sm_80 / sm_90 and print the table; 1 if anything spills."""
    from lowmembp_convert import aot

    missing = aot.toolchain_missing()
    if missing:
        print(f"bench/kernel_bench.py --aot: {missing}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    results = aot.compile_configs(aot.all_configs(), jobs=jobs)
    elapsed = time.perf_counter() - start
    rows = aot_rows(results)
    summary = aot_summary(results)
    if markdown:
        print(_aot_environment(argv))
        print(f"- {summary} (compiled in {elapsed:.0f} s)\n")
        print(format_aot_markdown(rows))
    else:
        print(f"{summary} (compiled in {elapsed:.0f} s)")
        for row in rows:
            print("  ".join(f"{k}={_fmt(v)}" for k, v in row.items()))
    return 1 if any(r.local_bytes for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument(
        "--aot", action="store_true", help="compile every kernel configuration for sm_80/sm_90 (no GPU needed)"
    )
    parser.add_argument("--jobs", type=int, default=2, help="--aot: compiler processes in parallel")
    args = parser.parse_args(argv)
    if args.aot:
        return main_aot(args.markdown, args.jobs, sys.argv[1:] if argv is None else list(argv))
    if not torch.cuda.is_available():
        print("bench/kernel_bench.py: no CUDA device; this benchmark only runs on a GPU.", file=sys.stderr)
        return 2
    rows = run([])
    print(f"device: {torch.cuda.get_device_name()}")
    if args.markdown:
        print(format_markdown(rows))
    else:
        for row in rows:
            print("  ".join(f"{k}={_fmt(v)}" for k, v in row.items()))
    return 0 if all(row["ok"] is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
