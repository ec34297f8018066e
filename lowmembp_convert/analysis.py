"""Analysis: find every site, decide its action and reason, change nothing.

The pipeline of the rewrites listed in ``rewrites.registry.STAGES`` (norms, activations, PEFT adapter
inputs, the loss head; see ``rewrites.pipeline`` for what each declares): every stage first finds its
candidate sites, recognised by behaviour (``detect``); when a decision needs the dataflow, the model
is captured once (``capture``) and each stage decides its sites on that graph, or without it (saying
why) when the capture failed.
"""

from __future__ import annotations

import torch.nn as nn

from .capture import CaptureError, capture_graph
from .config import ConvertConfig, activation_mode, resolve_config
from .detect import Detector
from .plan import Plan
from .rewrites import registry
from .rewrites.norms import module_hooks
from .rewrites.pipeline import Context

__all__ = ["activation_mode", "module_hooks", "plan_conversion"]


def plan_conversion(model: nn.Module, config: ConvertConfig | None = None, **overrides) -> Plan:
    """Analyse ``model`` and return the :class:`Plan`; the model is not changed.

    Works on models whose parameters live on the ``meta`` device (nothing is computed on weights).
    """
    config = resolve_config(config, overrides)
    ctx = Context(model=model, config=config, plan=Plan(), detector=Detector())  # the detector caches per analysis
    stages = registry.STAGES
    needs_graph = [stage.find(ctx) for stage in stages]  # every stage looks, even after one asked
    if not any(needs_graph):
        ctx.plan.capture = "not needed (" + ("no norm found" if config.norms else "norms disabled") + ")"
        return ctx.plan
    try:
        ctx.capture = capture_graph(model, config.example_inputs)
    except CaptureError as exc:
        ctx.plan.capture = f"failed: {exc}"
    else:
        ctx.plan.capture = f"torch.export (non-strict, fake tensors), {ctx.capture.seconds:.1f} s"
    for stage in stages:
        stage.plan(ctx)
    return ctx.plan
