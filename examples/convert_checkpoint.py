"""Convert checkpoints on disk with ``lowmembp-convert``, reload them with the stock library, compare outputs.

Two round trips, on tiny models built from configs (no hub access needed):

1. transformers: a LLaMA decoder with randomised RMSNorm weights, ``save_pretrained`` to a folder,
   ``lowmembp-convert IN OUT --verify --json``, then ``AutoModelForCausalLM.from_pretrained(OUT)``
   (stock transformers, no lowmembp_convert involved) must give the original logits; finally
   ``lowmembp_convert.convert`` on the reloaded model recognises the folded norms (the CLI folds the
   affine on disk, the paper's form) and shares their identity affine as it is.
2. timm: a ViT state dict in a ``.safetensors`` file, converted with ``--arch`` and ``--model-kwargs``,
   loaded into a stock ``timm.create_model`` with ``load_state_dict``.

The CLI's documented usage: ``lowmembp-convert CKPT_IN CKPT_OUT [--arch NAME] [--model-kwargs JSON]
[--dry-run] [--verify] [--json] [--force]``. It is called as a subprocess, exactly as a user would.

    python examples/convert_checkpoint.py            # both round trips
    python examples/convert_checkpoint.py --tiny     # the same (the models are tiny already); for CI

Prints a JSON summary as the last line of stdout; exits 1 if a reloaded model's outputs differ.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import lowmembp_convert

RTOL = 1e-5  # folding does its math in float64 and rounds once: float32 round-off only
TIMM_KWARGS = {"img_size": 32, "patch_size": 4, "num_classes": 10, "depth": 2}


def cli() -> list[str]:
    """The console script if installed, else the module (same code)."""
    exe = shutil.which("lowmembp-convert")
    return [exe] if exe else [sys.executable, "-m", "lowmembp_convert"]


def run_cli(*args: str) -> tuple[int, dict]:
    """Run ``lowmembp-convert ARGS --json``; returns (exit code, the report's ``checkpoint`` part)."""
    proc = subprocess.run([*cli(), *args, "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
    try:
        report = json.loads(proc.stdout)
        return proc.returncode, report.get("checkpoint", report)  # an error report has no checkpoint part
    except json.JSONDecodeError:
        return proc.returncode, {"stdout": proc.stdout[-2000:], "stderr": proc.stderr[-2000:]}


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def randomise_norms(model: torch.nn.Module) -> None:
    """Norm weights away from 1 (and biases away from 0): init values would hide a wrong fold."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5) if name.endswith("weight") else param.uniform_(-0.5, 0.5)


def transformers_round_trip(tmp: Path) -> dict:
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    randomise_norms(model)
    model.save_pretrained(tmp / "llama")
    ids = torch.randint(0, config.vocab_size, (2, 24))
    with torch.no_grad():
        want = model(input_ids=ids).logits

    dry_code, plan = run_cli(str(tmp / "llama"), str(tmp / "llama-dry"), "--dry-run")
    code, report = run_cli(str(tmp / "llama"), str(tmp / "llama-lowmembp"), "--verify")
    print(f"lowmembp-convert (transformers): exit {code}, folded {report.get('folded')}", file=sys.stderr)
    if code != 0:
        return {"cli_exit": code, "report": report}

    reloaded = AutoModelForCausalLM.from_pretrained(tmp / "llama-lowmembp").eval()  # the stock class
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    # converting the reloaded model: its norms are recognised as folded and (norms="share", the default)
    # become memory-sharing norms with their identity affine; nothing is folded twice
    lowmembp_convert.convert(reloaded, verify=True)  # example inputs from the config (use_cache off)
    rep = reloaded.lowmembp_report
    print(rep, file=sys.stderr)
    return {
        "cli_exit": code,
        "dry_run_exit": dry_code,
        "dry_run_wrote_nothing": not (tmp / "llama-dry").exists(),
        "dry_run_planned": [s["module"] for s in plan.get("norms", []) if s.get("action") == "fold"],
        "folded": report.get("folded"),
        "verify": report.get("verify"),
        "stock_reload_class": type(reloaded).__name__,
        "stock_reload_max_rel_err": max_rel_err(got, want),
        "reconvert": {
            "norms_converted": rep.converted_norms,
            "activations_converted": rep.converted_activations,
            "notes": rep.notes,
        },
    }


def timm_round_trip(tmp: Path) -> dict:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM_KWARGS).eval()
    randomise_norms(model)
    save_file(model.state_dict(), str(tmp / "vit.safetensors"))
    x = torch.randn(2, 3, TIMM_KWARGS["img_size"], TIMM_KWARGS["img_size"])
    with torch.no_grad():
        want = model(x)

    code, report = run_cli(
        str(tmp / "vit.safetensors"), str(tmp / "vit-lowmembp.safetensors"),
        "--arch", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(TIMM_KWARGS),
    )  # fmt: skip
    print(f"lowmembp-convert (timm state dict): exit {code}, folded {report.get('folded')}", file=sys.stderr)
    if code != 0:
        return {"cli_exit": code, "report": report}
    stock = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM_KWARGS).eval()
    stock.load_state_dict(load_file(str(tmp / "vit-lowmembp.safetensors")))  # strict: same keys as stock
    with torch.no_grad():
        got = stock(x)
    return {"cli_exit": code, "folded": report.get("folded"), "stock_reload_max_rel_err": max_rel_err(got, want)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, default=None, help="write the checkpoints here instead of a temp dir")
    parser.add_argument("--tiny", action="store_true", help="accepted for symmetry with the other examples")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        summary = {"cli": " ".join(cli()), "transformers": transformers_round_trip(tmp), "timm": timm_round_trip(tmp)}
    ok = all(
        part.get("cli_exit") == 0 and part.get("stock_reload_max_rel_err", 1.0) <= RTOL
        for part in (summary["transformers"], summary["timm"])
    )
    summary["ok"] = ok
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
