"""Compile every kernel configuration the launchers can choose for real GPUs, without a GPU.

Triton's compiler and its bundled ``ptxas`` / ``cuobjdump`` need no device: ``triton.compile`` with a
``GPUTarget("cuda", 80 | 90, 32)`` yields a cubin, and ``cuobjdump --dump-resource-usage`` reads its
registers per thread, shared memory and local memory (spills). This module

- enumerates the configurations from the launchers' own settings functions
  (:func:`lowmembp_convert.ops.norms.launch_settings`, ``lowmembp_convert.ops.activations._launch_config``),
  for each storage dtype, each constexpr branch and each row length / element count in ``NS``,
  deduplicated (several N share one configuration);
- compiles them in a child process with ``TRITON_INTERPRET`` unset: ``@triton.jit`` and
  ``kernels/activations.py`` (libdevice vs ``tl.exp``) decide at import time, and the test suite runs
  the interpreter (tests/conftest.py), so the real-GPU code can only be imported in a fresh process;
- reads the resource usage with ``cuobjdump`` (or, when it is absent, ``ptxas -v`` on the PTX).

Nothing is run: these are static numbers from the compiler, not measurements.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "DTYPES",
    "NS",
    "VOCABS",
    "TARGETS",
    "CompileResult",
    "KernelConfig",
    "all_configs",
    "compile_configs",
    "default_configs",
    "fits_two_programs_per_sm",
    "issued_bytes_per_element",
    "toolchain_missing",
]

TARGETS: tuple[int, ...] = (80, 90)  # sm_80 (A100), sm_90 (H100)
DTYPES: tuple[str, ...] = ("fp32", "fp16", "bf16")  # storage dtype of every tensor argument
NS: tuple[int, ...] = (64, 768, 4096, 8192, 16384, 65536)  # row length (norms) / element count (activations)
# Vocabularies of the loss head's row kernel besides NS: GPT-2, LLaMA-3, Qwen2, Gemma 2, Gemma 3.
VOCABS: tuple[int, ...] = (50257, 128256, 151936, 256000, 262144)
# Rows of the [M, N] norm problems: only runtime arguments (M, rows_per_program) depend on it.
NOMINAL_ROWS = 4096
NOMINAL_KEPT = 3  # kept (ill-conditioned) channels of a norm, as the row stride of their buffer
REGISTERS_PER_SM = 65536
ELEMENT_SIZE = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class KernelConfig:
    """One compilation of one kernel: everything that makes a distinct cubin.

    Attributes:
        module: kernel module under ``lowmembp_convert.kernels`` ("norms", "activations", "recompute" or
            "cross_entropy").
        kernel: name of the ``@triton.jit`` function.
        dtype: storage dtype of the tensor arguments ("fp32", "fp16", "bf16"); fp32 buffers stay fp32.
        signature: (name, triton type, divisible by 16) of each non-constexpr argument, as the JIT
            would specialize it at launch (pointers from torch are 16-byte aligned; ints by value).
        flags: constexprs the caller picks (RMS, HAS_WEIGHT, ACTIVATION, ...).
        launch: constexprs the launcher derives from N (BLOCK_N, ONE_BLOCK, BLOCK, ...).
        num_warps: the launcher's num_warps.
    """

    module: str
    kernel: str
    dtype: str
    signature: tuple[tuple[str, str, bool], ...]
    flags: tuple[tuple[str, bool | int], ...]
    launch: tuple[tuple[str, bool | int], ...]
    num_warps: int

    @property
    def constexprs(self) -> dict[str, bool | int]:
        return dict(self.flags + self.launch)

    @property
    def threads(self) -> int:
        return 32 * self.num_warps

    @property
    def branch(self) -> tuple:
        """The code path: kernel, dtype, caller flags and the launcher's boolean constexprs."""
        bools = tuple((k, v) for k, v in self.launch if isinstance(v, bool))
        return (self.kernel, self.dtype, self.flags, bools)

    @property
    def elements_per_thread(self) -> float:
        block = 1
        for name, value in self.launch:
            if name.startswith("BLOCK") and not isinstance(value, bool):
                block *= value
        return block / self.threads

    def flags_label(self) -> str:
        return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.flags) or "-"

    def launch_label(self) -> str:
        parts = [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.launch]
        return ", ".join([*parts, f"{self.num_warps} warps"])


@dataclass(frozen=True)
class CompileResult:
    """Resource usage of one configuration compiled for one target (static, from the cubin).

    Attributes:
        config: what was compiled.
        ns: the N of ``NS`` whose launch selects this configuration.
        target: compute capability, 80 or 90.
        arch: the cubin's architecture as Triton named it ("sm80", "sm90a", ...).
        registers: registers per thread.
        local_bytes: local memory per thread (register spills and stack arrays); should be 0.
        stack_bytes: stack frame per thread.
        spill_stores, spill_loads: bytes, from ``ptxas -v``; None when read with cuobjdump.
        static_shared: static shared memory per program (bytes, from the cubin).
        dynamic_shared: dynamic shared memory Triton requests at launch (bytes, its metadata).
        tool: "cuobjdump" or "ptxas -v": where the numbers come from.
        libdevice: the activation kernels were imported with libdevice exp / tanh (the GPU branch).
    """

    config: KernelConfig
    ns: tuple[int, ...]
    target: int
    arch: str
    registers: int
    local_bytes: int
    stack_bytes: int
    spill_stores: int | None
    spill_loads: int | None
    static_shared: int
    dynamic_shared: int
    tool: str
    libdevice: bool

    @property
    def shared_bytes(self) -> int:
        return self.static_shared + self.dynamic_shared


def fits_two_programs_per_sm(result: CompileResult) -> bool:
    """regs * threads * 2 <= 65536: the register file holds two programs of this kernel at once."""
    return result.registers * result.config.threads * 2 <= REGISTERS_PER_SM


# --------------------------------------------------------------------------------------------------
# Enumeration, from the launchers' own settings
# --------------------------------------------------------------------------------------------------


def _int_arg(name: str, value: int) -> tuple[str, str, bool]:
    # As the JIT specializes an int: i32 below 2**31, "divisible by 16" when it is. (A value of 1
    # would become a constant; none of the arguments here can be 1.)
    return (name, "i32" if -(2**31) <= value < 2**31 else "i64", value % 16 == 0)


def _ptr(name: str, dtype: str) -> tuple[str, str, bool]:
    return (name, f"*{dtype}", True)  # torch allocations are 16-byte aligned


def _fp32(name: str) -> tuple[str, str, bool]:
    return (name, "fp32", False)  # float arguments are never specialized


def _affine_flag_sets() -> list[tuple[bool, bool, bool, bool]]:
    """(HAS_WEIGHT, HAS_BIAS, COMPUTE_DW, COMPUTE_DB) reachable through ``ms_norm_bwd_affine``.

    It refuses dweight without a weight and dbias without a bias, and ``grads_from_output`` only
    calls it when one of the two is needed.
    """
    sets = []
    for has_w, has_b, dw, db in itertools.product((False, True), repeat=4):
        if (dw or db) and (has_w or not dw) and (has_b or not db):
            sets.append((has_w, has_b, dw, db))
    return sets


def _kept_flags(has_affine: bool) -> tuple[bool, ...]:
    """HAS_KEPT values reachable: kept channels exist only for a norm with a weight or a bias."""
    return (False, True) if has_affine else (False,)


def _norm_configs(n: int, dtype: str) -> list[KernelConfig]:
    import torch

    from lowmembp_convert.ops import norms

    # The device only sets the number of row groups of the column reduction: a runtime argument.
    s = norms.launch_settings(NOMINAL_ROWS, n, torch.device("cpu"))
    row_launch = (("BLOCK_N", s.block_n), ("ONE_BLOCK", s.one_block))
    configs = []
    for rms, has_w, has_b in itertools.product((True, False), repeat=3):
        fwd_sig = (
            *(_ptr(p, dtype) for p in ("X", "Y", "W", "B")),
            _ptr("RSTD", "fp32"),
            _ptr("MEAN", "fp32"),
            _int_arg("stride_x_row", n),
            _int_arg("stride_y_row", n),
            _int_arg("N", n),
            _fp32("eps"),
            _fp32("weight_offset"),
        )
        bwd_sig = (
            _ptr("DY", dtype),
            _ptr("Y", dtype),
            _ptr("RSTD", "fp32"),
            *(_ptr(p, dtype) for p in ("W", "B", "DX")),
            _ptr("CORRECTION", "fp32"),
            _ptr("ROW_MEANS", "fp32"),
            _int_arg("stride_dy_row", n),
            _int_arg("stride_y_row", n),
            _int_arg("stride_dx_row", n),
            _int_arg("N", n),
            _fp32("weight_offset"),
        )
        for has_kept in _kept_flags(has_w or has_b):
            flags = (("RMS", rms), ("HAS_WEIGHT", has_w), ("HAS_BIAS", has_b), ("HAS_KEPT", has_kept))
            for kernel, sig in (("ms_norm_fwd_kernel", fwd_sig), ("ms_norm_bwd_kernel", bwd_sig)):
                configs.append(KernelConfig("norms", kernel, dtype, sig, flags, row_launch, s.num_warps))
    affine_sig = (
        *(_ptr(p, dtype) for p in ("DY", "Y", "W", "B")),
        _ptr("DW_PARTIAL", "fp32"),
        _ptr("DB_PARTIAL", "fp32"),
        _ptr("SLOT", "i32"),
        _ptr("KEPT", "fp32"),
        _int_arg("stride_dy_row", n),
        _int_arg("stride_y_row", n),
        _int_arg("stride_kept_row", NOMINAL_KEPT),
        _int_arg("M", NOMINAL_ROWS),
        _int_arg("N", n),
        _int_arg("rows_per_program", s.affine_rows_per_program),
        _fp32("weight_offset"),
    )
    affine_launch = (("BLOCK_M", s.affine_block_m), ("BLOCK_N", s.affine_block_n))
    for has_w, has_b, dw, db in _affine_flag_sets():
        for has_kept in _kept_flags(dw):  # the kept x_hat is read for dweight only
            flags = (
                ("HAS_WEIGHT", has_w), ("HAS_BIAS", has_b), ("COMPUTE_DW", dw), ("COMPUTE_DB", db),
                ("HAS_KEPT", has_kept),
            )  # fmt: skip
            configs.append(
                KernelConfig(
                    "norms", "ms_norm_bwd_affine_kernel", dtype, affine_sig, flags, affine_launch, s.affine_num_warps
                )
            )
    return configs + _kept_configs(n, dtype)


def _kept_configs(n: int, dtype: str) -> list[KernelConfig]:
    """The three kept-channel kernels, at the smallest and the largest block the launcher picks."""
    from lowmembp_convert.ops import norms

    kept = (_ptr("KC", "i64"), _ptr("KEPT", "fp32"))
    k = _int_arg("K", NOMINAL_KEPT)  # a handful of channels: rarely a multiple of 16
    fwd_sig = (_ptr("X", dtype), _ptr("MEAN", "fp32"), _ptr("RSTD", "fp32"), *kept, _int_arg("stride_x_row", n), k)
    row_ptrs = (_ptr("DY", dtype), _ptr("Y", dtype))
    strides = (_int_arg("stride_dy_row", n), _int_arg("stride_y_row", n))
    correction_sig = (
        *row_ptrs, _ptr("W", dtype), _ptr("B", dtype), *kept, _ptr("CORRECTION", "fp32"), *strides, k,
        _fp32("weight_offset"),
    )  # fmt: skip
    dx_sig = (
        *row_ptrs, _ptr("RSTD", "fp32"), _ptr("W", dtype), _ptr("B", dtype), *kept, _ptr("ROW_MEANS", "fp32"),
        _ptr("DX", dtype), *strides, _int_arg("stride_dx_row", n), k, _fp32("weight_offset"),
    )  # fmt: skip
    configs = []
    for entries in (NOMINAL_KEPT, 1024):
        block_k, warps = norms.kept_launch_settings(entries)
        launch = (("BLOCK_K", block_k),)
        for rms in (True, False):
            configs.append(
                KernelConfig("norms", "ms_norm_kept_fwd_kernel", dtype, fwd_sig, (("RMS", rms),), launch, warps)
            )
        for has_w, has_b in itertools.product((False, True), repeat=2):
            if not (has_w or has_b):
                continue  # no affine: nothing is kept
            flags = (("HAS_WEIGHT", has_w), ("HAS_BIAS", has_b))
            for kernel, sig in (("ms_norm_kept_correction_kernel", correction_sig), ("ms_norm_kept_dx_kernel", dx_sig)):
                configs.append(KernelConfig("norms", kernel, dtype, sig, flags, launch, warps))
    return configs


def _activation_configs(n: int, dtype: str) -> list[KernelConfig]:
    from lowmembp_convert.ops import activations

    _grid, block, num_warps = activations._launch_config(n)
    launch = (("BLOCK", block),)
    configs = []
    fwd_sig = (
        _ptr("X", dtype),
        _ptr("Y", dtype),
        _ptr("CODES", "u8"),
        _int_arg("n_elements", n),
        *(_fp32(c) for c in ("c0", "c1", "c2")),
    )
    for name in (*activations._GELU_APPROXIMATIONS, "silu"):
        flags = (("ACTIVATION", activations._triton_activation_id(name)),)
        configs.append(
            KernelConfig("activations", "_step_activation_fwd_kernel", dtype, fwd_sig, flags, launch, num_warps)
        )
    bwd_sig = (
        _ptr("DY", dtype),
        _ptr("CODES", "u8"),
        _ptr("DX", dtype),
        _int_arg("n_elements", n),
        *(_fp32(f"level{i}") for i in range(4)),
    )
    configs.append(KernelConfig("activations", "_step_activation_bwd_kernel", dtype, bwd_sig, (), launch, num_warps))
    return configs


def _recompute_configs(n: int, dtype: str) -> list[KernelConfig]:
    from lowmembp_convert.ops import recompute_launch

    s = recompute_launch.launch_settings(n)
    launch = (("BLOCK_SIZE", s.block_size),)
    rebuild_sig = (_ptr("A", dtype), _ptr("U", dtype), _ptr("P", dtype), _int_arg("n_elements", n))
    grads_sig = (
        _ptr("DP", dtype),
        _ptr("A", dtype),
        _ptr("U", dtype),
        _ptr("DA", dtype),
        _ptr("DU", dtype),
        _int_arg("n_elements", n),
    )
    configs = []
    for kind in recompute_launch.KINDS:
        for gated in (False, True):
            flags = (("ACTIVATION", recompute_launch._activation_id(kind)), ("GATED", gated))
            configs.append(KernelConfig("recompute", "_rebuild_kernel", dtype, rebuild_sig, flags, launch, s.num_warps))
            configs.append(KernelConfig("recompute", "_act_grads_kernel", dtype, grads_sig, flags, launch, s.num_warps))
    return configs


def _cross_entropy_configs(n: int, dtype: str) -> list[KernelConfig]:
    """The loss head's row kernel for a vocabulary of ``n`` (from ``NS`` and the real vocabularies in
    ``VOCABS``), with and without the in-place gradient."""
    from lowmembp_convert.ops import cross_entropy_rows

    s = cross_entropy_rows.launch_settings(n)
    signature = (
        _ptr("LOGITS", dtype),
        _ptr("TARGET", "i64"),
        _ptr("SCALE", "fp32"),
        _ptr("LOSS", "fp32"),
        _ptr("LSE", "fp32"),
        _ptr("GRAD", dtype),
        _int_arg("stride_row", n),
        _int_arg("stride_grad_row", n),
        _int_arg("V", n),
        _int_arg("ignore_index", -100),
    )
    launch = (("BLOCK_V", s.block_v),)
    return [
        KernelConfig("cross_entropy", "ce_rows_kernel", dtype, signature, (("HAS_GRAD", grad),), launch, s.num_warps)
        for grad in (False, True)
    ]


def all_configs(ns: Iterable[int] = NS, dtypes: Iterable[str] = DTYPES) -> dict[KernelConfig, tuple[int, ...]]:
    """Every distinct configuration the launchers choose for these N and dtypes -> the N choosing it.

    A configuration differs from another only in what reaches the compiler; for instance every
    N > ``MAX_FUSED_BLOCK_N`` gives the same looped norm kernel (N itself is a runtime argument),
    so it is compiled once.
    """
    found: dict[KernelConfig, list[int]] = {}
    for n, dtype in itertools.product(ns, dtypes):
        for config in _norm_configs(n, dtype) + _activation_configs(n, dtype) + _recompute_configs(n, dtype):
            found.setdefault(config, []).append(n)
    for n, dtype in itertools.product((*ns, *VOCABS), dtypes):
        for config in _cross_entropy_configs(n, dtype):
            found.setdefault(config, []).append(n)
    return {config: tuple(sorted(set(n))) for config, n in found.items()}


def default_configs(ns: Iterable[int] = NS, dtypes: Iterable[str] = DTYPES) -> dict[KernelConfig, tuple[int, ...]]:
    """One configuration per code path (kernel, dtype, flags, ONE_BLOCK): the one with the most elements
    per thread (the most register pressure), the larger block on a tie."""
    best: dict[tuple, tuple[KernelConfig, tuple[int, ...]]] = {}
    for config, chosen_by in all_configs(ns, dtypes).items():
        key = config.branch
        rank = (config.elements_per_thread, config.elements_per_thread * config.threads)
        held = best.get(key)
        if held is None or rank > (held[0].elements_per_thread, held[0].elements_per_thread * held[0].threads):
            best[key] = (config, chosen_by)
    return dict(best.values())


def issued_bytes_per_element(config: KernelConfig) -> float:
    """Global-memory bytes the kernel's loads and stores move per element of the [M, N] / flat tensors.

    Counts every pass over a row (a looped norm re-reads it; those re-reads mostly hit L2). Leaves
    out what is per row or per column ([N] weight and bias, rstd, partial sums): cached or tiny.
    """
    e = ELEMENT_SIZE[config.dtype]
    flags, launch = dict(config.flags), dict(config.launch)
    if config.kernel == "ms_norm_fwd_kernel":
        reads = 1 if launch["ONE_BLOCK"] else (2 if flags["RMS"] else 3)
        return (reads + 1) * e  # x, y
    if config.kernel == "ms_norm_bwd_kernel":
        passes = 1 if launch["ONE_BLOCK"] else 2
        return (2 * passes + 1) * e  # dy and y per pass, dx
    if config.kernel == "ms_norm_kept_fwd_kernel":
        return e + 4  # x in, the fp32 x_hat out, per kept entry
    if config.kernel == "ms_norm_kept_correction_kernel":
        return 2 * e + 4  # y, dy and the kept x_hat
    if config.kernel == "ms_norm_kept_dx_kernel":
        return 3 * e + 4  # y, dy, the kept x_hat in; dx out
    if config.kernel == "ms_norm_bwd_affine_kernel":
        return (2 if flags["COMPUTE_DW"] else 1) * e  # dy, and y for dweight
    if config.kernel in ("_step_activation_fwd_kernel", "_step_activation_bwd_kernel"):
        return 2 * e + 0.25  # x and y (dy and dx), and 2-bit codes
    if config.kernel == "_rebuild_kernel":
        return (3 if flags["GATED"] else 2) * e  # a [and u] in, p out
    if config.kernel == "_act_grads_kernel":
        return (5 if flags["GATED"] else 3) * e  # dp, a [and u] in; da [and du] out
    if config.kernel == "ce_rows_kernel":
        return (3 if flags["HAS_GRAD"] else 1) * e  # the row once (twice and a write with the gradient)
    raise ValueError(f"unknown kernel {config.kernel}")


# --------------------------------------------------------------------------------------------------
# Compilation (in a child process with the interpreter off)
# --------------------------------------------------------------------------------------------------


def toolchain_missing() -> str | None:
    """Why configurations cannot be compiled here (triton or its ptxas missing), else None."""
    try:
        import triton
    except Exception as error:  # pragma: no cover - triton is a dev dependency
        return f"triton is not importable: {error}"
    try:
        ptxas = triton.knobs.nvidia.ptxas.path
    except Exception as error:  # pragma: no cover
        return f"triton's ptxas was not found: {error}"
    if not ptxas or not os.path.exists(ptxas):
        return f"triton's ptxas was not found (looked at {ptxas!r})"
    return None


def compile_configs(
    configs: dict[KernelConfig, tuple[int, ...]],
    targets: Sequence[int] = TARGETS,
    jobs: int = 1,
    tool: str = "auto",
    timeout: float = 1800.0,
) -> list[CompileResult]:
    """Compile each configuration for each target; return their resource usage.

    Args:
        configs: from :func:`all_configs` or :func:`default_configs`.
        targets: compute capabilities (80, 90, ...).
        jobs: child processes compiling in parallel (Triton's own on-disk cache makes repeats cheap).
        tool: "cuobjdump", "ptxas" (``ptxas -v`` on the PTX) or "auto" (cuobjdump when present).
        timeout: seconds allowed for all of it.
    """
    work = [
        {"config": dataclasses.asdict(config), "ns": list(ns), "target": target}
        for config, ns in configs.items()
        for target in targets
    ]
    chunks = [work[i :: max(jobs, 1)] for i in range(max(jobs, 1))]
    import importlib.util

    # Where the kernel files are (found, not imported: no Triton import here). Not the package's
    # __file__: in a built wheel lowmembp_convert.kernels is a namespace subpackage without one.
    kernel_dir = os.path.dirname(os.path.abspath(importlib.util.find_spec("lowmembp_convert.kernels.norms").origin))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    results: list[CompileResult] = []
    with tempfile.TemporaryDirectory(prefix="lowmembp_aot_") as tmp:
        procs = []
        for i, chunk in enumerate(c for c in chunks if c):
            job_file, out_file = os.path.join(tmp, f"jobs{i}.json"), os.path.join(tmp, f"out{i}.json")
            with open(job_file, "w") as f:
                json.dump({"tool": tool, "kernel_dir": kernel_dir, "work": chunk}, f)
            proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_BOOT, __file__, job_file, out_file],
                cwd=tmp,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            procs.append((proc, out_file))
        try:
            for proc, out_file in procs:
                output, _ = proc.communicate(timeout=timeout)
                if proc.returncode != 0:
                    raise RuntimeError(f"AOT compile worker failed (exit {proc.returncode}):\n{output[-4000:]}")
                with open(out_file) as f:
                    for row in json.load(f):
                        results.append(_result_from_json(row))
        finally:
            for proc, _ in procs:  # only the workers started here, on failure or timeout
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    index = {c: i for i, c in enumerate(configs)}
    return sorted(results, key=lambda r: (index[r.config], r.target))


def _config_from_json(d: dict) -> KernelConfig:
    return KernelConfig(
        module=d["module"],
        kernel=d["kernel"],
        dtype=d["dtype"],
        signature=tuple(tuple(s) for s in d["signature"]),
        flags=tuple(tuple(f) for f in d["flags"]),
        launch=tuple(tuple(f) for f in d["launch"]),
        num_warps=d["num_warps"],
    )


def _result_from_json(d: dict) -> CompileResult:
    fields = {k: v for k, v in d.items() if k not in ("config", "ns")}
    return CompileResult(config=_config_from_json(d["config"]), ns=tuple(d["ns"]), **fields)


_CUOBJDUMP_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _usage_cuobjdump(cuobjdump: str, cubin: str, kernel: str) -> dict:
    text = subprocess.run(
        [cuobjdump, "--dump-resource-usage", cubin], check=True, capture_output=True, text=True
    ).stdout
    section = text.split(f"Function {kernel}:", 1)
    match = _CUOBJDUMP_RE.search(section[1] if len(section) == 2 else "")
    if match is None:
        raise RuntimeError(f"cannot read the resource usage of {kernel} from cuobjdump:\n{text}")
    regs, stack, shared, local = map(int, match.groups())
    return dict(registers=regs, stack_bytes=stack, static_shared=shared, local_bytes=local, tool="cuobjdump")


def _usage_ptxas(ptxas: str, ptx: str, arch: str, tmp: str) -> dict:
    path = os.path.join(tmp, "kernel.ptx")
    with open(path, "w") as f:
        f.write(ptx)
    # The options Triton's own ptxas call uses (triton/backends/nvidia/compiler.py, make_cubin).
    proc = subprocess.run(
        [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", path, "-o", os.path.join(tmp, "k.o")],
        check=True,
        capture_output=True,
        text=True,
    )
    text = proc.stdout + proc.stderr

    def grab(pattern: str) -> int:
        match = re.search(pattern, text)
        return int(match.group(1)) if match else 0

    stores, loads = grab(r"(\d+) bytes spill stores"), grab(r"(\d+) bytes spill loads")
    return dict(
        registers=grab(r"Used (\d+) registers"),
        stack_bytes=grab(r"(\d+) bytes stack frame"),
        static_shared=grab(r"(\d+) bytes smem"),
        local_bytes=max(stores, loads),  # ptxas -v reports spills, not local arrays (none here)
        spill_stores=stores,
        spill_loads=loads,
        tool="ptxas -v",
    )


# The child runs this file by path, so it imports neither the package (nor torch) nor anything else
# of it: only Triton and the two kernel files, loaded from their paths with the interpreter off.
_WORKER_BOOT = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__lowmembp_aot_worker__')"


def _load_kernel_modules(kernel_dir: str) -> dict:
    import importlib.util

    modules = {}
    for name in ("norms", "activations", "recompute", "cross_entropy"):  # recompute imports activations
        full = f"lowmembp_convert.kernels.{name}"
        spec = importlib.util.spec_from_file_location(full, os.path.join(kernel_dir, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
        modules[name] = module
    return modules


def _worker(job_file: str, out_file: str) -> None:
    """Child process: compile every job with the interpreter off and write the usage as JSON."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the AOT worker must run with TRITON_INTERPRET unset")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.language.extra.cuda import libdevice

    with open(job_file) as f:
        spec = json.load(f)
    modules = _load_kernel_modules(spec["kernel_dir"])
    activation_kernels = modules["activations"]

    if triton.knobs.runtime.interpret:
        raise RuntimeError("triton.knobs.runtime.interpret is on in the AOT worker")
    # The GPU branch of kernels/activations.py: libdevice's exp / tanh, as in PyTorch's kernels.
    uses_libdevice = activation_kernels._exp is libdevice.exp and activation_kernels._tanh is libdevice.tanh
    if not uses_libdevice:
        raise RuntimeError("kernels/activations.py was imported with the interpreter's tl.exp branch")

    tool = spec["tool"]
    cuobjdump = triton.knobs.nvidia.cuobjdump.path
    if tool == "auto":
        tool = "cuobjdump" if cuobjdump and os.path.exists(cuobjdump) else "ptxas"
    rows = []
    with tempfile.TemporaryDirectory(prefix="lowmembp_aot_w_") as tmp:
        for job in spec["work"]:
            config = _config_from_json(job["config"])
            fn = getattr(modules[config.module], config.kernel)
            types = {name: typ for name, typ, _ in config.signature}
            constexprs = config.constexprs
            expected = set(types) | set(constexprs)
            if set(fn.arg_names) != expected:
                raise RuntimeError(
                    f"{config.kernel}: the kernel's arguments {fn.arg_names} differ from the AOT signature "
                    f"{sorted(expected)}; update lowmembp_convert/aot.py"
                )
            signature = {name: types.get(name, "constexpr") for name in fn.arg_names}
            aligned = [name for name, _, divisible in config.signature if divisible]
            attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
            source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(
                source, target=GPUTarget("cuda", job["target"], 32), options={"num_warps": config.num_warps}
            )
            arch = compiled.metadata.arch
            if tool == "cuobjdump":
                cubin = os.path.join(tmp, "kernel.cubin")
                with open(cubin, "wb") as f:
                    f.write(compiled.asm["cubin"])
                usage = _usage_cuobjdump(cuobjdump, cubin, compiled.metadata.name)
                usage.update(spill_stores=None, spill_loads=None)
            else:
                ptx_arch = re.search(r"\.target\s+(sm_\w+)", compiled.asm["ptx"]).group(1)
                usage = _usage_ptxas(triton.knobs.nvidia.ptxas.path, compiled.asm["ptx"], ptx_arch, tmp)
            rows.append(
                dict(
                    config=job["config"],
                    ns=job["ns"],
                    target=job["target"],
                    arch=arch,
                    dynamic_shared=int(compiled.metadata.shared),
                    libdevice=uses_libdevice,
                    **usage,
                )
            )
    with open(out_file, "w") as f:
        json.dump(rows, f)


if __name__ == "__lowmembp_aot_worker__":
    _worker(sys.argv[2], sys.argv[3])
