"""Training trajectories of converted models against stock: |loss - stock loss| over 20 optimizer steps.

``convert()`` defaults to ``norms="share"``: memory-sharing norms that keep their own affine, so the
parameters and the state dict are the stock ones and training should follow the stock trajectory up
to float32 rounding. ``norms="fold"`` is the paper's reparameterization (the norm affine folded into
the next Linear): the same function at step 0, but other parameters, so an optimizer takes other
steps (SGD's update of W * gamma is not the update of W times gamma; AdamW normalises per tensor).
This script measures how far each variant drifts from stock over a short training run.

Variants: ``stock`` (a second independent copy of the stock model: shows 0, i.e. determinism),
``default`` (``convert(copy)``) and ``fold`` (``convert(copy, norms="fold")``). Optimizers: SGD
(momentum 0.9, lr 1e-2) and AdamW (lr 1e-3). Models, fp32, random weights, every norm weight and bias
randomised (weight = 1 + 0.2 randn, bias = 0.2 randn; 1 and 0 would hide folding differences),
dropout off, one fixed seeded batch for every step:

- ViT-S (timm ``vit_small_patch16_224``, img 32, patch 8, depth 2, 10 classes), batch 8;
- LLaMA-shaped decoder (transformers, hidden 128, MLP 344, 4 heads, 2 layers, vocab 500),
  batch 8 x 32 tokens, labels = input_ids.

For each (model, optimizer, variant): the max over steps of |loss - stock loss|, the step-20 losses,
and the max |param - stock param| after 20 steps over the parameters sharing a state_dict key.

    python bench/trajectory.py
    python bench/trajectory.py --json /tmp/trajectory.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import lowmembp_convert
from lowmembp_convert.demo import _randomise_norms

VARIANTS: dict[str, dict | None] = {"stock": None, "default": {}, "fold": {"norms": "fold"}}
OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "SGD": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
    "AdamW": lambda params: torch.optim.AdamW(params, lr=1e-3),
}
Batch = tuple[tuple, dict]  # (args, kwargs) of one forward call
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def vit(seed: int) -> tuple[nn.Module, Batch, LossFn]:
    """timm ViT-S at 32x32 in 8x8 patches, depth 2; timm's drop rates default to 0."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=10
    )
    g = torch.Generator().manual_seed(seed + 1)
    x, labels = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    return model, ((x,), {}), lambda m, batch: F.cross_entropy(m(*batch[0], **batch[1]), labels)


def llama(seed: int) -> tuple[nn.Module, Batch, LossFn]:
    """LLaMA-shaped causal LM from config (attention dropout 0), labels = input_ids."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=128, intermediate_size=344, num_attention_heads=4, num_key_value_heads=4,
        num_hidden_layers=2, vocab_size=500, attention_dropout=0.0,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, 500, (8, 32), generator=torch.Generator().manual_seed(seed + 1))
    return model, ((), {"input_ids": ids}), lambda m, batch: m(*batch[0], **batch[1], labels=batch[1]["input_ids"]).loss


MODELS = {"ViT-S (timm)": vit, "LLaMA (transformers)": llama}


def train(model: nn.Module, batch: Batch, loss_fn: LossFn, optimizer_name: str, steps: int) -> list[float]:
    """``steps`` optimizer steps on the same batch; the loss before each step."""
    model.train()
    optimizer = OPTIMIZERS[optimizer_name]([p for p in model.parameters() if p.requires_grad])
    losses = []
    for _ in range(steps):
        loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def max_param_diff(model: nn.Module, stock: nn.Module) -> tuple[float, int]:
    """(max |param - stock param| over state_dict keys both have with one shape, stock keys not compared)."""
    ours, ref = model.state_dict(), stock.state_dict()
    common = [k for k, v in ref.items() if k in ours and ours[k].shape == v.shape and v.is_floating_point()]
    diff = max((float((ours[k].double() - ref[k].double()).abs().max()) for k in common), default=float("nan"))
    return diff, sum(v.is_floating_point() for v in ref.values()) - len(common)


def run(steps: int, seed: int) -> list[dict]:
    rows = []
    for model_name, build in MODELS.items():
        original, batch, loss_fn = build(seed)
        _randomise_norms(original, seed)
        for optimizer_name in OPTIMIZERS:
            stock = copy.deepcopy(original)
            stock_losses = train(stock, batch, loss_fn, optimizer_name, steps)
            for variant, options in VARIANTS.items():
                model = copy.deepcopy(original)
                if options is not None:
                    lowmembp_convert.convert(model, example_inputs=batch, **options)
                losses = train(model, batch, loss_fn, optimizer_name, steps)
                diff, uncompared = max_param_diff(model, stock)
                rows.append({
                    "model": model_name, "optimizer": optimizer_name, "variant": variant,
                    "max_abs_loss_diff": max(abs(a - b) for a, b in zip(losses, stock_losses, strict=True)),
                    "stock_loss_last": stock_losses[-1], "loss_last": losses[-1],
                    "max_abs_param_diff": diff, "keys_not_compared": uncompared,
                    "losses": losses, "stock_losses": stock_losses,
                })  # fmt: skip
    return rows


def markdown(rows: list[dict], steps: int) -> list[str]:
    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, CPU, 1 thread"
    lines = [
        f"Machine: {machine}; date: {datetime.date.today()}; {steps} steps, fp32, one fixed batch.",
        "",
        "command: python bench/trajectory.py",
        "",
        f"| model | optimizer | variant | max \\|loss - stock\\| | stock loss @{steps} | loss @{steps} "
        f"| max \\|param - stock\\| @{steps} |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['optimizer']} | {r['variant']} | {r['max_abs_loss_diff']:.2e} "
            f"| {r['stock_loss_last']:.6f} | {r['loss_last']:.6f} | {r['max_abs_param_diff']:.2e} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the raw numbers (and per-step losses) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = run(args.steps, args.seed)
    print("\n".join(markdown(rows, args.steps)))
    if args.json is not None:
        args.json.write_text(json.dumps({"steps": args.steps, "seed": args.seed, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
