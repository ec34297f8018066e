"""Gradient fidelity of the converted model on trained weights: per-tensor cosine and relative error.

No pretrained weights are reachable offline, so the model is first trained on scikit-learn's digits
(or loaded from ``examples/train_digits.py --save-state``) so that weights, LayerNorm affines
included, are away from their initial values. Then, on one batch of held-out digits, the parameter
gradients of four float32 variants are compared with those of the original model in float64:

- ``fp32``: the original model in float32 (the floor: float32 rounding alone);
- ``norms``: ``convert(activations=False)``, memory-sharing LayerNorms with folded affine (exact);
- ``acts``: ``convert(norms=False)``, ReGELU2 (forward exact, 2-bit approximate backward);
- ``full``: ``convert()``, both.

Folding moves each LayerNorm's gamma/beta into the consumer Linear (W' = W * gamma,
b' = b + W @ beta), so a converted model has other parameters than the original. To compare like
with like, the converted model is called through ``torch.func.functional_call`` with W', b' built
from the original tensors inside autograd; backward then gives dL/dW, dL/db, dL/dgamma, dL/dbeta in
the original parameterisation (the chain rule of the fold done by autograd, not by hand).

    python bench/grad_fidelity.py                                  # trains 300 steps first (~30 s)
    python bench/grad_fidelity.py --state /tmp/digits_state.pt     # weights from train_digits.py
    python bench/grad_fidelity.py --tiny                           # a few steps (CI)

Prints markdown tables (per block, then per tensor) headed by machine, date and command, and a JSON
summary as the last line.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import lowmembp_convert

# the same data and model as the training example, so the "pretrained" state is the one it trains
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from train_digits import build_vit, digits_tensors  # noqa: E402

VARIANTS = {  # name -> convert() options, None for the unconverted float32 model
    "fp32": None,
    "norms": {"activations": False},
    "acts": {"norms": False},
    "full": {},
}


def pretrain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int = 0) -> float:
    """AdamW on the digits train split for ``steps`` steps; returns the last step's loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    order = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    perm = torch.randperm(len(x), generator=order)
    for step in range(steps):
        idx = perm[(step * 64) % len(x) :][:64]
        if len(idx) < 64:
            perm = torch.randperm(len(x), generator=order)
            idx = perm[:64]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss.item()


def reference_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
    """(dL/dparam of ``model`` computed in float64, the loss L)."""
    model64 = copy.deepcopy(model).double()
    model64.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model64(x.double()), y)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model64.named_parameters()}, loss.item()


def grads_in_original_parameterisation(
    original: nn.Module, options: dict | None, x: torch.Tensor, y: torch.Tensor, example: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Gradients w.r.t. the ORIGINAL model's parameters of the (optionally converted) model's loss.

    The converted model runs with its folded consumer weights rebuilt from the original tensors
    inside autograd (W' = W * gamma, b' = b + W @ beta), so backward lands on W, b, gamma, beta.
    """
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in original.named_parameters()}
    if options is None:
        model, params = original, dict(leaves)
    else:
        model = lowmembp_convert.convert(copy.deepcopy(original), example_inputs=((example,), {}), **options)
        params = {n: leaves[n] for n, _ in model.named_parameters() if n in leaves}
        for site in model.lowmembp_report.plan.norms:
            if site.action != "fold":
                continue
            gamma = leaves[site.weight] + site.weight_offset if site.weight else None
            beta = leaves[site.bias] if site.bias and site.fold_bias else None
            for consumer in site.consumers:
                if consumer.layout != "linear":
                    raise NotImplementedError(f"{consumer.module}: only Linear consumers are mapped back")
                weight = leaves[consumer.weight]
                params[consumer.weight] = weight * gamma if gamma is not None else weight
                if beta is not None:
                    old_bias = leaves.get(consumer.bias)  # absent when the fold created the bias
                    params[consumer.bias] = (old_bias if old_bias is not None else 0) + weight @ beta
        missing = {n for n, _ in model.named_parameters()} - set(params)
        if missing:
            raise RuntimeError(f"converted parameters with no original counterpart: {sorted(missing)}")
    F.cross_entropy(functional_call(model, params, (x,)), y).backward()
    return {n: leaf.grad.detach().clone() for n, leaf in leaves.items()}


def compare(grad: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """(cosine similarity, ||grad - ref|| / ||ref||, ||grad|| / ||ref||), in float64."""
    g, r = grad.double().flatten(), ref.double().flatten()
    ref_norm = r.norm().clamp_min(1e-300)
    cos = float(F.cosine_similarity(g, r, dim=0, eps=1e-300))
    return cos, float((g - r).norm() / ref_norm), float(g.norm() / ref_norm)


def group_of(name: str) -> str:
    """Block a parameter belongs to: blocks.i, or stem (patch/pos/cls) and head (final norm, head)."""
    if name.startswith("blocks."):
        return ".".join(name.split(".")[:2])
    return "head" if name.startswith(("norm.", "head", "fc_norm")) else "stem"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores), torch {torch.__version__}, CPU, {torch.get_num_threads()} thread"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state", type=Path, default=None, help="state_dict from train_digits.py --save-state")
    parser.add_argument("--train-steps", type=int, default=300, help="training steps when --state is not given")
    parser.add_argument("--batch-size", type=int, default=256, help="held-out images in the gradient batch")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="5 training steps, batch 32 (CI)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.train_steps, args.batch_size = 5, 32
    torch.set_num_threads(1)
    command = " ".join(["python bench/grad_fidelity.py", *(sys.argv[1:] if argv is None else argv)])

    x_train, y_train, x_test, y_test = digits_tensors(args.image_size)
    torch.manual_seed(args.seed)
    model = build_vit(args.image_size)
    if args.state is not None:
        model.load_state_dict(torch.load(args.state, weights_only=True))
        provenance = f"weights loaded from {args.state}"
    elif args.train_steps == 0:
        provenance = "at initialisation (no training; LayerNorm affines are 1 and 0)"
    else:
        last = pretrain(model, x_train, y_train, args.train_steps, args.seed)
        provenance = f"trained {args.train_steps} AdamW steps on digits (last batch loss {last:.3f})"
    model.eval()  # no dropout in this model; eval only pins that down
    gammas = torch.cat([m.weight.detach().flatten() for m in model.modules() if isinstance(m, nn.LayerNorm)])
    betas = torch.cat([m.bias.detach().flatten() for m in model.modules() if isinstance(m, nn.LayerNorm)])
    x, y = x_test[: args.batch_size], y_test[: args.batch_size]

    reference, batch_loss = reference_grads(model, x, y)
    results: dict[str, dict[str, tuple[float, float]]] = {}
    for variant, options in VARIANTS.items():
        grads = grads_in_original_parameterisation(model, options, x, y, x_train[:2])
        results[variant] = {n: compare(grads[n], reference[n]) for n in reference}
        results[variant]["__all__"] = compare(
            torch.cat([grads[n].flatten() for n in reference]), torch.cat([r.flatten() for r in reference.values()])
        )
        for group in dict.fromkeys(group_of(n) for n in reference):
            names = [n for n in reference if group_of(n) == group]
            results[variant][f"[{group}]"] = compare(
                torch.cat([grads[n].flatten() for n in names]), torch.cat([reference[n].flatten() for n in names])
            )

    lines = [
        "### Gradient fidelity: converted vs exact (float64) on a trained tiny ViT",
        "",
        f"- machine: {machine()}",
        f"- date: {datetime.date.today().isoformat()}",
        f"- command: `{command}`",
        f"- model: timm VisionTransformer (patch 4, dim 64, depth 4, heads 4, avg pool) on 16x16 digits; {provenance}",
        f"- LayerNorm affines after training: gamma in [{gammas.min():.3f}, {gammas.max():.3f}], "
        f"beta in [{betas.min():.3f}, {betas.max():.3f}]",
        f"- gradient batch: {len(x)} held-out images (loss {batch_loss:.4f}); reference: the original model in float64",
        "- columns: cos = cosine similarity, rel = ||g - g_ref|| / ||g_ref||, norm ratio = ||g|| / ||g_ref||; "
        "fp32 = original model in float32 (rounding floor), norms = norm-only conversion (exact), "
        "acts = ReGELU2 only, full = both",
        "",
        "| block | fp32 rel | norms cos | norms rel | acts cos | acts rel | full cos | full rel | full norm ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def row(key: str, label: str) -> str:
        cells = [f"{results['fp32'][key][1]:.1e}"]
        for variant in ("norms", "acts", "full"):
            cos, rel, _ratio = results[variant][key]
            cells += [f"{cos:.6f}", f"{rel:.1e}"]
        cells.append(f"{results['full'][key][2]:.3f}")
        return f"| {label} | " + " | ".join(cells) + " |"

    for key in [k for k in results["full"] if k.startswith("[")]:
        lines.append(row(key, key.strip("[]")))
    lines.append(row("__all__", "**all parameters**"))
    lines += [
        "",
        "| tensor | shape | fp32 rel | norms cos | norms rel | acts cos | acts rel | full cos | full rel "
        "| full norm ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, ref in reference.items():
        lines.append(row(name, f"{name} | {list(ref.shape)}"))
    print("\n".join(lines))

    per_tensor = {v: {n: r for n, r in results[v].items() if n in reference} for v in results}
    summary = {
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
        "command": command,
        "provenance": provenance,
        "batch": len(x),
        "batch_loss": batch_loss,
        "tensors": len(reference),
        "min_cos": {v: min(c for c, _, _ in per_tensor[v].values()) for v in per_tensor},
        "max_rel": {v: max(r for _, r, _ in per_tensor[v].values()) for v in per_tensor},
        "all_params": {v: dict(zip(("cos", "rel", "norm_ratio"), results[v]["__all__"], strict=True)) for v in results},
        "blocks": {
            v: {
                k.strip("[]"): dict(zip(("cos", "rel", "norm_ratio"), c, strict=True))
                for k, c in results[v].items()
                if k.startswith("[")
            }
            for v in results
        },
    }
    print(json.dumps(summary))
    # the exact variants must sit at the float32 floor; anything else is a folding bug
    exact_ok = all(summary["min_cos"][v] > 1 - 1e-6 and math.isfinite(summary["max_rel"][v]) for v in ("fp32", "norms"))
    return 0 if exact_ok else 1


if __name__ == "__main__":
    sys.exit(main())
