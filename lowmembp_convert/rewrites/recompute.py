"""The per-site activation planner and the exact ``recompute`` rewrite (docs/method.md section 7).

For each activation module the planner works out, from the captured graph, the bytes each option
keeps for backward on the example batch, counting storages (a view keeps its base alive):

- ``stock``: the activation keeps its input a; every user of h = act(a) that saves it keeps h (a
  gating ``mul`` keeps h and u; the consumer Linear keeps its input when its weight trains).
- ``approx`` (the paper's ReGELU2/ReSiLU2): a 2-bit code per element instead of a; the rest as stock.
- ``recompute``: where the graph proves ``consumer(act(a) [* u])`` with nothing else reading h (or
  the product), the consumer's backward rebuilds its input from a (and u): only a and u are kept.

The smallest wins, exact options on ties (stock, then recompute, then approx); a site where nothing
saves bytes stays stock. The rewrite itself is local to the module whose forward makes the call
(the *container*, e.g. ``LlamaMLP``): its forward is traced with torch.fx (children as leaves), the
``act -> [mul] -> consumer`` calls become one call of :func:`recompute_act_linear`, and the
container's class is swapped for a subclass with that forward. Module tree, parameter objects and
state_dict keys are unchanged; ``print(model)`` shows the rewrite in the container's line.
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef

from ..graph_calls import call_inputs, module_calls
from ..nn.handoff import HandoffLinear
from ..observers import hooked, note_switched_off
from ..ops.recompute import act_linear
from ..ops.recompute_module import BY_MODULE, module_act_linear
from ..transaction import no_side_effects, preserved_modes

aten = torch.ops.aten
OPTIONS = ("stock", "recompute", "approx")  # tie order: exact and untouched first
_IDENTITY_OPS = {aten.alias.default, aten.detach.default, aten.clone.default}


@dataclass
class Estimate:
    """Bytes kept for backward at one activation site, per option (example batch), and the proof."""

    bytes: dict[str, int] = field(default_factory=dict)
    recompute: RecomputeSite | None = None
    why_not_recompute: str = ""


@dataclass(frozen=True)
class RecomputeSite:
    """``container.consumer(container.activation(a) [* u])`` proven from the graph."""

    container: str  # fqn of the module whose forward is rewritten ("" for a hand-off)
    activation: str  # local name of the activation child (a hand-off: its fqn)
    consumer: str  # local name of the consumer child (a hand-off: its fqn)
    layout: str  # "linear", "conv1d" (transformers' Conv1D), "lora" (a PEFT LoRA layer) or "handoff"
    gated: bool


def _val(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else None


class _Storages:
    """A set of kept storages, each counted once at its full size."""

    def __init__(self) -> None:
        self._sizes: dict[object, int] = {}

    def add(self, t: torch.Tensor | None) -> None:
        if t is None:
            return
        try:
            key, size = StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without storage: count its elements
            key, size = ("tensor", id(t)), t.numel() * t.element_size()
        self._sizes[key] = size

    def add_bytes(self, key: object, size: int) -> None:
        self._sizes[key] = size

    @property
    def total(self) -> int:
        return sum(self._sizes.values())


def _single_user_chain(node: fx.Node) -> tuple[fx.Node | None, list[fx.Node]]:
    """Follow ``node`` through identity ops (alias, detach, dropout with p=0) while each has one user;
    returns (the first real user or None when there are several users, the identity nodes passed)."""
    chain = []
    while True:
        users = list(node.users)
        if len(users) != 1:
            return None, chain
        user = users[0]
        if user.op == "call_function" and (user.target in _IDENTITY_OPS or _is_identity_dropout(user)):
            chain.append(user)
            node = user
            continue
        return user, chain


def _is_identity_dropout(node: fx.Node) -> bool:
    if node.target not in (aten.dropout.default,):
        return False
    p = node.args[1] if len(node.args) > 1 else 0.5
    train = node.args[2] if len(node.args) > 2 else True
    return not p or not train


def _consumer_of(node: fx.Node) -> tuple[fx.Node, str, fx.Node] | None:
    """(the linear-like node, layout, its weight placeholder) when ``node`` is its input."""
    if node.op == "call_function" and node.target is aten.linear.default and node.args[0] is not None:
        return node, "linear", node.args[1]
    if node.op == "call_function" and node.target in (aten.view.default, aten.reshape.default):
        users = list(node.users)
        if len(users) == 1 and users[0].target is aten.addmm.default and users[0].args[1] is node:
            return users[0], "conv1d", users[0].args[2]
    return None


def _is_plain_linear(module: nn.Module, layout: str) -> bool:
    """A consumer whose forward is the stock one (a subclass overriding forward, a PEFT wrapper... is not)."""
    if layout == "linear":
        return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def estimate_site(
    model: nn.Module,
    graph: fx.Graph,
    names: set[str],
    state: set[fx.Node],
    param_of_placeholder: dict[str, str],
    needs_grad: set[fx.Node] | None = None,
    stock_keeps: tuple[bool, bool, float] = (True, False, 0.0),
) -> Estimate:
    """Bytes each option keeps at the activation module known under ``names``, and whether the
    graph proves the recompute pattern (one call, ``consumer(act(a) [* u])``, nothing else reading).

    ``needs_grad``: the nodes whose values require a gradient (:func:`grad_nodes`); an op keeps an
    input for backward only when the gradient it serves is needed. None: every node does.
    ``stock_keeps``: what the stock activation keeps (its input, its output, other tensors in
    multiples of its input's bytes), as measured by ``detect`` (torch's GELU/SiLU: the input only)."""

    def grad(node) -> bool:
        return needs_grad is None or node in needs_grad

    est = Estimate()
    stock, approx, recompute = _Storages(), _Storages(), _Storages()
    calls = module_calls(graph, names)
    if not calls:
        est.why_not_recompute = "not called in the traced forward"
        return est
    pattern: RecomputeSite | None = None
    reasons = []
    for index, (region, outputs) in enumerate(calls):
        inputs = call_inputs(region, state)
        if len(inputs) != 1 or len(outputs) != 1:
            reasons.append("the call does not map one tensor to one tensor")
            continue
        (a,), (h,) = tuple(inputs), outputs
        a_val, h_val = _val(a), _val(h)
        keeps_input, keeps_output, extra = stock_keeps
        if grad(a):  # the activation keeps its input (or its 2-bit code) only for da
            if keeps_input:
                stock.add(a_val)
            if keeps_output:
                stock.add(h_val)
            if extra and a_val is not None:
                stock.add_bytes(("intermediates", index), round(extra * a_val.numel() * a_val.element_size()))
            approx.add_bytes(("codes", index), math.ceil(a_val.numel() / 4) if a_val is not None else 0)
            recompute.add(a_val)
        user, _chain = _single_user_chain(h)
        lora = _lora_consumer(model, h, param_of_placeholder) if user is None else None
        if user is None and lora is None:  # several readers of h: each may keep it (as stock does)
            stock.add(h_val)
            approx.add(h_val)
            recompute.add(h_val)
            reasons.append(_peft_reader(model, h) or "its output has several readers")
            continue
        u_node = None
        p = h
        if user is not None and user.op == "call_function" and user.target is aten.mul.Tensor:
            other = user.args[1] if user.args[0] is h or user.args[0] in _chain else user.args[0]
            if isinstance(other, fx.Node) and _val(other) is not None and _val(other).shape == h_val.shape:
                u_node, p = other, user
                for kept in (stock, approx):
                    if grad(other):
                        kept.add(h_val)  # mul keeps h for du and u for dh
                    if grad(a):
                        kept.add(_val(other))
                if grad(a) or grad(other):
                    recompute.add(_val(other))
                user, _chain = _single_user_chain(user)
                lora = _lora_consumer(model, p, param_of_placeholder) if user is None else None
        if lora is not None:  # a PEFT LoRA layer reads p: its base Linear and (through casts) lora_A
            for kept in (stock, approx):
                for t in lora.kept:
                    kept.add(t)
            why = f"called {len(calls)} times in the forward" if len(calls) != 1 else ""
            container = _path(p) if u_node is not None else _common_parent(_path(h), lora.fqn)
            local = _children_of(container, _path(h), lora.fqn)
            if not why and local is None:
                why = "the activation and its consumer are not children of the module that calls them"
            if why:
                reasons.append(why)
                for t in lora.kept:
                    recompute.add(t)
                continue
            pattern = RecomputeSite(container, local[0], local[1], "lora", u_node is not None)
            continue
        consumer = _consumer_of(user) if user is not None else None
        p_kept = True
        if consumer is not None:
            node, layout, weight = consumer
            weight_fqn = param_of_placeholder.get(getattr(weight, "name", ""))
            if weight_fqn is not None and not model.get_parameter(weight_fqn).requires_grad:
                p_kept = False  # a frozen consumer keeps nothing of its input
        if p_kept:
            stock.add(_val(p))
            approx.add(_val(p))
        why = _recompute_blocker(model, consumer, len(calls), param_of_placeholder)
        if consumer is None and user is None:
            why = _peft_reader(model, p) or why
        if why:
            reasons.append(why)
            if p_kept:
                recompute.add(_val(p))
            continue
        node, layout, _weight = consumer
        container = _path(p) if u_node is not None else _common_parent(_path(h), _path(node))
        act_path, consumer_path = _path(h), _path(node)
        local = _children_of(container, act_path, consumer_path)
        if local is None and u_node is None and not _chain and layout == "linear" and act_path and consumer_path:
            # in different modules (BERT's intermediate / output): the activation hands its input over
            module = model.get_submodule(consumer_path)
            if type(module) in (nn.Linear, HandoffLinear):
                pattern = RecomputeSite("", act_path, consumer_path, "handoff", False)
                continue
        if local is None:
            reasons.append("the activation and its consumer are not children of the module that calls them")
            if p_kept:
                recompute.add(_val(p))
            continue
        pattern = RecomputeSite(container, local[0], local[1], layout, u_node is not None)
    if pattern is not None and not (grad(a) or (u_node is not None and grad(u_node))):
        # neither a nor u needs a gradient: the fused op runs the stock calls (it would keep a, u for
        # the consumer's weight gradient where stock keeps the one product)
        reasons.append("neither the activation's input nor the gating factor needs a gradient here")
    est.bytes = {"stock": stock.total, "approx": approx.total}
    if pattern is not None and not reasons:
        est.recompute = pattern
        est.bytes["recompute"] = recompute.total
    else:
        est.why_not_recompute = reasons[0] if reasons else "no consumer found"
    return est


def grad_nodes(graph: fx.Graph, model: nn.Module, param_of_placeholder: dict[str, str]) -> set[fx.Node]:
    """The nodes whose values require a gradient in training: downstream of a trainable parameter.
    The model's inputs are taken not to (a frozen prefix keeps nothing; a hook that makes them require
    one, as PEFT's enable_input_require_grads, only makes stock keep more)."""
    needs: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            fqn = param_of_placeholder.get(node.name)
            if fqn is not None and model.get_parameter(fqn).requires_grad:
                needs.add(node)
        elif node.op == "call_function" and any(n in needs for n in node.all_input_nodes):
            needs.add(node)
    return needs


def _recompute_blocker(model: nn.Module, consumer, n_calls: int, param_of_placeholder: dict[str, str]) -> str:
    if n_calls != 1:
        return f"called {n_calls} times in the forward"
    if consumer is None:
        return "its output does not go (alone, or through one gating multiply) into a Linear"
    node, layout, weight = consumer
    fqn = param_of_placeholder.get(getattr(weight, "name", ""))
    if fqn is None:
        return "the consumer multiplies by a computed weight"
    owner = fqn.rpartition(".")[0]
    module = model.get_submodule(owner) if owner else model
    if not _is_plain_linear(module, layout):
        kind = "PEFT-wrapped" if hasattr(module, "base_layer") or "lora" in type(module).__name__.lower() else "custom"
        return f"the consumer {owner} is {kind} ({type(module).__name__}), so its input path cannot be taken over"
    if _path(node) != owner:
        return "the consumer's weight belongs to another module"
    return ""


def _peft_reader(model: nn.Module, p: fx.Node) -> str:
    """The reason when every reader of ``p`` is inside one PEFT-wrapped layer (base + adapters)."""
    for user in p.users:
        path = _path(user) or ""
        while path:
            module = model.get_submodule(path)
            if hasattr(module, "base_layer"):
                from .adapter_inputs import lora_recompute_blocker

                why = lora_recompute_blocker(module) or "its input is also read by more than its Linears"
                return f"the consumer {path} is PEFT-wrapped ({type(module).__name__}) and {why}"
            path = path.rpartition(".")[0]
    return ""


@dataclass(frozen=True)
class _LoraConsumer:
    fqn: str  # the PEFT LoRA layer
    kept: tuple[torch.Tensor, ...]  # what stock keeps of its input: p for a trainable base, each cast for lora_A


def _lora_consumer(model: nn.Module, node: fx.Node, param_of_placeholder: dict[str, str]) -> _LoraConsumer | None:
    """The PEFT LoRA layer whose base Linear and lora_A Linears (directly or through one upcast each)
    are every reader of ``node``, when that layer qualifies for the fused recompute."""
    from .adapter_inputs import _CASTS, lora_recompute_blocker

    layer_fqn, kept = None, []
    for user in node.users:
        if user.op == "call_function" and user.target is aten._assert_tensor_metadata.default:
            continue  # export's check of a cast's input: reads nothing at run time
        cast = user.op == "call_function" and user.target in _CASTS
        for linear in list(user.users) if cast else [user]:
            source = user if cast else node
            if linear.op != "call_function" or linear.target is not aten.linear.default or linear.args[0] is not source:
                return None
            fqn = param_of_placeholder.get(getattr(linear.args[1], "name", ""))
            owner = fqn.rpartition(".")[0] if fqn else ""
            if owner.endswith(".base_layer") and not cast:
                layer = owner[: -len(".base_layer")]
            elif ".lora_A." in owner:
                layer = owner.rpartition(".lora_A.")[0]
            else:
                return None
            if layer_fqn not in (None, layer):
                return None
            layer_fqn = layer
            if model.get_parameter(fqn).requires_grad:
                kept.append(_val(source))
    if layer_fqn is None or lora_recompute_blocker(model.get_submodule(layer_fqn)):
        return None
    return _LoraConsumer(layer_fqn, tuple(t for t in kept if t is not None))


def _common_parent(a: str | None, b: str | None) -> str | None:
    if a is None or b is None:
        return None
    pa, pb = a.split("."), b.split(".")
    common = []
    for x, y in zip(pa[:-1], pb[:-1], strict=False):
        if x != y:
            break
        common.append(x)
    return ".".join(common)


def _children_of(container: str | None, act: str | None, consumer: str | None) -> tuple[str, str] | None:
    if container is None or act is None or consumer is None:
        return None
    prefix = f"{container}." if container else ""
    local_act, local_consumer = act[len(prefix) :], consumer[len(prefix) :]
    if not (act.startswith(prefix) and consumer.startswith(prefix)) or "." in local_act or "." in local_consumer:
        return None
    return local_act, local_consumer


# --------------------------------------------------------------------------------------------------
# The rewrite: the container's forward, traced with its children as leaves
# --------------------------------------------------------------------------------------------------


class _ChildrenAsLeaves(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


class ImpureForward(Exception):
    """The container's forward changes state when it runs: a traced rewrite would not."""


def _trace(container: nn.Module) -> fx.Graph:
    """The container's forward graph. torch.fx runs the forward's Python on proxies: a forward that
    changes its own state (a counter buffer updated in place, an attribute re-bound) would do so here,
    for real, once, and the traced graph would not do it at all. Such a forward raises ImpureForward;
    what tracing changed is put back either way (``no_side_effects``)."""
    buffers = {name: (b, b._version) for name, b in container.named_buffers()}
    attributes = {k: v for k, v in vars(container).items() if not isinstance(v, dict)}
    with no_side_effects(container):
        graph = _ChildrenAsLeaves().trace(container)
        changed = [n for n, (b, version) in buffers.items() if b._version != version]
        now = dict(container.named_buffers())
        changed += [n for n, (b, _v) in buffers.items() if now.get(n) is not b]
        own = vars(container)
        changed += [k for k, v in attributes.items() if own.get(k, v) is not v]
    if changed:
        names = ", ".join(sorted(set(changed)))
        raise ImpureForward(
            f"{type(container).__name__}.forward changes its own state when it runs ({names}); "
            "a traced rewrite would drop that"
        )
    return graph


def recompute_act_linear(
    a: torch.Tensor,
    u: torch.Tensor | None,
    act: nn.Module,
    between: tuple[nn.Module, ...],
    consumer: nn.Module,
    kind: str,
    layout: str,
    stamp: str,
) -> torch.Tensor:
    """What a rewritten container calls in place of ``consumer(*between(act(a) [* u]))``.

    The fused op runs only while the modules are what the rewrite proved: the consumer a stock
    Linear / Conv1D, the modules in between still identities, the activation unchanged (``stamp``),
    and no hook on any of them (a hook registered after converting must run). Otherwise the stock
    calls run, in the stock order: exact, as stock, without the saving.
    """
    # only weights needing gradients: the fused op would keep a and u where stock keeps the product
    needs_input_grad = a.requires_grad or (u is not None and u.requires_grad)
    layout = _runtime_layout(consumer, layout)
    if needs_input_grad and _fused_applies(a, u, act, between, consumer, layout, stamp, kind):
        if layout == "lora":
            return _lora_act_linear(a, u, consumer, kind, act)
        return _fused(a, u, act, consumer.weight, consumer.bias, kind, layout)
    if not torch.compiler.is_compiling() and hooked(act, *between, consumer):
        note_switched_off(f"{type(act).__name__} -> {type(consumer).__name__}")
    p = act(a)
    if u is not None:
        p = p * u
    for module in between:
        p = module(p)
    return consumer(p)


def _runtime_layout(consumer: nn.Module, layout: str) -> str:
    """A Linear consumer that PEFT wrapped after converting (``get_peft_model`` on a converted model)
    is served by the LoRA route, which re-checks at each call that the wrapper is a vanilla LoRA layer
    over a plain Linear (``lora_runtime_modules``); anything else runs the stock calls."""
    if layout == "linear" and not _is_plain_linear(consumer, layout) and hasattr(consumer, "base_layer"):
        if not torch.compiler.is_compiling():
            _hint_convert_again(consumer)
        return "lora"
    return layout


_HINTED: set[type] = set()


def _hint_convert_again(layer: nn.Module) -> None:
    """Once per PEFT layer class: adapters added after convert() keep PEFT's upcast copy of their input
    (wider adapters over a narrower model) until convert() runs on the PeftModel."""
    lora_a = getattr(layer, "lora_A", None)
    plain = isinstance(lora_a, nn.ModuleDict) and any(type(m) is nn.Linear for m in lora_a.values())
    if not plain or type(layer) in _HINTED:
        return
    base = getattr(layer, "base_layer", None)
    if base is None or all(m.weight.dtype == base.weight.dtype for m in lora_a.values()):
        return  # no upcast to spare
    _HINTED.add(type(layer))
    warnings.warn(
        "lowmembp_convert: PEFT adapters were added after convert(); the recomputed MLPs serve them, "
        "but each adapter still keeps a float32 copy of its input. Call lowmembp_convert.convert() on "
        "the PeftModel (again) to keep those inputs narrow too; it is exact and picks up every adapter.",
        stacklevel=4,
    )


def _fused_applies(
    a: torch.Tensor,
    u: torch.Tensor | None,
    act: nn.Module,
    between: tuple[nn.Module, ...],
    consumer: nn.Module,
    layout: str,
    stamp: str,
    kind: str = "",
) -> bool:
    """The modules are still what the rewrite proved: the consumer a stock Linear / Conv1D (or a
    vanilla PEFT LoRA layer), identities in between, the same activation, no hook on any of them.
    A recompute by the module itself runs in eager mode only (compiled or under ``torch.func``: stock)."""
    if kind == BY_MODULE and (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()):
        return False
    if layout == "lora":
        from .adapter_inputs import lora_runtime_modules

        p_dtype = a.dtype if u is None else torch.promote_types(a.dtype, u.dtype)
        modules = lora_runtime_modules(consumer, p_dtype)
    else:
        modules = [consumer] if _is_plain_linear(consumer, layout) else None
    if modules is None or hooked(act, *between, *modules):
        return False
    if not all(_is_identity_module(m) for m in between):
        return False
    if torch.compiler.is_compiling():
        return type(act).__qualname__ == stamp.partition("|")[0]
    return activation_stamp(act) == stamp


def _fused(a, u, act: nn.Module, weight, bias, kind: str, layout: str = "linear", in_dtype=None) -> torch.Tensor:
    if kind == BY_MODULE:
        return module_act_linear(a, u, act, weight, bias, layout, in_dtype)
    return act_linear(a, u, weight, bias, kind, layout, in_dtype=in_dtype)


def _lora_act_linear(
    a: torch.Tensor, u: torch.Tensor | None, layer: nn.Module, kind: str, act: nn.Module
) -> torch.Tensor:
    """PEFT's vanilla LoRA forward on p = act(a) [* u], each Linear through the fused op (keeping a, u):
    ``base(p) + sum(lora_B(lora_A(p.to(A.dtype))) * scaling)``, cast back to the base result's dtype."""
    base = layer.base_layer
    result = _fused(a, u, act, base.weight, base.bias, kind)
    result_dtype = result.dtype
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        lora_a = layer.lora_A[name]
        h = _fused(a, u, act, lora_a.weight, lora_a.bias, kind, in_dtype=lora_a.weight.dtype)
        result = result + layer.lora_B[name](h) * layer.scaling[name]
    return result.to(result_dtype)


def activation_stamp(module: nn.Module) -> str:
    """The activation's class and public plain attributes: what its behaviour was proven for."""
    attrs = sorted((k, repr(v)) for k, v in vars(module).items() if not k.startswith("_") and k != "training")
    return f"{type(module).__qualname__}|{attrs}"


_STATE_SKIP = frozenset({"training", "_parameters", "_buffers", "_modules", "forward"})


def _traced_reads(container: nn.Module) -> tuple[fx.Graph, tuple[str, ...]]:
    """The container's forward traced, and the names of its own plain attributes the trace read:
    torch.fx bakes their values into the graph (``self.scale``, ``self.config.pretraining_tp``)."""
    base, reads = type(container), set()

    def __getattribute__(self, name):
        if not name.startswith("__"):
            reads.add(name)
        return base.__getattribute__(self, name)

    container.__class__ = type(base.__name__, (base,), {"__getattribute__": __getattribute__})
    try:
        graph = _trace(container)
    finally:
        container.__class__ = base
    own = vars(container)
    names = tuple(sorted(n for n in reads if n in own and n not in _STATE_SKIP and not n.startswith("_")))
    return graph, names


def _value_stamp(value) -> object:
    if isinstance(value, (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)):
        return (type(value), value)
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(_value_stamp(v) for v in value))
    if isinstance(value, (nn.Module, torch.Tensor)) or not hasattr(value, "__dict__"):
        return ("id", id(value))
    # a config-like object: its plain attributes by value (one level)
    return ("obj", id(value), tuple(sorted((k, repr(v)) for k, v in vars(value).items() if not k.startswith("_"))))


def container_state(container: nn.Module, names: tuple[str, ...]) -> tuple:
    """What the traced forward assumed of the container's own attributes (see :func:`_traced_reads`)."""
    own = vars(container)
    return tuple((n, _value_stamp(own.get(n, _MISSING))) for n in names)


_MISSING = object()


def _rewritten_graph(container: nn.Module, sites: list[tuple[RecomputeSite, str]]) -> tuple[fx.Graph | None, str]:
    """The container's forward graph with every site replaced by the fused call, or (None, why not)."""
    graph, reads_or_why = _rewritten_graph_and_reads(container, sites)
    return (None, reads_or_why) if graph is None else (graph, "")


def _rewritten_graph_and_reads(container: nn.Module, sites: list[tuple[RecomputeSite, str]]):
    """(graph, names of the attributes it read) or (None, why not)."""
    try:
        graph, reads = _traced_reads(container)
        code = graph.python_code("self").src
        with preserved_modes(container):
            container.train(not container.training)
            other = _trace(container).python_code("self").src
    except ImpureForward as exc:
        return None, str(exc)
    except Exception as exc:  # any tracing failure: this container stays as it is
        return None, f"{type(container).__name__}.forward cannot be traced by torch.fx ({type(exc).__name__})"
    if code != other:
        return None, f"{type(container).__name__}.forward depends on train/eval mode"
    for site, kind in sites:
        why = _replace_pattern(graph, container, site, kind)
        if why:
            return None, why
    graph.lint()
    return graph, reads


def check_container(container: nn.Module, sites: list[tuple[RecomputeSite, str]]) -> str:
    """Why the rewrite of ``container`` at ``sites`` cannot be done ("" when it can). Changes nothing."""
    return _rewritten_graph(container, sites)[1]


def rewrite_container(container: nn.Module, sites: list[tuple[RecomputeSite, str]]) -> None:
    """Swap ``container``'s class for a subclass whose forward calls the fused op at ``sites``
    ((site, activation kind) pairs), keeping every child, parameter and attribute."""
    graph, reads = _rewritten_graph_and_reads(container, sites)
    if graph is None:
        raise RuntimeError(f"recompute rewrite of {type(container).__name__}: {reads}")
    code = graph.python_code("self")
    namespace = dict(code.globals)
    exec(compile(code.src, f"<lowmembp recompute {type(container).__name__}>", "exec"), namespace)  # noqa: S102
    base = type(container)
    fused_forward, assumed = namespace["forward"], container_state(container, reads)

    def forward(self, *args, **kwargs):
        # the traced forward baked in the attributes it read: if one changed since, run the stock
        # forward (exact, without the saving) rather than the old values
        if reads and container_state(self, reads) != assumed:
            return base.forward(self, *args, **kwargs)
        return fused_forward(self, *args, **kwargs)

    note = ", ".join(f"{s.consumer} recomputes {s.activation}" + (" x gate" if s.gated else "") for s, _ in sites)

    def extra_repr(self) -> str:
        own = base.extra_repr(self)
        return f"{own}, lowmembp: {note}" if own else f"lowmembp: {note}"

    def __reduce_ex__(self, protocol):
        # pickle / deepcopy by the importable base class and the sites; loading rewrites again
        return (_restore, (base, self.__getstate__(), tuple(sites)))

    attributes = {"forward": forward, "extra_repr": extra_repr, "__module__": base.__module__}
    attributes["lowmembp_recompute"] = tuple(s for s, _ in sites)
    attributes["__reduce_ex__"] = __reduce_ex__
    container.__class__ = type(base.__name__, (base,), attributes)


def _restore(base: type, state: dict, sites: tuple) -> nn.Module:
    """Unpickle a rewritten container: the stock class with its state, rewritten again."""
    module = base.__new__(base)
    module.__setstate__(state)
    rewrite_container(module, list(sites))
    return module


def _replace_pattern(graph: fx.Graph, container: nn.Module, site: RecomputeSite, kind: str) -> str:
    act = [n for n in graph.nodes if n.op == "call_module" and n.target == site.activation]
    if len(act) != 1 or len(act[0].args) != 1:
        return f"{site.activation} is not called once with one argument in {type(container).__name__}.forward"
    act = act[0]
    users = list(act.users)
    node, u, dead = act, None, [act]
    if site.gated:
        if len(users) != 1 or users[0].op != "call_function" or users[0].target not in (torch.mul, operator.mul):
            return "the gating multiply is not where the graph had it"
        mul = users[0]
        u = mul.args[1] if mul.args[0] is act else mul.args[0]
        node, dead = mul, [act, mul]
        users = list(mul.users)
    while len(users) == 1 and users[0].op == "call_module" and _is_identity_child(container, users[0].target):
        node = users[0]
        dead.append(node)
        users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module" or users[0].target != site.consumer:
        return (
            f"{site.consumer} does not directly take {site.activation}'s output in {type(container).__name__}.forward"
        )
    consumer = users[0]
    between = [n for n in dead if n.op == "call_module" and n is not act]
    with graph.inserting_before(consumer):
        act_module = graph.get_attr(site.activation)
        between_modules = tuple(graph.get_attr(n.target) for n in between)
        module = graph.get_attr(site.consumer)
        stamp = activation_stamp(container.get_submodule(site.activation))
        fused = graph.call_function(
            recompute_act_linear,
            (act.args[0], u, act_module, between_modules, module, kind, site.layout, stamp),
        )
    consumer.replace_all_uses_with(fused)
    for n in [consumer, *reversed(dead)]:
        graph.erase_node(n)
    return ""


def _is_identity_child(container: nn.Module, target: str) -> bool:
    return _is_identity_module(container.get_submodule(target))


def _is_identity_module(module: nn.Module) -> bool:
    return type(module) is nn.Identity or (type(module) is nn.Dropout and module.p == 0)
