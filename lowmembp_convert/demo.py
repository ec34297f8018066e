"""The built-in demo: build small models locally (no downloads), convert them, show the reports.

Run with ``lowmembp-convert --demo`` or ``python -m lowmembp_convert.demo``. Each model is converted
with ``verify=True`` (outputs compared with the original) and ``measure_memory=True`` (bytes saved
for backward in one training step, before and after, in the same run).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch
import torch.nn as nn

from .api import convert
from .optional import optional_import


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


def _llama() -> nn.Module:
    transformers = optional_import("transformers")
    if transformers is None:
        raise DemoPartUnavailable("transformers is not installed (pip install 'lowmembp-convert[hf]')")
    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=8,
        num_hidden_layers=4, vocab_size=1000, max_position_embeddings=256,
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(config)


def _vit() -> nn.Module:
    timm = optional_import("timm")
    if timm is None:
        raise DemoPartUnavailable("timm is not installed (pip install 'lowmembp-convert[timm]')")
    return timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64, depth=4)


class DemoPartUnavailable(RuntimeError):
    """A demo part cannot be built on this install; the message says why and how to fix it."""


# (title, builder): every part must run; a part that cannot is a failure of the demo, named.
DEMO_PARTS: list[tuple[str, Callable[[], nn.Module]]] = [
    ("transformers LLaMA (4 layers, hidden 256)", _llama),
    ("timm ViT-S/16 (4 blocks, 64x64 images)", _vit),
]


def main() -> int:
    """Run every part; exit status 1 naming each part that failed (and why), 0 only if all ran."""
    torch.manual_seed(0)
    failed: list[str] = []
    for title, build in DEMO_PARTS:
        try:
            model = _randomise_norms(build())
            start = time.perf_counter()
            convert(model, verify=True, measure_memory=True)
        except Exception as exc:  # each part is reported, then the demo fails as a whole
            failed.append(f"{title}: {type(exc).__name__}: {exc}")
            print(f"\n=== {title}: FAILED\n{type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        print(f"\n=== {title}: converted in {time.perf_counter() - start:.1f} s")
        print(model.lowmembp_report)
    if failed:
        print(f"\ndemo FAILED: {len(failed)} of {len(DEMO_PARTS)} part(s) did not run:", file=sys.stderr)
        for line in failed:
            print(f"  - {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
