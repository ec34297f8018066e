"""Measure activation memory: the bytes autograd keeps saved for backward while code runs.

:func:`activation_memory` installs ``torch.autograd.graph.saved_tensors_hooks`` around a callable
(typically forward + loss; backward optional) and counts every *storage* packed for backward once,
however many views of it were saved and however many ops saved it. Storages of the model's
parameters and buffers are left out, so what remains is activation memory. The count is live:
a storage leaves it when autograd frees the last saved reference to it, and the result is the peak,
so a ``run`` that also calls backward reports the largest amount held at once.

:func:`per_block_bytes` turns four such measurements into bytes per transformer block per sample:
at depths d1 < d2 and batches b1 < b2 the saved bytes are ``B(d, b) = P*d*b + W*d + E*b + C``
(P: per block per sample; W: per block, batch-independent such as autocast weight copies;
E: per sample outside the blocks such as embeddings, head and loss; C: the rest), and the double
difference isolates P exactly.

Blind spots, by construction: tensors an ``autograd.Function`` stashes on ``ctx`` as attributes
(``ctx.x = x``) instead of ``ctx.save_for_backward`` never reach the hooks. Under ``torch.compile``
the compiled region saves through ``ctx.save_for_backward`` of AOTAutograd's ``CompiledFunction``,
so the hooks do see it (tests/test_memory.py checks this against the backward node's own
``saved_tensors``); only tensors that a custom Function inside the region stashes on ``ctx``
escape, as in eager. Packing returns a detached alias, so double backward through a measured
graph is not supported.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .observers import OBSERVER_HOOK_IDS

MIB = 1024 * 1024

StorageKey = tuple[Any, ...]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _storages(t: torch.Tensor) -> list[tuple[StorageKey, int]]:
    """(key, nbytes) of every storage behind ``t``; wrapper subclasses are flattened."""
    if is_traceable_wrapper_subclass(t):
        attrs, _ = t.__tensor_flatten__()  # DTensor also names its device mesh: only tensors hold storage
        inner = [getattr(t, name) for name in attrs]
        return [s for x in inner if isinstance(x, torch.Tensor) for s in _storages(x)]
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return [(("tensor", id(t)), t.nbytes)]
    ptr = storage.data_ptr()
    # data_ptr identifies memory (two StorageImpls over one buffer count once); zero-sized and meta
    # storages all have data_ptr 0, so those fall back to the StorageImpl's identity.
    key = (t.device.type, t.device.index, ptr) if ptr else ("impl", storage._cdata)
    return [(key, storage.nbytes())]


def _storage_keys(tensors: Iterable[torch.Tensor]) -> set[StorageKey]:
    return {key for t in tensors for key, _ in _storages(t)}


@dataclass(frozen=True)
class SavedTensor:
    """One storage saved for backward, for explaining where the bytes go.

    Attributes:
        shape, dtype: of the first tensor packed from this storage (a view may be smaller).
        nbytes: size of the whole storage.
        savers: one label per pack of this storage, ``"module.fqn (ModuleClass) op"``; more than
            one label means the storage is shared between savers (what MS-BP aims for).
    """

    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    savers: tuple[str, ...]

    def __str__(self) -> str:
        shape = "x".join(map(str, self.shape)) or "scalar"
        return f"{self.nbytes / MIB:10.3f} MiB  {self.dtype:>9} [{shape}]  <- {' | '.join(self.savers)}"


@dataclass(frozen=True)
class SavedBytes:
    """Peak bytes held saved for backward, excluding parameters and buffers.

    Attributes:
        total: bytes of unique storages at the peak.
        storages: number of unique storages at the peak.
        by_dtype: bytes per dtype name ("float32", "bfloat16", "uint8", ...) at the peak.
        tensors: every storage packed during the run (only with ``explain=True``), largest first.
    """

    total: int
    storages: int
    by_dtype: Mapping[str, int] = field(default_factory=dict)
    tensors: tuple[SavedTensor, ...] = ()

    @property
    def mib(self) -> float:
        return self.total / MIB

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {v / MIB:.2f}" for k, v in sorted(self.by_dtype.items()))
        return f"{self.mib:.2f} MiB saved for backward in {self.storages} storages ({parts or 'none'})"


class _Held:
    """What a saved-tensor slot holds while measured; releasing it updates the live count."""

    __slots__ = ("tensor", "keys", "tracker")

    def __init__(self, tensor: torch.Tensor, keys: list[StorageKey], tracker: _Tracker) -> None:
        self.tensor = tensor
        self.keys = keys
        self.tracker = tracker

    def __del__(self) -> None:
        self.tracker.release(self.keys)


class _Tracker:
    """Reference-counts saved storages and keeps the peak of their total size."""

    def __init__(self, excluded: set[StorageKey], labeller: _Labeller | None) -> None:
        self.excluded = excluded
        self.labeller = labeller
        self.lock = threading.RLock()  # __del__ of a holder may run on autograd's worker threads
        self.refs: dict[StorageKey, int] = {}
        self.info: dict[StorageKey, tuple[int, str]] = {}  # key -> (nbytes, dtype name) while live
        self.live = 0
        self.live_by_dtype: dict[str, int] = defaultdict(int)
        self.peak = SavedBytes(0, 0)
        self.explained: dict[StorageKey, tuple[tuple[int, ...], str, int, list[str]]] = {}

    def pack(self, t: torch.Tensor) -> Any:
        storages = [(k, n) for k, n in _storages(t) if k not in self.excluded]
        if not storages:
            return t.detach()
        dtype = _dtype_name(t.dtype)
        label = self.labeller.label() if self.labeller is not None else ""
        with self.lock:
            for key, nbytes in storages:
                if self.refs.get(key, 0) == 0:
                    self.refs[key] = 0
                    self.info[key] = (nbytes, dtype)
                    self.live += nbytes
                    self.live_by_dtype[dtype] += nbytes
                self.refs[key] += 1
                if self.labeller is not None:
                    entry = self.explained.setdefault(key, (tuple(t.shape), dtype, nbytes, []))
                    entry[3].append(label)
            if self.live > self.peak.total:
                by_dtype = {k: v for k, v in self.live_by_dtype.items() if v}
                self.peak = SavedBytes(self.live, len(self.info), by_dtype)
        return _Held(t.detach(), [k for k, _ in storages], self)

    def release(self, keys: list[StorageKey]) -> None:
        with self.lock:
            for key in keys:
                self.refs[key] -= 1
                if self.refs[key] == 0:
                    del self.refs[key]
                    nbytes, dtype = self.info.pop(key)
                    self.live -= nbytes
                    self.live_by_dtype[dtype] -= nbytes

    @staticmethod
    def unpack(held: Any) -> torch.Tensor:
        return held.tensor if isinstance(held, _Held) else held

    def result(self) -> SavedBytes:
        tensors = tuple(
            sorted(
                (SavedTensor(shape, dtype, n, tuple(savers)) for shape, dtype, n, savers in self.explained.values()),
                key=lambda s: -s.nbytes,
            )
        )
        return SavedBytes(self.peak.total, self.peak.storages, dict(self.peak.by_dtype), tensors)


class _OpStack(TorchFunctionMode):
    """Remembers which torch function is running, so a saved tensor can name the op that saved it."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.stack.append(getattr(func, "__name__", str(func)))
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.stack.pop()


class _Labeller:
    """Module stack (global forward hooks) plus op stack (a TorchFunctionMode), for ``explain``."""

    def __init__(self, names: Mapping[nn.Module, str]) -> None:
        self.names = names
        self.modules: list[nn.Module] = []
        self.ops = _OpStack()
        self.handles: list[Any] = []

    def __enter__(self) -> _Labeller:
        hooks = nn.modules.module
        self.handles = [
            hooks.register_module_forward_pre_hook(lambda m, _: self.modules.append(m)),
            hooks.register_module_forward_hook(lambda m, _, __: self._pop(m), always_call=True),
        ]
        OBSERVER_HOOK_IDS.update(h.id for h in self.handles)  # they only label: fused paths stay on
        self.ops.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.ops.__exit__(*exc)
        for handle in self.handles:
            handle.remove()
            OBSERVER_HOOK_IDS.discard(handle.id)

    def _pop(self, module: nn.Module) -> None:
        if self.modules and self.modules[-1] is module:
            self.modules.pop()

    def label(self) -> str:
        if self.modules:
            module = self.modules[-1]
            where = f"{self.names.get(module, '?')} ({type(module).__name__})"
        else:
            where = "<no module>"
        # A custom autograd.Function saves after its forward returned, outside any torch function.
        op = self.ops.stack[-1] if self.ops.stack else "autograd.Function"
        return f"{where} {op}"


def activation_memory(
    run: Callable[[], Any],
    *,
    params: Iterable[torch.Tensor] | nn.Module | None = None,
    explain: bool = False,
) -> SavedBytes:
    """Bytes saved for backward while ``run()`` executes, at their peak.

    Args:
        run: the code to measure, e.g. ``lambda: loss_fn(model(x), y)``; it may call backward.
        params: storages never to count: a module (its parameters and buffers) or tensors.
            Autocast copies of weights are new storages and do count. None excludes nothing.
        explain: also record every saved storage with the module and op that saved it
            (``SavedBytes.tensors``); slower, meant for eager debugging, not compiled runs.
    Returns:
        A :class:`SavedBytes`. The value returned by ``run`` is dropped.
    """
    if isinstance(params, nn.Module):
        names = {m: n for n, m in params.named_modules()}
        excluded = _storage_keys([*params.parameters(), *params.buffers()])
    else:
        names = {}
        excluded = _storage_keys(params or ())
    labeller = _Labeller(names) if explain else None
    tracker = _Tracker(excluded, labeller)
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        if labeller is not None:
            with labeller:
                run()
        else:
            run()
    return tracker.result()


@dataclass(frozen=True)
class PerBlock:
    """Saved bytes split by the bilinear model ``B(d, b) = per_block_per_sample*d*b + ...``.

    Attributes:
        per_block_per_sample: bytes per block per sample (the figure to compare).
        per_block: bytes per block independent of batch (autocast weight copies, for example).
        per_sample: bytes per sample outside the blocks (embeddings, head, loss).
        constant: the rest.
        by_dtype: per_block_per_sample split by dtype.
        measurements: ``{(depth, batch): SavedBytes}`` of the four runs.
    """

    per_block_per_sample: float
    per_block: float
    per_sample: float
    constant: float
    by_dtype: Mapping[str, float]
    measurements: Mapping[tuple[int, int], SavedBytes]

    def __str__(self) -> str:
        return (
            f"{self.per_block_per_sample / MIB:.3f} MiB per block per sample "
            f"(+{self.per_block / MIB:.3f} MiB per block, batch-independent)"
        )


def _bilinear(values: Mapping[tuple[int, int], float], d: tuple[int, int], b: tuple[int, int]) -> tuple:
    (d1, d2), (b1, b2) = d, b
    v11, v12, v21, v22 = values[d1, b1], values[d1, b2], values[d2, b1], values[d2, b2]
    p = (v22 - v21 - v12 + v11) / ((d2 - d1) * (b2 - b1))
    w = (v21 - v11) / (d2 - d1) - p * b1
    e = (v12 - v11) / (b2 - b1) - p * d1
    c = v11 - p * d1 * b1 - w * d1 - e * b1
    return p, w, e, c


def per_block_bytes(
    measure: Callable[[int, int], SavedBytes | int],
    *,
    depths: tuple[int, int] = (1, 2),
    batches: tuple[int, int] = (1, 2),
) -> PerBlock:
    """Saved bytes per block per sample, from four measurements whose differences cancel the rest.

    Args:
        measure: ``measure(depth, batch)`` builds a model with ``depth`` blocks, runs one step on a
            batch of ``batch`` samples and returns its :class:`SavedBytes` (or a byte count).
        depths: two different block counts.
        batches: two different batch sizes.
    """
    if depths[0] == depths[1] or batches[0] == batches[1]:
        raise ValueError(f"need two different depths and batches, got depths={depths} batches={batches}")
    runs: dict[tuple[int, int], SavedBytes] = {}
    for depth in depths:
        for batch in batches:
            got = measure(depth, batch)
            runs[depth, batch] = got if isinstance(got, SavedBytes) else SavedBytes(int(got), 0)
    p, w, e, c = _bilinear({k: v.total for k, v in runs.items()}, depths, batches)
    dtypes = {k for v in runs.values() for k in v.by_dtype}
    by_dtype = {
        dt: _bilinear({k: v.by_dtype.get(dt, 0) for k, v in runs.items()}, depths, batches)[0] for dt in sorted(dtypes)
    }
    return PerBlock(p, w, e, c, {k: v for k, v in by_dtype.items() if v}, runs)


# Python numbers a built-in op wraps into 0-dim tensors; autograd saves them without the hooks.
_WRAPPED_NUMBER_DTYPES = (torch.float64, torch.int64, torch.complex128, torch.bool)


def _tensors_in(value: Any, skip_wrapped_numbers: bool = False) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        wrapped = value.dim() == 0 and value.device.type == "cpu" and value.dtype in _WRAPPED_NUMBER_DTYPES
        return [] if (wrapped and skip_wrapped_numbers) else [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_in(v, skip_wrapped_numbers)]
    return []


def saved_in_graph(
    outputs: torch.Tensor | Iterable[torch.Tensor],
    *,
    params: Iterable[torch.Tensor] | nn.Module | None = None,
) -> tuple[SavedBytes, SavedBytes]:
    """Walk the autograd graph behind ``outputs`` and total what its nodes hold for backward.

    An independent check on :func:`activation_memory`: it reads each node's saved tensors
    (``_saved_*`` of built-in nodes, ``saved_tensors`` of custom and compiled Functions) and also
    finds tensors a custom Function stashed on ``ctx`` as attributes, which saved-tensor hooks
    never see. Call it after forward, before backward frees the graph. 0-dim CPU double/long/bool
    tensors saved by built-in nodes are skipped: they are Python scalars the op wrapped, which
    autograd saves without calling hooks (a custom or compiled Function's, e.g. RNG seeds, count).

    Returns:
        ``(saved, stashed)``: unique storages saved through autograd, and unique storages only
        reachable as ``ctx`` attributes (AOTAutograd's ``_tensors_no_vc_check`` among them).
    """
    if isinstance(params, nn.Module):
        excluded = _storage_keys([*params.parameters(), *params.buffers()])
    else:
        excluded = _storage_keys(params or ())
    roots = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    seen: set[int] = set()
    found: dict[str, dict[StorageKey, tuple[int, str]]] = {"saved": {}, "stashed": {}}
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        groups: dict[str, list[torch.Tensor]] = {"saved": [], "stashed": []}
        for attr in dir(node):
            if attr.startswith("_saved_"):
                groups["saved"] += _tensors_in(getattr(node, attr), skip_wrapped_numbers=True)
        if hasattr(node, "saved_tensors"):  # custom autograd.Function and AOTAutograd's CompiledFunction
            groups["saved"] += _tensors_in(node.saved_tensors)
        for value in getattr(node, "__dict__", {}).values():
            groups["stashed"] += _tensors_in(value)
        for group, tensors in groups.items():
            for t in tensors:
                for key, nbytes in _storages(t):
                    if key not in excluded:
                        found[group].setdefault(key, (nbytes, _dtype_name(t.dtype)))
        stack.extend(fn for fn, _ in node.next_functions)
    for key in found["saved"]:
        found["stashed"].pop(key, None)
    results = []
    for group in ("saved", "stashed"):
        by_dtype: dict[str, int] = defaultdict(int)
        for nbytes, dtype in found[group].values():
            by_dtype[dtype] += nbytes
        results.append(SavedBytes(sum(by_dtype.values()), len(found[group]), dict(by_dtype)))
    return results[0], results[1]
