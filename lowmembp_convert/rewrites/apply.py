"""Apply a :class:`Plan` to the user's model, in place.

Only submodules are swapped and parameters edited in place (``param.data`` keeps its identity, so an
optimizer or PEFT wrapper built earlier still points at the right tensors); the model keeps its class
and every method (``save_pretrained``, ``generate``, timm's ``forward_features``...).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..naming import param_names
from ..nn.activations import ReGELU2, ReSiLU2
from ..nn.handoff import HandoffActivation, HandoffLinear, link
from ..nn.linear import TwinLinear
from ..nn.norms import FoldedNormsGuard, FoldWatch, MSLayerNorm, MSRMSNorm
from ..plan import ActivationSite, NormSite, Plan
from .folding import fold_affine_into
from .norms import module_hooks
from .pipeline import ApplyOptions
from .planner import recompute_kind
from .recompute import rewrite_container


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> int:
    """Point every parent that holds ``old`` (under any name) at ``new``; returns how many."""
    count = 0
    for parent in model.modules():
        for name, child in list(parent._modules.items()):
            if child is old:
                parent._modules[name] = new
                count += 1
    return count


def _untie(model: nn.Module, module_fqn: str, local: str) -> str:
    """Give ``module_fqn.local`` its own copy of a weight it shares with other layers."""
    module = model.get_submodule(module_fqn)
    shared = getattr(module, local)
    setattr(module, local, nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad))
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
    return f"untied {module_fqn}.{local} from the weight it shared (config.tie_word_embeddings=False)"


def _fold_site(model: nn.Module, site: NormSite, untie: bool, notes: list[str]) -> None:
    norm = model.get_submodule(site.module)
    weight = getattr(norm, "weight", None) if site.weight else None
    bias = getattr(norm, "bias", None) if site.bias else None
    gamma = None if weight is None else weight.detach() + site.weight_offset
    beta = bias.detach() if bias is not None else None  # a fold moves the whole affine
    shared = _shared_param_ids(model) if untie else set()
    folded: set[object] = set()  # each weight storage is folded once, however often the forward reaches it
    for consumer in site.consumers:
        module = model.get_submodule(consumer.module)
        local_w = consumer.weight.rpartition(".")[2]
        if id(getattr(module, local_w)) in shared:
            notes.append(_untie(model, consumer.module, local_w))
        w = getattr(module, local_w)
        b = model.get_parameter(consumer.bias) if consumer.bias else None
        key = (w.untyped_storage().data_ptr(), w.storage_offset(), w.device)
        if key in folded:
            continue
        folded.add(key)
        new_w, new_b = fold_affine_into(w, b, gamma, beta, consumer.layout, consumer.groups)
        with torch.no_grad():
            w.copy_(new_w)
            if b is not None and new_b is not None:
                b.copy_(new_b)


def _shared_param_ids(model: nn.Module) -> set[int]:
    return {pid for pid, names in param_names(model).items() if len(names) > 1}


def _ms_norm_for(norm: nn.Module, site: NormSite, min_abs_weight: float, autocast_twin: bool = False) -> nn.Module:
    cls = MSLayerNorm if site.kind == "layer_norm" else MSRMSNorm
    weight = getattr(norm, "weight", None) if site.weight else None
    bias = getattr(norm, "bias", None) if site.bias else None
    size = (weight if weight is not None else bias).shape[0] if (weight is not None or bias is not None) else None
    if size is None:
        size = int(norm.normalized_shape[0])
    keep = site.action == "keep_affine"
    ms = cls(
        size,
        site.eps,
        weight=weight,
        bias=bias,
        affine_weight=keep and weight is not None,
        affine_bias=keep and bias is not None,
        weight_offset=site.weight_offset,
        channel_dim=site.channel_dim,
        autocast_output=site.autocast_output,
        autocast_twin=autocast_twin,
        min_abs_weight=min_abs_weight if keep else 0.0,
    )
    ms.train(norm.training)
    _keep_attributes(norm, ms)
    return ms


def _twin_linears(model: nn.Module, site: NormSite, notes: list[str]) -> int:
    """Post-norm under autocast: the residual needs the norm output in full precision, so the norm
    keeps it and saves its autocast-dtype twin instead; each nn.Linear receiving the output (or a view
    of it) becomes a TwinLinear (same Parameters) that reads that twin rather than saving its own cast.
    Returns how many consumers read the twin (0: the norm makes none)."""
    readers = 0
    for consumer in site.consumers:
        if not (consumer.shares_output and consumer.layout == "linear"):
            continue
        linear = model.get_submodule(consumer.module)
        if isinstance(linear, TwinLinear):
            readers += 1
            continue
        why = ""
        if type(linear) is not nn.Linear:
            why = f"it is a {type(linear).__name__}, not an nn.Linear"
        elif module_hooks(linear):
            why = f"it has {', '.join(module_hooks(linear))} registered on it; a swap would drop them"
        if why:
            notes.append(f"{consumer.module} saves its own autocast cast of {site.module}'s output: {why}")
            continue
        twin_linear = TwinLinear.from_linear(linear)
        _keep_attributes(linear, twin_linear)
        replace_module(model, linear, twin_linear)
        readers += 1
        _count_twin_linear(notes, consumer.module)
    return readers


_TWIN_NOTE = "Linear layer(s) fed by a post-norm MS norm became TwinLinear"


def _count_twin_linear(notes: list[str], fqn: str) -> None:
    """One report note for all TwinLinear swaps, counting them, with the first as the example."""
    for i, note in enumerate(notes):
        count, _, rest = note.partition(" ")
        if rest.startswith(_TWIN_NOTE):
            notes[i] = f"{int(count) + 1} {rest}"
            return
    notes.append(
        f"1 {_TWIN_NOTE} (e.g. {fqn}): the same Parameters; under autocast each reads the low-precision twin "
        "its norm saved instead of saving a cast of its own"
    )


# private flags libraries set on modules and read later: transformers' weight initialisation skips a
# module marked initialised (else resize_token_embeddings / init_weights could re-initialise it)
_KEPT_PRIVATE = ("_is_hf_initialized",)


def _keep_attributes(old: nn.Module, new: nn.Module) -> None:
    """Public plain attributes of the stock module that host code may read (``variance_epsilon``,
    ``hidden_size``, ``elementwise_affine``...) and library flags (``_KEPT_PRIVATE``) stay readable
    on the replacement."""
    for name, value in vars(old).items():
        if (name.startswith("_") and name not in _KEPT_PRIVATE) or name == "training" or hasattr(new, name):
            continue
        setattr(new, name, value)


def _activation_for(site: ActivationSite, old: nn.Module) -> nn.Module:
    if site.kind == "silu":
        new = ReSiLU2(inplace=site.inplace)
    else:
        new = ReGELU2(approximate="tanh" if site.kind == "gelu_tanh" else "none", inplace=site.inplace)
    new.train(old.training)
    _keep_attributes(old, new)
    return new


def _path_between(model: nn.Module, a: str, b: str) -> tuple[nn.Module, ...]:
    """The modules below the common parent of ``a`` and ``b`` down to each of them (both included)."""
    pa, pb = a.split("."), b.split(".")
    common = 0
    while common < min(len(pa), len(pb)) - 1 and pa[common] == pb[common]:
        common += 1
    names = [".".join(pa[: i + 1]) for i in range(common, len(pa))]
    names += [".".join(pb[: i + 1]) for i in range(common, len(pb))]
    return tuple(model.get_submodule(n) for n in names)


def _handoff(model: nn.Module, site: ActivationSite) -> None:
    """Across modules: the activation hands its input to the consumer Linear (same object, class swapped)."""
    old = model.get_submodule(site.module)
    new = HandoffActivation(site.kind)
    new.train(old.training)
    _keep_attributes(old, new)
    replace_module(model, old, new)
    consumer = model.get_submodule(site.recompute.consumer)
    if type(consumer) is nn.Linear:
        consumer.__class__ = HandoffLinear
    link(new, consumer, _path_between(model, site.module, site.recompute.consumer))


def apply_plan(
    model: nn.Module, plan: Plan, *, untie_embeddings: bool = False, min_abs_weight: float = 1e-3
) -> list[str]:
    """Carry out ``plan`` on ``model`` in place, stage by stage (``registry.STAGES``); returns notes."""
    from .registry import STAGES

    options = ApplyOptions(untie_embeddings=untie_embeddings, min_abs_weight=min_abs_weight)
    notes: list[str] = []
    for stage in STAGES:
        notes += stage.apply(model, plan, options)
    return notes


def apply_norms(model: nn.Module, plan: Plan, options: ApplyOptions) -> list[str]:
    """The norm stage: folds (on request), memory-sharing norms, TwinLinear consumers, fold guards."""
    untie_embeddings, min_abs_weight = options.untie_embeddings, options.min_abs_weight
    notes: list[str] = []
    lora = sorted({c.module for s in plan.norms if s.action == "fold" for c in s.consumers if ".lora_A." in c.module})
    if lora:
        notes.append(
            f"folded into {len(lora)} PEFT lora_A layer(s) (e.g. {lora[0]}): adapters trained from here hold A*gamma, "
            "so use them with this converted base (or a checkpoint written by lowmembp-convert), not the stock base"
        )
    for site in plan.norms:
        if site.action == "skip":
            continue
        norm = model.get_submodule(site.module)
        if site.action == "fold" and not site.already_folded:
            _fold_site(model, site, untie_embeddings, notes)
        twin = site.action == "keep_affine" and not site.autocast_output and _twin_linears(model, site, notes) > 0
        ms = _ms_norm_for(norm, site, min_abs_weight, autocast_twin=twin)
        if site.action == "fold" and not site.already_folded:
            consumers = [(c.module, model.get_submodule(c.module)) for c in site.consumers]
            dropouts = [(d, model.get_submodule(d)) for d in site.dropouts]
            ms.__dict__["_lowmembp_fold_watch"] = FoldWatch(ms, site.module, consumers, dropouts)
        replace_module(model, norm, ms)
    if any(s.action == "fold" for s in plan.norms) and not FoldedNormsGuard.registered_on(model):
        model.register_load_state_dict_pre_hook(FoldedNormsGuard(model))
        notes.append(
            "norms='fold': a load_state_dict pre-hook (FoldedNormsGuard) checks every folded norm's incoming "
            "weights before anything is copied, so a stock state dict is refused whole"
        )
    return notes


def apply_activations(model: nn.Module, plan: Plan, options: ApplyOptions) -> list[str]:
    """The activation stage: 2-bit modules, hand-offs and rewritten containers (exact recompute)."""
    containers: dict[str, list] = {}
    for site in plan.activations:
        if site.action != "convert":
            continue
        if site.option == "recompute" and site.recompute.layout == "handoff":
            _handoff(model, site)
            continue
        if site.option == "recompute":
            containers.setdefault(site.recompute.container, []).append((site.recompute, recompute_kind(site)))
            continue
        old = model.get_submodule(site.module)
        replace_module(model, old, _activation_for(site, old))
    for container, sites in containers.items():
        rewrite_container(model.get_submodule(container), sites)
    return []
