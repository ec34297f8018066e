"""timm models no issue names: converted exactly (norms "share" and "fold", activations="recompute"), judged by the test
against a copy of the stock model (outputs and the gradient reaching the patch embedding), and
something converted."""

import copy

import pytest
import timm
import torch
from tiny_zoo import assert_exact_conversion, randomize_affine

import lowmembp_convert as lc
from lowmembp_convert.capture import example_inputs_for

CASES = {
    "beit_base_patch16_224": dict(depth=2, img_size=64),  # computed qkv bias: keep_affine
    "eva02_tiny_patch14_224": dict(depth=2, img_size=56),  # SwiGLU + rotary
    "mixer_s16_224": dict(img_size=64),  # token-mixing Linear: keep_affine
    "cait_xxs24_224": dict(depth=2, depth_token_only=1, img_size=64),
    "convnextv2_atto": dict(depths=(1, 1, 1, 1)),  # conv_mlp + GRN
    "xcit_nano_12_p16_224": dict(depth=2, img_size=64),
    "edgenext_xx_small": dict(depths=(1, 1, 1, 1)),
}


@pytest.mark.parametrize("norms", ["share", "fold"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_timm_converts_with_identical_outputs(name, norms):
    torch.manual_seed(0)
    original = randomize_affine(timm.create_model(name, pretrained=False, num_classes=10, **CASES[name]))
    model = lc.convert(copy.deepcopy(original), activations="recompute", norms=norms, verify_rtol=1e-5)
    report = model.lowmembp_report
    assert report.converted_norms > 0, str(report)
    if norms == "share":  # the default reparameterizes nothing
        before, after = original.state_dict(), model.state_dict()
        assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert_exact_conversion(original, model, example_inputs_for(original))
