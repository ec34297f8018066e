"""Is anything hooked on the modules a fused path would skip? (Observers of lowmembp's own excepted.)

A rewritten forward runs its fused op only while no hook, and no instance-level ``forward`` (as
accelerate's hooks and wrappers install), could change what the skipped modules see or return.
Global module hooks count too. Observers do not: the hooks lowmembp registers only to watch (the
module labels of ``activation_memory(explain=True)``, the recorder of ``verify``: ids in
:data:`OBSERVER_HOOK_IDS`) and torch's ModuleTracker (FlopCounterMode and the memory trackers).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from torch.nn.modules import module as _module

OBSERVER_HOOK_IDS: set[int] = set()


def _observer(key: int, hook: object) -> bool:
    if key in OBSERVER_HOOK_IDS:
        return True
    # torch's ModuleTracker (FlopCounterMode, the memory tracker, CommDebugMode) only records the module
    # stack: its hooks return nothing, so skipping the modules they watch changes no result
    owner = getattr(hook, "__self__", None)
    return type(owner).__name__ == "ModuleTracker" and type(owner).__module__ == "torch.utils.module_tracker"


def global_hooks() -> bool:
    """A global module hook that is not an observer (lowmembp's own, torch's ModuleTracker) is registered."""
    tables = (
        _module._global_forward_hooks,
        _module._global_forward_pre_hooks,
        _module._global_backward_hooks,
        _module._global_backward_pre_hooks,
    )
    return any(not _observer(key, hook) for table in tables for key, hook in table.items())


def hooked(*modules: nn.Module) -> bool:
    """A hook on any of ``modules``, an instance-level ``forward`` on one, or a global hook."""
    if global_hooks():
        return True
    return any(
        _live(m._forward_hooks)
        or _live(m._forward_pre_hooks)
        or m._backward_hooks
        or m._backward_pre_hooks
        or "forward" in m.__dict__
        for m in modules
    )


def _live(table) -> bool:
    return any(key not in OBSERVER_HOOK_IDS for key in table)


_WARNED: set[str] = set()


def note_switched_off(where: str) -> None:
    """Warn once per kind of site that hooks made a fused path run the stock modules (exact, but
    without the memory saving): accelerate's offloading, a user's global hook..."""
    if torch.compiler.is_compiling() or where in _WARNED:
        return
    _WARNED.add(where)
    warnings.warn(
        f"lowmembp_convert: a hook or a wrapped forward on {where} makes it run the stock modules: exact, but "
        "without the memory saving of the exact recompute (warned once)",
        stacklevel=3,
    )
