"""Every rewrite convert() can make: the stages the pipeline runs and the contracts they declare.

``STAGES`` drives ``analysis.plan_conversion``, ``rewrites.apply.apply_plan`` and the report: each
stage is one module's ``STAGE`` (``rewrites.pipeline.Stage``: how it finds its sites, plans them with
or without the captured graph, applies them and reports them). ``REWRITES`` lists what each rewrite
promises, with the options that turn it on alone.

As optimum's transforms declare ``preserves_computation`` and torchao registers a handler per config,
each rewrite here names the ``convert()`` options that turn it on alone, how to read the sites it
applied from a :class:`~lowmembp_convert.plan.Plan`, and its contract:

- ``exact_forward``: outputs equal the stock model's (up to the rounding of a folded weight);
- ``exact_backward``: gradients equal the stock model's (up to rounding);
- ``changes_parameter_values``: parameter tensors are edited in place (a fold);
- ``keeps_state_dict_keys``: ``state_dict()`` has the same keys (a stock model loads it).

``tests/rewrites/test_contracts.py`` runs every registered rewrite over the model zoo and checks each
declared property against the stock model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..plan import Plan
from . import adapter_inputs, loss_head, norms, planner
from .pipeline import Stage

# The pipeline, in order: norms first (the activation planner reads the norms' plan), the loss head last.
STAGES: tuple[Stage, ...] = (norms.STAGE, planner.STAGE, adapter_inputs.STAGE, loss_head.STAGE)


@dataclass(frozen=True)
class Contract:
    exact_forward: bool
    exact_backward: bool
    changes_parameter_values: bool
    keeps_state_dict_keys: bool


@dataclass(frozen=True)
class Rewrite:
    name: str
    module: str  # where its site finding and application live
    options: dict[str, Any]  # convert() options that make this rewrite the only one
    sites: Callable[[Plan], list[str]]  # the sites a plan applied it to
    contract: Contract


REWRITES: tuple[Rewrite, ...] = (
    Rewrite(
        name="share_norms",
        module="lowmembp_convert.rewrites.norms",
        options={"norms": "share", "activations": False, "adapter_inputs": False, "loss_head": False},
        sites=lambda plan: [s.module for s in plan.norms if s.action != "skip"],
        contract=Contract(
            exact_forward=True, exact_backward=True, changes_parameter_values=False, keeps_state_dict_keys=True
        ),
    ),
    Rewrite(
        name="fold_norms",
        module="lowmembp_convert.rewrites.norms",
        options={"norms": "fold", "activations": False, "adapter_inputs": False, "loss_head": False},
        sites=lambda plan: [s.module for s in plan.norms if s.action != "skip"],
        contract=Contract(
            exact_forward=True, exact_backward=True, changes_parameter_values=True, keeps_state_dict_keys=True
        ),
    ),
    Rewrite(
        name="approx_activations",
        module="lowmembp_convert.rewrites.activations",
        options={"norms": False, "activations": "approx", "adapter_inputs": False, "loss_head": False},
        sites=lambda plan: [s.module for s in plan.activations if s.action == "convert" and s.option == "approx"],
        contract=Contract(
            exact_forward=True, exact_backward=False, changes_parameter_values=False, keeps_state_dict_keys=True
        ),
    ),
    Rewrite(
        name="recompute_activations",
        module="lowmembp_convert.rewrites.recompute",
        options={"norms": False, "activations": "recompute", "adapter_inputs": False, "loss_head": False},
        sites=lambda plan: [s.module for s in plan.activations if s.action == "convert" and s.option == "recompute"],
        contract=Contract(
            exact_forward=True, exact_backward=True, changes_parameter_values=False, keeps_state_dict_keys=True
        ),
    ),
    Rewrite(
        name="share_adapter_inputs",
        module="lowmembp_convert.rewrites.adapter_inputs",
        options={"norms": False, "activations": False, "adapter_inputs": True, "loss_head": False},
        sites=lambda plan: [s.module for s in plan.adapters if s.action == "share"],
        contract=Contract(
            exact_forward=True, exact_backward=True, changes_parameter_values=False, keeps_state_dict_keys=True
        ),
    ),
    Rewrite(
        name="exact_loss_head",
        module="lowmembp_convert.rewrites.loss_head",
        options={"norms": False, "activations": False, "adapter_inputs": False, "loss_head": True},
        sites=lambda plan: [s.head for s in plan.loss_heads if s.action == "exact"],
        contract=Contract(
            exact_forward=True, exact_backward=True, changes_parameter_values=False, keeps_state_dict_keys=True
        ),
    ),
)


def rewrite(name: str) -> Rewrite:
    for r in REWRITES:
        if r.name == name:
            return r
    raise KeyError(f"no rewrite named {name!r}; registered: {[r.name for r in REWRITES]}")
