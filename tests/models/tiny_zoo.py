"""Tiny transformers / timm models built from configs, and the independent oracles the model tests use.

Every factory builds a 2-block model (a few thousand parameters) with no hub access, then
:func:`randomize_affine` gives every norm weight and bias, every bias and every layer-scale gamma
random values: the init values (1 and 0) make a missing or doubled fold invisible.

What a test expects of the analysis is written here per family, from the architecture (where each
norm's output goes), not read back from the converter: ``keep`` and ``skip`` map norm-name patterns
to the reason the analysis must give; every other norm must be folded. The counts of activation and
norm modules are taken by module type, again without asking the converter.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

Inputs = tuple[tuple[Any, ...], dict[str, Any]]

# Module classes that compute GELU / tanh-GELU / SiLU (the ones our families use), by type.
_ACTIVATION_CLASSES = {
    "transformers.activations": {
        "GELUActivation",
        "NewGELUActivation",
        "GELUTanh",
        "PytorchGELUTanh",
        "SiLUActivation",
    },
    "timm.layers.activations": {"GELU", "GELUTanh", "Swish"},
}


# Elementwise activations by type (torch's): the analysis finds any pure elementwise module.
_ELEMENTWISE_TORCH = (nn.GELU, nn.SiLU, nn.Tanh, nn.ReLU, nn.Sigmoid, nn.Mish, nn.Hardswish, nn.Softplus)


def is_activation_module(module: nn.Module) -> bool:
    if isinstance(module, _ELEMENTWISE_TORCH):
        return True
    return type(module).__name__ in _ACTIVATION_CLASSES.get(type(module).__module__, ())


def is_norm_module(module: nn.Module) -> bool:
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    return type(module).__name__.endswith(("LayerNorm", "RMSNorm", "LayerNorm2d"))


def activation_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if is_activation_module(m)]


def norm_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if is_norm_module(m)]


def randomize_affine(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random norm scales (|s| in [0.5, 1.5], random signs), biases and layer-scale gammas, in place.

    A norm whose weight starts at all zeros scales by (1 + w) (Gemma): its w is set so that 1 + w
    has the same distribution as the other scales.
    """
    gen = torch.Generator().manual_seed(seed)

    def scale(shape) -> torch.Tensor:
        return (torch.rand(shape, generator=gen) + 0.5) * torch.randn(shape, generator=gen).sign()

    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if is_norm_module(module) and isinstance(weight, nn.Parameter):
                offset = 1.0 if bool(torch.all(weight == 0)) else 0.0
                weight.copy_(scale(weight.shape) - offset)
            for name, p in module.named_parameters(recurse=False):
                if name == "bias" and p.dim() == 1:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
                elif name == "gamma" and p.dim() == 1:  # timm layer scale (ConvNeXt init 1e-6)
                    p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return model


def relative_error(ref: torch.Tensor, got: torch.Tensor) -> float:
    """max |ref - got| / max |ref|, in float64."""
    ref, got = ref.detach().double(), got.detach().double()
    return ((ref - got).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def assert_grads_match(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float = 1e-4) -> None:
    """Each gradient within ``rtol`` of its expected value, relative to its own largest entry.

    Entries that are zero in exact arithmetic (the key bias of softmax attention) are compared at a
    floor of 1e-3 x the largest gradient of the whole model, so their rounding noise does not count.
    """
    floor = 1e-3 * max(g.detach().abs().max().item() for g in expected.values())
    for name, want in expected.items():
        got = actual[name]
        assert got is not None, f"{name}: no gradient"
        error = (got.detach().double() - want.detach().double()).abs().max().item()
        scale = max(want.detach().abs().max().item(), floor)
        assert error <= rtol * scale, f"{name}: gradient off by {error:.3e} (scale {scale:.3e})"


def logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out.logits


# --------------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """A tiny model of one architecture and what the analysis must decide for it.

    Attributes:
        build: returns the model (random init, not yet randomised).
        inputs: ``inputs(seed, batch)`` -> (args, kwargs) of one forward.
        labels: ``labels(logits, seed)`` -> class targets for a cross-entropy loss.
        embedding: parameter name of the input (token or patch) embedding.
        keep: norm-name regex -> regex its keep_affine reason must match (``norms="fold"``).
        skip: norm-name regex -> regex its skip reason must match (both norm modes).
        share_skip: norm-name regex -> the skip reason under ``norms="share"`` where it differs from
            the ``skip`` one (the fold's "cannot fold (...)" preamble is not there).
        stock_activations: activation-name regex -> regex of the reason ``activations="auto"`` (exact
            options only) leaves it stock: recompute is impossible there; only ``"approx"`` converts it.
        weight_offset: 1.0 where the norms scale by (1 + w).
    """

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int], Inputs]
    embedding: str
    keep: dict[str, str] = field(default_factory=dict)
    skip: dict[str, str] = field(default_factory=dict)
    share_skip: dict[str, str] = field(default_factory=dict)
    stock_activations: dict[str, str] = field(default_factory=dict)
    weight_offset: float = 0.0  # the norms scale by (weight + weight_offset): 1.0 for Gemma

    def make(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return randomize_affine(self.build(), seed).eval()

    def expected(self, norm: str, norms: str = "fold") -> tuple[str, str]:
        """(action, reason regex) this norm must get with ``convert(norms=norms)``.

        ``"fold"``: as the ``keep`` / ``skip`` tables say, every other norm folded. ``"share"`` (the
        default): the same norms are skipped (``share_skip`` overriding the reason) and every other
        one keeps its affine, for no reason but that it is the default (an empty reason).
        """
        tables = ((self.keep, "keep_affine"), (self.skip, "skip"))
        if norms == "share":
            tables = ((self.share_skip, "skip"), (self.skip, "skip"))
        for table, action in tables:
            for pattern, reason in table.items():
                if re.fullmatch(pattern, norm):
                    return action, reason
        return ("keep_affine", "^$") if norms == "share" else ("fold", "")

    def stock_activation(self, module: str) -> str | None:
        """The reason regex ``activations="auto"`` must give for leaving this site stock, or None
        when the site is converted (recomputed)."""
        for pattern, reason in self.stock_activations.items():
            if re.fullmatch(pattern, module):
                return reason
        return None


def _text_inputs(vocab: int, low: int = 0) -> Callable[[int, int], Inputs]:
    def make(seed: int, batch: int = 2) -> Inputs:
        gen = torch.Generator().manual_seed(seed)
        return (), {"input_ids": torch.randint(low, vocab, (batch, 8), generator=gen)}

    return make


def _image_inputs(size: int, *, hf: bool) -> Callable[[int, int], Inputs]:
    def make(seed: int, batch: int = 2) -> Inputs:
        gen = torch.Generator().manual_seed(seed)
        pixels = torch.randn(batch, 3, size, size, generator=gen)
        return ((), {"pixel_values": pixels}) if hf else ((pixels,), {})

    return make


VOCAB = 64
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
_ENCODER = dict(_DECODER, max_position_embeddings=40)
_RETURNED = r"affine kept in the norm: returned from the model's forward"


def _hf(model_cls: str, config_cls: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        config = getattr(transformers, config_cls)(**kwargs)
        return getattr(transformers, model_cls)(config)

    return build


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=5, **kwargs)

    return build


_DECODER_FAMILY = dict(
    inputs=_text_inputs(VOCAB), embedding="model.embed_tokens.weight", keep={"model.norm": _RETURNED}
)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("llama", _hf("LlamaForCausalLM", "LlamaConfig", **_DECODER, num_key_value_heads=2), **_DECODER_FAMILY),
        Family(
            "mistral", _hf("MistralForCausalLM", "MistralConfig", **_DECODER, num_key_value_heads=2), **_DECODER_FAMILY
        ),
        # Qwen2: q/k/v have biases
        Family("qwen2", _hf("Qwen2ForCausalLM", "Qwen2Config", **_DECODER, num_key_value_heads=2), **_DECODER_FAMILY),
        # Qwen3: per-head q_norm / k_norm feed rotary embeddings and attention, not a Linear
        Family(
            "qwen3",
            _hf("Qwen3ForCausalLM", "Qwen3Config", **_DECODER, num_key_value_heads=2, head_dim=8),
            inputs=_text_inputs(VOCAB),
            embedding="model.embed_tokens.weight",
            keep={"model.norm": _RETURNED},
            skip={r"model\.layers\.\d\.self_attn\.[qk]_norm": r"no Linear layer consumes its output"},
        ),
        # Gemma: RMSNorm scales by (1 + w); tanh-GELU
        Family(
            "gemma",
            _hf("GemmaForCausalLM", "GemmaConfig", **_DECODER, num_key_value_heads=2, head_dim=8),
            **_DECODER_FAMILY,
            weight_offset=1.0,
        ),
        # GPT-2: Conv1D consumers (weight [in, out]), tied lm_head, the final ln_f is a model output
        Family(
            "gpt2",
            _hf(
                "GPT2LMHeadModel",
                "GPT2Config",
                vocab_size=VOCAB,
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_positions=32,
                bos_token_id=0,
                eos_token_id=0,
            ),
            inputs=_text_inputs(VOCAB),
            embedding="transformer.wte.weight",
            keep={"transformer.ln_f": _RETURNED},
            # NewGELUActivation writes tanh-GELU out by hand: recomputed by re-running the module itself
        ),
        # BERT / RoBERTa: post-norm. Each encoder norm's output feeds the next block's Linear *and* its
        # residual add, so the affine stays in the norm. The embeddings norm reaches its consumers
        # through Dropout(p=0.1), so nothing can be shared; RoBERTa's last norm likewise through the
        # classifier's dropout, while BERT's last norm feeds the pooler (through a token select).
        Family(
            "bert",
            _hf("BertForSequenceClassification", "BertConfig", **_ENCODER, num_labels=3),
            inputs=_text_inputs(VOCAB),
            embedding="bert.embeddings.word_embeddings.weight",
            keep={
                r"bert\.encoder\.layer\.0\.output\.LayerNorm": (
                    r"affine kept in the norm: add in bert\.encoder\.layer\.1"
                ),
                r"bert\.encoder\.layer\.\d\.attention\.output\.LayerNorm": r"affine kept in the norm: add in ",
                r"bert\.encoder\.layer\.1\.output\.LayerNorm": _RETURNED,
            },
            skip={r"bert\.embeddings\.LayerNorm": r"sharing would break: dropout .*\(p=0\.1\)"},
            # the pooler's tanh keeps its output, which the classifier keeps anyway (through a dropout)
            stock_activations={r"bert\.pooler\.activation": r"keeps only its output"},
        ),
        Family(
            "roberta",
            _hf("RobertaForSequenceClassification", "RobertaConfig", **_ENCODER, num_labels=3),
            inputs=_text_inputs(VOCAB, low=2),  # ids 0/1 are <s>/<pad>: keep position ids simple
            embedding="roberta.embeddings.word_embeddings.weight",
            keep={
                r"roberta\.encoder\.layer\.0\.output\.LayerNorm": (
                    r"affine kept in the norm: add in roberta\.encoder\.layer\.1"
                ),
                r"roberta\.encoder\.layer\.\d\.attention\.output\.LayerNorm": r"affine kept in the norm: add in ",
            },
            skip={
                r"roberta\.embeddings\.LayerNorm": r"sharing would break: dropout .*\(p=0\.1\)",
                r"roberta\.encoder\.layer\.1\.output\.LayerNorm": (
                    r"sharing would break: dropout in classifier\.dropout \(p=0\.1\)"
                ),
            },
        ),
        # HF ViT: pre-norm; the final layernorm feeds only the classifier (through the CLS select)
        Family(
            "vit",
            _hf(
                "ViTForImageClassification",
                "ViTConfig",
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                image_size=16,
                patch_size=4,
                num_labels=5,
            ),
            inputs=_image_inputs(16, hf=True),
            embedding="vit.embeddings.patch_embeddings.projection.weight",
            # the inner ViTModel returns the final norm's output (last_hidden_state): a user can ask for it
            keep={"vit.layernorm": _RETURNED},
        ),
        # timm: forward_features (the final norm's output) is a model output
        Family(
            "timm_vit",
            _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4),
            inputs=_image_inputs(32, hf=False),
            embedding="patch_embed.proj.weight",
            keep={"norm": _RETURNED},
        ),
        Family(
            "deit",
            _timm("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4),
            inputs=_image_inputs(32, hf=False),
            embedding="patch_embed.proj.weight",
            keep={"norm": _RETURNED},
        ),
        # Swin: window partition / roll between norm1 and qkv (folds through copies); the patch-embed
        # norm feeds the first block's norm and residual; the final norm is pooled (a copy) and returned;
        # the patch-merging reduction has no bias to take the norm's shift, so that norm keeps its affine.
        Family(
            "swin",
            _timm(
                "swin_tiny_patch4_window7_224",
                img_size=32,
                patch_size=2,
                embed_dim=16,
                depths=(1, 1),
                num_heads=(2, 4),
                window_size=4,
            ),
            inputs=_image_inputs(32, hf=False),
            embedding="patch_embed.proj.weight",
            keep={
                r"layers\.1\.downsample\.norm": (
                    r"layers\.1\.downsample\.reduction has no bias( parameter)? to take the norm's shift"
                )
            },
            skip={
                "patch_embed.norm": (
                    r"no Linear layer consumes its output \(used by: layer_norm in layers\.0\.blocks\.0\.norm1, add"
                ),
                "norm": r"cannot fold \(returned from the model's forward\) and no Linear receives the output itself",
            },
            # without the fold nothing is saved where the window partition copies norm1's output on its
            # way to qkv, nor for the (pooled) final norm
            share_skip={
                r"norm|layers\.\d\.blocks\.0\.norm1": (
                    r"^no Linear receives the output itself \(it is copied on the way\), so nothing is shared"
                )
            },
        ),
        # ConvNeXt with nn.LayerNorm + Linear MLPs (conv_mlp=False) and with LayerNorm2d + 1x1 convs;
        # the stem norm feeds the first block's depthwise conv and its residual.
        Family(
            "convnext",
            _timm("convnext_atto", conv_mlp=False, dims=(8, 16, 24, 32), depths=(1, 1, 1, 1)),
            inputs=_image_inputs(32, hf=False),
            embedding="stem.0.weight",
            keep={
                r"stem\.1": r"affine kept in the norm: add in stages\.0\.blocks\.0",
                # forward_head(pre_logits=True) returns the normed, pooled features: kept exact
                r"head\.norm": _RETURNED,
            },
        ),
        Family(
            "convnext_conv_mlp",
            _timm("convnext_atto", conv_mlp=True, dims=(8, 16, 24, 32), depths=(1, 1, 1, 1)),
            inputs=_image_inputs(32, hf=False),
            embedding="stem.0.weight",
            keep={
                r"stem\.1": r"affine kept in the norm: add in stages\.0\.blocks\.0",
                # forward_head(pre_logits=True) returns the normed, pooled features: kept exact
                r"head\.norm": _RETURNED,
            },
            # the MLP's activation feeds a 1x1 conv, which no recompute is proven for
            stock_activations={
                r"stages\.\d\.blocks\.0\.mlp\.act": r"recompute is not possible here \(its output does not go "
                r"\(alone, or through one gating multiply\) into a Linear\)"
            },
        ),
    ]
}


def _with_lora(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """PEFT LoRA on q, v and the MLP's down projection, float64 adapters on a float32 model: wider
    adapters, as PEFT's default fp32 adapters on a bf16 model, at precisions that keep the exactness
    checks tight (and a LoRA consumer for the MLP recompute)."""

    def make() -> nn.Module:
        import peft

        config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
        model = peft.get_peft_model(build(), config)
        for name, module in model.named_modules():
            if ".lora_" in name and isinstance(module, nn.Linear):
                module.double()
        return model

    return make


# Families outside the zoo-wide tests, for the checks that need them (the rewrite contracts).
EXTRA_FAMILIES: dict[str, Family] = {
    "llama_lora": Family(
        "llama_lora",
        _with_lora(_hf("LlamaForCausalLM", "LlamaConfig", **_DECODER, num_key_value_heads=2)),
        inputs=_text_inputs(VOCAB),
        embedding="base_model.model.model.embed_tokens.weight",
    ),
}


def forward(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    args, kwargs = inputs
    return logits_of(model(*args, **kwargs))


def projection_loss(logits: torch.Tensor, seed: int = 123) -> torch.Tensor:
    """A scalar with a dense, non-degenerate gradient: <logits, R> for a fixed random R."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(logits.shape, generator=gen).to(logits.dtype)
    return (logits.float() * weights.float()).sum() / logits.numel() ** 0.5


def cross_entropy(logits: torch.Tensor, seed: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    flat = logits.float().reshape(-1, logits.shape[-1])
    target = torch.randint(0, logits.shape[-1], (flat.shape[0],), generator=gen)
    return nn.functional.cross_entropy(flat, target)


# --------------------------------------------------------------------------------------------------
# The chain-rule oracle for folded consumers
# --------------------------------------------------------------------------------------------------


def _in_axis(module: nn.Module) -> int:
    """The weight axis that holds the consumer's input channels, from the module's type."""
    if type(module).__name__ == "Conv1D":  # transformers' Conv1D: weight [in, out]
        return 0
    if isinstance(module, nn.Linear):
        return 1
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups != 1:
            raise NotImplementedError(f"oracle for a grouped conv consumer ({module})")
        return 1
    raise NotImplementedError(f"no oracle for consumer type {type(module).__name__}")


def _along(vec: torch.Tensor, weight: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * weight.dim()
    shape[axis] = -1
    return vec.reshape(shape)


def expected_original_grads(
    original: nn.Module, converted: nn.Module, plan, weight_offset: float = 0.0
) -> dict[str, torch.Tensor]:
    """dL/d(original parameter) predicted from the converted model's gradients, by the chain rule.

    For a folded norm with scale gamma and (folded) shift beta and a consumer z = W y + b:
    W' = W * gamma (on the input axis), b' = b + sum_in W * beta, so
        dL/dW     = dL/dW' * gamma + dL/db' (x) beta
        dL/db     = dL/db'
        dL/dgamma = sum over consumers and non-input axes of dL/dW' * W
        dL/dbeta  = sum over consumers of sum_out dL/db' * (W summed over the kernel)
    Every other parameter's gradient must equal the converted model's own. Returned in float64.
    """
    orig_params = dict(original.named_parameters())
    conv_params = dict(converted.named_parameters())
    expected = {name: conv_params[name].grad.double() for name in orig_params if name in conv_params}
    for site in plan.norms:
        if site.action != "fold":
            continue
        norm = original.get_submodule(site.module)
        gamma = norm.weight.detach().double() + weight_offset if site.weight else None
        beta = norm.bias.detach().double() if site.bias and site.fold_bias else None
        d_gamma = torch.zeros_like(gamma) if gamma is not None else None
        d_beta = torch.zeros_like(beta) if beta is not None else None
        for consumer in site.consumers:
            layer = original.get_submodule(consumer.module)
            axis = _in_axis(layer)
            w = orig_params[consumer.weight].detach().double()
            dw_folded = conv_params[consumer.weight].grad.double()
            db_folded = conv_params[consumer.bias].grad.double() if consumer.bias else None
            others = tuple(d for d in range(w.dim()) if d != axis)
            dw = dw_folded * (_along(gamma, w, axis) if gamma is not None else 1.0)
            if beta is not None:
                out_axis = 1 - axis if w.dim() == 2 else 0
                dw = dw + _along(db_folded, w, out_axis) * _along(beta, w, axis)
                kernel = tuple(range(2, w.dim()))
                w_summed = w.sum(kernel) if kernel else w
                d_beta += (w_summed * _along(db_folded, w_summed, 1 - axis if w.dim() == 2 else 0)).sum(
                    1 - axis if w.dim() == 2 else 0
                )
            if gamma is not None:
                d_gamma += (dw_folded * w).sum(others)
            expected[consumer.weight] = dw
        if gamma is not None:
            expected[site.weight] = d_gamma
        if beta is not None:
            expected[site.bias] = d_beta
    return expected


# --------------------------------------------------------------------------------------------------
# An independent check of an exact conversion (norms + exact activation options)
# --------------------------------------------------------------------------------------------------


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    return []


def _input_embedding(model: nn.Module) -> nn.Module:
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter) and getter() is not None:
        return getter()
    for name in ("patch_embed", "stem", "embeddings"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"no input embedding found in {type(model).__name__}")


def outputs_and_embedding_grad(model: nn.Module, inputs: Inputs, seed: int = 0) -> tuple[list, torch.Tensor]:
    """Every floating output of a training-mode forward (dropout seeded) and dL/d(embedding output)
    for a fixed random projection loss over all outputs."""
    args, kwargs = inputs
    captured: dict[str, torch.Tensor] = {}

    def keep(_m, _i, out):
        out = out[0] if isinstance(out, tuple) else out
        if "out" not in captured:  # the first call: the encoder's input
            out.retain_grad()
            captured["out"] = out

    embedding = _input_embedding(model)
    weight = getattr(embedding, "weight", None)
    # encoder-decoders (T5, BART) embed through other modules sharing the embedding's weight
    hooked = [m for m in model.modules() if weight is not None and getattr(m, "weight", None) is weight]
    handles = [m.register_forward_hook(keep) for m in hooked or [embedding]]
    model.train()
    try:
        torch.manual_seed(seed)
        outs = _tensors(model(*args, **kwargs))
        gen = torch.Generator().manual_seed(seed + 1)
        loss = sum((t.float() * torch.randn(t.shape, generator=gen)).sum() for t in outs)
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    return [t.detach() for t in outs], captured["out"].grad


def assert_exact_conversion(original: nn.Module, converted: nn.Module, inputs: Inputs, rtol: float = 1e-4) -> None:
    """Outputs (all of them) and the gradient reaching the input embedding equal the original's."""
    a_out, a_grad = outputs_and_embedding_grad(original, inputs)
    b_out, b_grad = outputs_and_embedding_grad(converted, inputs)
    assert len(a_out) == len(b_out)
    for i, (a, b) in enumerate(zip(a_out, b_out, strict=True)):
        assert relative_error(a, b) < 1e-5, f"output {i} differs: {relative_error(a, b):.2e}"
    assert relative_error(a_grad, b_grad) < rtol, f"embedding gradient differs: {relative_error(a_grad, b_grad):.2e}"
