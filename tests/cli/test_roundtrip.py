"""End to end: convert a saved checkpoint, reload it with the stock library only, compare outputs.

For each family: the converted checkpoint computes what the original computes (fp32, max relative
error < 1e-5), carries the conversion record, and ``lowmembp_convert.convert`` on the reloaded model
equals converting the original directly with the fold the CLI does (``norms="fold"``), without folding
anything a second time, whether asked to fold again or (the default) to share the identity norms.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from cli_helpers import TIMM_CASES, cli, first_output, hf_model, model_inputs, rel_err, timm_model
from safetensors import safe_open

import lowmembp_convert
from lowmembp_convert.checkpoint.load import sync_timm_input_size
from lowmembp_convert.checkpoint.torch_file import load_torch_file, read_torch_record

HF_FAMILIES = ["llama", "mistral", "qwen2", "gemma", "gpt2", "bert", "roberta", "vit"]


def _check_convert_twice(original, reloaded, record_folded, inputs):
    """convert(reloaded) == convert(original, norms="fold"), and convert(reloaded) rescales no folded
    consumer: norms="fold" sees the fold done already, the default shares the identity norms as they are."""
    direct = lowmembp_convert.convert(copy.deepcopy(original), norms="fold")
    direct_folded = {s.module for s in direct.lowmembp_report.plan.norms if s.action == "fold"}
    assert set(record_folded) <= direct_folded
    reference = first_output(original, inputs)
    assert rel_err(reference, first_output(direct, inputs)) < 1e-5, "convert() of the original model"
    before = {k: v.clone() for k, v in reloaded.state_dict().items()}
    # the default decides on the reloaded (identity) norms as on the original's
    shared = {s.module: s.action for s in lowmembp_convert.plan_conversion(original, activations=False).norms}
    for norms in ("fold", "share"):
        again = lowmembp_convert.convert(copy.deepcopy(reloaded), norms=norms)
        plan = again.lowmembp_report.plan
        for name in record_folded:
            site = plan.norm(name)
            if norms == "fold":
                assert site.action == "fold" and site.already_folded, f"{name}: {site.action} {site.reason}"
            else:
                assert site.action == shared[name], f"{name}: {site.action} {site.reason}"
            for consumer in site.consumers:
                assert torch.equal(again.get_parameter(consumer.weight), before[consumer.weight]), consumer.weight
        if norms == "share":  # nothing changes on the reloaded checkpoint's parameters
            after = again.state_dict()
            assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
        assert rel_err(reference, first_output(again, inputs)) < 1e-5, f"convert(norms={norms!r}) of the reloaded"
        assert rel_err(first_output(direct, inputs), first_output(again, inputs)) < 1e-5


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_transformers_round_trip(family, tmp_path, capsys):
    original = hf_model(family)
    src, dst = tmp_path / "in", tmp_path / "out"
    original.save_pretrained(src)
    (src / "tokenizer_config.json").write_text('{"model_max_length": 32}')

    post_norm = family in ("bert", "roberta")  # nothing folds: the CLI writes only with --force-copy
    code, out, err = cli([src, dst, "--quiet"] + (["--force-copy"] if post_norm else []), capsys)
    assert code == 0, err

    reloaded = type(original).from_pretrained(dst).eval()  # the stock library, nothing else
    inputs = model_inputs(original)
    assert rel_err(first_output(original, inputs), first_output(reloaded, inputs)) < 1e-5

    config = json.loads((dst / "config.json").read_text())
    record = config["lowmembp_convert"]
    assert record["architecture"] == type(original).__name__
    assert reloaded.config.lowmembp_convert == record
    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["lowmembp_convert"]) == record
        assert f.metadata()["format"] == "pt"
    assert (dst / "tokenizer_config.json").read_text() == '{"model_max_length": 32}'
    for name in record["folded"]:  # the folded norms' own affine is identity now
        norm = reloaded.get_submodule(name)
        identity = 0.0 if family == "gemma" else 1.0
        assert torch.all(norm.weight == identity), name
    if family in ("llama", "mistral", "qwen2", "gemma", "gpt2", "vit"):
        assert record["folded"], "expected the pre-norm blocks to fold"

    _check_convert_twice(original, reloaded, record["folded"], inputs)


# swin and convnext round trips take 10-20 s each (windowed attention, conv stages): the slow set
_SLOW_TIMM = {"swin_tiny_patch4_window7_224", "convnext_atto"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_TIMM else n for n in TIMM_CASES]
)
def test_timm_state_dict_round_trip(name, tmp_path, capsys):
    import timm
    from safetensors.torch import load_file, save_file

    kwargs, suffix = TIMM_CASES[name]
    original = timm_model(name)
    src, dst = tmp_path / f"weights{suffix}", tmp_path / f"converted{suffix}"
    if suffix == ".safetensors":
        save_file(original.state_dict(), src)
    else:
        torch.save(original.state_dict(), src)

    code, out, err = cli([src, dst, "--arch", name, "--model-kwargs", json.dumps(kwargs), "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["checkpoint"]["folded"], "expected some norms to fold"

    if suffix == ".safetensors":
        state = load_file(str(dst))
        with safe_open(str(dst), "pt") as f:
            record = json.loads(f.metadata()["lowmembp_convert"])
    else:
        state = torch.load(dst, weights_only=True)
        record = read_torch_record(load_torch_file(dst).tensors)
    assert record["folded"] == sorted(report["checkpoint"]["folded"])
    reloaded = timm.create_model(name, pretrained=False, **kwargs).eval()
    sync_timm_input_size(reloaded, kwargs)
    reloaded.load_state_dict(state)  # strict: same keys as the stock model
    inputs = model_inputs(original)
    assert rel_err(first_output(original, inputs), first_output(reloaded, inputs)) < 1e-5

    _check_convert_twice(original, reloaded, record["folded"], inputs)
