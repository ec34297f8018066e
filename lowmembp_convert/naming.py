"""Names of modules and parameters, under every name they are registered with (shared or tied)."""

from __future__ import annotations

from collections import defaultdict

import torch.nn as nn


def module_names(model: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every qualified name it has in ``model``."""
    names: dict[int, list[str]] = defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        names[id(module)].append(name)
    return names


def param_names(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every qualified name it has in ``model`` (several: tied or shared)."""
    names: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        names[id(param)].append(name)
    return names
