"""Is anything hooked on the modules a fused path would skip? (Observers of lowmembp's own excepted.)

A rewritten forward runs its fused op only while no hook, and no instance-level ``forward`` (as
accelerate's hooks and wrappers install), could change what the skipped modules see or return.
Global module hooks count too, except those lowmembp registers only to observe (the module labels of
``activation_memory(explain=True)``): ids in :data:`OBSERVER_HOOK_IDS`.
"""

from __future__ import annotations

import torch.nn as nn
from torch.nn.modules import module as _module

OBSERVER_HOOK_IDS: set[int] = set()


def global_hooks() -> bool:
    """A global module hook that is not one of lowmembp's observers is registered."""
    tables = (
        _module._global_forward_hooks,
        _module._global_forward_pre_hooks,
        _module._global_backward_hooks,
        _module._global_backward_pre_hooks,
    )
    return any(key not in OBSERVER_HOOK_IDS for table in tables for key in table)


def hooked(*modules: nn.Module) -> bool:
    """A hook on any of ``modules``, an instance-level ``forward`` on one, or a global hook."""
    if global_hooks():
        return True
    return any(
        m._forward_hooks
        or m._forward_pre_hooks
        or m._backward_hooks
        or m._backward_pre_hooks
        or "forward" in m.__dict__
        for m in modules
    )
