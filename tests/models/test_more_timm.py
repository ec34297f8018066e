"""timm models no issue names: converted with verify=True (outputs equal), something converted."""

import pytest
import timm
import torch

import lowmembp_convert as lc

CASES = {
    "beit_base_patch16_224": dict(depth=2, img_size=64),  # computed qkv bias: keep_affine
    "eva02_tiny_patch14_224": dict(depth=2, img_size=56),  # SwiGLU + rotary
    "mixer_s16_224": dict(img_size=64),  # token-mixing Linear: keep_affine
    "cait_xxs24_224": dict(depth=2, depth_token_only=1, img_size=64),
    "convnextv2_atto": dict(depths=(1, 1, 1, 1)),  # conv_mlp + GRN
    "xcit_nano_12_p16_224": dict(depth=2, img_size=64),
    "edgenext_xx_small": dict(depths=(1, 1, 1, 1)),
}


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            for name in ("weight", "bias"):
                p = module._parameters.get(name)
                if p is not None and p.dim() == 1 and not isinstance(module, torch.nn.Linear):
                    p.copy_((1.0 if name == "weight" else 0.0) + 0.3 * torch.randn(p.shape, generator=gen))
    return model


@pytest.mark.parametrize("name", sorted(CASES))
def test_timm_converts_with_identical_outputs(name):
    torch.manual_seed(0)
    model = _randomise(timm.create_model(name, pretrained=False, num_classes=10, **CASES[name]))
    lc.convert(model, verify=True, verify_rtol=1e-5)
    report = model.lowmembp_report
    assert report.converted_norms > 0 and report.converted_activations > 0, str(report)
