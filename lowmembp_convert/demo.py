"""The built-in demo: build small models locally (no downloads), convert them, show the reports.

Run with ``lowmembp-convert --demo`` or ``python -m lowmembp_convert.demo``. Each model is converted
with ``verify=True`` (outputs compared with the original) and ``measure_memory=True`` (bytes saved
for backward in one training step, before and after, in the same run).
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from .api import convert


def _randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random norm weights/biases, as a fine-tuned checkpoint would have (1 and 0 hide folding bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name in ("weight", "bias"):
                p = module._parameters.get(name)
                if p is not None and p.dim() == 1 and not isinstance(module, nn.Linear):
                    base = 1.0 if name == "weight" else 0.0
                    p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
    return model


def demo_models() -> list[tuple[str, nn.Module]]:
    """Small models of the two libraries, built from configs (whatever of them is installed)."""
    models: list[tuple[str, nn.Module]] = []
    try:
        from transformers import AutoModelForCausalLM, LlamaConfig

        config = LlamaConfig(
            hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=8,
            num_hidden_layers=4, vocab_size=1000, max_position_embeddings=256,
        )  # fmt: skip
        models.append(("transformers LLaMA (4 layers, hidden 256)", AutoModelForCausalLM.from_config(config)))
    except ImportError:
        pass
    try:
        import timm

        vit = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64, depth=4)
        models.append(("timm ViT-S/16 (4 blocks, 64x64 images)", vit))
    except ImportError:
        pass
    return models


def main() -> int:
    torch.manual_seed(0)
    models = demo_models()
    if not models:
        print("the demo needs transformers or timm: pip install 'lowmembp-convert[hf,timm]'")
        return 1
    for title, model in models:
        _randomise_norms(model)
        start = time.perf_counter()
        convert(model, verify=True, measure_memory=True)
        print(f"\n=== {title}: converted in {time.perf_counter() - start:.1f} s")
        print(model.lowmembp_report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
