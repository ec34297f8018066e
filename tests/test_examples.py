"""The runnable examples and the accuracy bench, each run with ``--tiny`` in a subprocess, as a user would.

The selected scripts are started together (they are single-threaded, so two cores run two at a time)
and each test then waits for its own, parses the JSON summary on the last stdout line and checks
real outcomes: conversions reported, exact forwards, files written where asked.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # generous: the scripts take seconds alone, far more on a loaded CI machine

# each example runs end to end (minutes in all): the slow set
pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.slow]


def _commands(tmp: Path) -> dict[str, list[str]]:
    return {
        "train_digits": ["examples/train_digits.py", "--tiny", "--out", str(tmp / "curves.png")],
        "grad_fidelity": ["bench/grad_fidelity.py", "--tiny"],
        "hf_lora_trainer": ["examples/hf_lora_trainer.py", "--tiny"],
        "timm_finetune": ["examples/timm_finetune.py", "--tiny"],
        "convert_checkpoint": ["examples/convert_checkpoint.py", "--tiny", "--keep", str(tmp / "ckpts")],
    }


@pytest.fixture(scope="module")
def launched(request, tmp_path_factory):
    """Start every example whose test is selected in this session; yields (processes, tmp dir)."""
    tmp = tmp_path_factory.mktemp("examples")
    selected = {item.name.removeprefix("test_") for item in request.session.items if item.module is request.module}
    env = dict(os.environ)
    # a script's own folder comes first on sys.path; put the repo root there too so the package
    # imports the same way whether it is installed editable, installed, or not installed at all
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    procs = {}
    for name, cmd in _commands(tmp).items():
        if name in selected:
            procs[name] = subprocess.Popen(
                [sys.executable, *cmd], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
    yield procs, tmp
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _finish(launched, name: str) -> dict:
    procs, _tmp = launched
    stdout, stderr = procs[name].communicate(timeout=TIMEOUT_S)
    assert procs[name].returncode == 0, f"{name} exited {procs[name].returncode}:\n{stderr[-4000:]}"
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, f"{name} printed nothing on stdout:\n{stderr[-4000:]}"
    summary = json.loads(lines[-1])
    summary["_stderr"] = stderr
    return summary


def test_train_digits(launched) -> None:
    summary = _finish(launched, "train_digits")
    _procs, tmp = launched
    assert summary["tiny"] is True
    assert summary["conversion"] == {"activations_converted": 4, "norms_converted": 9}
    assert "lowmembp_convert report for VisionTransformer" in summary["_stderr"]
    runs = summary["runs"]
    assert set(runs) == {"original", "converted"} and set(runs["original"]) == {"0", "1"}
    for seed in ("0", "1"):
        original, converted = runs["original"][seed], runs["converted"][seed]
        assert original["init_fingerprint"] == converted["init_fingerprint"]  # same initial weights
        # before the first update both compute the same function on the same batch
        assert converted["first_train_loss"] == pytest.approx(original["first_train_loss"], rel=1e-5)
        assert original["steps"] == converted["steps"] == 3
    for metric in ("final_test_acc", "final_test_loss", "final_train_loss"):
        noise = summary["noise"][metric]
        assert noise["tolerance"] >= noise["seed_spread"] >= 0
        assert set(noise["converted"]["same_seed_gap"]) == {"0", "1"}
    assert isinstance(summary["within_noise"], bool) and isinstance(summary["no_worse_than_noise"], bool)
    png = tmp / "curves.png"
    assert summary["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_grad_fidelity(launched) -> None:
    summary = _finish(launched, "grad_fidelity")
    # exact variants sit at the float32 floor: the folded norm-only conversion and the default (auto:
    # exact recompute, norms keeping their affine) give cosine 1 on every tensor
    assert summary["auto_choice"] == "gelu recompute x4"
    for exact in ("fp32", "norms", "auto"):
        assert summary["min_cos"][exact] > 1 - 1e-9
        assert summary["max_rel"][exact] < 1e-5
    # the approximate GELU backward bends gradients but keeps their direction overall
    assert 0.9 < summary["all_params"]["full"]["cos"] < 1 - 1e-6
    assert summary["all_params"]["acts"]["cos"] > 0.9
    # nothing after the last GELU is approximated: the head's gradients stay exact
    assert summary["blocks"]["full"]["head"]["cos"] > 1 - 1e-9
    assert summary["tensors"] == 55
    for row in summary["shapes"]:  # the default never approximates, at any depth
        assert "approx" not in row["auto_choice"] and row["auto"]["params_cos"] > 1 - 1e-9, row


def test_hf_lora_trainer(launched) -> None:
    summary = _finish(launched, "hf_lora_trainer")
    assert summary["norms"] == "share"  # the default
    assert summary["conversion"]["activations_converted"] == 2
    assert summary["conversion"]["activation_options"] == ["recompute"]  # exact: auto never approximates
    assert summary["conversion"]["norms_converted"] == 5 and summary["conversion"]["norms_folded"] == 0
    assert "lowmembp_convert report for PeftModelForCausalLM" in summary["_stderr"]
    original, converted = summary["original"], summary["converted"]
    assert converted["first_loss"] == pytest.approx(original["first_loss"], rel=1e-5)  # exact forward
    # exact gradients, the same parameters: the stock training run, up to rounding
    assert converted["last_loss"] == pytest.approx(original["last_loss"], rel=1e-4)
    assert converted["last_loss"] < converted["first_loss"]
    pairing = summary["adapter_pairing"]
    assert pairing["adapter_on_converted_base_max_rel_err"] < 1e-5
    assert pairing["adapter_on_stock_base_max_rel_err"] < 1e-5  # nothing folded into lora_A: any base fits


def test_timm_finetune(launched) -> None:
    summary = _finish(launched, "timm_finetune")
    assert summary["model"] == "convnext_atto" and summary["steps"] == 2
    # the defaults: the GELUs feed 1x1 convs, no exact recompute is proven there, and auto never
    # approximates unasked: all 12 stay stock, each saying that activations='approx' would save bytes
    assert (summary["conversion"]["activations"], summary["conversion"]["norms"]) == ("auto", "share")
    assert summary["conversion"]["activations_converted"] == 0
    assert summary["conversion"]["activations_approx_on_request"] == 12
    assert summary["conversion"]["norms_converted"] == 17 and summary["conversion"]["norms_folded"] == 0
    assert any(note.startswith("verified") for note in summary["conversion"]["notes"])
    losses = [h["train_loss"] for h in summary["history"]] + [h["test_loss"] for h in summary["history"]]
    assert all(math.isfinite(v) and v > 0 for v in losses), summary["history"]  # the converted model trains


@pytest.mark.skipif(importlib.util.find_spec("lowmembp_convert.cli") is None, reason="CLI not available")
def test_convert_checkpoint(launched) -> None:
    summary = _finish(launched, "convert_checkpoint")
    _procs, tmp = launched
    assert summary["ok"] is True
    hf, vit = summary["transformers"], summary["timm"]
    assert hf["cli_exit"] == 0 and hf["dry_run_exit"] == 0 and hf["dry_run_wrote_nothing"]
    assert hf["dry_run_planned"] == hf["folded"] and len(hf["folded"]) == 4
    assert hf["verify"]["status"] == "passed"
    assert hf["stock_reload_class"] == "LlamaForCausalLM" and hf["stock_reload_max_rel_err"] < 1e-5
    # convert() on the reloaded stock model recognises the folded norms and swaps in MS norms
    assert any("lowmembp-convert checkpoint" in note for note in hf["reconvert"]["notes"])
    assert hf["reconvert"]["norms_converted"] == 5 and hf["reconvert"]["activations_converted"] == 2
    assert vit["cli_exit"] == 0 and len(vit["folded"]) == 4 and vit["stock_reload_max_rel_err"] < 1e-5
    assert (tmp / "ckpts" / "llama-lowmembp" / "config.json").exists()
