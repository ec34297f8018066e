"""HF ``Trainer`` + PEFT LoRA on a converted decoder: a tiny LLaMA learns byte-level text, original vs converted.

The decoder is built from a ``LlamaConfig`` (no hub access needed) with randomised RMSNorm weights
(init values of 1 would hide a wrong affine). LoRA adapters go on q/k/v/o and the MLP, and ``lm_head``
is trained in full (``modules_to_save``: a random base's frozen head would barely let the loss move);
then ``lowmembp_convert.convert`` rewrites the PEFT model in place: the SiLU is recomputed exactly in
the (LoRA-wrapped) down projection's backward, and RMSNorm -> memory-sharing RMSNorm that keeps its
own weight (the default ``norms="share"``): no parameter changes, adapters included. A stock copy
with the same initial weights is trained on the same batches for comparison.

Text: the docstrings of a few standard-library modules (shipped with Python), as bytes (vocab 256).

Deployment note, checked at the end: with the default, the adapter trained on the converted model
fits the STOCK base as well as a converted one. With ``--norms fold`` (the paper's reparameterization)
gamma is folded into ``lora_A``, so the adapter belongs with a CONVERTED base only
(``lowmembp-convert base base_out``, or ``convert(base, norms="fold")`` before
``PeftModel.from_pretrained``).

    python examples/hf_lora_trainer.py                 # 2 x 80 steps, ~30 s on 2 CPU cores
    python examples/hf_lora_trainer.py --norms fold    # the folded form, and its deployment caveat
    python examples/hf_lora_trainer.py --tiny          # 2 x 3 steps (CI)

Prints the conversion report and a JSON summary as the last line of stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import inspect
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import lowmembp_convert

STDLIB_MODULES = ("argparse", "collections", "dataclasses", "functools", "itertools", "json", "pathlib", "re")


def stdlib_text() -> bytes:
    """Docstrings of a few standard-library modules and their public members: real English text, offline."""
    parts = []
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr, obj in sorted(vars(module).items()):
            if not attr.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)):
                doc = inspect.getdoc(obj)
                if doc and getattr(obj, "__module__", None) == name:
                    parts.append(doc)
    return "\n\n".join(parts).encode("utf-8")


class ByteWindows(torch.utils.data.Dataset):
    """Non-overlapping windows of ``length`` bytes; labels are the inputs (the model shifts them)."""

    def __init__(self, data: bytes, length: int) -> None:
        tokens = torch.tensor(list(data), dtype=torch.long)
        self.windows = tokens[: len(tokens) // length * length].view(-1, length)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def build_peft_model(seed: int) -> tuple[LlamaForCausalLM, PeftModel]:
    """(base, LoRA model on a deep copy of it); both reproducible from ``seed``."""
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        use_cache=False,  # training needs no KV cache
    )  # fmt: skip
    torch.manual_seed(seed)
    base = LlamaForCausalLM(config)
    with torch.no_grad():  # a "pretrained-like" spread of norm weights (init values of 1 hide folding bugs)
        for name, param in base.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM", modules_to_save=["lm_head"],
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )  # fmt: skip
    return base, get_peft_model(copy.deepcopy(base), lora)


def train(model: torch.nn.Module, train_set, eval_set, args: argparse.Namespace, output_dir: str) -> dict:
    """One ``Trainer.train()``; returns per-step train losses and the final eval loss."""
    training_args = TrainingArguments(
        output_dir=output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 10),
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=args.seed,
        data_seed=args.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    eval_loss = trainer.evaluate()["eval_loss"]
    return {"train_losses": losses, "eval_loss": eval_loss, "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="3 steps, short sequences (CI)")
    parser.add_argument(
        "--norms", choices=("share", "fold"), default="share", help="convert()'s norms option (default: share)"
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.seq_len, args.batch_size = 3, 32, 4
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    data = stdlib_text()
    split = int(len(data) * 0.9)
    train_set, eval_set = ByteWindows(data[:split], args.seq_len), ByteWindows(data[split:], args.seq_len)
    if args.tiny:
        eval_set.windows = eval_set.windows[:8]

    base, original = build_peft_model(args.seed)
    # same init, rewritten in place
    converted = lowmembp_convert.convert(copy.deepcopy(original), verify=True, norms=args.norms)
    report = converted.lowmembp_report
    print(report, file=sys.stderr)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in (("original", original), ("converted", converted)):
            with contextlib.redirect_stdout(io.StringIO()):  # Trainer prints its log dicts
                results[name] = train(model, train_set, eval_set, args, str(Path(tmp) / name))
            r = results[name]
            print(
                f"{name:>9}: train loss {r['train_losses'][0]:.3f} -> {r['train_losses'][-1]:.3f}, "
                f"eval loss {r['eval_loss']:.3f} ({args.steps} steps, {r['seconds']} s)",
                file=sys.stderr,
            )

        # which base the trained adapter belongs with: check both pairings on one batch
        converted.save_pretrained(Path(tmp) / "adapter")
        base.save_pretrained(Path(tmp) / "base")
        batch = eval_set[0]["input_ids"][None]
        converted.eval()
        with torch.no_grad():
            want = converted(input_ids=batch).logits
            stock_base = LlamaForCausalLM.from_pretrained(Path(tmp) / "base")
            converted_base = lowmembp_convert.convert(
                LlamaForCausalLM.from_pretrained(Path(tmp) / "base"), norms=args.norms
            )
            on_converted = PeftModel.from_pretrained(converted_base, Path(tmp) / "adapter")(input_ids=batch).logits
            on_stock = PeftModel.from_pretrained(stock_base, Path(tmp) / "adapter")(input_ids=batch).logits
        scale = want.abs().max().item()
        pairing = {
            "adapter_on_converted_base_max_rel_err": (on_converted - want).abs().max().item() / scale,
            "adapter_on_stock_base_max_rel_err": (on_stock - want).abs().max().item() / scale,
        }
    print(
        f"adapter + converted base: max rel err {pairing['adapter_on_converted_base_max_rel_err']:.1e}; "
        f"adapter + stock base: {pairing['adapter_on_stock_base_max_rel_err']:.1e}"
        + (" (use a converted base)" if args.norms == "fold" else ""),
        file=sys.stderr,
    )
    summary = {
        "model": "LlamaForCausalLM (hidden 64, 2 layers, vocab 256 bytes) + LoRA r8, lm_head trained",
        "tiny": args.tiny,
        "norms": args.norms,
        "steps": args.steps,
        "train_windows": len(train_set),
        "trainable_params": sum(p.numel() for p in converted.parameters() if p.requires_grad),
        "conversion": {
            "activations_converted": report.converted_activations,
            "activation_options": sorted({s.option for s in report.plan.activations if s.action == "convert"}),
            "norms_converted": report.converted_norms,
            "norms_folded": sum(s.action == "fold" for s in report.plan.norms),
            "notes": report.notes,
        },
        "original": {k: v for k, v in results["original"].items() if k != "train_losses"}
        | {"first_loss": results["original"]["train_losses"][0], "last_loss": results["original"]["train_losses"][-1]},
        "converted": {k: v for k, v in results["converted"].items() if k != "train_losses"}
        | {
            "first_loss": results["converted"]["train_losses"][0],
            "last_loss": results["converted"]["train_losses"][-1],
        },
        "unigram_entropy_nats": unigram_entropy(data[:split]),
        "adapter_pairing": pairing,
    }
    print(json.dumps(summary))
    return 0 if all(math.isfinite(results[n]["eval_loss"]) for n in results) else 1


def unigram_entropy(data: bytes) -> float:
    """Entropy of the byte distribution: the loss a model that ignores context would reach."""
    counts = torch.bincount(torch.tensor(list(data)), minlength=256).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


if __name__ == "__main__":
    sys.exit(main())
