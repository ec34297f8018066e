"""Recognising norms and activations by what they compute, not by their class names.

A module is a LayerNorm/RMSNorm when its output, on a random input and with random values in its own
weight and bias, matches the formula (with its own eps, and with w or 1+w as the scale). A module is
GELU/tanh-GELU/SiLU when its output matches that function on a random input spanning the thresholds.
The module under test is a deep copy, so the user's weights are never read or changed, and models on
the ``meta`` device are recognised too (the copy is materialised on CPU with random values).
"""

from __future__ import annotations

import copy
import enum
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .plan import ActivationKind, NormKind

_EPS_ATTRS = ("eps", "variance_epsilon", "epsilon", "layer_norm_eps", "rms_norm_eps", "norm_eps")
_ACTIVATIONS: tuple[tuple[ActivationKind, object], ...] = (
    ("gelu", lambda x: F.gelu(x)),
    ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh")),
    ("silu", F.silu),
)


@dataclass(frozen=True)
class NormSpec:
    """What a verified norm computes."""

    kind: NormKind
    eps: float | None  # None: the input dtype's machine epsilon (nn.RMSNorm with eps=None)
    size: int
    has_weight: bool
    has_bias: bool
    weight_offset: float  # 1.0 when the scale is (1 + w)
    channel_dim: int  # -1, or 1 for NCHW inputs


_MODULE_INTERNALS = frozenset({"training", "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"})
_VALUE_TYPES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, enum.Enum)


def _setting(value) -> object:
    """A hashable stand-in for one attribute: the value itself for plain values (tuples of them too),
    else the object's identity (a stored callable, a child object, a list...)."""
    if isinstance(value, _VALUE_TYPES):
        return (type(value), value)
    if isinstance(value, (tuple, frozenset)):
        return (type(value), tuple(_setting(v) for v in value))
    return ("id", id(value))


def _behaviour_key(module: nn.Module, *extra) -> tuple:
    """Everything a leaf module's behaviour can depend on besides its parameter values.

    The class, every attribute (plain values by value, anything else by identity: two modules
    holding the same function object compute the same thing) and every hook. Two modules with the
    same key compute the same function of (input, weights), so one verification covers both (a
    32-layer model has 65 identical RMSNorms). Identities are only meaningful while the objects
    live, which is why a :class:`Detector` (and its cache) lives for one analysis only.
    """
    settings = []
    for name, value in sorted(vars(module).items()):
        if name in _MODULE_INTERNALS:
            continue
        if isinstance(value, dict) and name.startswith("_") and "hook" in name:
            settings.append((name, tuple(id(h) for h in value.values())))
            continue
        settings.append((name, _setting(value)))
    return (type(module), tuple(settings), *extra)


def is_converted(module: nn.Module) -> bool:
    return bool(getattr(module, "lowmembp_converted", False))


def _activation_probe() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=gen) * 4
    edges = torch.tensor([0.0, -0.0, 1e-3, -1e-3, 3.19, -3.19, 6.3, -6.3, 20.0, -20.0, 50.0, -50.0])
    return torch.cat([x, edges]).reshape(2, 2, 1027)  # n-D, so a module acting along a dim shows


def takes_one_tensor(module: nn.Module) -> bool:
    """True when ``module.forward`` has exactly one parameter: a caller cannot pass it anything else
    (a gated norm's ``forward(x, gate=None)`` or an activation with options is not replaceable)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(params) == 1 and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD)


@dataclass(frozen=True)
class ActivationSpec:
    """What a verified activation module computes."""

    kind: ActivationKind  # the known function it matches (to rounding), or "elementwise" (none known)
    inplace: bool  # it writes its result into its input (nn.GELU/SiLU(inplace=True) and the like)
    bitwise: bool = False  # its output is torch's op bit for bit (float32 and bfloat16): recompute may rebuild it
    # proven pure and elementwise (deterministic, each output element a function of the same input
    # element only, in float32 and bfloat16): a recompute may re-run the module itself in backward
    elementwise: bool = False
    saves: StockSaves | None = None  # what its stock backward keeps (measured on a probe)


@dataclass(frozen=True)
class StockSaves:
    """What an activation module's own autograd graph keeps for backward, per byte of its input."""

    input: bool  # its input tensor
    output: bool  # its output tensor (tanh, sigmoid, relu keep their result)
    extra: float  # other tensors (intermediates of a composite forward), in multiples of the input's bytes


class Detector:
    """Recognises norms and activations by behaviour, with a cache scoped to one analysis.

    The cache key is everything a module's behaviour can depend on (:func:`_behaviour_key`), and it
    holds object identities, so it must not outlive the objects: make one Detector per analysis.
    """

    def __init__(self) -> None:
        self._activations: dict[tuple, ActivationSpec | None] = {}
        self._norms: dict[tuple, NormSpec | None] = {}

    def activation(self, module: nn.Module) -> ActivationSpec | None:
        """The activation a parameter-free leaf module computes, or None."""
        if is_converted(module) or any(True for _ in module.children()) or not takes_one_tensor(module):
            return None
        if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
            return None
        key = _behaviour_key(module)
        if key not in self._activations:
            self._activations[key] = _match_activation(module)
        return self._activations[key]

    def norm(self, module: nn.Module) -> NormSpec | None:
        """What a leaf module computes if it is a LayerNorm/RMSNorm over one dim, else None."""
        if is_converted(module) or any(True for _ in module.children()) or not takes_one_tensor(module):
            return None
        params = _norm_params(module)
        if params is None:
            return None
        weight, bias = params
        if weight is None and bias is None:
            shape = getattr(module, "normalized_shape", None)
            if not (isinstance(shape, (tuple, list)) and len(shape) == 1):
                return None
            size = int(shape[0])
        else:
            size = int((weight if weight is not None else bias).shape[0])
        eps_values = _eps_candidates(module)
        if not eps_values:
            return None
        shapes = tuple(None if t is None else (tuple(t.shape), t.dtype) for t in (weight, bias))
        key = _behaviour_key(module, size, shapes)
        if key not in self._norms:
            try:
                probe = _probe_copy(module)
            except Exception:  # a module that cannot be copied cannot be probed: not recognised
                self._norms[key] = None
            else:
                with torch.device("cpu"):
                    self._norms[key] = _match_norm_in_both_modes(probe, weight, bias, size, eps_values)
        return self._norms[key]


def classify_activation(module: nn.Module) -> ActivationSpec | None:
    """One-off :meth:`Detector.activation` (no cache shared with anything)."""
    return Detector().activation(module)


def classify_norm(module: nn.Module) -> NormSpec | None:
    """One-off :meth:`Detector.norm` (no cache shared with anything)."""
    return Detector().norm(module)


def _bitwise_in_bf16(probe: nn.Module, fn, x: torch.Tensor) -> bool:
    low = x.to(torch.bfloat16)
    try:
        with torch.no_grad():
            y = probe(low.clone())
    except Exception:
        return False
    return isinstance(y, torch.Tensor) and y.dtype == low.dtype and torch.equal(y, fn(low))


def _match_activation(module: nn.Module) -> ActivationSpec | None:
    """Run a copy of the module (so no state of the user's is touched) on a probe, in both modes.

    A known function (GELU, tanh-GELU, SiLU) to rounding gives its kind (the 2-bit option and the
    Triton recompute when bit for bit); otherwise a module proven pure and elementwise is kind
    ``"elementwise"`` (exact recompute by re-running it). An identity (``nn.Identity``, a dropout
    with p = 0 or in eval mode) is not an activation.
    """
    with torch.device("cpu"):
        x = _activation_probe()
        try:
            probe = copy.deepcopy(module)
        except Exception:
            return None
        found = set()
        for training in (True, False):
            probe.train(training)
            given = x.clone()
            try:
                with torch.no_grad():
                    y = probe(given)
            except Exception:
                return None
            if not isinstance(y, torch.Tensor) or y.shape != x.shape or y.dtype != x.dtype:
                return None
            mutated = not torch.equal(given, x)
            if mutated and not (y.data_ptr() == given.data_ptr() or torch.equal(given, y)):
                return None  # writes something other than its result into its input
            if torch.equal(y, x):
                return None  # an identity: nothing to recompute or approximate
            match = next(((k, fn) for k, fn in _ACTIVATIONS if torch.allclose(y, fn(x), rtol=1e-5, atol=1e-6)), None)
            elementwise = not mutated and _proves_elementwise(probe, x, y)
            if match is None and not elementwise:
                return None
            kind, fn = match if match is not None else ("elementwise", None)
            bitwise = fn is not None and torch.equal(y, fn(x)) and _bitwise_in_bf16(probe, fn, x)
            saves = _stock_saves(probe, x) if elementwise else None
            found.add(ActivationSpec(kind, mutated, bitwise, elementwise, saves))
    return found.pop() if len(found) == 1 else None


def _run(probe: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    try:
        with torch.no_grad():
            y = probe(x)
    except Exception:
        return None
    return y if isinstance(y, torch.Tensor) and y.shape == x.shape and y.dtype == x.dtype else None


def _same(a: torch.Tensor | None, b: torch.Tensor, ulps: int = 0) -> bool:
    """Equal bit for bit (``ulps`` 0), or within ``ulps`` units of b's precision elementwise."""
    if a is None or a.shape != b.shape:
        return False
    a, b = a.nan_to_num(), b.nan_to_num()
    if not ulps:
        return torch.equal(a, b)
    eps = torch.finfo(b.dtype).eps
    return bool(((a.double() - b.double()).abs() <= ulps * eps * b.double().abs() + 1e-30).all())


def _proves_elementwise(probe: nn.Module, x: torch.Tensor, y: torch.Tensor) -> bool:
    """Pure and elementwise, in float32 and bfloat16: the same input gives the same bits again (no
    randomness, no state: what a backward re-running the module on the kept input relies on); a
    permuted input gives the permuted result and a prefix of the flattened input the prefix of the
    result (no reduction, no dependence on position or shape). The last two hold to a few ulps, not
    bit for bit: CPU kernels round a vector loop's tail differently from its body."""
    gen = torch.Generator().manual_seed(3)
    perm = torch.randperm(x.numel(), generator=gen)
    for given in (x, x.to(torch.bfloat16)):
        expected = y if given.dtype == y.dtype else _run(probe, given.clone())
        if expected is None or not _same(_run(probe, given.clone()), expected):
            return False
        flat, out = given.reshape(-1), expected.reshape(-1)
        moved = (
            (flat[perm].reshape(x.shape), out[perm].reshape(x.shape)),
            (flat[:1000].clone(), out[:1000]),
            (flat[perm[:7]].reshape(7, 1), out[perm[:7]].reshape(7, 1)),
        )
        if not all(_same(_run(probe, inp), exp, ulps=4) for inp, exp in moved):
            return False
    return True


def _stock_saves(probe: nn.Module, x: torch.Tensor) -> StockSaves:
    """What the module's autograd graph keeps on a float32 probe, by storage (a view counts as its base)."""
    x = x.detach().clone().requires_grad_(True)
    kept: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.setdefault(t.untyped_storage().data_ptr(), t)
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
            y = probe(x)
    except Exception:
        return StockSaves(True, False, 0.0)
    ptr_x, ptr_y = x.untyped_storage().data_ptr(), y.untyped_storage().data_ptr()
    extra = sum(t.untyped_storage().nbytes() for p, t in kept.items() if p not in (ptr_x, ptr_y))
    return StockSaves(ptr_x in kept, ptr_y in kept, extra / (x.numel() * x.element_size()))


def _norm_params(module: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """(weight, bias) if the module's own parameters are at most a 1-D weight and bias of one size."""
    params = dict(module.named_parameters(recurse=False))
    if set(params) - {"weight", "bias"}:
        return None
    weight, bias = params.get("weight"), params.get("bias")
    sizes = {p.shape for p in (weight, bias) if p is not None}
    if len(sizes) > 1 or any(len(s) != 1 for s in sizes):
        return None
    if any(p is not None and not p.is_floating_point() for p in (weight, bias)):
        return None
    return weight, bias


def _eps_candidates(module: nn.Module) -> list[float | None]:
    """Candidate eps values from the module's attributes; None stands for "the input dtype's machine
    epsilon", which is what ``nn.RMSNorm`` / ``F.rms_norm`` use when their eps is None."""
    found: list[float | None] = []
    if "eps" in vars(module) and module.eps is None:
        found.append(None)
    for name in _EPS_ATTRS:
        value = getattr(module, name, None)
        if isinstance(value, (float, int)) and not isinstance(value, bool) and value >= 0:
            found.append(float(value))
    return list(dict.fromkeys(found))


def _formula(x: torch.Tensor, kind: NormKind, eps: float, scale, shift, dim: int) -> torch.Tensor:
    x = x.double()
    if kind == "layer_norm":
        mu = x.mean(dim, keepdim=True)
        var = (x - mu).pow(2).mean(dim, keepdim=True)
        x_hat = (x - mu) / torch.sqrt(var + eps)
    else:
        x_hat = x / torch.sqrt(x.pow(2).mean(dim, keepdim=True) + eps)
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    if scale is not None:
        x_hat = x_hat * scale.double().reshape(shape)
    if shift is not None:
        x_hat = x_hat + shift.double().reshape(shape)
    return x_hat


def _probe_copy(module: nn.Module) -> nn.Module:
    """A float32 CPU copy of the module with random weight/bias (init values hide offsets)."""
    with torch.device("cpu"):  # a caller inside `with torch.device("meta")` must not leak into probes
        return _probe_copy_cpu(module)


def _probe_copy_cpu(module: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(1)
    if any(t.device.type == "meta" for t in module.parameters(recurse=False)):
        probe = copy.deepcopy(module).to_empty(device="cpu")
    else:
        probe = copy.deepcopy(module).cpu()
    probe = probe.float()
    with torch.no_grad():
        for name, p in probe.named_parameters(recurse=False):
            values = (
                torch.rand(p.shape, generator=gen) + 0.5 if name == "weight" else torch.randn(p.shape, generator=gen)
            )
            p.copy_(values)
    return probe


def _match_norm_in_both_modes(probe, weight, bias, size, eps_values) -> NormSpec | None:
    """The formula must hold in training and in eval mode (a module may branch on ``training``)."""
    specs = set()
    for training in (True, False):
        probe.train(training)
        specs.add(_match_norm_formula(probe, weight, bias, size, eps_values))
    return specs.pop() if len(specs) == 1 else None


def _match_norm_formula(probe, weight, bias, size, eps_values) -> NormSpec | None:
    p_weight = getattr(probe, "weight", None) if weight is not None else None
    p_bias = getattr(probe, "bias", None) if bias is not None else None
    gen = torch.Generator().manual_seed(2)
    for channel_dim, shape in ((-1, (3, 5, size)), (1, (2, size, 3, 2))):
        x = torch.randn(shape, generator=gen) * 2 + 0.7
        # one small-variance slice, so a wrong eps shows
        if channel_dim == -1:
            x[0, 0] = x[0, 0] * 1e-3 + 0.1
        else:
            x[0, :, 0, 0] = x[0, :, 0, 0] * 1e-3 + 0.1
        try:
            with torch.no_grad():
                y = probe(x)
        except Exception:
            continue
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            continue
        y = y.double()
        for kind in ("layer_norm", "rms_norm"):
            for eps in eps_values:
                for offset in (0.0, 1.0) if p_weight is not None else (0.0,):
                    scale = None if p_weight is None else p_weight.detach() + offset
                    value = torch.finfo(x.dtype).eps if eps is None else eps
                    ref = _formula(x, kind, value, scale, p_bias, channel_dim)
                    err = (y - ref).abs().max().item()
                    if math.isfinite(err) and err <= 1e-4 * max(1.0, ref.abs().max().item()):
                        return NormSpec(kind, eps, size, weight is not None, bias is not None, offset, channel_dim)
    return None
