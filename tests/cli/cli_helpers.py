"""Helpers for the CLI tests: tiny models of each family, inputs, digests, and running the CLI.

Every model gets random norm weights *and* biases (and random Linear biases): the init values
1 and 0 would hide a fold that forgot gamma, beta or the 1+w offset.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from lowmembp_convert.cli import main

HF_SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=96)


def hf_model(family: str, tie: bool | None = None) -> nn.Module:
    """A tiny transformers model of ``family`` in eval mode with randomised norms and biases."""
    import transformers as T

    extra = {} if tie is None else {"tie_word_embeddings": tie}
    small = dict(HF_SMALL)
    makers = {
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**small, num_key_value_heads=2, **extra)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**small, num_key_value_heads=2, **extra)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**small, num_key_value_heads=2, **extra)),
        "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(**small, num_key_value_heads=2, head_dim=8, **extra)),
        "gpt2": lambda: T.GPT2LMHeadModel(
            T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=32, bos_token_id=0, eos_token_id=0)
        ),
        "bert": lambda: T.BertForMaskedLM(T.BertConfig(**small, max_position_embeddings=32, **extra)),
        "roberta": lambda: T.RobertaForMaskedLM(T.RobertaConfig(**small, max_position_embeddings=40, **extra)),
        "t5": lambda: T.T5ForConditionalGeneration(
            T.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=4, d_kv=8, vocab_size=96, decoder_start_token_id=0)
        ),
        "vit": lambda: T.ViTForImageClassification(
            T.ViTConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=32,
                patch_size=8,
                num_labels=5,
            )  # fmt: skip
        ),
    }
    torch.manual_seed(0)
    return randomize(makers[family]()).eval()


# timm name -> (create_model kwargs that make it small, file suffix to save as)
TIMM_CASES = {
    "vit_tiny_patch16_224": ({"depth": 2, "img_size": 64}, ".safetensors"),
    "deit_tiny_patch16_224": ({"depth": 2, "img_size": 64}, ".pth"),
    "swin_tiny_patch4_window7_224": (
        {"depths": [1, 2, 1, 1], "embed_dim": 32, "num_heads": [1, 2, 4, 8], "img_size": 112},
        ".safetensors",
    ),
    "convnext_atto": ({"depths": [1, 1, 2, 1]}, ".bin"),
}


def timm_model(name: str) -> nn.Module:
    import timm

    from lowmembp_convert.checkpoint.load import sync_timm_input_size

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **TIMM_CASES[name][0])
    sync_timm_input_size(model, TIMM_CASES[name][0])
    return randomize(model).eval()


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random norm weights around 1 (or 0 for 1+w norms: any value works) and biases, in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            params = dict(module.named_parameters(recurse=False))
            is_norm = "norm" in type(module).__name__.lower() and set(params) <= {"weight", "bias"}
            if is_norm:
                for name, p in params.items():
                    center = 1.0 if name == "weight" else 0.0
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + center)
            elif "bias" in params and params["bias"] is not None and params["bias"].dim() == 1:
                params["bias"].copy_(torch.randn(params["bias"].shape, generator=gen) * 0.1)
    return model


def model_inputs(model: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    from lowmembp_convert.checkpoint.verify import example_batch

    return example_batch(model, seed, batch=2, seq_len=12)


def first_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    from lowmembp_convert.checkpoint.verify import _first_tensor

    with torch.no_grad():
        return _first_tensor(model(**inputs)).double()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def tree_digest(path: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file under ``path`` (or of the file itself), to prove it was not touched."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {
        str(p.relative_to(path) if path.is_dir() else p.name): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
    }


def leftovers(directory: str | os.PathLike) -> list[str]:
    """Temporary directories of the converter left in ``directory``."""
    return [p.name for p in Path(directory).iterdir() if ".lowmembp-tmp-" in p.name]


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the CLI in process; return (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err
