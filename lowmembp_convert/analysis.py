"""Analysis: find every site, decide its action and reason, change nothing.

The orchestrator of the rewrites (``rewrites.registry`` lists them with their contracts): norms and
activations are recognised by behaviour (``detect``); when a decision needs the dataflow, the model
is captured once (``capture``) and each rewrite analyses its sites on that graph: norm folding
(``rewrites.norms``), the activation planner (``rewrites.planner``, ``rewrites.recompute``), PEFT
adapter inputs (``rewrites.adapter_inputs``).
"""

from __future__ import annotations

import torch.nn as nn

from . import naming
from .capture import CaptureError, capture_graph
from .config import ConvertConfig, loss_head_mode, resolve_config
from .detect import Detector
from .plan import NormSite, Plan
from .rewrites.activations import find_activations, report_functional_activations
from .rewrites.adapter_inputs import find_adapter_layers, plan_adapter_inputs
from .rewrites.loss_head import find_loss_heads, plan_loss_heads
from .rewrites.norms import NormAnalyzer, find_norms, module_hooks
from .rewrites.planner import plan_activations, plan_activations_without_graph

__all__ = ["activation_mode", "module_hooks", "plan_conversion"]


def activation_mode(config: ConvertConfig) -> str | None:
    """ "auto", "approx", "recompute", or None (activations left alone). ``True`` means "auto"."""
    if config.activations is False:
        return None
    return "auto" if config.activations is True else config.activations


def _rows(config: ConvertConfig, model: nn.Module) -> int | None:
    """Token rows of the example batch (batch x sequence of its ids), for the loss head's estimate."""
    from .capture import example_inputs_for

    try:
        args, kwargs = config.example_inputs or example_inputs_for(model, flags=False)
    except Exception:
        return None
    ids = kwargs.get("input_ids", args[0] if args else None)
    return int(ids.numel()) if hasattr(ids, "numel") and ids.dim() == 2 else None


def plan_conversion(model: nn.Module, config: ConvertConfig | None = None, **overrides) -> Plan:
    """Analyse ``model`` and return the :class:`Plan`; the model is not changed.

    Works on models whose parameters live on the ``meta`` device (nothing is computed on weights).
    """
    config = resolve_config(config, overrides)
    plan = Plan()
    detector = Detector()  # its cache lives for this analysis only
    mode = activation_mode(config)
    if mode:
        find_activations(model, config, plan, detector)
    norms = find_norms(model, config, plan, detector) if config.norms else []
    planning = mode in ("auto", "recompute") and any(s.action == "convert" for s in plan.activations)
    adapters = config.adapter_inputs and bool(find_adapter_layers(model))
    heads = config.loss_head and bool(find_loss_heads(model, plan))
    if not norms and not planning and not adapters and not heads:
        plan.capture = "not needed (" + ("no norm found" if config.norms else "norms disabled") + ")"
        return plan
    try:
        capture = capture_graph(model, config.example_inputs)
    except CaptureError as exc:
        plan.capture = f"failed: {exc}"
        for fqn, _module, spec in norms:
            plan.norms.append(
                NormSite(module=fqn, kind=spec.kind, eps=spec.eps, weight=None, bias=None,
                         reason="graph capture failed, so its consumers are unknown; left unconverted")
            )  # fmt: skip
        if planning:
            plan_activations_without_graph(plan)
        if adapters:
            plan.notes.append("PEFT adapter inputs left as they are: the graph that proves the rewrite is missing")
        if heads:  # checked at run time (the loss takes the exact path only given the head's own output)
            plan_loss_heads(model, plan, None, None, loss_head_mode(config))
        return plan
    plan.capture = f"torch.export (non-strict, fake tensors), {capture.seconds:.1f} s"
    analyzer = NormAnalyzer(model, config, capture)
    module_names = naming.module_names(model)
    claimed: dict[str, str] = {}
    for fqn, module, spec in norms:
        site = analyzer.norm_site(fqn, module, spec, set(module_names[id(module)]))
        if site.action != "skip":
            clash = [c.module for c in site.consumers if c.module in claimed]
            if clash:
                site.action, site.reason = "skip", f"{clash[0]} already consumes {claimed[clash[0]]}"
            else:
                claimed.update({c.module: fqn for c in site.consumers})
        plan.norms.append(site)
    if planning:
        plan_activations(model, plan, capture, analyzer.state_placeholders, module_names, mode)
    if adapters:
        plan_adapter_inputs(model, plan, capture, config)
    if heads:
        plan_loss_heads(model, plan, capture, _rows(config, model), loss_head_mode(config))
    if mode:
        report_functional_activations(capture, model, plan)
    return plan
