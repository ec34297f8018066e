"""Choosing, per activation site, what its backward keeps: stock, the 2-bit approximation or recompute.

``activations="auto"`` (the default) takes the exact option that keeps the fewest bytes on the example
batch (recompute where the graph proves it, else stock): an approximate gradient is never chosen for
a user who did not ask for one, and a site where the 2-bit option would keep fewer bytes says so in
its reason. ``"recompute"`` is the same without the estimates deciding against recompute;
``"approx"`` is the paper (ReGELU2/ReSiLU2 everywhere, no graph needed). Estimates come from
:func:`lowmembp_convert.rewrites.recompute.estimate_site`; every choice is reported with them.
"""

from __future__ import annotations

from collections import Counter

import torch.fx as fx
import torch.nn as nn

from .. import naming
from ..capture import Capture
from ..config import activation_mode
from ..ops.recompute_module import BY_MODULE
from ..plan import Plan
from .activations import find_activations, report_functional_activations
from .pipeline import ApplyOptions, Context, Stage
from .recompute import OPTIONS, RecomputeSite, check_container, estimate_site, grad_nodes


def _size(n: int) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= 10 * scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def describe(estimate: dict[str, int]) -> str:
    names = {"stock": "stock", "approx": "2-bit", "recompute": "recompute", "share": "narrow input"}
    order = (*OPTIONS, "share")
    return ", ".join(f"{names[k]} {_size(v)}" for k, v in sorted(estimate.items(), key=lambda kv: order.index(kv[0])))


def plan_activations(
    model: nn.Module,
    plan: Plan,
    capture: Capture,
    state: set[fx.Node],
    module_names: dict[int, list[str]],
    mode: str,
) -> None:
    """Fill in each convertible activation site's estimate and option (``mode``: auto or recompute)."""
    needs_grad = grad_nodes(capture.graph, model, capture.param_of_placeholder)
    for site in plan.activations:
        if site.action != "convert":
            continue
        module = model.get_submodule(site.module)
        est = estimate_site(
            model,
            capture.graph,
            set(module_names[id(module)]),
            state,
            capture.param_of_placeholder,
            needs_grad,
            site.stock_keeps,
        )
        if site.kind == "elementwise":
            est.bytes.pop("approx", None)  # no 2-bit form of an arbitrary function
        if est.recompute is not None and est.recompute.layout != "handoff":
            container = model.get_submodule(est.recompute.container)
            why = check_container(container, [(est.recompute, recompute_kind(site))])
            handoff = _handoff_instead(model, site, est.recompute) if why else None
            if handoff is not None:  # the container's forward cannot be rewritten: hand the input over
                est.recompute = handoff
            elif why:
                est.recompute, est.why_not_recompute = None, why
                est.bytes.pop("recompute", None)
        why = _recompute_refused(site, est, module)
        if why and "recompute" in est.bytes:
            est.bytes.pop("recompute")
            est.why_not_recompute = why
        site.estimate = dict(est.bytes)
        exact = {k: v for k, v in est.bytes.items() if k != "approx"}  # auto and recompute: exact only
        if not exact:
            site.action, site.option, site.reason = "skip", None, "not called in the traced forward"
            continue
        best = min(exact, key=lambda k: (exact[k], OPTIONS.index(k)))
        if best == "stock":
            site.action, site.option = "skip", None
            if "recompute" not in est.bytes:
                site.reason = f"left stock (exact): recompute is not possible here ({est.why_not_recompute})"
            else:
                site.reason = f"left stock: no exact option keeps fewer bytes ({describe(site.estimate)})"
            if est.bytes.get("approx", exact["stock"]) < exact["stock"]:
                site.reason += "; activations='approx' would keep fewer bytes with an approximate gradient"
            continue
        site.option = best
        if best == "recompute":
            site.recompute = r = est.recompute
            if r.layout == "handoff":
                site.reason = f"exact recompute in {r.consumer}, handed the input over from this module"
            else:
                site.reason = f"exact recompute in {r.container or '<root>'}.{r.consumer}"


def _handoff_instead(model: nn.Module, site, proven: RecomputeSite) -> RecomputeSite | None:
    """Where the container's forward cannot be rewritten (torch.fx cannot trace BART's or Whisper's
    encoder layer), a plain ``linear(act(a))`` with a stock Linear and torch's op bit for bit can
    still take the hand-off between the two modules: the Linear recomputes only when it receives the
    activation's very output (a dropout with p = 0 returns it), else it runs plainly (exact)."""
    if proven.gated or proven.layout != "linear" or not site.bitwise or site.inplace:
        return None
    prefix = f"{proven.container}." if proven.container else ""
    consumer = f"{prefix}{proven.consumer}"
    if type(model.get_submodule(consumer)) is not nn.Linear:
        return None
    return RecomputeSite("", f"{prefix}{proven.activation}", consumer, "handoff", False)


def recompute_kind(site) -> str:
    """What the fused op rebuilds the activation with: torch's op (and its Triton kernel) where the
    module is that op bit for bit, else the module itself (:data:`BY_MODULE`)."""
    return site.kind if site.bitwise else BY_MODULE


def _recompute_refused(site, est, module: nn.Module) -> str:
    if site.inplace:
        return "in-place activation"
    if not (site.bitwise or site.elementwise):
        return f"{type(module).__name__} is not torch's {site.kind} bit for bit, nor proven pure and elementwise"
    if est.recompute is not None and est.recompute.layout == "handoff" and not site.bitwise:
        return (
            f"{type(module).__name__} and its consumer are in different modules and it is not torch's "
            f"{site.kind} bit for bit (the hand-off rebuilds torch's op)"
        )
    return ""


def plan_activations_without_graph(plan: Plan) -> None:
    """Capture failed: nothing exact can be proven, so every site stays stock (never approximated)."""
    for site in plan.activations:
        if site.action != "convert":
            continue
        site.action, site.option = "skip", None
        site.reason = (
            "left stock (exact): graph capture failed, so recompute cannot be proven; pass example_inputs to "
            "convert(), or activations='approx' for the 2-bit approximate gradient"
        )


# --------------------------------------------------------------------------------------------------
# The stage (rewrites.pipeline): activations, 2-bit or recomputed exactly
# --------------------------------------------------------------------------------------------------


def _find_stage(ctx: Context) -> bool:
    mode = activation_mode(ctx.config)
    ctx.found["activations"] = mode
    if not mode:
        return False
    find_activations(ctx.model, ctx.config, ctx.plan, ctx.detector)
    # the 2-bit swap needs no graph; choosing the exact recompute does
    return mode in ("auto", "recompute") and any(s.action == "convert" for s in ctx.plan.activations)


def _plan_stage(ctx: Context) -> None:
    mode = ctx.found.get("activations")
    if not mode:
        return
    planning = mode in ("auto", "recompute") and any(s.action == "convert" for s in ctx.plan.activations)
    if ctx.capture is None:
        if planning:
            plan_activations_without_graph(ctx.plan)
        return
    if planning:
        placeholders = ctx.shared.get("state_placeholders")
        if placeholders is None:
            from .norms import NormAnalyzer

            placeholders = NormAnalyzer(ctx.model, ctx.config, ctx.capture).state_placeholders
        names = ctx.shared.setdefault("module_names", naming.module_names(ctx.model))
        plan_activations(ctx.model, ctx.plan, ctx.capture, placeholders, names, mode)
    report_functional_activations(ctx.capture, ctx.model, ctx.plan)


def _apply_stage(model: nn.Module, plan: Plan, options: ApplyOptions) -> list[str]:
    from .apply import apply_activations  # apply imports this module

    return apply_activations(model, plan, options)


def _summary(plan: Plan) -> list[str]:
    kinds = Counter(f"{s.kind} {s.option}" for s in plan.activations if s.action == "convert")
    converted = sum(s.action == "convert" for s in plan.activations)
    return [
        f"  activations: {converted} converted"
        + (f" ({', '.join(f'{k} x{n}' for k, n in sorted(kinds.items()))})" if kinds else "")
        + f", {sum(s.action == 'skip' for s in plan.activations)} skipped"
    ]


STAGE = Stage(
    name="activations",
    find=_find_stage,
    plan=_plan_stage,
    apply=_apply_stage,
    summary=_summary,
    converted=lambda plan: sum(s.action == "convert" for s in plan.activations),
)
