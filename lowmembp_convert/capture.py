"""Graph capture: a torch.export graph of the user's model, built on fake tensors.

``torch.export`` (non-strict) runs the model's Python forward on fake tensors, so a 7B-parameter
model (even one on the ``meta`` device) is traced in seconds and without any real compute on its
weights. Every node carries ``nn_module_stack``, which maps it back to the module that ran it.
Example inputs come from the model's own config unless the user passes them.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .errors import CaptureError
from .transaction import no_lasting_additions, preserved_modes
from .verify import all_tensors

ExampleInputs = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass
class Capture:
    """A captured graph and the maps from its placeholders to the model's parameters."""

    program: torch.export.ExportedProgram
    param_of_placeholder: dict[str, str]  # placeholder node name -> parameter fqn
    seconds: float
    state_placeholders: frozenset[str] = frozenset()  # placeholders of parameters, buffers and constants

    @property
    def graph(self) -> torch.fx.Graph:
        return self.program.graph


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _vocab(config: Any) -> int:
    """A token id bound: the config's vocabulary, at most 1000 (small ids are valid everywhere)."""
    return max(1, min(int(getattr(config, "vocab_size", None) or 32), 1000))


def _image_size(config: Any) -> tuple[int, int]:
    size = getattr(config, "image_size", 224)
    return (size, size) if isinstance(size, int) else tuple(size)


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _add_flags(model: nn.Module, config: Any, kwargs: dict[str, Any], force: bool = False) -> None:
    # Every output the model can return must stay exact, so trace with all hidden states returned:
    # a norm whose output is a hidden state then keeps its affine instead of being folded away.
    # ``force``: the user's own example inputs; only keywords the model names explicitly are added.
    named = _names(model, "use_cache") if force else _accepts(model, "use_cache")
    if named and (force or getattr(config, "use_cache", None) is not None):
        kwargs["use_cache"] = False
    if _names(model, "output_hidden_states") if force else _accepts(model, "output_hidden_states"):
        kwargs["output_hidden_states"] = True


def _names(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def example_inputs_for(
    model: nn.Module, batch: int = 2, seq_len: int = 8, seed: int = 0, flags: bool = True
) -> ExampleInputs:
    """Build a small batch from the model's config: HF ``main_input_name`` or timm ``input_size``.

    Drawn from a generator of its own (``seed``), so the global random state is never touched.
    ``flags`` adds the keywords that make a transformers model return every hidden state and build
    no cache (for tracing and verifying); an encoder-decoder also gets ``decoder_input_ids``.

    Raises:
        CaptureError: when the model says nothing about its inputs (pass ``example_inputs``).
    """
    device, dtype = _model_device_dtype(model)
    gen = torch.Generator().manual_seed(seed)
    main = getattr(model, "main_input_name", None)
    config = getattr(model, "config", None)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    def decoder_ids(kwargs: dict[str, Any]) -> None:
        # an encoder-decoder's decoder needs its own ids (T5, BART, Whisper...)
        if getattr(config, "is_encoder_decoder", False) and _accepts(model, "decoder_input_ids"):
            vocab = _vocab(getattr(config, "decoder", None) or config)
            ids = torch.randint(0, vocab, (batch, max(1, seq_len // 2)), generator=gen)
            kwargs["decoder_input_ids"] = ids.to(device)

    if main == "input_ids":
        ids = torch.randint(0, _vocab(getattr(config, "text_config", None) or config), (batch, seq_len), generator=gen)
        kwargs: dict[str, Any] = {"input_ids": ids.to(device)}
        decoder_ids(kwargs)
        vision = getattr(config, "vision_config", None)
        if vision is not None and _names(model, "pixel_values"):  # a text-image model (CLIP, SigLIP, BLIP)
            kwargs["pixel_values"] = randn(batch, getattr(vision, "num_channels", 3), *_image_size(vision))
        if flags:
            _add_flags(model, config, kwargs)
        return (), kwargs
    if main == "input_features":  # speech encoders on mel features (Whisper)
        frames = 2 * int(getattr(config, "max_source_positions", seq_len))  # the encoder's conv stride is 2
        kwargs = {"input_features": randn(batch, int(getattr(config, "num_mel_bins", 80)), frames)}
        decoder_ids(kwargs)
        if flags:
            _add_flags(model, config, kwargs)
        return (), kwargs
    if main == "input_values":  # raw-waveform encoders (Wav2Vec2, HuBERT): a fifth of a second at 16 kHz
        kwargs = {"input_values": randn(batch, 3200)}
        if flags:
            _add_flags(model, config, kwargs)
        return (), kwargs
    if main == "pixel_values":
        vision = getattr(config, "vision_config", None) or config
        kwargs = {"pixel_values": randn(batch, getattr(vision, "num_channels", 3), *_image_size(vision))}
        if _names(model, "input_ids") and getattr(config, "text_config", None) is not None:
            text_ids = torch.randint(0, _vocab(config.text_config), (batch, seq_len), generator=gen)
            kwargs["input_ids"] = text_ids.to(device)
        if flags:
            _add_flags(model, config, kwargs)
        return (), kwargs
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    timm_class = type(model).__module__.startswith("timm.")
    if (isinstance(pretrained_cfg, dict) and "input_size" in pretrained_cfg) or (timm_class and first_conv):
        # a timm model: from its pretrained cfg, or built from its class (no cfg) at timm's default 224
        channels, h, w = (
            pretrained_cfg["input_size"]
            if isinstance(pretrained_cfg, dict) and pretrained_cfg.get("input_size")
            else (3, 224, 224)
        )
        # a model built with img_size=... keeps the pretrained cfg's size; its patch embed knows better
        # likewise in_chans=...: the first convolution reads the image
        if first_conv is not None:
            channels = first_conv.in_channels
        for module in model.modules():
            img_size = getattr(module, "img_size", None)
            if isinstance(img_size, (tuple, list)) and len(img_size) == 2 and all(isinstance(v, int) for v in img_size):
                h, w = img_size
                break
        return (randn(batch, channels, h, w),), {}
    raise CaptureError(
        f"cannot build example inputs for {type(model).__name__}: it has neither a transformers "
        "`main_input_name` ('input_ids'/'pixel_values') nor a timm `pretrained_cfg['input_size']`; "
        "pass example_inputs=((args...), {kwargs...}) to convert()"
    )


def _accepts_pre_logits(fn) -> bool:
    try:
        return "pre_logits" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _nested_models(model: nn.Module) -> list[nn.Module]:
    """transformers models inside ``model`` (a user's wrapper, a PEFT model): their outputs, hidden
    states included, are outputs a user can ask for even when the wrapper does not return them."""
    return [
        m
        for m in model.modules()
        if m is not model
        and hasattr(getattr(m, "config", None), "output_hidden_states")
        and hasattr(m, "main_input_name")
    ]


class _EveryOutput(nn.Module):
    """The model as traced: its outputs, plus every output a user can ask for some other way.

    - timm: ``forward_features`` and ``forward_head(pre_logits=True)`` beside the logits;
    - transformers models nested in the model: everything they return (hidden states included).
    """

    def __init__(self, model: nn.Module, features: bool, nested: list[nn.Module]):
        super().__init__()
        self.model = model
        self.features = features
        self.nested = nested

    def forward(self, *args, **kwargs):
        collected: list[torch.Tensor] = []
        handles = [m.register_forward_hook(lambda _m, _i, out: collected.extend(all_tensors(out))) for m in self.nested]
        try:
            if self.features:
                features = self.model.forward_features(*args)
                outputs = [self.model.forward_head(features), features]
                if _accepts_pre_logits(self.model.forward_head):  # the pooled features, another public output
                    outputs.append(self.model.forward_head(features, pre_logits=True))
            else:
                outputs = [self.model(*args, **kwargs)]
        finally:
            for handle in handles:
                handle.remove()
        return tuple(outputs) + tuple(collected)


def _strip_prefix(program: torch.export.ExportedProgram, prefix: str) -> dict[str, str]:
    for node in program.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                key: (path[len(prefix) :] if path.startswith(prefix) else path, kind)
                for key, (path, kind) in stack.items()
            }
    return {
        name: fqn[len(prefix) :] if fqn.startswith(prefix) else fqn
        for name, fqn in program.graph_signature.inputs_to_parameters.items()
    }


@contextlib.contextmanager
def every_output_requested(model: nn.Module):
    """Every transformers model inside ``model`` (the model itself, or one nested in a user's
    wrapper) returns all its hidden states and builds no cache while this is active.

    Hidden states are outputs a user can ask for, so the trace must show them as outputs (a norm
    whose output is one then keeps its affine); a cache object cannot be traced. Set through each
    config, since a wrapper's forward decides which keywords reach the inner model.
    """
    saved = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None or any(c is config for c, _ in saved) or not hasattr(config, "output_hidden_states"):
            continue
        values = {
            name: getattr(config, name) for name in ("output_hidden_states", "use_cache") if hasattr(config, name)
        }
        saved.append((config, values))
    try:
        for config, values in saved:
            config.output_hidden_states = True
            if "use_cache" in values:
                config.use_cache = False
        yield
    finally:
        for config, values in saved:
            for name, value in values.items():
                setattr(config, name, value)


def capture_graph(model: nn.Module, example_inputs: ExampleInputs | None = None) -> Capture:
    """Export ``model`` (in training mode, as it will be fine-tuned) on fake tensors.

    The model's train/eval flags and configs are restored afterwards; its weights are never read.
    """
    if example_inputs is not None:
        args, kwargs = example_inputs
        kwargs = dict(kwargs)
        _add_flags(model, getattr(model, "config", None), kwargs, force=True)
    else:
        args, kwargs = example_inputs_for(model)
    start = time.perf_counter()
    wrap = (
        not kwargs
        and callable(getattr(model, "forward_features", None))
        and callable(getattr(model, "forward_head", None))
    )
    nested = _nested_models(model)
    wrapped = wrap or bool(nested)
    try:
        with preserved_modes(model), every_output_requested(model), no_lasting_additions(model):
            model.train()
            target = _EveryOutput(model, wrap, nested) if wrapped else model
            program = torch.export.export(target, tuple(args), dict(kwargs), strict=False)
    except Exception as exc:  # any tracing failure is reported, never guessed around
        raise CaptureError(f"torch.export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    if wrapped:
        params = _strip_prefix(program, "model.")
    else:
        params = dict(program.graph_signature.inputs_to_parameters)
    signature = program.graph_signature
    state = {*signature.inputs_to_parameters, *signature.inputs_to_buffers}
    state |= set(getattr(signature, "inputs_to_lifted_tensor_constants", {}) or {})
    return Capture(
        program=program,
        param_of_placeholder=params,
        seconds=time.perf_counter() - start,
        state_placeholders=frozenset(state),
    )
