"""timm models built from their class (no pretrained cfg): inputs come from the patch embed or timm's
default size, so the graph is captured and the conversion saves memory, exactly.

Oracle: a deep copy of the stock model, gradients of every parameter.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from lowmembp_convert import activation_memory, convert

timm = pytest.importorskip("timm")


def _models():
    from timm.models.convnext import ConvNeXt
    from timm.models.mlp_mixer import MlpMixer
    from timm.models.vision_transformer import VisionTransformer

    return {
        "mixer": lambda: MlpMixer(img_size=32, patch_size=8, num_blocks=2, embed_dim=32, num_classes=5),
        "vit": lambda: VisionTransformer(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=4, num_classes=5),
        "convnext": lambda: ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=5),
    }


@pytest.mark.parametrize("name", ["mixer", "vit", "convnext"])
def test_class_built_timm_model_is_captured_and_exact(name: str) -> None:
    torch.manual_seed(0)
    stock = _models()[name]().train()
    with torch.no_grad():
        for n, p in stock.named_parameters():
            if p.ndim == 1 and "norm" in n:
                p.copy_(torch.rand_like(p) + 0.5 if n.endswith("weight") else torch.randn_like(p))
    model = copy.deepcopy(stock)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no capture warning, no verify-skipped warning
        convert(model)
    plan = model.lowmembp_report.plan
    assert plan.capture.startswith("torch.export"), plan.capture
    assert any(s.action != "skip" for s in plan.norms)
    assert all(s.option == "recompute" for s in plan.activations), [s.reason for s in plan.activations]
    size = 32 if name != "convnext" else 64
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    for m in (stock, model):
        m.zero_grad()
        m(x).square().sum().backward()
    for (n, a), b in zip(stock.named_parameters(), model.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6 * a.grad.abs().max().item()), n
    saved = [activation_memory(lambda m=m: m(x).sum(), params=m).total for m in (stock, model)]
    assert saved[1] < 0.8 * saved[0], saved
