"""Memory-sharing norm modules: the thin ``nn.Module`` face of :mod:`lowmembp_convert.ops.norms`.

The converter swaps a model's LayerNorm / RMSNorm for one of these. With the affine folded into the
consumers (plan action ``fold``) the module emits x_hat (plus a kept bias); with ``keep_affine`` it
applies the original Parameters itself. Either way backward saves only the output y (shared with
the consumer) and rstd. A post-norm norm under autocast (``autocast_twin``) keeps its output in full
precision for the residual and saves the output's autocast-dtype twin instead of y, which the
consumer ``nn.linear.TwinLinear`` layers read rather than each saving a cast of their own.

State dict compatibility: a folded affine is not dropped but kept as a persistent buffer under the
same name holding the identity value, so a converted checkpoint has the stock module's keys and,
loaded into the stock class, computes the same function.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowmembp_convert.observers import OBSERVER_HOOK_IDS
from lowmembp_convert.ops.norm_twin import ms_norm_twin_fwd, publish_twin
from lowmembp_convert.ops.norms import ill_conditioned_channels, ms_layer_norm, ms_rms_norm

__all__ = ["FoldedNormsGuard", "MSLayerNorm", "MSRMSNorm"]


class _MSNorm(nn.Module):
    lowmembp_converted = True  # the converter leaves modules carrying this alone
    _rms: bool

    def __init__(
        self,
        normalized_size: int,
        eps: float,
        *,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        affine_weight: bool = False,
        affine_bias: bool = False,
        weight_offset: float = 0.0,
        channel_dim: int = -1,
        autocast_output: bool = False,
        autocast_twin: bool = False,
        min_abs_weight: float = 0.0,
    ) -> None:
        """Args:
        normalized_size: N, the size of the normalized dim.
        eps: added to the variance (LayerNorm) or the mean square (RMSNorm).
        weight: the original module's weight, or None if it had none.
        bias: the original module's bias, or None if it had none.
        affine_weight: True: ``weight`` (an nn.Parameter) is registered as that same Parameter
            and used in forward. False: a given ``weight`` was folded away; a persistent buffer of
            identity values (``1 - weight_offset``) takes its state_dict key, unused in forward.
        affine_bias: the same for ``bias`` (identity value 0).
        weight_offset: the scale is ``weight + weight_offset`` (1.0 for Gemma's ``(1 + w)``).
        channel_dim: the normalized dim of the input: -1, or 1 for NCHW (LayerNorm2d-style).
        autocast_output: under autocast, emit the autocast dtype (every consumer casts to it
            anyway, and emitting it spares the consumer a saved cast copy).
        autocast_twin: post-norm under autocast (the output stays in the input dtype for the
            residual): also make the output's autocast-dtype twin and save it instead of the output,
            for the consumer ``TwinLinear``s to read (see ``ops/norm_twin.py``).
        min_abs_weight: with a kept affine, channels whose |weight + weight_offset| is below this
            (or whose bias is large against it) keep their x_hat for backward instead of recovering
            it from y; chosen in every forward from the current weights, so nothing ever raises.
        """
        super().__init__()
        self.normalized_size = int(normalized_size)
        self.normalized_shape = (self.normalized_size,)
        self.eps = None if eps is None else float(eps)  # None: the input dtype's machine epsilon
        self.min_abs_weight = float(min_abs_weight)
        self.weight_offset = float(weight_offset)
        self.channel_dim = int(channel_dim)
        self.autocast_output = bool(autocast_output)
        self.autocast_twin = bool(autocast_twin)
        self.affine_weight = bool(affine_weight)
        self.affine_bias = bool(affine_bias)
        identity_weight = 1.0 - self.weight_offset  # ones, or zeros for (1 + w) norms
        self._register_affine("weight", weight, self.affine_weight, identity_weight)
        self._register_affine("bias", bias, self.affine_bias, 0.0)
        # Under torch.compile no shape may depend on the weights' values: up to this many
        # ill-conditioned channels keep x_hat (4 bytes a row each, kept whether used or not). Set
        # from the weights at conversion (usually 0: then compiled keeps what eager keeps); a step
        # that finds more warns. Eager keeps every such channel.
        self.compiled_kept_capacity = self._ill_conditioned_now() if (self.affine_weight or self.affine_bias) else 0

    def _twin_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The autocast dtype when this call should make the twin (post-norm, autocast, training)."""
        if not (self.autocast_twin and torch.is_grad_enabled() and torch.is_autocast_enabled(x.device.type)):
            return None
        if not (x.requires_grad or any(p.requires_grad for p in self.parameters(recurse=False))):
            return None  # no autograd node to keep the twin
        low = torch.get_autocast_dtype(x.device.type)
        return None if x.dtype in (low, torch.float64) else low  # autocast casts neither

    def _register_affine(self, name: str, tensor: torch.Tensor | None, used: bool, identity: float) -> None:
        cls = type(self).__name__
        if used:
            if not isinstance(tensor, nn.Parameter):
                raise TypeError(
                    f"{cls}: affine_{name}=True needs {name} to be the original nn.Parameter "
                    f"(got {type(tensor).__name__}); pass the stock module's .{name} itself so "
                    f"optimizer references and state_dict keys survive"
                )
            if tuple(tensor.shape) != self.normalized_shape:
                raise ValueError(f"{cls}: {name} has shape {tuple(tensor.shape)}, expected {self.normalized_shape}")
            self.register_parameter(name, tensor)
        elif tensor is not None:
            # Folded away: keep the key, with a value that makes the stock module compute x_hat.
            value = torch.full(tensor.shape, identity, dtype=tensor.dtype, device=tensor.device)
            self.register_buffer(name, value, persistent=True)
        else:
            self.register_parameter(name, None)

    def check_incoming(self, state_dict, prefix: str) -> None:
        """Raise if ``state_dict`` would give a folded affine a non-identity value.

        A folded affine's buffer must stay identity: loading a stock (unfolded) norm weight here
        would silently compute something else, since the consumers already hold the fold."""
        for name, used in (("weight", self.affine_weight), ("bias", self.affine_bias)):
            incoming = state_dict.get(prefix + name)
            if used or incoming is None or getattr(self, name, None) is None or incoming.device.type == "meta":
                continue
            identity = (1.0 - self.weight_offset) if name == "weight" else 0.0
            if not torch.all(incoming == identity):
                raise RuntimeError(
                    f"{prefix}{name}: this norm's affine was folded into its consumers by lowmembp_convert "
                    "(norms='fold'), but the state dict holds a non-identity value (an unconverted checkpoint); "
                    "nothing was loaded. Load the checkpoint before convert(), convert it with `lowmembp-convert` "
                    "first, or convert with the default norms='share', which keeps the stock parameters."
                )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        self.check_incoming(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    def _eps_for(self, x: torch.Tensor) -> float:
        return torch.finfo(x.dtype).eps if self.eps is None else self.eps

    def _ill_conditioned_now(self) -> int:
        weight = self.weight if self.affine_weight else None
        bias = self.bias if self.affine_bias else None
        if any(t is not None and t.device.type == "meta" for t in (weight, bias)):
            return 0
        return ill_conditioned_channels(weight, bias, self.weight_offset, self.min_abs_weight).numel()

    def _kept_capacity(self) -> int:
        """-1 in eager (every ill-conditioned channel keeps x_hat); the fixed capacity when compiling."""
        return self.compiled_kept_capacity if torch.compiler.is_compiling() else -1

    def _stock_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same function in plain torch ops (for torch.func transforms, which the custom ops lack)."""
        x_last = x.movedim(self.channel_dim, -1)
        scale = None
        if self.affine_weight:
            scale = self.weight + self.weight_offset
        bias = self.bias if self.affine_bias else None
        shape = (self.normalized_size,)
        if self._rms:
            y = F.rms_norm(x_last, shape, scale, self._eps_for(x))
            y = y + bias if bias is not None else y
        else:
            y = F.layer_norm(x_last, shape, scale, bias, self._eps_for(x))
        return y.movedim(-1, self.channel_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        watch = self.__dict__.get("_lowmembp_fold_watch")
        if watch is not None and not torch.compiler.is_compiling():
            watch.check(self)
        if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
            return self._stock_forward(x)
        moved = self.channel_dim not in (-1, x.dim() - 1)
        if moved:
            x = x.movedim(self.channel_dim, -1)
        low = None if moved else self._twin_dtype(x)
        if low is not None:
            weight = self.weight if self.affine_weight else None
            bias = self.bias if self.affine_bias else None
            # Eager: the twin is published for the consumer TwinLinears to find from y's storage.
            # Compiled: the saved twin is a graph cast of y, merged (CSE) with the consumers' casts.
            twin_output = not torch.compiler.is_compiling()
            y, twin, *_ = ms_norm_twin_fwd(
                x, weight, bias, self._eps_for(x), self.weight_offset, self._rms, low, twin_output,
                self.min_abs_weight, self._kept_capacity(),
            )  # fmt: skip
            if twin_output:
                publish_twin(y, twin)
            return y
        out_dtype = None
        if self.autocast_output and torch.is_autocast_enabled(x.device.type):
            out_dtype = torch.get_autocast_dtype(x.device.type)
        norm = ms_rms_norm if self._rms else ms_layer_norm
        y = norm(
            x,
            self.weight if self.affine_weight else None,
            self.bias if self.affine_bias else None,
            eps=self._eps_for(x),
            weight_offset=self.weight_offset,
            out_dtype=out_dtype,
            keep_below=self.min_abs_weight,
            kept_capacity=self._kept_capacity(),
        )
        # A view of the normalized (saved) storage, so a consumer that saves it shares it.
        return y.movedim(-1, self.channel_dim) if moved else y

    def extra_repr(self) -> str:
        kept = [n for n, used in (("weight", self.affine_weight), ("bias", self.affine_bias)) if used]
        mode = f"affine({'+'.join(kept)})" if kept else "folded"
        eps = "dtype eps" if self.eps is None else f"{self.eps:g}"
        return (
            f"{self.normalized_size}, eps={eps}, mode={mode}, weight_offset={self.weight_offset:g}, "
            f"channel_dim={self.channel_dim}, autocast_output={self.autocast_output}"
            + (", autocast_twin=True" if self.autocast_twin else "")
        )


class MSLayerNorm(_MSNorm):
    """Memory-sharing LayerNorm over one dim (last, or ``channel_dim``). See :class:`_MSNorm`.

    Saved for backward: the output y (the returned tensor's storage) and rstd, one float32 per row;
    with ``autocast_twin`` under autocast, y's autocast-dtype twin instead of y.
    """

    _rms = False


class MSRMSNorm(_MSNorm):
    """Memory-sharing RMSNorm over one dim (last, or ``channel_dim``). See :class:`_MSNorm`.

    Saved for backward: the output y (the returned tensor's storage) and rstd, one float32 per row;
    with ``autocast_twin`` under autocast, y's autocast-dtype twin instead of y.
    """

    _rms = True


class FoldWatch:
    """What a folded norm (``norms="fold"``) checks before each eager forward: the misuses that would
    make the reparameterized model compute something other than what its user asked for. Each one
    raises at that moment, naming the module and the fix, before the norm computes anything:

    - its identity buffer (``weight`` / ``bias``) given another value: an in-place rescale
      (``ln.weight /= s``, as AWQ/SmoothQuant do), an assignment, ``functional_call`` with stock
      weights. The fold ignores those buffers, so the change would silently do nothing; a new tensor
      or version is checked by value (one read), so ``.to()``, loading identity values and
      ``functional_call`` with the converted model's own buffers pass;
    - a forward hook or pre-hook added after conversion on the norm or one of its consumers: it would
      see x_hat (and the consumer's folded input) instead of the stock values;
    - a dropout module on the way to the consumers, an identity (p = 0) when the norm's shift was
      folded into the consumers' biases, now dropping in training (p > 0): the folded shift would
      skip the dropout that the stock shift goes through.

    The consumers are held by reference (a plain object, not registered as submodules), so copies
    and pickles of the model carry the watch along with them.
    """

    def __init__(
        self,
        norm: nn.Module,
        name: str,
        consumers: list[tuple[str, nn.Module]],
        dropouts: list[tuple[str, nn.Module]] = (),
    ) -> None:
        self.name = name
        self.dropouts = [(fqn, m) for fqn, m in dropouts if hasattr(m, "p")]
        self.consumers = [
            (fqn, m, frozenset(m._forward_hooks), frozenset(m._forward_pre_hooks)) for fqn, m in consumers
        ]
        self.own_hooks = frozenset(norm._forward_hooks)
        self.record(norm)

    def record(self, norm: nn.Module) -> None:
        self.buffers = {
            n: (t.data_ptr(), t._version) for n in ("weight", "bias") if (t := norm._buffers.get(n)) is not None
        }

    def check(self, norm: nn.Module) -> None:
        fix = "convert with the default norms='share' (the stock parameterization), or undo the change"
        for name, (ptr, version) in self.buffers.items():
            t = norm._buffers.get(name)
            if t is None or t.data_ptr() != ptr or t._version != version:
                identity = (1.0 - norm.weight_offset) if name == "weight" else 0.0
                if t is not None and t.device.type != "meta" and bool(torch.all(t == identity)):
                    self.record(norm)  # moved, copied or reloaded, still identity: fine
                    continue
                raise RuntimeError(
                    f"lowmembp_convert: {self.name}.{name} was changed after norms='fold' folded it into "
                    f"{', '.join(f for f, *_ in self.consumers)} (a rescale, an assignment or functional_call with "
                    f"stock weights?); the folded model ignores it, so the change would do nothing. {fix}"
                )

        def new(hooks: dict, known: frozenset) -> bool:
            return any(h not in known and h not in OBSERVER_HOOK_IDS for h in hooks)  # verify's hooks only watch

        for fqn, dropout in self.dropouts:
            if dropout.training and dropout.p:
                raise RuntimeError(
                    f"lowmembp_convert: {fqn} now drops (p={dropout.p}) between {self.name} and its consumers, "
                    f"but norms='fold' moved {self.name}'s shift into their biases while it was an identity, so the "
                    f"shift would skip the dropout. {fix}"
                )

        added = [self.name] if new(norm._forward_hooks, self.own_hooks) else []
        for fqn, module, forward_hooks, pre_hooks in self.consumers:
            if new(module._forward_hooks, forward_hooks) or new(module._forward_pre_hooks, pre_hooks):
                added.append(fqn)
        if added:
            raise RuntimeError(
                f"lowmembp_convert: a forward hook was added to {added[0]} after norms='fold' folded {self.name} "
                f"into its consumers: it would see the normalized x_hat, not the stock values. {fix}"
            )


class FoldedNormsGuard:
    """``load_state_dict`` pre-hook on a model with folded norms: checks every folded norm's incoming
    affine before anything is copied, so a refused state dict leaves the model untouched (the norms'
    own check runs only when loading reaches them, after earlier modules were loaded)."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model

    def __call__(self, module, state_dict, prefix, *_args) -> None:
        for name, child in self._model.named_modules():
            if isinstance(child, _MSNorm):
                child.check_incoming(state_dict, f"{prefix}{name}." if name else prefix)

    def __repr__(self) -> str:
        return "FoldedNormsGuard()"

    @staticmethod
    def registered_on(model: nn.Module) -> list[FoldedNormsGuard]:
        """The guards registered on ``model`` (torch wraps each pre-hook in a ``_WrappedHook``)."""
        hooks = (getattr(h, "hook", h) for h in model._load_state_dict_pre_hooks.values())
        return [h for h in hooks if isinstance(h, FoldedNormsGuard)]
