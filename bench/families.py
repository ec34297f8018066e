"""Per-family table: default ``convert(model)`` on 28 transformers and timm models, no example inputs.

For each family, built from a tiny config (no hub) with random norm affines and biases, in training
mode with dropout off (so stock and converted draw nothing random):

- ``convert(model)`` with the defaults and nothing else (inputs built from the config by the tool);
- forward: max relative difference of the first output against a deep copy of the stock model;
- gradients of every parameter (nothing is reparameterized by default) against a float64 copy of the
  stock model, for the converted model and for stock itself: max difference relative to that
  parameter's largest gradient, floored at 1e-3 of the model's largest (gradients that are zero
  analytically, such as attention key biases, are rounding noise in stock too). Exact means within
  twice stock's own error (or 1e-6);
- bytes saved for backward (saved-tensor hooks), whole forward at depth 2, and per block (the
  difference between depths 2 and 4, halved), stock against converted;
- what the sites took: norms shared, activations recomputed / left stock, and the first reason a
  site was left stock.

Usage::

    python bench/families.py [--only NAME ...] [--json bench/families.json] [--markdown]

Writes the JSON (one record per family, machine and date included) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lowmembp_convert as lc  # noqa: E402
from lowmembp_convert.capture import example_inputs_for  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_memory import _cpu_name  # noqa: E402

H, MLP, HEADS, VOCAB = 64, 256, 4, 128  # hidden, MLP width (4x), heads, vocabulary
SEQ, BATCH = 32, 2


def _hf(model: str, config: str, **kwargs) -> Callable[[int], nn.Module]:
    def build(layers: int) -> nn.Module:
        import transformers as tr

        cfg = getattr(tr, config)(**{k: _depth(v, layers) for k, v in kwargs.items()})
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout",
                     "activation_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout_rate",
                     "hidden_dropout", "classifier_dropout", "layerdrop", "encoder_layerdrop",
                     "decoder_layerdrop", "feat_proj_dropout", "final_dropout", "mask_time_prob"):  # fmt: skip
            for sub in (cfg, getattr(cfg, "text_config", None), getattr(cfg, "vision_config", None)):
                if sub is not None and isinstance(getattr(sub, name, None), float):
                    setattr(sub, name, 0.0)
        return getattr(tr, model)(cfg)

    return build


def _depth(value, layers: int):
    """``"L"`` (also inside a tuple of stage depths) stands for the depth being measured."""
    if isinstance(value, tuple):
        return tuple(layers if v == "L" else v for v in value)
    if isinstance(value, dict):  # a nested sub-config (CLIP's text_config / vision_config)
        return {k: _depth(v, layers) for k, v in value.items()}
    return layers if value == "L" else value


def _timm_class(path: str, **kwargs) -> Callable[[int], nn.Module]:
    """A timm model built from its class, without a pretrained cfg (inputs from its patch embed)."""

    def build(layers: int) -> nn.Module:
        import importlib

        module, _, name = path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        return cls(num_classes=10, **{k: _depth(v, layers) for k, v in kwargs.items()})

    return build


def _timm(name: str, **kwargs) -> Callable[[int], nn.Module]:
    def build(layers: int) -> nn.Module:
        import timm

        args = {"drop_rate": 0.0, "drop_path_rate": 0.0, **{k: _depth(v, layers) for k, v in kwargs.items()}}
        return timm.create_model(name, pretrained=False, num_classes=10, **args)

    return build


LM = dict(hidden_size=H, intermediate_size=MLP, num_attention_heads=HEADS, num_hidden_layers="L", vocab_size=VOCAB,
          max_position_embeddings=128)  # fmt: skip
ENC = dict(hidden_size=H, intermediate_size=MLP, num_attention_heads=HEADS, num_hidden_layers="L", vocab_size=VOCAB)
VIS = dict(hidden_size=H, intermediate_size=MLP, num_attention_heads=HEADS, num_hidden_layers="L", image_size=32,
           patch_size=8)  # fmt: skip

ENC_DEC = dict(d_model=H, encoder_layers="L", decoder_layers="L", encoder_attention_heads=HEADS,
               decoder_attention_heads=HEADS, encoder_ffn_dim=MLP, decoder_ffn_dim=MLP, vocab_size=VOCAB)  # fmt: skip
SEQ2SEQ = dict(ENC_DEC, max_position_embeddings=128)

TOWER = dict(hidden_size=H, intermediate_size=MLP, num_attention_heads=HEADS, num_hidden_layers="L", vocab_size=VOCAB)
VISION_TOWER = dict(hidden_size=H, intermediate_size=MLP, num_attention_heads=HEADS, num_hidden_layers="L",
                    image_size=32, patch_size=8)  # fmt: skip

FAMILIES: dict[str, tuple[str, Callable[[int], nn.Module]]] = {
    # decoder-only
    "llama": ("decoder", _hf("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2, **LM)),
    "mistral": ("decoder", _hf("MistralForCausalLM", "MistralConfig", num_key_value_heads=2, **LM)),
    "qwen2": ("decoder", _hf("Qwen2ForCausalLM", "Qwen2Config", num_key_value_heads=2, **LM)),
    "gemma": ("decoder", _hf("GemmaForCausalLM", "GemmaConfig", num_key_value_heads=2, head_dim=16, **LM)),
    "gemma2": ("decoder", _hf("Gemma2ForCausalLM", "Gemma2Config", num_key_value_heads=2, head_dim=16, **LM)),
    "phi3": ("decoder", _hf("Phi3ForCausalLM", "Phi3Config", num_key_value_heads=2, pad_token_id=0, **LM)),
    "gpt2": (
        "decoder",
        _hf("GPT2LMHeadModel", "GPT2Config", n_embd=H, n_layer="L", n_head=HEADS, vocab_size=VOCAB, n_positions=128),
    ),  # fmt: skip
    "gpt_neox": ("decoder", _hf("GPTNeoXForCausalLM", "GPTNeoXConfig", **LM)),
    "opt": ("decoder", _hf("OPTForCausalLM", "OPTConfig", word_embed_proj_dim=H, ffn_dim=MLP, **LM)),
    # encoder-only
    "bert": ("encoder", _hf("BertForMaskedLM", "BertConfig", **ENC)),
    "roberta": ("encoder", _hf("RobertaForMaskedLM", "RobertaConfig", pad_token_id=1, **ENC)),
    "distilbert": (
        "encoder",
        _hf(
            "DistilBertForMaskedLM",
            "DistilBertConfig",
            dim=H,
            hidden_dim=MLP,
            n_layers="L",
            n_heads=HEADS,
            vocab_size=VOCAB,
        ),
    ),  # fmt: skip
    "deberta_v2": ("encoder", _hf("DebertaV2ForMaskedLM", "DebertaV2Config", **ENC)),
    # encoder-decoder
    "t5_gated_gelu": (
        "enc-dec",
        _hf(
            "T5ForConditionalGeneration",
            "T5Config",
            d_model=H,
            d_ff=MLP,
            d_kv=16,
            num_layers="L",
            num_heads=HEADS,
            vocab_size=VOCAB,
            feed_forward_proj="gated-gelu",
        ),
    ),  # fmt: skip
    "bart": ("enc-dec", _hf("BartForConditionalGeneration", "BartConfig", **SEQ2SEQ)),
    "pegasus": ("enc-dec", _hf("PegasusForConditionalGeneration", "PegasusConfig", **SEQ2SEQ)),
    "mbart": ("enc-dec", _hf("MBartForConditionalGeneration", "MBartConfig", **SEQ2SEQ)),
    "whisper": (
        "audio",
        _hf(
            "WhisperForConditionalGeneration",
            "WhisperConfig",
            **ENC_DEC,
            num_mel_bins=16,
            max_source_positions=32,
            max_target_positions=32,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        ),
    ),  # fmt: skip
    "wav2vec2": (
        "audio",
        _hf(
            "Wav2Vec2ForCTC",
            "Wav2Vec2Config",
            hidden_size=H,
            intermediate_size=MLP,
            num_attention_heads=HEADS,
            num_hidden_layers="L",
            vocab_size=VOCAB,
            conv_dim=(32, 32),
            conv_stride=(5, 2),
            conv_kernel=(10, 3),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
        ),
    ),  # fmt: skip
    # vision
    "vit_hf": ("vision", _hf("ViTForImageClassification", "ViTConfig", num_labels=10, **VIS)),
    "vit_timm": (
        "vision",
        _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth="L", embed_dim=H, num_heads=HEADS),
    ),  # fmt: skip
    "deit_timm": (
        "vision",
        _timm("deit_tiny_patch16_224", img_size=32, patch_size=8, depth="L", embed_dim=H, num_heads=HEADS),
    ),  # fmt: skip
    "swin_timm": (
        "vision",
        _timm(
            "swin_tiny_patch4_window7_224",
            img_size=56,
            patch_size=4,
            window_size=7,
            embed_dim=32,
            depths=(2, "L"),
            num_heads=(2, 4),
        ),
    ),  # fmt: skip
    "convnext_timm": ("vision", _timm("convnext_tiny", depths=(1, 1, "L", 1), dims=(16, 32, 64, 128))),
    # the atto/femto/pico variants put the MLP in 1x1 convolutions (conv_mlp=True): no recompute there
    "convnext_atto_timm": ("vision", _timm("convnext_atto", depths=(1, 1, "L", 1), dims=(16, 32, 64, 128))),
    "mixer_timm_class": (
        "vision",
        _timm_class("timm.models.mlp_mixer.MlpMixer", img_size=32, patch_size=8, num_blocks="L", embed_dim=H),
    ),
    # multimodal
    "clip": ("multimodal", _hf("CLIPModel", "CLIPConfig", text_config=TOWER, vision_config=VISION_TOWER)),
    "siglip": ("multimodal", _hf("SiglipModel", "SiglipConfig", text_config=TOWER, vision_config=VISION_TOWER)),
    "blip": (
        "multimodal",
        _hf("BlipForConditionalGeneration", "BlipConfig", text_config=TOWER, vision_config=VISION_TOWER),
    ),
}


def _build(name: str, layers: int) -> nn.Module:
    _kind, build = FAMILIES[name]
    model = build(layers)
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if module is not model and not list(module.children()):
                for pname, p in module.named_parameters(recurse=False):
                    if p.ndim == 1 and p.is_floating_point():
                        p.copy_(torch.rand_like(p) + 0.5 if pname == "weight" else torch.randn_like(p) * 0.5)
    return model.train()


def _first(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "logits_per_image", "last_hidden_state"):
        value = getattr(out, key, None) if not isinstance(out, dict) else out.get(key)
        if isinstance(value, torch.Tensor):
            return value
    values = out.values() if isinstance(out, dict) else out
    return next(v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point())


def _loss(out) -> torch.Tensor:
    y = _first(out).float()
    w = torch.randn(y.shape[-1], generator=torch.Generator().manual_seed(1))
    return (y * w).sum() / y.numel() ** 0.5


def _step(model: nn.Module, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    args, kwargs = inputs
    model.zero_grad(set_to_none=True)
    out = model(*args, **kwargs)
    _loss(out).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return _first(out).detach(), grads


def _saved(model: nn.Module, inputs) -> int:
    args, kwargs = inputs
    return lc.activation_memory(lambda: _loss(model(*args, **kwargs)), params=model).total


def _double(inputs):
    args, kwargs = inputs

    def cast(v):
        return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()


def _one(name: str, layers: int) -> dict:
    stock = _build(name, layers)
    model = copy.deepcopy(stock)
    inputs = example_inputs_for(stock, batch=BATCH, seq_len=SEQ, flags=False)
    record: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        lc.convert(model)
        record["convert_s"] = round(time.perf_counter() - start, 2)
    record["warnings"] = [str(w.message).splitlines()[0][:200] for w in caught if "lowmembp" in str(w.message)]
    y0, g0 = _step(stock, inputs)
    y1, g1 = _step(model, inputs)
    _y64, g64 = _step(copy.deepcopy(stock).double(), _double(inputs))
    record["forward_rel"] = _rel(y0, y1)
    # per parameter, relative to its own largest gradient but never below 1e-3 of the model's largest:
    # some gradients are zero analytically (a key bias under softmax) and only rounding noise in stock
    scale = max((g.abs().max().item() for g in g64.values()), default=0.0)

    def err(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
        return max(
            (
                (got[n].double() - ref[n].double()).abs().max().item() / max(ref[n].abs().max().item(), 1e-3 * scale)
                for n in ref
            ),
            default=0.0,
        )

    record["grad_rel"] = err(g1, g0)  # converted against stock
    record["grad_err_stock64"], record["grad_err_conv64"] = err(g0, g64), err(g1, g64)  # each against float64
    record["grads_missing"] = sorted(set(g0) ^ set(g1))
    record["bytes_stock"], record["bytes_converted"] = _saved(stock, inputs), _saved(model, inputs)
    plan = model.lowmembp_report.plan
    record["norms_shared"] = sum(s.action != "skip" for s in plan.norms)
    record["norms_stock"] = sum(s.action == "skip" for s in plan.norms)
    record["acts"] = {}
    for s in plan.activations:
        key = f"{s.kind}:{s.option or 'stock'}"
        record["acts"][key] = record["acts"].get(key, 0) + 1
    stock_sites = [s for s in (*plan.norms, *plan.activations) if s.action == "skip"]
    record["first_stock_reason"] = f"{stock_sites[0].module}: {stock_sites[0].reason}" if stock_sites else ""
    record["capture"] = plan.capture
    return record


def run_family(name: str) -> dict:
    two, four = _one(name, 2), _one(name, 4)
    block_stock = (four["bytes_stock"] - two["bytes_stock"]) / 2
    block_conv = (four["bytes_converted"] - two["bytes_converted"]) / 2
    return {
        "family": name,
        "kind": FAMILIES[name][0],
        **two,
        "block_stock": block_stock,
        "block_converted": block_conv,
        "block_cut": 1 - block_conv / block_stock if block_stock else 0.0,
        "whole_cut": 1 - two["bytes_converted"] / two["bytes_stock"],
        # exact: the converted model's gradients are as close to float64 as stock's own (twice its
        # error, or fp32's unit roundoff where stock's is smaller), the forward within fp32 rounding
        "exact": two["grad_err_conv64"] <= max(2 * two["grad_err_stock64"], 1e-6)
        and two["forward_rel"] <= 1e-5
        and not two["grads_missing"],
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| family | kind | exact (fwd vs stock / grads vs fp64: ours vs stock) | per block | whole fwd "
        "| norms shared | activations | left stock (first) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['family']} | {r['kind']} | ERROR | | | | | {r['error']} |")
            continue
        acts = ", ".join(f"{k} {v}" for k, v in sorted(r["acts"].items())) or "-"
        exact = (
            f"{'yes' if r['exact'] else 'NO'} ({r['forward_rel']:.0e} / {r['grad_err_conv64']:.0e} vs "
            f"{r['grad_err_stock64']:.0e})"
        )
        lines.append(
            f"| {r['family']} | {r['kind']} | {exact} | {-100 * r['block_cut']:.1f}% | {-100 * r['whole_cut']:.1f}% | "
            f"{r['norms_shared']}/{r['norms_shared'] + r['norms_stock']} | {acts} | "
            f"{r['first_stock_reason'][:110] or '-'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="family names (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="write the records here")
    parser.add_argument("--table-from", type=Path, default=None, help="print the table of a saved JSON and exit")
    args = parser.parse_args()
    if args.table_from:
        print(markdown(json.loads(args.table_from.read_text())["rows"]))
        return
    rows = []
    for name in args.only or FAMILIES:
        start = time.perf_counter()
        try:
            row = run_family(name)
        except Exception as exc:  # a row says why, the table goes on
            row = {"family": name, "kind": FAMILIES[name][0], "error": f"{type(exc).__name__}: {exc}"[:300]}
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        status = row.get("error") or f"exact={row['exact']}, per block {-100 * row['block_cut']:.1f}%"
        print(f"{name}: {status} ({row['seconds']} s)", flush=True)
    print(markdown(rows))
    if args.json:
        meta = {
            "machine": f"{platform.platform()}, {_cpu_name()}, {os.cpu_count()} logical CPUs",
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
            "seq": SEQ,
            "batch": BATCH,
            "hidden": H,
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
