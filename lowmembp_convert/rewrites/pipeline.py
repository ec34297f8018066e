"""What a rewrite declares so that the pipeline (plan, apply, report) can run it without knowing it.

``convert()`` runs every :class:`Stage` listed in ``rewrites.registry.STAGES``, in that order:

1. ``find(ctx)``: look at the model (no graph yet), record the candidate sites in ``ctx.found`` or
   the plan, and return whether deciding them needs the captured graph;
2. the pipeline captures the model once if any stage asked for it;
3. ``plan(ctx)``: decide every site (``ctx.capture`` is None when the capture failed or was not
   needed: the stage then plans what it can without it and says why);
4. ``apply(model, plan, options)``: carry the plan out, in place, returning notes for the report;
5. ``summary(plan)``: the report's lines for this stage; ``converted(plan)``: how many sites changed.

What each rewrite promises (exact forward / backward, edits parameters, keeps state_dict keys) is
declared beside it in ``registry.REWRITES`` and checked by ``tests/rewrites/test_contracts.py``. A new
rewrite is one module defining its ``STAGE`` and one entry in each of those two tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from ..plan import Plan


@dataclass
class Context:
    """What the stages of one analysis share: the model, the options, the plan being filled in, the
    behaviour detector, the captured graph (None when not needed or failed) and each stage's findings."""

    model: nn.Module
    config: Any  # ConvertConfig
    plan: Plan
    detector: Any  # detect.Detector
    capture: Any = None  # capture.Capture, or None
    found: dict[str, Any] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)  # e.g. the norm analyzer's state placeholders


@dataclass(frozen=True)
class ApplyOptions:
    untie_embeddings: bool = False
    min_abs_weight: float = 1e-3


@dataclass(frozen=True)
class Stage:
    """One rewrite as the pipeline runs it (see the module docstring for the order of the calls)."""

    name: str
    find: Callable[[Context], bool]
    plan: Callable[[Context], None]
    apply: Callable[[nn.Module, Plan, ApplyOptions], list[str]]
    summary: Callable[[Plan], list[str]]
    converted: Callable[[Plan], int]
