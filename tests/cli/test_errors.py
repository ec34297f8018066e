"""Bad input: one line naming the path and the fix, exit code 1, nothing written, ckpt_in untouched."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import cli, leftovers, tree_digest
from safetensors.torch import save_file


def _assert_refused(argv, capsys, fragment: str, path: Path, out: Path, src: Path | None = None):
    digest = tree_digest(src) if src is not None and src.exists() else None
    code, stdout, err = cli(argv, capsys)
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    message = lines[0]
    assert message.startswith("lowmembp-convert: error: ")
    assert str(path) in message, message
    assert fragment in message, message
    assert "; fix: " in message, message
    assert not out.exists() or out.is_dir() and out.name == "existing"
    assert leftovers(out.parent) == []
    if digest is not None:
        assert tree_digest(src) == digest
    return message


@pytest.fixture(scope="module")
def llama_dir(saved_llama):
    return saved_llama[1]


@pytest.fixture
def llama_copy(llama_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(llama_dir, dst)
    return dst


def test_missing_path(tmp_path, capsys):
    src, out = tmp_path / "nope", tmp_path / "out"
    _assert_refused([src, out], capsys, "no such file or directory", src, out)


def test_directory_without_config(tmp_path, capsys):
    src, out = tmp_path / "folder", tmp_path / "out"
    src.mkdir()
    (src / "readme.md").write_text("hi")
    _assert_refused([src, out], capsys, "not a checkpoint: no config.json", src, out, src)


def test_unknown_file_type(tmp_path, capsys):
    src, out = tmp_path / "weights.txt", tmp_path / "out.txt"
    src.write_text("hello")
    _assert_refused([src, out, "--arch", "vit_tiny_patch16_224"], capsys, "not a checkpoint", src, out, src)


def test_garbage_safetensors(tmp_path, capsys):
    src, out = tmp_path / "w.safetensors", tmp_path / "o.safetensors"
    src.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    _assert_refused([src, out, "--arch", "vit_tiny_patch16_224"], capsys, "corrupt", src, out, src)


def test_truncated_shard_in_directory(llama_copy, tmp_path, capsys):
    shard = sorted(llama_copy.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    out = tmp_path / "out"
    _assert_refused([llama_copy, out], capsys, "truncated", shard, out, llama_copy)


def test_missing_shard(llama_copy, tmp_path, capsys):
    shard = sorted(llama_copy.glob("model-*.safetensors"))[0]
    shard.unlink()
    out = tmp_path / "out"
    _assert_refused([llama_copy, out], capsys, "missing", shard, out, llama_copy)


def test_truncated_pth(tmp_path, capsys):
    src, out = tmp_path / "w.pth", tmp_path / "o.pth"
    torch.save({"a": torch.randn(64, 64)}, src)
    src.write_bytes(src.read_bytes()[:-200])
    _assert_refused([src, out, "--arch", "vit_tiny_patch16_224"], capsys, "corrupt or truncated", src, out, src)


def test_pickle_with_arbitrary_objects(tmp_path, capsys):
    src, out = tmp_path / "w.pth", tmp_path / "o.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, src)  # a pickled module, not a state dict
    _assert_refused([src, out, "--arch", "vit_tiny_patch16_224"], capsys, "not a plain tensor checkpoint", src, out)


def test_corrupt_config(llama_copy, tmp_path, capsys):
    (llama_copy / "config.json").write_text("{ broken")
    out = tmp_path / "out"
    _assert_refused([llama_copy, out], capsys, "corrupt JSON", llama_copy / "config.json", out, llama_copy)


def test_unknown_transformers_architecture(llama_copy, tmp_path, capsys):
    config = json.loads((llama_copy / "config.json").read_text())
    config["model_type"], config["architectures"] = "not_a_model", ["NotAModelForCausalLM"]
    (llama_copy / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    _assert_refused([llama_copy, out], capsys, "unknown architecture", llama_copy, out, llama_copy)


def test_unknown_timm_arch(tmp_path, capsys):
    src, out = tmp_path / "w.safetensors", tmp_path / "o.safetensors"
    save_file({"a": torch.zeros(3)}, src)
    _assert_refused([src, out, "--arch", "no_such_model_xyz"], capsys, "unknown architecture", src, out, src)


def test_state_dict_without_arch(tmp_path, capsys):
    src, out = tmp_path / "w.safetensors", tmp_path / "o.safetensors"
    save_file({"a": torch.zeros(3)}, src)
    _assert_refused([src, out], capsys, "pass --arch", src, out, src)


def test_state_dict_of_another_arch(tmp_path, capsys):
    src, out = tmp_path / "w.safetensors", tmp_path / "o.safetensors"
    save_file({"a": torch.zeros(3), "b": torch.zeros(4)}, src)
    _assert_refused([src, out, "--arch", "vit_tiny_patch16_224"], capsys, "does not match", src, out, src)


def test_quantized_dtype(tmp_path, capsys):
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
    state = model.state_dict()
    state["blocks.0.norm1.weight"] = torch.full_like(state["blocks.0.norm1.weight"], 2, dtype=torch.int8)
    src, out = tmp_path / "w.safetensors", tmp_path / "o.safetensors"
    save_file(state, src)
    argv = [src, out, "--arch", "vit_tiny_patch16_224", "--model-kwargs", '{"depth": 1}']
    message = _assert_refused(argv, capsys, "dtype I8", src, out, src)
    assert "blocks.0.norm1.weight" in message


def test_quantized_config(llama_copy, tmp_path, capsys):
    config = json.loads((llama_copy / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (llama_copy / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    _assert_refused([llama_copy, out], capsys, "quantized", llama_copy, out, llama_copy)


def test_output_exists_refused_then_forced(llama_dir, tmp_path, capsys):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _assert_refused([llama_dir, out], capsys, "already exists", out, out, llama_dir)
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = cli([llama_dir, out, "--force", "--quiet"], capsys)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert leftovers(tmp_path) == []


def test_output_inside_input(llama_copy, capsys):
    out = llama_copy / "converted"
    digest = tree_digest(llama_copy)
    code, _, err = cli([llama_copy, out], capsys)
    assert code == 1 and "ckpt_out is inside ckpt_in" in err and "; fix: " in err
    assert not out.exists() and tree_digest(llama_copy) == digest and leftovers(llama_copy) == []


def test_input_inside_output_with_force(llama_copy, capsys):
    out = llama_copy.parent
    code, _, err = cli([llama_copy, out, "--force"], capsys)
    assert code == 1 and "inside ckpt_out" in err
    assert (llama_copy / "config.json").exists()


def test_output_same_as_input(tmp_path, capsys):
    src = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3)}, src)
    code, _, err = cli([src, src, "--arch", "vit_tiny_patch16_224", "--force"], capsys)
    assert code == 1 and "ckpt_out is ckpt_in" in err


def test_output_suffix_must_match(tmp_path, capsys):
    src, out = tmp_path / "w.safetensors", tmp_path / "o.pth"
    save_file({"a": torch.zeros(3)}, src)
    _assert_refused([src, out, "--arch", "vit_tiny_patch16_224"], capsys, "must be a safetensors file", out, out, src)


def test_peft_adapter_directory(llama_copy, tmp_path, capsys):
    (llama_copy / "adapter_config.json").write_text("{}")
    out = tmp_path / "out"
    _assert_refused([llama_copy, out], capsys, "PEFT adapter", llama_copy, out, llama_copy)


def test_json_error_report(tmp_path, capsys):
    code, out, err = cli([tmp_path / "nope", tmp_path / "out", "--json"], capsys)
    assert code == 1
    assert json.loads(out)["exit_code"] == 1 and "no such file" in json.loads(out)["error"]


def test_failed_verify_writes_nothing(llama_dir, tmp_path, capsys, monkeypatch):
    from lowmembp_convert.checkpoint import conversion

    def diverging(*args, **kwargs):
        return {"status": "failed", "max_rel_error": 0.5, "rtol": 1e-4}

    monkeypatch.setattr(conversion, "verify_outputs", diverging)
    out = tmp_path / "out"
    _assert_refused([llama_dir, out, "--verify", "--quiet"], capsys, "--verify failed", out, out, llama_dir)


# --- checked up front, before any planning -------------------------------------------------------


@pytest.fixture
def no_planning(monkeypatch):
    """Fail the test if the conversion gets as far as planning (the checks must come first)."""
    from lowmembp_convert.checkpoint import conversion

    def planner(model, config):
        raise AssertionError("planned before the input was checked")

    monkeypatch.setattr(conversion, "_default_planner", planner)


@pytest.mark.parametrize("verify", [False, True], ids=["plain", "verify"])
def test_head_size_mismatch(verify, tmp_path, capsys, no_planning):
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, num_classes=10)
    src, out = tmp_path / "w.safetensors", tmp_path / "o.safetensors"
    save_file(model.state_dict(), src)
    argv = [src, out, "--arch", "vit_tiny_patch16_224", "--model-kwargs", '{"depth": 1, "img_size": 32}']
    message = _assert_refused(argv + (["--verify"] if verify else []), capsys, "does not match", src, out, src)
    assert "head.weight is [10, 192] in the checkpoint but [1000, 192] in the model" in message
    assert """fix: pass --model-kwargs '{"depth": 1, "img_size": 32, "num_classes": 10}'""" in message


def test_head_size_fix_works(tmp_path, capsys):
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, num_classes=10)
    src, out = tmp_path / "w.safetensors", tmp_path / "o.safetensors"
    save_file(model.state_dict(), src)
    kwargs = '{"depth": 1, "img_size": 32, "num_classes": 10}'
    code, _, err = cli([src, out, "--arch", "vit_tiny_patch16_224", "--model-kwargs", kwargs, "--quiet"], capsys)
    assert code in (0, 3), err  # timm's init norms are identity: nothing may be left to fold


def test_read_only_output_parent(llama_dir, tmp_path, capsys, monkeypatch, no_planning):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != readonly and real_access(p, mode, **kw))
    out = readonly / "out"
    message = _assert_refused([llama_dir, out], capsys, "read-only or permission denied", out, out, llama_dir)
    assert message.startswith(f"lowmembp-convert: error: {out}: cannot create in {readonly}")
    assert ".lowmembp-tmp-" not in message
    missing = readonly / "missing" / "out"
    code, _, err = cli([llama_dir, missing], capsys)
    assert code == 1 and not missing.parent.exists()
    assert err.startswith(f"lowmembp-convert: error: {missing}: cannot create {missing.parent} in {readonly}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_parent_for_real(llama_dir, tmp_path, capsys, no_planning):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        out = readonly / "out"
        _assert_refused([llama_dir, out], capsys, "read-only or permission denied", out, out, llama_dir)
    finally:
        readonly.chmod(0o755)


def test_write_failure_names_ckpt_out(llama_dir, tmp_path, capsys, monkeypatch):
    import errno

    from lowmembp_convert.checkpoint import streaming

    def disk_full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(streaming, "write_safetensors", disk_full)
    out = tmp_path / "out"
    message = _assert_refused([llama_dir, out, "--quiet"], capsys, "No space left on device", out, out, llama_dir)
    assert message.startswith(f"lowmembp-convert: error: {out}: writing failed")
    assert ".lowmembp-tmp-" not in message


# --- pickles --------------------------------------------------------------------------------------


class NotAllowed:
    """A class a weights-only load must refuse."""


def test_refused_pickle_names_the_global(tmp_path, capsys):
    src, out = tmp_path / "w.pth", tmp_path / "o.pth"
    torch.save({"state_dict": {"a": torch.zeros(2)}, "config": NotAllowed()}, src)
    message = _assert_refused([src, out, "--arch", "vit_tiny_patch16_224"], capsys, "not a plain tensor", src, out)
    assert f"{NotAllowed.__module__}.NotAllowed" in message
    assert "\x1b" not in message and "weights_only=False" not in message
    assert "lowmembp-convert never runs code from a checkpoint" in message


def test_timm_train_checkpoint(tmp_path, capsys):
    """timm's train.py writes model_best.pth.tar with an argparse.Namespace under 'args' (and an EMA
    copy): it is converted; everything around the state dict comes back unchanged."""
    import argparse

    import timm

    from lowmembp_convert.checkpoint.torch_file import SAFE_GLOBALS

    torch.manual_seed(0)
    kwargs = {"depth": 1, "img_size": 32, "num_classes": 10}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    with torch.no_grad():
        model.blocks[0].norm1.weight.uniform_(0.5, 1.5)
    args = argparse.Namespace(model="vit_tiny_patch16_224", lr=0.001, epochs=3, model_kwargs={})
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters()).state_dict()
    checkpoint = {"epoch": 3, "arch": "vit_tiny_patch16_224", "state_dict": model.state_dict(), "args": args,
                  "optimizer": optimizer, "version": 2, "state_dict_ema": ema, "metric": 0.5}  # fmt: skip
    src, out = tmp_path / "model_best.pth.tar", tmp_path / "model_best_lowmembp.pth.tar"
    torch.save(checkpoint, src)
    argv = [src, out, "--arch", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(kwargs), "--verify"]
    code, stdout, err = cli(argv + ["--quiet"], capsys)
    assert code == 0, err
    assert "carried over unconverted (another state dict in the file): 'state_dict_ema'" in stdout
    assert "verify: passed" in stdout
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
        again = torch.load(out, weights_only=True)
    assert again["args"] == args and again["epoch"] == 3 and again["metric"] == 0.5
    assert torch.all(again["state_dict"]["blocks.0.norm1.weight"] == 1)
    assert torch.equal(again["state_dict_ema"]["blocks.0.norm1.weight"], ema["blocks.0.norm1.weight"])
