"""A plain timm fine-tuning loop with a converted model: ConvNeXt on scikit-learn's digits.

The one line that matters is ``lowmembp_convert.convert(model, ...)`` before the optimizer is built.
By default every LayerNorm (channels-last in the blocks, channels-first LayerNorm2d in the stem and
downsamples) becomes a memory-sharing norm that keeps its own affine, the fc1 / strided conv / head
reading it keeps the same tensor for backward, and no parameter changes. ConvNeXt's GELUs feed 1x1
convs (``conv_mlp``), where no exact recompute is proven: the default leaves them stock (exact) and
the report says that ``--activations approx`` (ReGELU2, a 2-bit approximate backward) would keep
fewer bytes. ``--norms fold`` folds the affine into those consumers instead (the paper's form); then
building the optimizer afterwards matters: folded gammas and betas are no longer parameters.

No hub access here, so the default starts from random weights (``--pretrained`` loads timm's
ImageNet weights where the network allows; timm adapts the stem to 1 channel). Data:
``sklearn.datasets.load_digits`` (shipped with scikit-learn), upsampled to 32x32, 75/25 split.

    python examples/timm_finetune.py                         # convnext_atto, 3 epochs, ~1-2 min on 2 cores
    python examples/timm_finetune.py --model vit_tiny_patch16_224 --image-size 32 --model-kwargs '{"patch_size": 4}'
    python examples/timm_finetune.py --activations approx --norms fold   # the paper's conversion
    python examples/timm_finetune.py --tiny                  # 2 steps (CI)

Prints the conversion report, per-epoch loss and accuracy, and a JSON summary as the last line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import AverageMeter, accuracy

import lowmembp_convert


def digits_loaders(image_size: int, batch_size: int, seed: int):
    """Train/test DataLoaders over digits in [0, 1], resized to ``image_size``, standardised on train."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.long)
    train, test = train_test_split(np.arange(len(y)), test_size=0.25, stratify=digits.target, random_state=0)
    x = (x - x[train].mean()) / x[train].std()
    data = torch.utils.data.TensorDataset
    generator = torch.Generator().manual_seed(seed)
    train_loader = torch.utils.data.DataLoader(
        data(x[train], y[train]), batch_size=batch_size, shuffle=True, drop_last=True, generator=generator
    )
    test_loader = torch.utils.data.DataLoader(data(x[test], y[test]), batch_size=256)
    return train_loader, test_loader


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader) -> tuple[float, float]:
    """(top-1 accuracy in %, mean loss) over ``loader``."""
    model.eval()
    top1, losses = AverageMeter(), AverageMeter()
    for images, targets in loader:
        logits = model(images)
        losses.update(F.cross_entropy(logits, targets).item(), images.size(0))
        top1.update(accuracy(logits, targets, topk=(1,))[0].item(), images.size(0))
    model.train()
    return top1.avg, losses.avg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnext_atto")
    parser.add_argument("--model-kwargs", type=json.loads, default={}, help="extra timm.create_model arguments (JSON)")
    parser.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs the hub)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: small models, busy machines)")
    parser.add_argument("--tiny", action="store_true", help="1 epoch of 2 steps (CI)")
    parser.add_argument("--activations", choices=("auto", "approx", "recompute"), default="auto")
    parser.add_argument("--norms", choices=("share", "fold"), default="share")
    args = parser.parse_args(argv)
    max_steps = 2 if args.tiny else None
    if args.tiny:
        args.epochs = 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train_loader, test_loader = digits_loaders(args.image_size, args.batch_size, args.seed)
    model = timm.create_model(args.model, pretrained=args.pretrained, num_classes=10, in_chans=1, **args.model_kwargs)
    example = next(iter(test_loader))[0][:2]
    # example_inputs: the model's pretrained_cfg still says 3x224x224; our images are 1x32x32
    model = lowmembp_convert.convert(
        model, verify=True, example_inputs=((example,), {}), activations=args.activations, norms=args.norms
    )
    print(model.lowmembp_report, file=sys.stderr)

    optimizer = create_optimizer_v2(model, opt="adamw", lr=args.lr, weight_decay=0.05)  # after convert()
    steps_per_epoch = max_steps or len(train_loader)
    scheduler = CosineLRScheduler(
        optimizer, t_initial=args.epochs * steps_per_epoch, warmup_t=max(1, steps_per_epoch // 2),
        warmup_lr_init=args.lr / 20, t_in_epochs=False,
    )  # fmt: skip
    history = []
    step = 0
    start = time.perf_counter()
    model.train()
    for epoch in range(args.epochs):
        train_loss = AverageMeter()
        for i, (images, targets) in enumerate(train_loader):
            if max_steps and i >= max_steps:
                break
            loss = F.cross_entropy(model(images), targets, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
            train_loss.update(loss.item(), images.size(0))
        acc, test_loss = evaluate(model, test_loader)
        history.append({"epoch": epoch + 1, "train_loss": train_loss.avg, "test_loss": test_loss, "test_acc": acc})
        print(
            f"epoch {epoch + 1}: train loss {train_loss.avg:.4f}  test loss {test_loss:.4f}  test acc {acc:.2f}%",
            file=sys.stderr,
        )
    report = model.lowmembp_report
    summary = {
        "model": args.model,
        "tiny": args.tiny,
        "steps": step,
        "epochs": args.epochs,
        "final_test_acc": history[-1]["test_acc"],
        "history": history,
        "conversion": {
            "activations": args.activations,
            "norms": args.norms,
            "activations_converted": report.converted_activations,
            "activations_approx_on_request": sum(
                s.action == "skip" and "activations='approx' would keep fewer bytes" in s.reason
                for s in report.plan.activations
            ),
            "norms_converted": report.converted_norms,
            "norms_folded": sum(s.action == "fold" for s in report.plan.norms),
            "notes": report.notes,
        },
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(summary))
    return 0 if all(math.isfinite(h["train_loss"]) for h in history) else 1


if __name__ == "__main__":
    sys.exit(main())
