"""``convert()`` is all or nothing: what it may change is recorded first and put back on any failure.

Two tools:

- :class:`ModelSnapshot`: the module tree (every module's attributes, children, parameters, buffers
  and hooks, as references), the transformers configs, and copies of the parameter values a fold will
  edit (kept on the CPU, so a GPU model is never doubled on its device). ``restore()`` makes the model
  exactly as it was: same module objects, same parameter objects and values, same hooks.
- :func:`no_side_effects`: a forward run for measuring, verifying or tracing leaves no trace: buffers
  (BatchNorm statistics, counters), module attributes the forward re-bound (``self.calls += 1``),
  the random number generators and train/eval flags are restored, and hooks or attributes the
  forward added to modules are removed (:func:`no_lasting_additions`:
  transformers installs output-capturing hooks, local functions that would make the model unpicklable,
  the first time hidden states are requested).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn


def _unique_modules(model: nn.Module) -> list[nn.Module]:
    return list({id(m): m for m in model.modules()}.values())


class ModelSnapshot:
    """The state of ``model`` that a conversion can touch, restorable exactly."""

    def __init__(self, model: nn.Module) -> None:
        self._modules: list[tuple[nn.Module, dict[str, Any], list[tuple[dict, dict]]]] = []
        self._classes = [(m, type(m)) for m in _unique_modules(model)]  # a rewrite may swap a class
        for module in _unique_modules(model):
            attributes = dict(vars(module))
            # the containers themselves (_modules, _parameters, _buffers, hook dicts) are mutated in
            # place, so their contents are recorded too
            containers = [(v, dict(v)) for v in attributes.values() if isinstance(v, dict)]
            self._modules.append((module, attributes, containers))
        self._configs: list[tuple[Any, dict[str, Any]]] = []
        for module in _unique_modules(model):
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "__dict__") and all(c is not config for c, _ in self._configs):
                self._configs.append((config, dict(vars(config))))
        self._values: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._value_keys: set[int] = set()

    def keep_values(self, tensors: Iterable[torch.Tensor]) -> None:
        """Copy the current values of ``tensors`` (to the CPU) before they are edited in place."""
        for t in tensors:
            if id(t) in self._value_keys or t.device.type == "meta":
                continue
            self._value_keys.add(id(t))
            self._values.append((t, t.detach().to("cpu", copy=True)))

    def restore(self) -> None:
        """Put every recorded class, attribute, container and value back."""
        for module, cls in self._classes:
            module.__class__ = cls
        for module, attributes, containers in self._modules:
            for container, items in containers:
                container.clear()
                container.update(items)
            vars(module).clear()
            vars(module).update(attributes)
        for config, attributes in self._configs:
            vars(config).clear()
            vars(config).update(attributes)
        with torch.no_grad():
            for tensor, value in self._values:
                tensor.copy_(value.to(tensor.device))


@contextlib.contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Every module's train/eval flag is put back on exit (``model.train(x)`` sets them all)."""
    modes = {m: m.training for m in _unique_modules(model)}
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


@dataclass(frozen=True)
class RandomState:
    """The state of every generator a forward may draw from (torch CPU and CUDA, Python, NumPy)."""

    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor] | None
    python: object
    numpy: object | None

    @staticmethod
    def capture() -> RandomState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        try:
            import numpy

            np_state = numpy.random.get_state()
        except ImportError:
            np_state = None
        return RandomState(torch.get_rng_state(), cuda, random.getstate(), np_state)

    def restore(self) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda is not None:
            torch.cuda.set_rng_state_all(self.torch_cuda)
        random.setstate(self.python)
        if self.numpy is not None:
            import numpy

            numpy.random.set_state(self.numpy)


HOOK_DICTS = (  # every per-module hook table (the with_kwargs / always_called ones index forward hooks)
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


@contextlib.contextmanager
def no_lasting_additions(model: nn.Module) -> Iterator[None]:
    """Hooks registered on, and attributes added to, ``model``'s modules inside are removed on exit."""
    before = []
    for m in _unique_modules(model):
        hooks = {name: set(getattr(m, name, None) or ()) for name in HOOK_DICTS}
        before.append((m, set(m.__dict__), hooks))
    try:
        yield
    finally:
        for m, attrs, hooks in before:
            for name, keys in hooks.items():
                table = getattr(m, name, None)
                for key in [k for k in (table or ()) if k not in keys]:
                    del table[key]
            for key in [k for k in m.__dict__ if k not in attrs]:
                del m.__dict__[key]


@contextlib.contextmanager
def no_side_effects(model: nn.Module, replay: RandomState | None = None) -> Iterator[RandomState]:
    """Run forwards of ``model`` inside without leaving a trace on it or on the RNGs.

    Args:
        replay: start from this random state (so a second run draws the same numbers as the first).
    Yields the random state the block starts from.
    """
    before = RandomState.capture()
    modules = _unique_modules(model)
    holders = [(m, dict(m._buffers)) for m in modules]
    # attributes a forward may re-bind (a call counter, a cached value): put back by identity
    plain = [(m, {k: v for k, v in vars(m).items() if not isinstance(v, dict)}) for m in modules]
    values = [(b, b.detach().clone()) for _m, bufs in holders for b in bufs.values() if b is not None]
    if replay is not None:
        replay.restore()
    try:
        with preserved_modes(model), no_lasting_additions(model):
            yield replay or before
    finally:
        for module, attributes in plain:
            own = vars(module)
            for key, value in attributes.items():
                if own.get(key, value) is not value:
                    own[key] = value
        for module, buffers in holders:
            module._buffers.clear()
            module._buffers.update(buffers)
        with torch.no_grad():
            for buffer, value in values:
                if buffer.device.type != "meta":
                    buffer.copy_(value)
        before.restore()
