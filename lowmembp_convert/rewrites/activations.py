"""Rewrite: activation sites (GELU/SiLU and any pure elementwise module, found by behaviour) and the
functional calls left exact.

Which option a site takes (stock, exact recompute, 2-bit approximation) is the planner's decision
(``rewrites.planner``); the 2-bit swap is done by ``rewrites.apply``, the recompute by
``rewrites.recompute``.
"""

from __future__ import annotations

import torch.nn as nn

from ..capture import Capture
from ..config import ConvertConfig
from ..detect import Detector, is_converted
from ..plan import ActivationSite, Plan
from .norms import module_hooks, selected


def find_activations(model: nn.Module, config: ConvertConfig, plan: Plan, detector: Detector) -> None:
    seen = set()
    for fqn, module in model.named_modules():
        if id(module) in seen or is_converted(module):
            continue
        seen.add(id(module))
        spec = detector.activation(module)
        if spec is None:
            continue
        site = ActivationSite(
            module=fqn, kind=spec.kind, inplace=spec.inplace, bitwise=spec.bitwise, elementwise=spec.elementwise
        )
        if spec.saves is not None:
            site.stock_keeps = (spec.saves.input, spec.saves.output, spec.saves.extra)
        hooks = module_hooks(module)
        if not selected(config, module, fqn):
            site.action, site.option, site.reason = "skip", None, "excluded by filter_fn"
        elif spec.saves is not None and spec.saves.output and not spec.saves.input and not spec.saves.extra:
            # ReLU, tanh, sigmoid: their consumer keeps that very output anyway; no option keeps less
            site.action, site.option = "skip", None
            site.reason = (
                f"left stock: {type(module).__name__} keeps only its output, which its consumer keeps anyway "
                "(nothing to save)"
            )
        elif spec.kind == "elementwise" and config.activations == "approx":
            site.action, site.option = "skip", None
            site.reason = (
                f"left stock: {type(module).__name__} has no 2-bit form (not GELU/SiLU); "
                "activations='auto' recomputes it exactly"
            )
        elif hooks:
            site.action, site.option = "skip", None
            site.reason = f"has {', '.join(hooks)} registered on it; a swap would drop them"
        plan.activations.append(site)


def report_functional_activations(capture: Capture, model: nn.Module, plan: Plan) -> None:
    """Report gelu/silu calls made inside some other module's forward (they cannot be swapped)."""
    activation_modules = {s.module for s in plan.activations}
    for node in capture.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "__name__", "").split(".")[0] not in ("gelu", "silu"):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        if path not in activation_modules:
            plan.notes.append(
                f"functional {node.target} inside {path or '<root>'}.forward left exact "
                "(only activation modules can be swapped without editing forward code)"
            )
