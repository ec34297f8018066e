"""The rule every conversion must keep, as assertions with an independent oracle.

After ``convert()`` returns, every output equals the original's (a deep copy made before converting,
run by the test, not by the package), input gradients too where the conversion is exact, the
trainable parameters are the same (less norm affines folded into trainable consumers), and
buffers are as before. If ``convert()`` raises, the model is bitwise what it was: same module
objects under the same names, same parameter objects and values, buffers, hooks and attributes.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from lowmembp_convert import convert


def tensors_of(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in tensors_of(item)]
    return []


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item() if a.numel() else 0.0


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Everything a failed convert() must leave as it was, by identity and by value."""
    modules = [(name, id(m), type(m)) for name, m in model.named_modules(remove_duplicate=False)]
    params = [
        (name, id(p), p.requires_grad, p.detach().clone()) for name, p in model.named_parameters(remove_duplicate=False)
    ]
    buffers = [(name, id(b), b.detach().clone()) for name, b in model.named_buffers(remove_duplicate=False)]
    hooks = [
        (name, key, tuple(getattr(m, key).keys()))
        for name, m in model.named_modules(remove_duplicate=False)
        for key in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks")
    ]
    attributes = [(name, tuple(sorted(vars(m)))) for name, m in model.named_modules(remove_duplicate=False)]
    return {"modules": modules, "params": params, "buffers": buffers, "hooks": hooks, "attributes": attributes}


def assert_same_fingerprint(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key in ("modules", "hooks", "attributes"):
        assert before[key] == after[key], f"{key} changed"
    assert [p[:3] for p in before["params"]] == [p[:3] for p in after["params"]], "parameters changed"
    for (name, *_, a), (_n, *_, b) in zip(before["params"], after["params"], strict=True):
        assert torch.equal(a, b), f"parameter {name} changed value"
    assert [b[:2] for b in before["buffers"]] == [b[:2] for b in after["buffers"]], "buffers changed"
    for (name, _i, a), (_n, _j, b) in zip(before["buffers"], after["buffers"], strict=True):
        assert torch.equal(a, b), f"buffer {name} changed value"


def outputs(model: nn.Module, inputs: tuple[tuple, dict], *, train: bool = False, seed: int = 0) -> list[torch.Tensor]:
    args, kwargs = inputs
    modes = {m: m.training for m in model.modules()}
    model.train(train)
    try:
        torch.manual_seed(seed)
        with torch.no_grad():
            return [t.detach().clone() for t in tensors_of(model(*args, **kwargs)) if t.is_floating_point()]
    finally:
        for m, t in modes.items():
            m.training = t


def gradients(model: nn.Module, x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The gradients of a random projection of every output: at the input, and at each trainable
    parameter (by name; None where the loss does not reach it)."""
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    outs = [t for t in tensors_of(model(x)) if t.is_floating_point()]
    gen = torch.Generator().manual_seed(seed + 1)
    loss = sum((t * torch.randn(t.shape, generator=gen)).sum() for t in outs)
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, *(p for _, p in params)], allow_unused=True)
    return grads[0], {name: g for (name, _), g in zip(params, grads[1:], strict=True)}


def input_grad(model: nn.Module, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return gradients(model, x, seed)[0]


def _folded_into(converted: nn.Module) -> set[str]:
    """Parameter names whose gradients a fold changes by design (the consumers' weights and biases,
    under every name they have)."""
    ids = set()
    for site in converted.lowmembp_report.plan.norms:
        if site.action == "fold":
            for consumer in site.consumers:
                ids.update(id(converted.get_parameter(n)) for n in (consumer.weight, consumer.bias) if n)
    return {name for name, p in converted.named_parameters(remove_duplicate=False) if id(p) in ids}


def assert_function_kept(original: nn.Module, converted: nn.Module, inputs, rtol: float = 1e-5) -> None:
    for train in (False, True):
        expected, got = outputs(original, inputs, train=train), outputs(converted, inputs, train=train)
        assert len(expected) == len(got), "number of outputs changed"
        for i, (a, b) in enumerate(zip(expected, got, strict=True)):
            assert a.shape == b.shape, f"output {i} changed shape"
            assert rel(a, b) < rtol, f"output {i} ({'train' if train else 'eval'}) differs: {rel(a, b):.2e}"


def assert_trainable_kept(before: dict[str, bool], converted: nn.Module) -> None:
    """Trainable parameters after = before, less the norm affines folded into trainable consumers."""
    report = converted.lowmembp_report
    folded = {}
    for site in report.plan.norms:
        if site.action == "fold":
            for local in (site.weight, site.bias):
                if local:
                    folded[local] = site
    after = {name: p.requires_grad for name, p in converted.named_parameters()}
    for name, trainable in before.items():
        if name in after:
            assert after[name] == trainable, f"{name}: requires_grad changed"
            continue
        assert name in folded, f"{name} disappeared without a fold"
        site = folded[name]
        if trainable:
            for consumer in site.consumers:
                target = consumer.weight if name.endswith("weight") else consumer.bias
                assert converted.get_parameter(target).requires_grad, f"trainable {name} folded into frozen {target}"
    assert set(after) <= set(before), "new parameters appeared"


def stock_copy(model: nn.Module) -> nn.Module:
    """A deep copy that also keeps the storage aliasing between distinct Parameters (two Parameters
    over one storage): ``copy.deepcopy`` gives each Parameter its own storage, so an optimizer step
    on the copy would no longer update both, and the copy would train away from the model."""
    clone = copy.deepcopy(model)
    groups: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    pairs = zip(
        model.named_parameters(remove_duplicate=False), clone.named_parameters(remove_duplicate=False), strict=True
    )
    for (_name, p), (_n, q) in pairs:
        if p.device.type != "meta" and p.untyped_storage().nbytes():
            groups.setdefault(p.untyped_storage().data_ptr(), []).append((p, q))
    for group in groups.values():
        if len({id(p) for p, _q in group}) < 2:
            continue
        storage = group[0][0].untyped_storage().clone()  # the values as of now, once for the group
        for p, q in group:
            q.data = torch.empty(0, dtype=p.dtype, device=p.device).set_(
                storage, p.storage_offset(), p.shape, p.stride()
            )
    return clone


def convert_checked(model: nn.Module, inputs, *, grad_exact: bool | None = None, **options) -> nn.Module | Exception:
    """Convert ``model`` and assert the rule; returns the model, or the exception convert() raised
    (after asserting the model was left exactly as it was)."""
    original = stock_copy(model)
    before = fingerprint(model)
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    options.setdefault("example_inputs", inputs)
    try:
        convert(model, **options)
    except Exception as exc:  # the rule's other branch: an error, and the model untouched
        assert_same_fingerprint(before, fingerprint(model))
        return exc
    assert_function_kept(original, model, inputs)
    assert_trainable_kept(trainable, model)
    # exact unless the 2-bit approximation was asked for (auto and recompute are exact)
    exact = options.get("activations", True) != "approx" if grad_exact is None else grad_exact
    if options.get("norms", True) != "fold":
        assert_stock_state(original, model, inputs)
        assert_hooks_see_stock(original, model, inputs)
    args, kwargs = inputs
    if exact and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
        for m in (original, model):
            m.train()
        (a, params_a), (b, params_b) = gradients(original, args[0]), gradients(model, args[0])
        assert rel(a, b) < 1e-5, f"input gradient differs: {rel(a, b):.2e}"
        for name in params_a.keys() & params_b.keys() - _folded_into(model):
            ga, gb = params_a[name], params_b[name]
            assert (ga is None) == (gb is None), f"{name}: gradient reached in one model only"
            if ga is not None:
                assert rel(ga, gb) < 1e-5, f"gradient of {name} differs: {rel(ga, gb):.2e}"
        if options.get("norms", True) != "fold":
            train_next_to_stock(original, model, args[0])
    return model


def assert_stock_state(original: nn.Module, converted: nn.Module, inputs) -> None:
    """Without a fold nothing is reparameterized: the state dict is the stock one, key for key and
    value for value, and loading the stock state dict into the converted model keeps its function."""
    expected, got = original.state_dict(), converted.state_dict()
    assert list(expected) == list(got), "state_dict keys changed"
    for key, value in expected.items():
        assert torch.equal(value, got[key]), f"state_dict[{key!r}] changed"
    converted.load_state_dict(expected)
    assert_function_kept(original, converted, inputs)


def assert_hooks_see_stock(original: nn.Module, converted: nn.Module, inputs) -> None:
    """Forward hooks registered after converting, on every module, see the stock values (in training,
    with autograd on, where the rewritten paths would run), and removing them leaves the model as it was."""
    args, kwargs = inputs
    seen: dict[str, dict[str, list[torch.Tensor]]] = {"stock": {}, "converted": {}}
    handles = []
    for key, model in (("stock", original), ("converted", converted)):
        for name, module in model.named_modules():

            def record(_m, _args, out, _name=name, _into=seen[key]):
                kept = [t.detach().clone() for t in tensors_of(out) if t.is_floating_point()]
                _into.setdefault(_name, []).extend(kept)

            handles.append(module.register_forward_hook(record))
    modes = {m: m.training for model in (original, converted) for m in model.modules()}
    try:
        for model in (original, converted):
            model.train()
            torch.manual_seed(0)
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        for m, t in modes.items():
            m.training = t
    assert seen["stock"].keys() == seen["converted"].keys(), "hooks ran on other modules"
    for name, expected in seen["stock"].items():
        got = seen["converted"][name]
        assert [t.shape for t in expected] == [t.shape for t in got], f"a hook on {name!r} saw other tensors"
        for a, b in zip(expected, got, strict=True):
            assert rel(a, b) < 1e-5, f"a hook on {name!r} saw {rel(a, b):.2e} away from stock"


def train_next_to_stock(original: nn.Module, converted: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    """A few SGD steps (momentum) on both: the losses and the trained parameters stay together."""
    params = {name: [p for p in m.parameters() if p.requires_grad] for name, m in (("a", original), ("b", converted))}
    if not params["a"]:
        return
    optimizers = [torch.optim.SGD(params[k], lr=1e-2, momentum=0.9) for k in ("a", "b")]
    gen = torch.Generator().manual_seed(7)
    for step in range(steps):
        losses, magnitudes = [], []
        for model, optimizer in zip((original, converted), optimizers, strict=True):
            model.train()
            torch.manual_seed(step)
            outs = [t for t in tensors_of(model(x)) if t.is_floating_point()]
            gen.manual_seed(step)
            terms = [t * torch.randn(t.shape, generator=gen) for t in outs]
            loss = sum(term.sum() for term in terms)
            # a random projection can cancel to near 0: judge its error against the size of its terms
            magnitudes.append(sum(term.detach().abs().sum() for term in terms))
            optimizer.zero_grad()
            if loss.requires_grad:  # else no trainable parameter reaches an output (frozen path, unused layers)
                loss.backward()
                optimizer.step()
            losses.append(loss)
        assert losses[0].requires_grad == losses[1].requires_grad, (
            "the loss reaches trainable parameters in one model only"
        )
        error = (losses[0].detach() - losses[1].detach()).abs() / max(float(magnitudes[0]), 1e-12)
        assert error < 1e-5, f"step {step}: loss {losses[1]} against stock {losses[0]} (error {error:.2e} of its terms)"
    for (name, p), q in zip(original.named_parameters(), converted.parameters(), strict=True):
        assert rel(p, q) < 1e-4, f"{name} trained away from stock: {rel(p, q):.2e}"
