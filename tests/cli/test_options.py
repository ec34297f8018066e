"""The command line's surface: --version, python -m, --help, --dry-run without ckpt_out, option checks,
--model-kwargs for transformers, post-norm models (exit 3, --force-copy), permissions, T5 --verify,
and a dry-run plan that decides as convert(norms="fold") does, ill-conditioned norm weights included."""

from __future__ import annotations

import copy
import json
import os
import runpy
import shutil
import stat
import sys

import pytest
import torch
from cli_helpers import cli, first_output, hf_model, model_inputs, randomize, rel_err, tree_digest
from safetensors.torch import load_file, save_file

import lowmembp_convert
from lowmembp_convert.checkpoint.metadata import describe_record
from lowmembp_convert.cli import EXIT_CODES, main


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lowmembp-convert {lowmembp_convert.__version__}"


def test_python_dash_m(monkeypatch, capsys):
    """``python -m lowmembp_convert`` runs the same CLI (run here in process, as the interpreter would)."""
    monkeypatch.setattr(sys, "argv", ["lowmembp_convert", "--version"])
    monkeypatch.delitem(sys.modules, "lowmembp_convert.__main__", raising=False)
    with pytest.raises(SystemExit) as info:
        runpy.run_module("lowmembp_convert", run_name="__main__")
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("lowmembp-convert ")


def test_help_lists_exit_codes_and_demo(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    usage = capsys.readouterr().out
    for option in ("--demo", "--version", "--force-copy", "--dry-run", "--verify-rtol"):
        assert option in usage, option
    assert "exit codes:" in usage
    for code, meaning in EXIT_CODES:
        assert f"  {code:<4} {meaning}" in usage


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["in", "out", "--verify-rtol", "-1"], "must be a positive number"),
        (["in", "out", "--verify-rtol", "0"], "must be a positive number"),
        (["in", "out", "--verify-rtol", "nan"], "must be a positive number"),
        (["in", "out", "--verify-rtol", "x"], "not a number"),
        (["--demo", "in"], "--demo takes no other arguments"),
        (["--demo", "--json"], "--demo takes no other arguments"),
        (["in"], "required: ckpt_out (optional only with --dry-run)"),
        ([], "required: ckpt_in"),
    ],
)
def test_usage_errors(argv, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert fragment in capsys.readouterr().err


def test_dry_run_without_ckpt_out(saved_llama, capsys):
    _, src = saved_llama
    code, out, err = cli([src, "--dry-run"], capsys)
    assert code == 0, err
    assert "fold         model.layers.0.input_layernorm" in out
    assert out.strip().endswith("output: - (nothing written: --dry-run)")
    code, out, err = cli([src, "--dry-run", "--json"], capsys)
    summary = json.loads(out)["checkpoint"]
    assert code == 0 and summary["output"] is None and summary["written"] is False


def test_model_kwargs_refused_for_transformers_directory(saved_llama, tmp_path, capsys):
    _, src = saved_llama
    code, _, err = cli([src, tmp_path / "out", "--model-kwargs", '{"num_hidden_layers": 1}'], capsys)
    assert code == 1
    assert "--model-kwargs" in err and "does not apply to a transformers model directory" in err
    assert "; fix: " in err and not (tmp_path / "out").exists()


def test_model_kwargs_override_config_of_arch_directory(tmp_path, capsys):
    """A state dict whose head has 3 labels, with a config that says 5: the shape check names the fix,
    and --model-kwargs '{"num_labels": 3}' applies to the plan and to --verify."""
    config_model = hf_model("vit")  # num_labels=5
    config_dir = tmp_path / "config"
    config_model.config.save_pretrained(config_dir)
    config = type(config_model.config).from_pretrained(config_dir, num_labels=3)
    original = randomize(type(config_model)(config)).eval()
    src, out = tmp_path / "vit.safetensors", tmp_path / "vit-lowmembp.safetensors"
    save_file(original.state_dict(), src)

    code, _, err = cli([src, out, "--arch", config_dir], capsys)
    assert code == 1 and "classifier.weight is [3, 32] in the checkpoint but [5, 32] in the model" in err
    assert """fix: pass --model-kwargs '{"num_labels": 3}'""" in err

    code, _, err = cli([src, out, "--arch", config_dir, "--model-kwargs", '{"no_such_attribute": 1}'], capsys)
    assert code == 1 and "no_such_attribute" in err and "no such attribute" in err

    argv = [src, out, "--arch", config_dir, "--model-kwargs", '{"num_labels": 3}', "--verify", "--json"]
    code, stdout, err = cli(argv, capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["checkpoint"]["verify"]["status"] == "passed" and report["checkpoint"]["folded"]
    assert "id2label" not in err  # no warning about the saved label names
    reloaded = type(original)(config).eval()
    reloaded.load_state_dict(load_file(out))
    inputs = model_inputs(original)
    assert rel_err(first_output(original, inputs), first_output(reloaded, inputs)) < 1e-5


@pytest.fixture(scope="module")
def saved_bert(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "bert"
    hf_model("bert").save_pretrained(path)
    return path


def test_post_norm_model_writes_nothing_unless_force_copy(saved_bert, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = cli([saved_bert, out, "--quiet"], capsys)
    assert code == 3
    assert "nothing to fold in a post-norm model" in err
    assert "memory savings come from convert() at training time" in err and "--force-copy" in err
    assert "keep_affine  bert.encoder.layer.0.attention.output.LayerNorm" in stdout  # the plan says why
    assert not out.exists() and os.listdir(tmp_path) == []

    code, stdout, err = cli([saved_bert, out, "--force-copy", "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)["checkpoint"]
    assert report["written"] is True and report["folded"] == [] and "post-norm" in report["nothing_to_fold"]
    assert set(tree_digest(out)) == set(tree_digest(saved_bert))
    assert load_file(out / "model.safetensors").keys() == load_file(saved_bert / "model.safetensors").keys()


def test_output_keeps_input_permissions(saved_llama, tmp_path, capsys):
    _, llama = saved_llama
    src = tmp_path / "in"
    shutil.copytree(llama, src)
    modes = {"config.json": 0o600, "model.safetensors.index.json": 0o640, "tokenizer.json": 0o604}
    shards = sorted(p.name for p in src.glob("model-*.safetensors"))
    modes.update({shards[0]: 0o440, shards[1]: 0o644})
    for name, mode in modes.items():
        os.chmod(src / name, mode)
    os.chmod(src, 0o750)
    out = tmp_path / "out"
    code, _, err = cli([src, out, "--quiet"], capsys)
    assert code == 0, err
    for name, mode in modes.items():
        assert stat.S_IMODE(os.stat(out / name).st_mode) == mode, name
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o750

    single = tmp_path / "w.safetensors"
    save_file(load_file(llama / shards[0]), single)  # not a model: only the mode of a single file matters here
    os.chmod(single, 0o600)
    from lowmembp_convert.checkpoint.conversion import _copy_modes
    from lowmembp_convert.checkpoint.formats import detect_checkpoint

    staged = tmp_path / "o.safetensors"
    staged.write_bytes(b"x")
    _copy_modes(detect_checkpoint(single), staged)
    assert stat.S_IMODE(os.stat(staged).st_mode) == 0o600


def test_encoder_decoder_verify(tmp_path, capsys):
    """T5 needs decoder_input_ids: --verify builds them instead of dying in a ValueError."""
    original = hf_model("t5")
    src, out = tmp_path / "t5", tmp_path / "t5-lowmembp"
    original.save_pretrained(src)
    code, stdout, err = cli([src, out, "--verify", "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["checkpoint"]["verify"]["status"] == "passed", report["checkpoint"]["verify"]
    assert "decoder_input_ids" in report["checkpoint"]["verify"]["inputs"]
    reloaded = type(original).from_pretrained(out).eval()
    inputs = model_inputs(original)
    assert rel_err(first_output(original, inputs), first_output(reloaded, inputs)) < 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dry_run_keeps_the_affine_of_an_ill_conditioned_norm_as_convert_does(family, tmp_path, capsys):
    """A final norm that keeps its affine with a zero weight (LLaMA) or a bias far larger than its
    weight (GPT-2) is not skipped: its ill-conditioned channels keep x_hat in every forward. The dry
    run (on the meta skeleton) plans what convert(norms="fold") plans on the real weights, and the
    default convert() keeps that norm's affine too, with exact gradients."""
    model = hf_model(family)
    final = "model.norm" if family == "llama" else "transformer.ln_f"
    norm = model.get_submodule(final)
    with torch.no_grad():
        if family == "llama":
            norm.weight[3] = 0.0
        else:
            norm.weight.fill_(0.1)
            norm.bias.fill_(5.0)
    src = tmp_path / family
    model.save_pretrained(src)
    code, stdout, err = cli([src, "--dry-run", "--json"], capsys)
    assert code == 0, err
    sites = json.loads(stdout)["checkpoint"]["norms"]
    cli_actions = {site["module"]: (site["action"], site["reason"]) for site in sites}
    plan = lowmembp_convert.plan_conversion(model, activations=False, norms="fold")  # real weights
    api_actions = {site.module: (site.action, site.reason) for site in plan.norms}
    assert cli_actions == api_actions
    assert cli_actions[final] == ("keep_affine", "affine kept in the norm: returned from the model's forward")
    assert not any(action == "skip" for action, _ in cli_actions.values()), cli_actions

    converted = lowmembp_convert.convert(copy.deepcopy(model), activations=False)
    site = converted.lowmembp_report.plan.norm(final)
    assert site.action == "keep_affine" and getattr(converted.get_submodule(final), "lowmembp_converted", False)
    inputs = model_inputs(model)
    for m in (model, converted):
        m.zero_grad()
        out = m(**inputs).logits
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    for name in (f"{final}.weight", f"{final}.bias") if family == "gpt2" else (f"{final}.weight",):
        want, got = model.get_parameter(name).grad, converted.get_parameter(name).grad
        assert rel_err(want, got) < 1e-4, name


def test_record_summary_is_short():
    record = {
        "version": "0.1.0",
        "architecture": "LlamaForCausalLM",
        "folded": [f"model.layers.{i // 2}.{'input' if i % 2 == 0 else 'post_attention'}_layernorm" for i in range(24)],
        "untied": [],
    }
    text = describe_record(record)
    assert text == (
        "lowmembp-convert 0.1.0, LlamaForCausalLM: 24 norms folded (model.layers.0.input_layernorm, "
        "model.layers.0.post_attention_layernorm, model.layers.1.input_layernorm and 21 more)"
    )
    assert describe_record({"folded": ["a"], "untied": ["lm_head.weight"]}) == (
        "lowmembp-convert ?: 1 norm folded (a); untied: lm_head.weight"
    )
