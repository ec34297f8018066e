"""Graph capture: a torch.export graph of the user's model, built on fake tensors.

``torch.export`` (non-strict) runs the model's Python forward on fake tensors, so a 7B-parameter
model (even one on the ``meta`` device) is traced in seconds and without any real compute on its
weights. Every node carries ``nn_module_stack``, which maps it back to the module that ran it.
Example inputs come from the model's own config unless the user passes them.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .errors import CaptureError

ExampleInputs = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass
class Capture:
    """A captured graph and the maps from its placeholders to the model's parameters."""

    program: torch.export.ExportedProgram
    param_of_placeholder: dict[str, str]  # placeholder node name -> parameter fqn
    seconds: float

    @property
    def graph(self) -> torch.fx.Graph:
        return self.program.graph


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _add_flags(model: nn.Module, config: Any, kwargs: dict[str, Any]) -> None:
    # Every output the model can return must stay exact, so trace with all hidden states returned:
    # a norm whose output is a hidden state then keeps its affine instead of being folded away.
    if _accepts(model, "use_cache") and getattr(config, "use_cache", None) is not None:
        kwargs["use_cache"] = False
    if _accepts(model, "output_hidden_states"):
        kwargs["output_hidden_states"] = True


def example_inputs_for(model: nn.Module, batch: int = 2, seq_len: int = 8) -> ExampleInputs:
    """Build a small batch from the model's config: HF ``main_input_name`` or timm ``input_size``.

    Raises:
        CaptureError: when the model says nothing about its inputs (pass ``example_inputs``).
    """
    device, dtype = _model_device_dtype(model)
    main = getattr(model, "main_input_name", None)
    config = getattr(model, "config", None)
    if main == "input_ids":
        vocab = getattr(config, "vocab_size", None) or 32
        ids = torch.randint(0, max(1, min(int(vocab), 1000)), (batch, seq_len), device=device)
        kwargs: dict[str, Any] = {"input_ids": ids}
        if getattr(config, "is_encoder_decoder", False) and _accepts(model, "decoder_input_ids"):
            kwargs["decoder_input_ids"] = ids
        _add_flags(model, config, kwargs)
        return (), kwargs
    if main == "pixel_values":
        size = getattr(config, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        channels = getattr(config, "num_channels", 3)
        kwargs = {"pixel_values": torch.randn(batch, channels, h, w, device=device, dtype=dtype)}
        _add_flags(model, config, kwargs)
        return (), kwargs
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(pretrained_cfg, dict) and "input_size" in pretrained_cfg:
        channels, h, w = pretrained_cfg["input_size"]
        # a model built with img_size=... keeps the pretrained cfg's size; its patch embed knows better
        # likewise in_chans=...: the first convolution reads the image
        first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if first_conv is not None:
            channels = first_conv.in_channels
        for module in model.modules():
            img_size = getattr(module, "img_size", None)
            if isinstance(img_size, (tuple, list)) and len(img_size) == 2 and all(isinstance(v, int) for v in img_size):
                h, w = img_size
                break
        return (torch.randn(batch, channels, h, w, device=device, dtype=dtype),), {}
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


class _FeaturesToo(nn.Module):
    """Returns timm's ``forward_features`` and ``forward_head(pre_logits=True)`` outputs beside the
    logits, so every output a timm user can ask for stays exact."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args):
        features = self.model.forward_features(*args)
        outputs = [self.model.forward_head(features), features]
        if _accepts_pre_logits(self.model.forward_head):  # the pooled features, another public output
            outputs.append(self.model.forward_head(features, pre_logits=True))
        return tuple(outputs)


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


def capture_graph(model: nn.Module, example_inputs: ExampleInputs | None = None) -> Capture:
    """Export ``model`` (in training mode, as it will be fine-tuned) on fake tensors.

    The model's train/eval flags are restored afterwards; its weights are never read.
    """
    args, kwargs = example_inputs if example_inputs is not None else example_inputs_for(model)
    modes = {m: m.training for m in model.modules()}
    start = time.perf_counter()
    wrap = (
        not kwargs
        and callable(getattr(model, "forward_features", None))
        and callable(getattr(model, "forward_head", None))
    )
    try:
        model.train()
        target = _FeaturesToo(model) if wrap else model
        program = torch.export.export(target, tuple(args), dict(kwargs), strict=False)
    except Exception as exc:  # any tracing failure is reported, never guessed around
        raise CaptureError(f"torch.export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    finally:
        for m, training in modes.items():
            m.training = training
    if wrap:
        params = _strip_prefix(program, "model.")
    else:
        params = dict(program.graph_signature.inputs_to_parameters)
    return Capture(
        program=program,
        param_of_placeholder=params,
        seconds=time.perf_counter() - start,
    )
