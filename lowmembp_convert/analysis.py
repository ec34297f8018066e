"""Analysis: find every site, decide its action and reason, change nothing.

Norms and activations are recognised by behaviour (``detect``); the exported graph (``capture``)
tells where each norm's output goes (``graph_walk``). A norm is folded only when every user of its
output is a Linear-like consumer and every use of each consumer's weight is one of those consumers
(fold only when every user qualifies); otherwise it keeps its affine, or is skipped, with the reason.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.fx as fx
import torch.nn as nn

from .capture import Capture, CaptureError, capture_graph
from .config import ConvertConfig, resolve_config
from .detect import NormSpec, classify_activation, classify_norm, is_converted
from .graph_walk import WalkResult, walk_from
from .plan import ActivationSite, Consumer, NormSite, Plan


def _module_names(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        names[id(module)].append(name)
    return names


def _param_names(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        names[id(param)].append(name)
    return names


def _selected(config: ConvertConfig, module: nn.Module, fqn: str) -> bool:
    return config.filter_fn is None or bool(config.filter_fn(module, fqn))


def _norm_outputs(graph: fx.Graph, names: set[str]) -> dict[str, list[fx.Node]] | None:
    """Output nodes of each call of the module known under ``names`` (call key -> outputs)."""
    regions: dict[str, list[fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        for key, (path, _type) in (node.meta.get("nn_module_stack") or {}).items():
            if path in names:
                regions[key].append(node)
    if not regions:
        return None
    outputs = {}
    for key, nodes in regions.items():
        inside = set(nodes)
        outputs[key] = [
            n
            for n in nodes
            if isinstance(n.meta.get("val"), torch.Tensor)
            and any(u not in inside for u in n.users)
            and not _is_input_alias(n, inside)
        ]
    return outputs


_NO_OP_TARGETS = {"to", "_to_copy", "alias", "detach", "contiguous", "type_as"}


def _is_input_alias(node: fx.Node, inside: set[fx.Node]) -> bool:
    """True for a same-dtype ``x.to(...)``-style no-op on the module's input (e.g. ``x.float()`` in an
    fp32 model), which the caller may keep using as its residual: it is not the norm's output."""
    while node in inside:
        name = getattr(node.target, "__name__", "").split(".")[0]
        src = node.args[0] if node.args else None
        if name not in _NO_OP_TARGETS or not isinstance(src, fx.Node):
            return False
        out, inp = node.meta.get("val"), src.meta.get("val")
        if not (isinstance(out, torch.Tensor) and isinstance(inp, torch.Tensor)) or out.dtype != inp.dtype:
            return False
        node = src
    return True


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


class _Analyzer:
    def __init__(self, model: nn.Module, config: ConvertConfig, capture: Capture):
        self.model = model
        self.config = config
        self.capture = capture
        self.param_names = _param_names(model)
        self.placeholder_uses: dict[str, list[fx.Node]] = defaultdict(list)
        for node in capture.graph.nodes:
            if node.op == "placeholder" and node.name in capture.param_of_placeholder:
                self.placeholder_uses[node.name] = list(node.users)

    def param_fqn(self, node) -> str | None:
        if isinstance(node, fx.Node) and node.op == "placeholder":
            return self.capture.param_of_placeholder.get(node.name)
        return None

    def consumers(self, walk: WalkResult) -> tuple[list[Consumer], list[str], set[fx.Node]]:
        consumers, problems, nodes = [], [], set()
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
            consumers.append(
                Consumer(
                    module=module,
                    weight=f"{module}.{local_w}" if module else local_w,
                    bias=(f"{module}.{local_b}" if module else local_b) if local_b else None,
                    layout=use.layout,
                    shares_output=use.shares_output,
                    groups=use.groups,
                )
            )
            nodes.add(use.node)
        return consumers, problems, nodes

    def weight_conflicts(self, walk: WalkResult, consumer_nodes: set[fx.Node]) -> list[str]:
        """Uses of a consumer's weight/bias outside this norm's consumers (shared or tied weights)."""
        conflicts = []
        for use in walk.uses:
            for arg in (use.weight, use.bias):
                if arg is None or self.param_fqn(arg) is None:
                    continue
                others = [u for u in self.placeholder_uses[arg.name] if u not in consumer_nodes]
                names = self.param_names[id(self.model.get_parameter(self.param_fqn(arg)))]
                if others or len(names) > 1:
                    conflicts.append(f"{' = '.join(names)} is shared with other layers (tied or reused weights)")
        return sorted(set(conflicts))

    def norm_site(self, fqn: str, module: nn.Module, spec: NormSpec, names: set[str]) -> NormSite:
        weight = f"{fqn}.weight" if spec.has_weight else None
        bias = f"{fqn}.bias" if spec.has_bias else None
        site = NormSite(
            module=fqn, kind=spec.kind, eps=spec.eps, weight=weight, bias=bias,
            weight_offset=spec.weight_offset, channel_dim=spec.channel_dim,
        )  # fmt: skip
        outputs = _norm_outputs(self.capture.graph, names)
        if outputs is None:
            site.reason = "not called in the traced forward"
            return site
        walk = WalkResult()
        for call_outputs in outputs.values():
            if len(call_outputs) != 1:
                site.reason = f"the module returns {len(call_outputs)} tensors; expected one"
                return site
            one = walk_from(call_outputs[0], spec.channel_dim)
            walk.uses += one.uses
            walk.blockers += one.blockers
            walk.bias_blockers += one.bias_blockers
            walk.sharing_breakers += one.sharing_breakers
            walk.exact_sharers += one.exact_sharers
        consumers, problems, consumer_nodes = self.consumers(walk)
        site.consumers = tuple(consumers)
        blockers = list(dict.fromkeys(walk.blockers + problems))
        if walk.sharing_breakers:
            site.reason = f"sharing would break: {walk.sharing_breakers[0]}"
            return site
        if not consumers and not walk.exact_sharers:
            site.reason = f"no Linear layer consumes its output (used by: {', '.join(blockers[:3]) or 'nothing'})"
            return site
        conflicts = self.weight_conflicts(walk, consumer_nodes)
        if conflicts and self.config.untie_embeddings and not blockers:
            site.reason = f"untie: {conflicts[0]}"
            conflicts = []
        # A shift moves into the consumers' biases only if every consumer has one and nothing on the
        # way (zero padding, a sum) treats the shift differently from the scale; otherwise the whole
        # affine stays in the norm (folding the scale alone would need the shift divided by it).
        shift_problem = []
        if spec.has_bias:
            no_bias = [c.module for c in consumers if c.bias is None]
            if no_bias:
                shift_problem = [f"{no_bias[0]} has no bias parameter to take the norm's shift"]
            shift_problem += walk.bias_blockers[:1]
        if not blockers and not conflicts and not shift_problem:
            site.action = "fold"
            site.fold_bias = spec.has_bias
            site.autocast_output = True
            site.already_folded = self._is_identity(module, spec)
            return site
        conflicts = conflicts + shift_problem
        why = (blockers + conflicts)[0]
        if not any(c.shares_output for c in consumers) and not walk.exact_sharers:
            site.reason = f"cannot fold ({why}) and no Linear receives the output itself, so nothing is shared"
            return site
        guard = self._weight_guard(module, spec)
        if guard:
            site.reason = guard
            return site
        site.action = "keep_affine"
        site.autocast_output = not blockers
        site.reason = f"affine kept in the norm: {why}"
        return site

    def _is_identity(self, module: nn.Module, spec: NormSpec) -> bool:
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        tensors = [t for t in (weight, bias) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "meta" for t in tensors):
            return False
        with torch.no_grad():
            if spec.has_weight and not torch.all(weight + spec.weight_offset == 1):
                return False
            if spec.has_bias and torch.any(bias != 0):
                return False
        return spec.has_weight or spec.has_bias

    def _weight_guard(self, module: nn.Module, spec: NormSpec) -> str:
        weight = getattr(module, "weight", None) if spec.has_weight else None
        if weight is None or weight.device.type == "meta":
            return ""
        smallest = (weight.detach().float() + spec.weight_offset).abs().min().item()
        if smallest < self.config.min_abs_weight:
            return (
                f"keeping the affine would divide by |weight| = {smallest:.2e} in backward "
                f"(< min_abs_weight={self.config.min_abs_weight}); left unconverted"
            )
        return ""


def _find_norms(model: nn.Module, config: ConvertConfig, plan: Plan) -> list[tuple[str, nn.Module, NormSpec]]:
    found, seen = [], set()
    for fqn, module in model.named_modules():
        if id(module) in seen or is_converted(module):
            continue
        seen.add(id(module))
        spec = classify_norm(module)
        if spec is None:
            if "norm" in type(module).__name__.lower() and not any(True for _ in module.children()):
                plan.notes.append(
                    f"{fqn} ({type(module).__name__}): not a LayerNorm/RMSNorm over one dim by behaviour; left as is"
                )
            continue
        if not _selected(config, module, fqn):
            plan.norms.append(
                NormSite(
                    module=fqn, kind=spec.kind, eps=spec.eps, weight=None, bias=None, reason="excluded by filter_fn"
                )
            )
            continue
        found.append((fqn, module, spec))
    return found


def _find_activations(model: nn.Module, config: ConvertConfig, plan: Plan) -> None:
    seen = set()
    for fqn, module in model.named_modules():
        if id(module) in seen or is_converted(module):
            continue
        seen.add(id(module))
        kind = classify_activation(module)
        if kind is None:
            continue
        site = ActivationSite(module=fqn, kind=kind)
        if not _selected(config, module, fqn):
            site.action, site.reason = "skip", "excluded by filter_fn"
        plan.activations.append(site)


def _functional_activations(capture: Capture, model: nn.Module, plan: Plan) -> None:
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


def plan_conversion(model: nn.Module, config: ConvertConfig | None = None, **overrides) -> Plan:
    """Analyse ``model`` and return the :class:`Plan`; the model is not changed.

    Works on models whose parameters live on the ``meta`` device (nothing is computed on weights).
    """
    config = resolve_config(config, overrides)
    plan = Plan()
    if config.activations:
        _find_activations(model, config, plan)
    if not config.norms:
        plan.capture = "not needed (norms disabled)"
        return plan
    norms = _find_norms(model, config, plan)
    if not norms:
        plan.capture = "not needed (no norm found)"
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
        return plan
    plan.capture = f"torch.export (non-strict, fake tensors), {capture.seconds:.1f} s"
    analyzer = _Analyzer(model, config, capture)
    module_names = _module_names(model)
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
    if config.activations:
        _functional_activations(capture, model, plan)
    return plan
