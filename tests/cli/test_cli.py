"""The command line itself: --dry-run, --json, --verify, the progress bar, the console script,
re-converting a converted checkpoint, and a bare state dict with a transformers config as --arch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import cli, first_output, hf_model, model_inputs, rel_err, tree_digest
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def test_dry_run_prints_the_plan(saved_llama, tmp_path, capsys):
    _, src = saved_llama
    out = tmp_path / "out"
    code, stdout, err = cli([src, out, "--dry-run"], capsys)
    assert code == 0, err
    assert stdout.startswith(f"plan for {src}")
    assert "fold         model.layers.0.input_layernorm" in stdout
    assert "nothing written: --dry-run" in stdout
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_json_report_and_verify(saved_llama, tmp_path, capsys):
    _, src = saved_llama
    code, stdout, err = cli([src, tmp_path / "out", "--json", "--verify"], capsys)
    assert code == 0, err
    report = json.loads(stdout)  # the Report's to_json(): the plan and the checkpoint part
    summary = report["checkpoint"]
    assert summary["verify"]["status"] == "passed" and summary["verify"]["max_rel_error"] < 1e-5
    for key in ("input", "output", "norms", "folded", "changed_tensors", "shards", "record", "seconds"):
        assert key in summary
    assert summary["record"]["folded"] == summary["folded"]
    assert [s["module"] for s in report["plan"]["norms"]] == [s["module"] for s in summary["norms"]]
    assert err == ""  # --json: no progress bar


def test_progress_bar_on_stderr(saved_llama, tmp_path, capsys):
    _, src = saved_llama
    code, stdout, err = cli([src, tmp_path / "out"], capsys)
    assert code == 0
    assert "lowmembp-convert:" in err and "100%" in err
    assert stdout.startswith(f"converted {src}")


def test_converting_a_converted_checkpoint_changes_nothing(saved_llama, tmp_path, capsys):
    _, src = saved_llama
    once, twice = tmp_path / "once", tmp_path / "twice"
    assert cli([src, once, "--quiet"], capsys)[0] == 0
    code, stdout, err = cli([once, twice, "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)["checkpoint"]
    assert report["folded"] == [] and report["changed_tensors"] == []
    assert report["already_folded"] == json.loads((once / "config.json").read_text())["lowmembp_convert"]["folded"]
    for shard in sorted(once.glob("*.safetensors")):
        a, b = load_file(shard), load_file(twice / shard.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_state_dict_with_transformers_config_as_arch(tmp_path, capsys):
    original = hf_model("mistral")
    config_dir = tmp_path / "config"
    original.config.save_pretrained(config_dir)
    src, out = tmp_path / "mistral.safetensors", tmp_path / "mistral-converted.safetensors"
    save_file(original.state_dict(), src, metadata={"format": "pt"})
    digest = tree_digest(src)
    code, stdout, err = cli([src, out, "--arch", config_dir, "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["checkpoint"]["folded"]
    reloaded = type(original)(original.config).eval()
    reloaded.load_state_dict(load_file(out))
    inputs = model_inputs(original)
    assert rel_err(first_output(original, inputs), first_output(reloaded, inputs)) < 1e-5
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["lowmembp_convert"])["architecture"] == "MistralForCausalLM"
    assert tree_digest(src) == digest


def test_other_weight_formats_are_not_carried(tmp_path, capsys):
    original = hf_model("qwen2")
    src, out = tmp_path / "in", tmp_path / "out"
    original.save_pretrained(src)
    torch.save(original.state_dict(), src / "pytorch_model.bin")  # a stale duplicate in another format
    code, stdout, err = cli([src, out, "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["checkpoint"]["skipped_files"] == ["pytorch_model.bin"]
    assert not (out / "pytorch_model.bin").exists()


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli(["only-one-argument"], capsys)
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        cli(["a", "b", "--model-kwargs", "[1, 2]"], capsys)
    assert info.value.code == 2


def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        cli(["--help"], capsys)
    assert info.value.code == 0
    usage = capsys.readouterr().out
    assert "ckpt_in" in usage and "--untie-embeddings" in usage and "--dry-run" in usage


def test_console_script(tmp_path):
    script = Path(sys.executable).parent / "lowmembp-convert"
    exe = str(script) if script.exists() else shutil.which("lowmembp-convert")
    if exe is None:
        pytest.skip("console script not installed (pip install -e .)")
    done = subprocess.run([exe, str(tmp_path / "missing"), str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"lowmembp-convert: error: {tmp_path / 'missing'}: no such file or directory; fix: check the path of ckpt_in"
    )
