"""Rewrite: swap in memory-sharing norms (MS-BP), keeping their affine or (on request) folding it.

Finds every LayerNorm/RMSNorm (by behaviour, ``detect``), follows each call's output through the
captured graph to the layers that consume it (``graph_walk``) and decides, with the reason:

- default (``norms="share"``): ``keep_affine`` wherever a Linear receives the output itself (so the
  norm and the Linear keep one tensor); the norm keeps its own Parameters and recovers x_hat from
  its saved output in backward. Nothing is reparameterized. ``skip`` otherwise.
- ``norms="fold"`` (the paper's form): ``fold`` when every user is a Linear-like consumer and every
  read of each folded tensor's storage is one of them; ``keep_affine`` when a user needs the affine
  output but a Linear still receives the output itself; ``skip`` otherwise.

Contracts (``rewrites.registry``): both exact forward and backward up to rounding; the fold changes
parameter values (state_dict keys kept, identity buffers), the default changes none.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict

import torch
import torch.fx as fx
import torch.nn as nn

from .. import naming
from ..capture import Capture
from ..config import ConvertConfig, norm_mode
from ..detect import Detector, NormSpec, is_converted, takes_one_tensor
from ..graph_calls import call_inputs, is_no_op_alias, module_calls
from ..graph_walk import WalkResult, walk_from
from ..naming import param_names
from ..plan import Consumer, NormSite, Plan
from ..transaction import HOOK_DICTS
from .pipeline import ApplyOptions, Context, Stage


def selected(config: ConvertConfig, module: nn.Module, fqn: str) -> bool:
    return config.filter_fn is None or bool(config.filter_fn(module, fqn))


def _consumer_module(model: nn.Module, node: fx.Node, param_fqn: str) -> tuple[str, str]:
    """(module fqn, local parameter name) of the module that called the op with this parameter."""
    param = model.get_parameter(param_fqn)
    stack = node.meta.get("nn_module_stack") or {}
    for path, _type in reversed(list(stack.values())):
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        for local, p in module.named_parameters(recurse=False):
            if p is param:
                return path, local
        break
    owner, _, local = param_fqn.rpartition(".")
    return owner, local


def _describe(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else "<root>"
    return f"{getattr(node.target, '__name__', node.target)} in {path}"


def _storage_key(t: torch.Tensor) -> tuple | None:
    """Identifies the memory a tensor lives in (None on the meta device, where nothing is shared)."""
    if t.device.type == "meta":
        return None
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr())


def module_hooks(module: nn.Module) -> list[str]:
    """Names of the hook kinds registered on ``module`` itself (a replacement would drop them)."""
    kinds = [n for n in HOOK_DICTS if not n.endswith(("_with_kwargs", "_always_called"))]
    return [name.strip("_") for name in kinds if getattr(module, name, None)]


class NormAnalyzer:
    def __init__(self, model: nn.Module, config: ConvertConfig, capture: Capture):
        self.model = model
        self.config = config
        self.capture = capture
        self.param_names = param_names(model)
        # Placeholders of parameters grouped by the storage they live in: two Parameter objects over
        # one storage (or one Parameter under two names) are one tensor to a fold.
        self.placeholders_of_storage: dict[object, list[fx.Node]] = defaultdict(list)
        self.state_placeholders: set[fx.Node] = set()
        for node in capture.graph.nodes:
            if node.op != "placeholder":
                continue
            if node.name in capture.state_placeholders:
                self.state_placeholders.add(node)
            fqn = capture.param_of_placeholder.get(node.name)
            if fqn is not None:
                self.placeholders_of_storage[self._storage(fqn)].append(node)

    def _storage(self, fqn: str) -> object:
        param = self.model.get_parameter(fqn)
        return _storage_key(param) or ("param", id(param))

    def param_fqn(self, node) -> str | None:
        if isinstance(node, fx.Node) and node.op == "placeholder":
            return self.capture.param_of_placeholder.get(node.name)
        return None

    def uses_of_storage(self, fqn: str) -> list[fx.Node]:
        """Every graph node that reads the tensor ``fqn`` or any parameter sharing its storage, also
        through no-op aliases (``w.float()`` on a float32 ``w`` is ``w`` itself, and the trace hands
        that node to every later reader of ``w``, inside the module that made it or not)."""
        uses = []
        for placeholder in self.placeholders_of_storage[self._storage(fqn)]:
            todo, seen = [placeholder], {placeholder}
            while todo:
                node = todo.pop()
                for user in node.users:
                    uses.append(user)
                    if user not in seen and is_no_op_alias(user):
                        seen.add(user)
                        todo.append(user)
        return uses

    def consumers(self, walk: WalkResult) -> tuple[list[Consumer], list[str], set[fx.Node]]:
        """One Consumer per distinct (module, weight), however many times the forward reaches it."""
        found: dict[tuple[str, str], Consumer] = {}
        problems, nodes = [], set()
        for use in walk.uses:
            weight_fqn = self.param_fqn(use.weight)
            bias_fqn = self.param_fqn(use.bias) if use.bias is not None else None
            if weight_fqn is None:
                problems.append(f"{_describe(use.node)} multiplies by a computed weight, not a parameter")
                continue
            # A computed bias (e.g. BEiT's cat of q/k/v biases) is left alone: the scale still folds
            # into the weight; a norm shift then has no parameter to go to (bias=None below).
            if not self.model.get_parameter(weight_fqn).is_floating_point():
                problems.append(f"{weight_fqn} is not a floating-point weight")
                continue
            module, local_w = _consumer_module(self.model, use.node, weight_fqn)
            local_b = _consumer_module(self.model, use.node, bias_fqn)[1] if bias_fqn else None
            consumer = Consumer(
                module=module,
                weight=f"{module}.{local_w}" if module else local_w,
                bias=(f"{module}.{local_b}" if module else local_b) if local_b else None,
                layout=use.layout,
                shares_output=use.shares_output,
                groups=use.groups,
            )
            key = (consumer.module, consumer.weight)
            previous = found.get(key)
            if previous is not None and (previous.bias, previous.layout, previous.groups) != (
                consumer.bias,
                consumer.layout,
                consumer.groups,
            ):
                problems.append(f"{consumer.module} is called in two different ways on the norm's output")
            elif previous is not None:
                # reached several times (a loop, a shared tower, slices): one consumer, sharing only if always
                found[key] = dataclasses.replace(previous, shares_output=previous.shares_output and use.shares_output)
            else:
                found[key] = consumer
            nodes.add(use.node)
        return list(found.values()), problems, nodes

    def weight_conflicts(self, consumers: list[Consumer], consumer_nodes: set[fx.Node]) -> list[tuple[str, bool]]:
        """Reads of a consumer's weight/bias storage by anything but this norm's consumers.

        Returns (reason, untieable): untieable when every outside read comes from another module
        (a tied embedding), so giving the consumer its own copy would leave every read correct.
        """
        conflicts: dict[str, bool] = {}
        weights_seen: dict[object, str] = {}
        for consumer in consumers:
            for fqn in (consumer.weight, consumer.bias):
                if fqn is None:
                    continue
                storage = self._storage(fqn)
                if storage in weights_seen and weights_seen[storage] != consumer.module:
                    conflicts[f"{fqn} shares its storage with {weights_seen[storage]}'s parameters"] = False
                weights_seen.setdefault(storage, consumer.module)
                outside = [u for u in self.uses_of_storage(fqn) if u not in consumer_nodes]
                if not outside:
                    continue
                own = [u for u in outside if _caller(u) == consumer.module]
                names = sorted({n for ph in self.placeholders_of_storage[storage] for n in self._names(ph)})
                conflicts[
                    f"{' = '.join(names)} is also read by {_describe(outside[0])} (tied or reused weights)"
                ] = not own
        return list(conflicts.items())

    def _names(self, placeholder: fx.Node) -> list[str]:
        fqn = self.capture.param_of_placeholder[placeholder.name]
        return self.param_names.get(id(self.model.get_parameter(fqn)), [fqn])

    def own_affine_problems(
        self, fqn: str, module: nn.Module, spec: NormSpec, regions: list[set[fx.Node]]
    ) -> list[str]:
        """Why the norm's own weight/bias cannot be folded away (read elsewhere, tied, trainable alone)."""
        problems = []
        inside = set().union(*regions) if regions else set()
        for local, present in (("weight", spec.has_weight), ("bias", spec.has_bias)):
            if not present:
                continue
            param_fqn = f"{fqn}.{local}" if fqn else local
            outside = [u for u in self.uses_of_storage(param_fqn) if u not in inside]
            if outside:
                problems.append(f"{param_fqn} is also read outside the norm, by {_describe(outside[0])}")
            elif len(self.param_names.get(id(getattr(module, local)), [])) > 1:
                problems.append(f"{param_fqn} is registered under several names")
        return problems

    def trainability_problems(self, module: nn.Module, spec: NormSpec, consumers: list[Consumer]) -> list[str]:
        """A trainable gamma/beta folded into a frozen weight/bias would stop training (LN-tuning, BitFit)."""
        problems = []
        for local, present, target in (("weight", spec.has_weight, "weight"), ("bias", spec.has_bias, "bias")):
            own = getattr(module, local, None) if present else None
            if own is None or not own.requires_grad:
                continue
            for consumer in consumers:
                fqn = getattr(consumer, target)
                if fqn is not None and not self.model.get_parameter(fqn).requires_grad:
                    problems.append(
                        f"its {local} is trainable but {fqn} is frozen (folding would stop the {local} from training)"
                    )
                    break
        return problems

    def norm_site(self, fqn: str, module: nn.Module, spec: NormSpec, names: set[str]) -> NormSite:
        weight = f"{fqn}.weight" if spec.has_weight else None
        bias = f"{fqn}.bias" if spec.has_bias else None
        site = NormSite(
            module=fqn, kind=spec.kind, eps=spec.eps, weight=weight, bias=bias,
            weight_offset=spec.weight_offset, channel_dim=spec.channel_dim,
        )  # fmt: skip
        calls = module_calls(self.capture.graph, names)
        if not calls:
            site.reason = "not called in the traced forward"
            return site
        walk = WalkResult()
        for region, call_outputs in calls:
            inputs = call_inputs(region, self.state_placeholders)
            if len(inputs) != 1:
                site.reason = (
                    f"called with {len(inputs)} tensor inputs in the traced forward; only a norm of one tensor "
                    "is replaced (a gated norm's extra input would be lost)"
                )
                return site
            if len(call_outputs) != 1:
                site.reason = f"the module returns {len(call_outputs)} tensors; expected one"
                return site
            one = walk_from(call_outputs[0], spec.channel_dim)
            walk.uses += one.uses
            walk.blockers += one.blockers
            walk.bias_blockers += one.bias_blockers
            walk.sharing_breakers += one.sharing_breakers
            walk.exact_sharers += one.exact_sharers
            walk.identity_dropouts += one.identity_dropouts
        consumers, problems, consumer_nodes = self.consumers(walk)
        site.consumers = tuple(consumers)
        blockers = list(dict.fromkeys(walk.blockers + problems))
        if walk.sharing_breakers:
            site.reason = f"sharing would break: {walk.sharing_breakers[0]}"
            return site
        if not consumers and not walk.exact_sharers:
            site.reason = f"no Linear layer consumes its output (used by: {', '.join(blockers[:3]) or 'nothing'})"
            return site
        if norm_mode(self.config) == "share":
            return self._share(site, consumers, walk, blockers)
        conflicts = []
        for reason, untieable in self.weight_conflicts(consumers, consumer_nodes):
            if untieable and self.config.untie_embeddings and not blockers:
                site.reason = f"untie: {reason}"
            else:
                conflicts.append(reason)
        own = self.own_affine_problems(fqn, module, spec, [r for r, _ in calls])
        own += self.trainability_problems(module, spec, consumers)
        # A shift moves into the consumers' biases only if every consumer has one and nothing on the
        # way (zero padding, a sum) treats the shift differently from the scale; otherwise the whole
        # affine stays in the norm (folding the scale alone would need the shift divided by it).
        shift_problem = []
        if spec.has_bias:
            no_bias = [c.module for c in consumers if c.bias is None]
            if no_bias:
                shift_problem = [f"{no_bias[0]} has no bias parameter to take the norm's shift"]
            shift_problem += walk.bias_blockers[:1]
        if not blockers and not conflicts and not shift_problem and not own:
            site.action = "fold"
            site.fold_bias = spec.has_bias
            site.dropouts = tuple(dict.fromkeys(walk.identity_dropouts)) if spec.has_bias else ()
            site.autocast_output = True
            site.already_folded = self._is_identity(module, spec)
            return site
        why = (blockers + own + conflicts + shift_problem)[0]
        if not any(c.shares_output for c in consumers) and not walk.exact_sharers:
            site.reason = f"cannot fold ({why}) and no Linear receives the output itself, so nothing is shared"
            return site
        site.action = "keep_affine"
        site.autocast_output = not blockers
        site.reason = f"affine kept in the norm: {why}"
        return site

    def _share(self, site: NormSite, consumers: list[Consumer], walk: WalkResult, blockers: list[str]) -> NormSite:
        """The default: keep the affine in the norm wherever a Linear receives its output itself."""
        if not any(c.shares_output for c in consumers) and not walk.exact_sharers:
            site.reason = "no Linear receives the output itself (it is copied on the way), so nothing is shared"
            return site
        site.action = "keep_affine"
        # Every reader casts to the autocast dtype anyway: emit it (one low-precision tensor kept).
        # A residual or any other reader needs the full-precision output: the twin path then.
        site.autocast_output = not blockers
        site.reason = ""
        return site

    def _is_identity(self, module: nn.Module, spec: NormSpec) -> bool:
        weight = getattr(module, "weight", None) if spec.has_weight else None
        bias = getattr(module, "bias", None) if spec.has_bias else None
        return is_identity_affine(weight, bias, spec.weight_offset)


def is_identity_affine(weight: torch.Tensor | None, bias: torch.Tensor | None, offset: float) -> bool:
    """True when the affine is the identity already (scale ``weight + offset`` all 1, shift all 0): a
    norm of a converted checkpoint. False on the meta device (nothing to read) and with no affine."""
    tensors = [t for t in (weight, bias) if t is not None]
    if not tensors or any(t.device.type == "meta" for t in tensors):
        return False
    with torch.no_grad():
        if weight is not None and not torch.all(weight.to(torch.float64) + offset == 1):
            return False
        return bias is None or not torch.any(bias != 0)


def _caller(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else None


def find_norms(
    model: nn.Module, config: ConvertConfig, plan: Plan, detector: Detector
) -> list[tuple[str, nn.Module, NormSpec]]:
    found, seen = [], set()
    for fqn, module in model.named_modules():
        if id(module) in seen or is_converted(module):
            continue
        seen.add(id(module))
        spec = detector.norm(module)
        if spec is None:
            leaf = not any(True for _ in module.children())
            if "norm" in type(module).__name__.lower() and leaf:
                why = (
                    "its forward takes more than one argument (e.g. a gate), so it is not a plain norm"
                    if not takes_one_tensor(module)
                    else "not a LayerNorm/RMSNorm over one dim by behaviour"
                )
                plan.notes.append(f"{fqn} ({type(module).__name__}): {why}; left as is")
            continue
        site = NormSite(module=fqn, kind=spec.kind, eps=spec.eps, weight=None, bias=None)
        hooks = module_hooks(module)
        if not selected(config, module, fqn):
            site.reason = "excluded by filter_fn"
        elif hooks:
            site.reason = f"has {', '.join(hooks)} registered on it; replacing the module would drop them"
        else:
            found.append((fqn, module, spec))
            continue
        plan.norms.append(site)
    return found


# --------------------------------------------------------------------------------------------------
# The stage (rewrites.pipeline): memory-sharing norms, folded on request
# --------------------------------------------------------------------------------------------------


def _find_stage(ctx: Context) -> bool:
    ctx.found["norms"] = find_norms(ctx.model, ctx.config, ctx.plan, ctx.detector) if ctx.config.norms else []
    return bool(ctx.found["norms"])


def _plan_stage(ctx: Context) -> None:
    norms = ctx.found.get("norms") or []
    if ctx.capture is None:
        for fqn, _module, spec in norms:
            ctx.plan.norms.append(
                NormSite(module=fqn, kind=spec.kind, eps=spec.eps, weight=None, bias=None,
                         reason="graph capture failed, so its consumers are unknown; left unconverted")
            )  # fmt: skip
        return
    analyzer = NormAnalyzer(ctx.model, ctx.config, ctx.capture)
    ctx.shared["state_placeholders"] = analyzer.state_placeholders
    module_names = ctx.shared.setdefault("module_names", naming.module_names(ctx.model))
    claimed: dict[str, str] = {}
    for fqn, module, spec in norms:
        site = analyzer.norm_site(fqn, module, spec, set(module_names[id(module)]))
        if site.action != "skip":
            clash = [c.module for c in site.consumers if c.module in claimed]
            if clash:
                site.action, site.reason = "skip", f"{clash[0]} already consumes {claimed[clash[0]]}"
            else:
                claimed.update({c.module: fqn for c in site.consumers})
        ctx.plan.norms.append(site)


def _apply_stage(model: nn.Module, plan: Plan, options: ApplyOptions) -> list[str]:
    from .apply import apply_norms  # apply imports this module

    return apply_norms(model, plan, options)


def _summary(plan: Plan) -> list[str]:
    actions = Counter(s.action for s in plan.norms)
    return [
        f"  norms: {actions['fold']} folded, {actions['keep_affine']} memory-sharing with own affine, "
        f"{actions['skip']} skipped"
    ]


STAGE = Stage(
    name="norms",
    find=_find_stage,
    plan=_plan_stage,
    apply=_apply_stage,
    summary=_summary,
    converted=lambda plan: sum(s.action != "skip" for s in plan.norms),
)
