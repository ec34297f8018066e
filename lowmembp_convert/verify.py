"""Verification: the converted model computes what the original did, checked on the model itself.

No copy of the model is made (a 7B model on a GPU cannot be doubled). Before anything is changed,
:func:`record` runs one forward of the original on a small batch and keeps (cloned) every module's
output and every tensor the model returns, with the random state it started from. After the
rewrite, :meth:`Recording.compare` replays the same forward from the same random state (so random
masking, as in ViTMAE, draws the same numbers) and names the first module whose output diverges.
Both runs leave buffers, RNGs and train/eval flags as they were (:func:`no_side_effects`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .errors import ConversionError
from .observers import OBSERVER_HOOK_IDS
from .transaction import RandomState, no_side_effects

# Default tolerance (max |a - b| / max |a|) per dtype: a fold rounds each folded weight once and a
# memory-sharing norm reduces in another order, so a converted model differs from the stock one by
# a few roundings of the dtype; anything beyond is a real divergence.
DEFAULT_RTOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def default_rtol(dtype: torch.dtype) -> float:
    return DEFAULT_RTOL.get(dtype, 1e-5)


def first_tensor(out: Any) -> torch.Tensor | None:
    """The first tensor of a model output (tensor, tuple, dict or transformers ModelOutput)."""
    found = all_tensors(out)
    return found[0] if found else None


def all_tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor of a (nested) model output, in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in all_tensors(item)]
    return []


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not a.numel():
        return 0.0
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        same = torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a[~torch.isnan(a)], b[~torch.isnan(b)])
        return 0.0 if same else float("inf")
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _Recorder:
    """Records a clone of each module's first floating-point output (first call), in call order.

    With ``folded``/``consumers`` given it also marks outputs that are x_hat-derived by design: a
    folded norm's output, and the output of any non-consumer module fed such a tensor (Identity,
    Dropout, a pooling module between the norm and its Linear). Those are not compared.
    """

    def __init__(self, folded: Iterable[str] = (), consumers: Iterable[str] = ()):
        self.outputs: dict[str, torch.Tensor] = {}
        self.by_design: set[str] = set()
        self.folded, self.consumers = set(folded), set(consumers)
        self._tainted: set[int] = set()
        self._tainted_values: list[tuple[torch.Size, torch.Tensor]] = []
        self._stack: list[str] = []  # the modules being run, outermost first

    @property
    def propagates(self) -> bool:
        """Ops on x_hat-derived tensors make x_hat-derived tensors, except inside a consumer (its
        output must equal stock's)."""
        return bool(self.folded) and not any(name in self.consumers for name in self._stack)

    def taint_outputs(self, args: Any, out: Any) -> None:
        """Called for every torch function run (see :class:`_Propagate`)."""
        if any(self._is_tainted(t) for t in all_tensors(list(args)) if isinstance(t, torch.Tensor)):
            for t in all_tensors(out):
                self._tainted.add(_storage(t))

    def enter(self, name: str):
        def push(_module, _inputs):
            self._stack.append(name)

        return push

    def leave(self, name: str):
        def pop(_module, _inputs, _output):
            if self._stack and self._stack[-1] == name:
                self._stack.pop()

        return pop

    def _is_tainted(self, t: torch.Tensor) -> bool:
        """The tensor is (a view of) a recorded x_hat-derived output, or a copy of one in another
        dtype (an adapter casting the norm output to its own dtype first: PEFT's fp32 LoRA)."""
        if _storage(t) in self._tainted:
            return True
        if not t.is_floating_point() or not t.numel():
            return False
        sample = t.detach().reshape(-1)[:16].double()
        return any(
            shape == t.shape and torch.allclose(sample, values, rtol=1e-2, atol=1e-6)
            for shape, values in self._tainted_values
        )

    def _taint(self, t: torch.Tensor) -> None:
        self._tainted.add(_storage(t))
        if t.numel():
            self._tainted_values.append((t.shape, t.detach().reshape(-1)[:16].double()))

    def hook(self, name: str):
        def record(_module, inputs, output):
            tensor = first_tensor(output)
            if tensor is None or not tensor.is_floating_point() or name in self.outputs:
                return
            fed = any(isinstance(t, torch.Tensor) and self._is_tainted(t) for t in inputs)
            passes_on = _storage(tensor) in self._tainted  # e.g. a parent returning the norm's output
            if name in self.folded or passes_on or (fed and name not in self.consumers):
                self._taint(tensor)
                self.by_design.add(name)
            # cloned: a later in-place op (EfficientNet's in-place activations) must not rewrite the record
            self.outputs[name] = tensor.detach().clone()

        return record


class _Propagate(torch.overrides.TorchFunctionMode):
    """Marks what torch functions make of x_hat-derived tensors outside consumers (a slice of a folded
    norm's output that an adapter then casts to its own dtype, a zero pad...) as x_hat-derived too."""

    def __init__(self, recorder: _Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.recorder.propagates:
            self.recorder.taint_outputs([*args, *(kwargs or {}).values()], out)
        return out


def _run(model: nn.Module, inputs: tuple[tuple, dict], recorder: _Recorder) -> list[torch.Tensor]:
    args, kwargs = inputs
    handles = []
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(recorder.enter(name)))
        handles.append(m.register_forward_hook(recorder.hook(name)))
        handles.append(m.register_forward_hook(recorder.leave(name), always_call=True))
    OBSERVER_HOOK_IDS.update(h.id for h in handles)  # they only record: the fused paths run as they will
    try:
        model.eval()
        with torch.no_grad(), _Propagate(recorder):
            out = model(*args, **kwargs)
        return [t.detach().clone() for t in all_tensors(out) if t.is_floating_point()]
    finally:
        for h in handles:
            h.remove()
            OBSERVER_HOOK_IDS.discard(h.id)


def _lowest_precision(model: nn.Module) -> torch.dtype:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        if dtype in dtypes:
            return dtype
    return torch.float32


@dataclass
class Recording:
    """The original model's outputs on one batch, and the random state they were made from."""

    inputs: tuple[tuple, dict]
    random_state: RandomState
    outputs: list[torch.Tensor]
    modules: dict[str, torch.Tensor]
    model_dtype: torch.dtype
    notes: list[str] = field(default_factory=list)

    def tolerance(self, tensor: torch.Tensor, rtol: float | None, other: torch.Tensor | None = None) -> float:
        """``rtol``, or the default of the lowest precision among the model, the recorded tensor and
        its replayed counterpart (a norm under autocast emits the autocast dtype its consumers cast to)."""
        if rtol is not None:
            return rtol
        dtypes = [tensor.dtype, self.model_dtype] + ([other.dtype] if other is not None else [])
        return max(default_rtol(d) for d in dtypes)

    def compare(
        self,
        model: nn.Module,
        *,
        rtol: float | None = None,
        folded_norms: Iterable[str] = (),
        consumers: Iterable[str] = (),
    ) -> float:
        """Replay the forward on the converted ``model``; raise ConversionError on a divergence.

        A folded norm's output is x_hat by design, and so is whatever a non-consumer module between
        it and its consumers makes of it; those are not compared, everything else is. Returns the
        largest relative error among the model's outputs.
        """
        candidate = _Recorder(folded_norms, consumers)
        with no_side_effects(model, replay=self.random_state):
            outputs = _run(model, self.inputs, candidate)
        shapes = [t.shape for t in outputs]
        if shapes != [t.shape for t in self.outputs]:
            raise ConversionError(
                "verify: the converted model returns outputs of other shapes or number than the original"
            )
        errors = [relative_error(a, b) for a, b in zip(self.outputs, outputs, strict=True)]
        worst = max(errors, default=0.0)
        # Every module, not only the outputs: a small fold error can hide behind a head.
        for name, tensor in self.modules.items():
            other = candidate.outputs.get(name)
            if other is None or name in candidate.by_design or other.shape != tensor.shape:
                continue
            error, tol = relative_error(tensor, other), self.tolerance(tensor, rtol, other)
            if error > tol:
                module = model.get_submodule(name)
                raise ConversionError(
                    f"verify: first diverging module: {name or '<root>'} ({type(module).__name__}): relative error "
                    f"{error:.2e} > {tol:.0e}{self._cause(tensor, rtol)}; model output error {worst:.2e}."
                )
        for index, (error, tensor) in enumerate(zip(errors, self.outputs, strict=True)):
            tol = self.tolerance(tensor, rtol)
            if error > tol:
                raise ConversionError(
                    f"verify: model output {index} differs (relative error {error:.2e} > {tol:.0e}) although no single "
                    f"module's output does{self._cause(tensor, rtol)}"
                )
        return worst

    def _cause(self, tensor: torch.Tensor, rtol: float | None) -> str:
        low = {tensor.dtype, self.model_dtype} & {torch.float16, torch.bfloat16}
        if low and rtol is None:
            return (
                f" (a {sorted(str(d) for d in low)[0]} model: this may be rounding; pass verify_rtol=... to accept "
                "a larger difference)"
            )
        return ""


def record(model: nn.Module, inputs: tuple[tuple, dict]) -> Recording:
    """Run the (unconverted) ``model`` once on ``inputs`` and keep what :meth:`Recording.compare` needs."""
    recorder = _Recorder()
    with no_side_effects(model) as state:
        outputs = _run(model, inputs, recorder)
    if not outputs:
        raise ConversionError("verify: the model returned no floating-point tensor to compare")
    return Recording(inputs, state, outputs, recorder.outputs, _lowest_precision(model))
