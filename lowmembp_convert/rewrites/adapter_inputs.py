"""PEFT LoRA adapters wider than their input: lora_A keeps the narrow input, not PEFT's upcast copy.

PEFT keeps adapters in float32 on a bf16/fp16 model (``autocast_adapter_dtype=True``, its default)
and upcasts the layer's input in the wrapper's forward (``_cast_input_dtype``) before ``lora_A``,
which then keeps that copy for its weight gradient: twice the bytes of the input, per adapted layer,
while the narrow input itself is kept anyway (by the memory-sharing norm before it). Measured on the
LLaMA LoRA q,v row of ``bench/cpu_memory.py``, those copies were the whole gap between fp32 and bf16
adapters.

The rewrite: each such ``lora_A`` (a plain ``nn.Linear``) becomes an :class:`UpcastInputLinear` (same
object, same Parameters) that upcasts inside one op keeping the narrow input
(:func:`lowmembp_convert.ops.recompute.upcast_linear`), and the PEFT layer's class gets a subclass
whose ``_cast_input_dtype`` hands the input over uncast. The upcast is exact, so forward values and
gradients are the stock ones.

Why PEFT by name: the cast happens inside a wrapper forward full of Python control flow (merged,
disabled, mixed batches, DoRA and other variants) that cannot be re-traced safely; PEFT routes it
through one method. The graph proves the pattern at convert time (the upcast feeds only lora_A), and
the override re-checks at every call that every active adapter is a vanilla one with no dropout and
a converted lora_A; otherwise it casts as stock.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from ..capture import Capture
from ..nn.linear import UpcastInputLinear
from ..observers import hooked
from ..ops.recompute import exact_upcast
from ..plan import AdapterSite, Plan
from .pipeline import ApplyOptions, Context, Stage

aten = torch.ops.aten
_CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout}


def _peft_lora_linear() -> type | None:
    try:
        from peft.tuners.lora.layer import Linear
    except Exception:  # peft missing or broken: no PEFT layer to find
        return None
    return Linear


def _is_plain_peft_linear(module: nn.Module, lora_linear: type) -> bool:
    """A PEFT LoRA Linear whose forward and cast method are PEFT's own (a subclass may change either)."""
    cls = type(module)
    if getattr(cls, "lowmembp_adapter_inputs", False):
        cls = cls.__mro__[1]
    return (
        isinstance(module, lora_linear)
        and cls.forward is lora_linear.forward
        and cls._cast_input_dtype is lora_linear._cast_input_dtype
        and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
    )


def find_adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every PEFT LoRA Linear in ``model`` (first name of each), without a graph."""
    lora_linear = _peft_lora_linear()
    if lora_linear is None:
        return []
    seen, found = set(), []
    for fqn, module in model.named_modules(remove_duplicate=False):
        if id(module) not in seen and _is_plain_peft_linear(module, lora_linear):
            seen.add(id(module))
            found.append((fqn, module))
    return found


def _val(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _adapter_blocker(layer: nn.Module, name: str) -> str:
    lora_a = layer.lora_A[name]
    if type(lora_a) is not nn.Linear:
        return f"its lora_A is a {type(lora_a).__name__}, not an nn.Linear"
    if name in getattr(layer, "lora_variant", {}):
        return f"adapter {name!r} is a {type(layer.lora_variant[name]).__name__} variant, which reads the upcast input"
    dropout = layer.lora_dropout[name] if name in layer.lora_dropout else None
    if type(dropout) is not nn.Identity:
        return f"adapter {name!r} has lora_dropout ({type(dropout).__name__}), which would run in the narrow dtype"
    return ""


def plan_adapter_inputs(model: nn.Module, plan: Plan, capture: Capture, config) -> None:
    """Find each PEFT layer whose lora_A reads an exact upcast of the layer input, and nothing else does."""
    layers = find_adapter_layers(model)
    if not layers:
        return
    fqn_of_weight = {}
    for fqn, layer in layers:
        for name, lora_a in layer.lora_A.items():
            fqn_of_weight[id(lora_a.weight)] = (fqn, name)
    by_param = {fqn: model.get_parameter(fqn) for fqn in set(capture.param_of_placeholder.values())}
    reads: dict[str, list[tuple[str, fx.Node]]] = {}
    for node in capture.graph.nodes:
        if node.op != "call_function" or node.target is not aten.linear.default:
            continue
        weight = node.args[1]
        param = by_param.get(capture.param_of_placeholder.get(getattr(weight, "name", ""), ""))
        if param is not None and id(param) in fqn_of_weight:
            fqn, name = fqn_of_weight[id(param)]
            reads.setdefault(fqn, []).append((name, node))
    # lora_A layers that receive an MS norm's output itself, which the norm emits in the autocast dtype
    # under autocast: there PEFT upcasts it to the adapters' dtype and autocast casts it back
    autocast_fed = {
        c.module for s in plan.norms if s.action != "skip" and s.autocast_output for c in s.consumers if c.shares_output
    }
    recomputed = {  # PEFT layers that consume an exact MLP recompute: they keep nothing of their input
        f"{r.container}.{r.consumer}" if r.container else r.consumer
        for a in plan.activations
        if a.action == "convert" and a.option == "recompute" and (r := a.recompute) is not None and r.layout == "lora"
    }
    for fqn, layer in layers:
        if config.filter_fn is not None and not config.filter_fn(layer, fqn):
            continue
        site = _plan_layer(fqn, layer, reads.get(fqn, []), autocast_fed)
        if site is not None and fqn in recomputed:
            site.action, site.estimate = "skip", {}
            site.reason = "its input is rebuilt by the exact MLP recompute, which keeps no copy of it"
        if site is not None:
            plan.adapters.append(site)


def _plan_layer(
    fqn: str, layer: nn.Module, reads: list[tuple[str, fx.Node]], autocast_fed: set[str]
) -> AdapterSite | None:
    site = AdapterSite(module=fqn)
    stock = share = 0
    names = []
    under_autocast = False
    lora_linears = {n for _, n in reads}
    counted: set[fx.Node] = set()  # one upcast read by several adapters is one copy
    for name, linear in reads:
        x32 = linear.args[0]
        if x32.op == "call_function" and x32.target is aten.dropout.default:
            x32 = x32.args[0]  # lora_dropout between the cast and lora_A: the blocker below says so
        val32 = _val(x32)
        if x32.op != "call_function" or x32.target not in _CASTS or val32 is None:
            if f"{fqn}.lora_A.{name}" in autocast_fed and val32 is not None and val32.dtype == torch.float32:
                # no cast in the captured graph, but one under autocast: the norm emits e.g. bf16
                why = _adapter_blocker(layer, name)
                if why:
                    site.reason = why
                    return site
                if layer.lora_A[name].weight.requires_grad:
                    stock += val32.numel() * 2  # autocast's own 16-bit copy
                names.append(name)
                under_autocast = True
            continue  # otherwise lora_A reads no cast (adapters in the input's dtype): nothing to do
        source = _val(x32.args[0])
        if source is None or not exact_upcast(source.dtype, val32.dtype) or source.shape != val32.shape:
            continue
        why = _adapter_blocker(layer, name)
        if why:
            site.reason = why
            return site
        if not all(u in lora_linears and u.args[0] is x32 for u in x32.users):
            site.reason = f"the upcast input of {name!r} is read by more than its lora_A layers"
            return site
        if layer.lora_A[name].weight.requires_grad and x32 not in counted:
            counted.add(x32)
            stock += val32.numel() * val32.element_size()
            share += source.numel() * source.element_size()
        names.append(name)
    if not names:
        return None  # no upcast in this layer: not a site
    site.adapters = tuple(dict.fromkeys(names))
    site.estimate = {"stock": stock, "share": share}
    if under_autocast:
        site.reason = (
            "under autocast: the MS norm before it emits the 16-bit output that lora_A then keeps, instead of the "
            "copy PEFT's upcast and autocast's cast back make (estimate for a 16-bit autocast dtype)"
        )
    if not stock:
        site.reason = "its lora_A layers are frozen, so they keep nothing of their input"
        return site
    site.action = "share"
    return site


# --------------------------------------------------------------------------------------------------
# Apply
# --------------------------------------------------------------------------------------------------


def _cast_input_dtype_of(base: type):
    stock = base._cast_input_dtype

    def _cast_input_dtype(self, x, dtype: torch.dtype):
        """PEFT's cast, skipped when every active adapter's lora_A upcasts inside (checked at each call)."""
        if (
            isinstance(x, torch.Tensor)
            and getattr(self, "cast_input_dtype_enabled", True)
            and exact_upcast(x.dtype, dtype)
            and _adapters_upcast_inside(self, x.dtype, dtype)
        ):
            return x
        return stock(self, x, dtype)  # the base class's own: a later subclass on top must not loop

    return _cast_input_dtype


def _adapters_upcast_inside(layer: nn.Module, x_dtype: torch.dtype, dtype: torch.dtype) -> bool:
    """Every active adapter is a vanilla one (as the recompute needs: :func:`lora_runtime_modules`)
    whose lora_A is a converted one of ``dtype``, with no hook or wrapped forward on lora_A or its
    dropout (they would see what PEFT hands them: the upcast)."""
    modules = lora_runtime_modules(layer, x_dtype, any_base=True)
    if modules is None or hooked(*modules[2:]):  # [layer, base_layer, lora_A, dropout, ...]
        return False
    active = [layer.lora_A[n] for n in layer.active_adapters if n in layer.lora_A]
    return all(type(a) is UpcastInputLinear and a.weight.dtype == dtype for a in active)


_SUBCLASSES: dict[type, type] = {}


def _subclass(base: type) -> type:
    if base not in _SUBCLASSES:

        def __reduce_ex__(self, protocol):
            # pickle / deepcopy by the importable PEFT class; loading converts again
            return (_restore, (base, self.__getstate__()))

        _SUBCLASSES[base] = type(
            base.__name__,
            (base,),
            {
                "_cast_input_dtype": _cast_input_dtype_of(base),
                "__reduce_ex__": __reduce_ex__,
                "__module__": base.__module__,
                "lowmembp_adapter_inputs": True,
            },
        )
    return _SUBCLASSES[base]


def _restore(base: type, state: dict) -> nn.Module:
    module = base.__new__(base)
    module.__setstate__(state)
    module.__class__ = _subclass(base)
    return module


def apply_adapter_inputs(model: nn.Module, plan: Plan) -> None:
    """Carry out the ``share`` sites of ``plan``: lora_A upcasts inside, the layer stops casting."""
    for site in plan.adapters:
        if site.action != "share":
            continue
        layer = model.get_submodule(site.module)
        for name in site.adapters:
            layer.lora_A[name].__class__ = UpcastInputLinear
        if not getattr(type(layer), "lowmembp_adapter_inputs", False):
            layer.__class__ = _subclass(type(layer))


# --------------------------------------------------------------------------------------------------
# A PEFT LoRA layer as the consumer of the exact MLP recompute (rewrites/recompute.py)
# --------------------------------------------------------------------------------------------------


def lora_recompute_blocker(layer: nn.Module) -> str:
    """Why the recompute cannot take ``layer`` (a PEFT LoRA Linear) as its consumer ("" when it can):
    it must be PEFT's own class over a plain nn.Linear, with vanilla, dropout-free adapters."""
    lora_linear = _peft_lora_linear()
    if lora_linear is None or not _is_plain_peft_linear(layer, lora_linear):
        return f"{type(layer).__name__} is not PEFT's LoRA Linear"
    if type(layer.base_layer) is not nn.Linear:
        return f"its base layer is a {type(layer.base_layer).__name__}"
    if layer.merged:
        return "its adapters are merged"
    for name in layer.lora_A:
        if type(layer.lora_A[name]) not in (nn.Linear, UpcastInputLinear):
            return f"its lora_A is a {type(layer.lora_A[name]).__name__}"
        why = _adapter_blocker(layer, name) if type(layer.lora_A[name]) is nn.Linear else ""
        if why:
            return why
    return ""


def lora_runtime_modules(layer: nn.Module, p_dtype: torch.dtype, any_base: bool = False) -> list[nn.Module] | None:
    """The modules whose hooks would run in PEFT's forward of ``layer`` on an input of ``p_dtype``, when
    that forward is the vanilla one the recompute reproduces; None when it is not (merged or disabled
    adapters, a variant, dropout, casting switched off, a cast that is not an exact upcast...)."""
    lora_linear = _peft_lora_linear()
    if lora_linear is None or not _is_plain_peft_linear(layer, lora_linear):
        return None
    if layer.merged or layer.disable_adapters or not getattr(layer, "cast_input_dtype_enabled", True):
        return None
    base = layer.base_layer
    if type(base) is not nn.Linear and not any_base:  # the recompute calls the base's weight itself
        return None
    modules = [layer, base]
    variants = getattr(layer, "lora_variant", {})
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        lora_a, dropout = layer.lora_A[name], layer.lora_dropout[name]
        dtype = lora_a.weight.dtype
        if name in variants or type(lora_a) not in (nn.Linear, UpcastInputLinear) or type(dropout) is not nn.Identity:
            return None
        if dtype != p_dtype and not exact_upcast(p_dtype, dtype):
            return None
        modules += [lora_a, dropout]
    return modules


# --------------------------------------------------------------------------------------------------
# The stage (rewrites.pipeline)
# --------------------------------------------------------------------------------------------------


def _find_stage(ctx: Context) -> bool:
    ctx.found["adapter_inputs"] = bool(ctx.config.adapter_inputs and find_adapter_layers(ctx.model))
    return ctx.found["adapter_inputs"]


def _plan_stage(ctx: Context) -> None:
    if not ctx.found.get("adapter_inputs"):
        return
    if ctx.capture is None:
        ctx.plan.notes.append("PEFT adapter inputs left as they are: the graph that proves the rewrite is missing")
        return
    plan_adapter_inputs(ctx.model, ctx.plan, ctx.capture, ctx.config)


def _apply_stage(model: nn.Module, plan: Plan, options: ApplyOptions) -> list[str]:
    apply_adapter_inputs(model, plan)
    return []


def _summary(plan: Plan) -> list[str]:
    if not plan.adapters:
        return []
    shared = sum(s.action == "share" for s in plan.adapters)
    return [
        f"  PEFT adapter inputs: {shared} layer(s) hand lora_A the narrow input, which it "
        f"keeps instead of an upcast copy, {sum(s.action == 'skip' for s in plan.adapters)} skipped"
    ]


STAGE = Stage(
    name="adapter_inputs",
    find=_find_stage,
    plan=_plan_stage,
    apply=_apply_stage,
    summary=_summary,
    converted=lambda plan: sum(s.action == "share" for s in plan.adapters),
)
