"""Gradient fidelity of converted models: cosine and relative error of gradients against stock (float64).

Part 1, trained weights. No pretrained weights are reachable offline, so a tiny ViT is first trained
on scikit-learn's digits (or loaded from ``examples/train_digits.py --save-state``) so that weights,
LayerNorm affines included, are away from their initial values. Then, on one batch of held-out
digits, the parameter gradients of five float32 variants are compared with those of the original
model in float64:

- ``fp32``: the original model in float32 (the floor: float32 rounding alone);
- ``norms``: ``convert(activations=False, norms="fold")``, memory-sharing LayerNorms with folded affine
  (exact);
- ``acts``: ``convert(norms=False, activations="approx")``, ReGELU2 (exact forward, 2-bit backward);
- ``full``: ``convert(activations="approx", norms="fold")``, both: the paper;
- ``auto``: ``convert()``, the default: per activation site the exact option keeping the fewest bytes,
  memory-sharing LayerNorms that keep their own affine (exact).

Part 2, shapes and depths (``--shapes``, on by default). ViT (timm), BERT and LLaMA (transformers)
built from config at a small width with random weights and randomised norm affines, at several
depths; for stock fp32, approx (the paper: ``activations="approx", norms="fold"``) and auto: cosine
of all parameter gradients together and of the input gradient (pixels, or ``inputs_embeds``) against
stock in float64.

Folding (``norms="fold"``) moves each LayerNorm's gamma/beta into the consumer Linear (W' = W * gamma,
b' = b + W @ beta), so a folded model has other parameters than the original. To compare like
with like, the converted model is called through ``torch.func.functional_call`` with W', b' built
from the original tensors inside autograd; backward then gives dL/dW, dL/db, dL/dgamma, dL/dbeta in
the original parameterisation (the chain rule of the fold done by autograd, not by hand).

    python bench/grad_fidelity.py                                  # trains 300 steps first (~30 s)
    python bench/grad_fidelity.py --state /tmp/digits_state.pt     # weights from train_digits.py
    python bench/grad_fidelity.py --tiny                           # a few steps, depths 1-2 (CI)
    python bench/grad_fidelity.py --no-shapes                      # part 1 only

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
from collections.abc import Callable
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
    "norms": {"activations": False, "norms": "fold"},
    "acts": {"norms": False, "activations": "approx"},
    "full": {"activations": "approx", "norms": "fold"},  # the paper
    "auto": {},  # the default: exact recompute, norms keep their affine
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
    grads, _ = gradients(
        original, options, lambda model, params: F.cross_entropy(functional_call(model, params, (x,)), y),
        example_inputs=((example,), {}),
    )  # fmt: skip
    return grads


def gradients(
    original: nn.Module,
    options: dict | None,
    loss_of: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor],
    example_inputs: tuple[tuple, dict] | None = None,
) -> tuple[dict[str, torch.Tensor], nn.Module]:
    """(dL/dparam of the original's parameters, the model that ran) for ``loss_of(model, params)``.

    ``options`` None runs ``original`` itself; otherwise a converted deep copy whose folded consumer
    weights are rebuilt from the original tensors inside autograd (W' = W * gamma, b' = b + W @ beta),
    so backward lands on W, b, gamma, beta. Gradients of inputs that ``loss_of`` closes over are
    left on those inputs.
    """
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in original.named_parameters()}
    if options is None:
        model, params = original, dict(leaves)
    else:
        model = lowmembp_convert.convert(copy.deepcopy(original), example_inputs=example_inputs, **options)
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
    loss_of(model, params).backward()
    # a parameter the loss does not reach (the token embedding when fed inputs_embeds) has gradient 0
    return {
        n: torch.zeros_like(leaf) if leaf.grad is None else leaf.grad.detach().clone() for n, leaf in leaves.items()
    }, model


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


def options_chosen(model: nn.Module) -> str:
    """What ``convert()`` did to the activation sites, e.g. "gelu recompute x4"."""
    counts: dict[str, int] = {}
    for site in model.lowmembp_report.plan.activations:
        key = f"{site.kind} {site.option if site.action == 'convert' else 'stock'}"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in counts.items()) or "no activation site"


SHAPE_FAMILIES = ("vit", "bert", "llama")
SHAPE_VARIANTS = {"fp32": None, "approx": {"activations": "approx", "norms": "fold"}, "auto": {}}


def shape_model(family: str, depth: int) -> tuple[nn.Module, dict[str, torch.Tensor], str]:
    """(fp32 model with random weights and randomised norms, its batch, the input whose gradient is compared).

    Width 128, 4 heads, MLP 4x (LLaMA: 344, gated); ViT on 32x32 images in 4x4 patches (65 tokens),
    BERT and LLaMA on 32 tokens fed as ``inputs_embeds``; batch 8; dropout off.
    """
    from workloads import _randomise_norms

    torch.manual_seed(depth)
    g = torch.Generator().manual_seed(100 + depth)
    if family == "vit":
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(img_size=32, patch_size=4, num_classes=10, embed_dim=128, depth=depth, num_heads=4)
        batch = {"x": torch.randn(8, 3, 32, 32, generator=g), "labels": torch.randint(0, 10, (8,), generator=g)}
        key = "x"
    elif family == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            hidden_size=128, num_attention_heads=4, intermediate_size=512, num_hidden_layers=depth, vocab_size=1024,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2, attn_implementation="sdpa",
        )  # fmt: skip
        model = BertForSequenceClassification(config)
        batch = {
            "inputs_embeds": torch.randn(8, 32, 128, generator=g),
            "labels": torch.randint(0, 2, (8,), generator=g),
        }
        key = "inputs_embeds"
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            hidden_size=128, intermediate_size=344, num_attention_heads=4, num_key_value_heads=4,
            num_hidden_layers=depth, vocab_size=1024, max_position_embeddings=64, attn_implementation="sdpa",
        )  # fmt: skip
        model = LlamaForCausalLM(config)
        batch = {
            "inputs_embeds": torch.randn(8, 32, 128, generator=g),
            "labels": torch.randint(0, 1024, (8, 32), generator=g),
        }
        key = "inputs_embeds"
    _randomise_norms(model, torch.Generator().manual_seed(depth + 1))
    return model.train(), batch, key


def _shape_loss(family: str, batch: dict[str, torch.Tensor], key: str, leaf: torch.Tensor):
    def loss_of(model: nn.Module, params: dict[str, torch.Tensor]) -> torch.Tensor:
        if family == "vit":
            return F.cross_entropy(functional_call(model, params, (leaf,)), batch["labels"])
        return functional_call(model, params, (), {key: leaf, "labels": batch["labels"]}).loss

    return loss_of


def shape_fidelity(depths: tuple[int, ...], seed: int = 0) -> list[dict]:
    """One row per (family, depth): cosine of all parameter gradients and of the input gradient vs float64 stock."""
    rows = []
    for family in SHAPE_FAMILIES:
        for depth in depths:
            model, batch, key = shape_model(family, depth)
            model64 = copy.deepcopy(model).double()
            leaf64 = batch[key].double().requires_grad_(True)
            ref, _ = gradients(model64, None, _shape_loss(family, batch, key, leaf64))
            ref_params = torch.cat([g.flatten() for g in ref.values()])
            example = ((batch["x"][:2],), {}) if family == "vit" else None
            row: dict = {"family": family, "depth": depth}
            for variant, options in SHAPE_VARIANTS.items():
                leaf = batch[key].clone().requires_grad_(True)
                grads, ran = gradients(model, options, _shape_loss(family, batch, key, leaf), example)
                params = torch.cat([grads[n].flatten() for n in ref])
                row[variant] = {
                    "params_cos": compare(params, ref_params)[0],
                    "params_rel": compare(params, ref_params)[1],
                    "input_cos": compare(leaf.grad, leaf64.grad)[0],
                    "input_rel": compare(leaf.grad, leaf64.grad)[1],
                }
                if variant == "auto":
                    row["auto_choice"] = options_chosen(ran)
            rows.append(row)
    return rows


SHAPE_TITLES = {
    "vit": "ViT (timm), width 128, 65 tokens",
    "bert": "BERT (post-norm), width 128, 32 tokens",
    "llama": "LLaMA (SwiGLU), width 128, 32 tokens",
}


def shapes_markdown(rows: list[dict], depths: tuple[int, ...]) -> list[str]:
    lines = [
        "### Gradient fidelity by architecture and depth (random init, randomised norm affines, fp32)",
        "",
        f"Depths {list(depths)}, batch 8; reference: the stock model in float64. Cosine similarity of all parameter "
        "gradients together and of the input gradient (pixels / `inputs_embeds`); fp32 = the stock model in float32 "
        '(the rounding floor), approx = `convert(activations="approx", norms="fold")` (the paper), '
        "auto = `convert()` (the default, exact).",
        "",
        "| model | blocks | fp32 params | approx params | auto params | fp32 input | approx input | auto input "
        "| auto chose |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        cells = [f"{r[v]['params_cos']:.6f}" for v in SHAPE_VARIANTS]
        cells += [f"{r[v]['input_cos']:.6f}" for v in SHAPE_VARIANTS]
        lines.append(
            f"| {SHAPE_TITLES[r['family']]} | {r['depth']} | " + " | ".join(cells) + f" | {r['auto_choice']} |"
        )
    return lines


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
    parser.add_argument("--tiny", action="store_true", help="5 training steps, batch 32, depths 1 and 2 (CI)")
    parser.add_argument("--no-shapes", dest="shapes", action="store_false", help="part 1 only")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4, 8], help="part 2's block counts")
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
    auto_choice = options_chosen(lowmembp_convert.convert(copy.deepcopy(model), example_inputs=((x_train[:2],), {})))
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
        'fp32 = original model in float32 (rounding floor), norms = norm-only conversion, folded (`norms="fold"`, '
        'exact), acts = ReGELU2 only, full = both (the paper, `activations="approx", norms="fold"`), '
        f"auto = `convert()` (the default: {auto_choice}; norms keep their affine)",
        "",
        "| block | fp32 rel | norms cos | norms rel | acts cos | acts rel | full cos | full rel | full norm ratio "
        "| auto cos | auto rel |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def row(key: str, label: str) -> str:
        cells = [f"{results['fp32'][key][1]:.1e}"]
        for variant in ("norms", "acts", "full"):
            cos, rel, _ratio = results[variant][key]
            cells += [f"{cos:.6f}", f"{rel:.1e}"]
        cells.append(f"{results['full'][key][2]:.3f}")
        cells += [f"{results['auto'][key][0]:.6f}", f"{results['auto'][key][1]:.1e}"]
        return f"| {label} | " + " | ".join(cells) + " |"

    for key in [k for k in results["full"] if k.startswith("[")]:
        lines.append(row(key, key.strip("[]")))
    lines.append(row("__all__", "**all parameters**"))
    lines += [
        "",
        "| tensor | shape | fp32 rel | norms cos | norms rel | acts cos | acts rel | full cos | full rel "
        "| full norm ratio | auto cos | auto rel |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, ref in reference.items():
        lines.append(row(name, f"{name} | {list(ref.shape)}"))
    shapes = []
    if args.shapes:
        depths = (1, 2) if args.tiny else tuple(args.depths)
        shapes = shape_fidelity(depths, args.seed)
        lines += ["", *shapes_markdown(shapes, depths)]
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
        "auto_choice": auto_choice,
        "shapes": shapes,
    }
    print(json.dumps(summary))
    # the exact variants must sit at the float32 floor (the default included: auto never approximates);
    # anything else is a folding or norm bug
    exact = ("fp32", "norms", "auto")
    exact_ok = all(summary["min_cos"][v] > 1 - 1e-6 and math.isfinite(summary["max_rel"][v]) for v in exact)
    exact_ok &= all(r["auto"]["params_cos"] > 1 - 1e-6 and "approx" not in r["auto_choice"] for r in shapes)
    return 0 if exact_ok else 1


if __name__ == "__main__":
    sys.exit(main())
