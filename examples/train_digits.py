"""Train a tiny timm ViT on scikit-learn's digits, original vs converted, and judge the gap against seed noise.

Each seed trains the model twice from the same initial weights on the same batch order: once as built
(exact GELU/LayerNorm backward), once after ``lowmembp_convert.convert(activations="approx",
norms="fold")`` (the paper: ReGELU2's 2-bit approximate GELU backward, memory-sharing LayerNorms with
the affine folded into qkv/fc1/head). Nothing else differs. ``--variants`` adds ``auto``
(``convert()``, the default: here every GELU is recomputed exactly in fc2's backward and the norms
keep their own affine, so nothing but float32 rounding differs) and the two halves of the paper's
conversion on their own (``norms_only``: exact gradients, folded parameterisation; ``acts_only``:
approximate GELU backward only), to attribute a gap.

Tolerance ("within noise"): for every seed, the converted run's final test accuracy, final test loss
and final train loss differ from the original run of the SAME seed by no more than the spread
(max - min) of the original runs ACROSS seeds, i.e. by no more than changing only the seed does.
Accuracy gets a floor of one test image, since it moves in steps of 1/n_test. Same-seed runs share
init and batch order, so a faithful conversion should usually land well inside that band. The test
is strict: if the conversion acted exactly like drawing a fresh seed, all three gaps would fall in
the band only ~42% of the time (~63% with a same-seed correlation of 0.5; Gaussian Monte Carlo), so
a pass is meaningful and a narrow miss alone is not proof of harm.
Both verdicts are printed: the two-sided "within noise" (indistinguishable) and the one-sided
"no worse" (accuracy not lower, losses not higher, by more than the tolerance); the exit code
follows "no worse", since a converted run that is better beyond noise is a finding, not a failure.

Data: ``sklearn.datasets.load_digits`` (1797 8x8 images, shipped inside scikit-learn, no download),
upsampled to 16x16, a fixed stratified 75/25 split (1347 train / 450 test). Model: ViT, patch 4,
width 64, depth 4, 4 heads, mean pooling. AdamW (lr 2e-3, weight decay 0.05 on matrices only), one
epoch of warmup then cosine, batch 64, 15 epochs (330 steps).

    python examples/train_digits.py                                  # 3 seeds x 2 runs, ~3 min on 2 cores
    python examples/train_digits.py --variants original converted auto norms_only acts_only
    python examples/train_digits.py --tiny --out /tmp/curves.png     # a few steps (CI)

Writes the curves to ``examples/digits_curves.png`` (``--out``) and prints a JSON summary as the
last line of stdout. Exits 1 when a full (non ``--tiny``) converted run is worse than seed noise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from timm.models.vision_transformer import VisionTransformer

import lowmembp_convert

DEFAULT_PNG = Path(__file__).with_name("digits_curves.png")
# variant -> convert() options (None: the model as built)
VARIANTS = {
    "original": None,
    "converted": {"activations": "approx", "norms": "fold"},  # the paper: ReGELU2 everywhere, folded norms
    "auto": {},  # convert()'s default: per site the exact option keeping the fewest bytes; norms keep their affine
    "norms_only": {"activations": False, "norms": "fold"},
    "acts_only": {"norms": False, "activations": "approx"},
}
METRICS = ("final_test_acc", "final_test_loss", "final_train_loss")


def digits_tensors(image_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): digits scaled to [0, 1], resized, standardised on train."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.long)
    train, test = train_test_split(np.arange(len(y)), test_size=0.25, stratify=digits.target, random_state=0)
    train, test = torch.from_numpy(train), torch.from_numpy(test)
    x = (x - x[train].mean()) / x[train].std()
    return x[train], y[train], x[test], y[test]


def build_vit(image_size: int) -> VisionTransformer:
    """A small ViT for 1-channel images: 16 patches of 4x4 at 16x16, mean-pooled (trains faster than a CLS token)."""
    return VisionTransformer(
        img_size=image_size, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4,
        global_pool="avg", class_token=False,
    )  # fmt: skip


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on the whole set, in eval mode."""
    model.eval()
    logits = torch.cat([model(chunk) for chunk in x.split(512)])
    model.train()
    return (logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only, as timm and BERT recipes do (decaying a norm's gamma pulls it to 0)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def train(
    model: nn.Module,
    data: tuple[torch.Tensor, ...],
    *,
    seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
    max_steps_per_epoch: int | None = None,
) -> dict:
    """AdamW with warmup + cosine; batch order drawn from ``seed`` alone, so two runs see the same batches."""
    x_train, y_train, x_test, y_test = data
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    if max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, max_steps_per_epoch)
    total = epochs * steps_per_epoch
    warmup = max(1, min(steps_per_epoch, total // 5))  # one epoch of linear warmup (less for tiny runs)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=lr)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    order = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {"train_loss": [], "test_acc": [], "test_loss": []}
    model.train()
    start = time.perf_counter()
    for _epoch in range(epochs):
        perm = torch.randperm(len(x_train), generator=order)
        for step in range(steps_per_epoch):
            idx = perm[step * batch_size : (step + 1) * batch_size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            history["train_loss"].append(loss.item())
        acc, test_loss = evaluate(model, x_test, y_test)
        history["test_acc"].append(acc)
        history["test_loss"].append(test_loss)
    last_epoch = history["train_loss"][-steps_per_epoch:]
    return {
        "history": history,
        "final_test_acc": history["test_acc"][-1],
        "final_test_loss": history["test_loss"][-1],
        "final_train_loss": sum(last_epoch) / len(last_epoch),  # mean over the last epoch: less jitter
        "first_train_loss": history["train_loss"][0],  # before any update: equal for exact forwards
        "steps": total,
        "seconds": time.perf_counter() - start,
    }


def run_one(seed: int, variant: str, args: argparse.Namespace, max_steps: int | None) -> dict:
    """Build the seed's model, convert it as ``variant`` says, train it. Runs in a worker process."""
    torch.set_num_threads(1)  # tiny matrices: one thread per run, runs in parallel instead
    data = digits_tensors(args.image_size)
    torch.manual_seed(seed)
    model = build_vit(args.image_size)
    # fingerprint of the initial weights: every variant of one seed must start from the same point
    init = float(sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(model.parameters())))
    report = None
    if VARIANTS[variant] is not None:
        model = lowmembp_convert.convert(
            model, verify=True, example_inputs=((data[0][:2],), {}), **VARIANTS[variant]
        )  # in place; verify=True checks the forward is unchanged
        report = model.lowmembp_report
    run = train(
        model, data, seed=seed, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        max_steps_per_epoch=max_steps,
    )  # fmt: skip
    run["init_fingerprint"] = init
    if report is not None:
        run["report"] = str(report)
        run["conversion"] = {
            "activations_converted": report.converted_activations,
            "norms_converted": report.converted_norms,
        }
        options = [site.option for site in report.plan.activations if site.action == "convert"]
        run["activation_options"] = {o: options.count(o) for o in dict.fromkeys(options)}  # e.g. {"recompute": 4}
    if args.save_state is not None and variant == "original" and seed == args.seeds[0]:
        args.save_state.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), args.save_state)
    return run


def within_noise(runs: dict[str, dict[int, dict]], n_test: int) -> dict:
    """Per metric: tolerance = spread of the original runs over seeds; same-seed gap of each variant."""
    result = {}
    for metric in METRICS:
        originals = [run[metric] for run in runs["original"].values()]
        spread = max(originals) - min(originals)
        tolerance = max(spread, 1.0 / n_test) if metric == "final_test_acc" else spread
        entry = {"original_mean": float(np.mean(originals)), "seed_spread": spread, "tolerance": tolerance}
        for variant, by_seed in runs.items():
            if variant == "original":
                continue
            gaps = {seed: by_seed[seed][metric] - runs["original"][seed][metric] for seed in by_seed}
            entry[variant] = {
                "mean": float(np.mean([r[metric] for r in by_seed.values()])),
                "same_seed_gap": {str(s): g for s, g in gaps.items()},
                "max_abs_gap": max(abs(g) for g in gaps.values()),
                "within": all(abs(g) <= tolerance for g in gaps.values()),
                # accuracy: higher is better; losses: lower is better
                "no_worse": all((g if metric == "final_test_acc" else -g) >= -tolerance for g in gaps.values()),
            }
        result[metric] = entry
    return result


def plot(runs: dict[str, dict[int, dict]], steps_per_epoch: int, path: Path, title: str) -> None:
    """Train loss per step (1-epoch moving mean, raw faint), test accuracy and loss per epoch, per variant and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    styles = {
        "original": ("tab:blue", "-"),
        "converted": ("tab:orange", "--"),
        "auto": ("tab:purple", (0, (5, 1, 1, 1))),
        "norms_only": ("tab:green", ":"),
        "acts_only": ("tab:red", "-."),
    }
    for variant, by_seed in runs.items():
        color, line = styles[variant]
        for i, (seed, run) in enumerate(sorted(by_seed.items())):
            alpha = 1.0 - 0.2 * i
            loss = np.asarray(run["history"]["train_loss"])
            window = max(1, min(steps_per_epoch, len(loss)))
            smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
            axes[0].plot(np.arange(len(loss)), loss, color=color, alpha=0.08, linewidth=0.6)
            axes[0].plot(
                np.arange(window - 1, len(loss)), smooth, color=color, linestyle=line, alpha=alpha,
                label=f"{variant}, seed {seed}",
            )  # fmt: skip
            epochs = np.arange(1, len(run["history"]["test_acc"]) + 1)
            axes[1].plot(epochs, run["history"]["test_acc"], color=color, linestyle=line, marker=".", alpha=alpha)
            axes[2].plot(epochs, run["history"]["test_loss"], color=color, linestyle=line, marker=".", alpha=alpha)
    axes[0].set(xlabel="step", ylabel="train cross-entropy", yscale="log", title="train loss per step")
    axes[1].set(xlabel="epoch", ylabel="test accuracy", title="test accuracy per epoch")
    axes[2].set(xlabel="epoch", ylabel="test cross-entropy", yscale="log", title="test loss per epoch")
    axes[0].legend(fontsize=7, ncol=2)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine(threads: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({multiprocessing.cpu_count()} cores), torch {torch.__version__}, {threads}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="at least 2 (the noise needs a spread)")
    parser.add_argument(
        "--variants", nargs="+", default=["original", "converted"], choices=list(VARIANTS),
        help="runs per seed; 'original' is always included (it defines the noise)",
    )  # fmt: skip
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument(
        "--jobs", type=int, default=None, help="parallel runs, one thread each (default: CPU count, 1 with --tiny)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"curves PNG (default {DEFAULT_PNG.name}; none with --tiny)"
    )
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--save-state", type=Path, default=None, help="save the first seed's trained original state_dict"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="2 seeds, 1 epoch of 3 steps: checks the plumbing, not accuracy"
    )
    args = parser.parse_args(argv)
    if len(args.seeds) < 2:
        parser.error("--seeds needs at least two seeds to measure seed noise")
    variants = ["original", *[v for v in dict.fromkeys(args.variants) if v != "original"]]
    if len(variants) < 2:
        variants.append("converted")
    max_steps = None
    if args.tiny:
        args.seeds, args.epochs, max_steps = args.seeds[:2], 1, 3
    jobs = args.jobs or (1 if args.tiny else multiprocessing.cpu_count())
    out = args.out if args.out is not None else (None if args.tiny else DEFAULT_PNG)

    start = time.perf_counter()
    tasks = [(seed, variant) for seed in args.seeds for variant in variants]
    if jobs > 1:
        # spawn, not fork: a forked child of a process that already ran OpenMP code can hang
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {task: pool.submit(run_one, *task, args, max_steps) for task in tasks}
            results = {task: future.result() for task, future in futures.items()}
    else:
        results = {task: run_one(*task, args, max_steps) for task in tasks}
    runs: dict[str, dict[int, dict]] = {v: {s: results[(s, v)] for s in args.seeds} for v in variants}
    for seed in args.seeds:
        fingerprints = {runs[v][seed]["init_fingerprint"] for v in variants}
        if len(fingerprints) != 1:
            raise RuntimeError(f"seed {seed}: variants started from different weights ({fingerprints})")
        for v in variants:
            r = runs[v][seed]
            print(
                f"seed {seed} {v:>10}: test acc {r['final_test_acc']:.4f}  test loss {r['final_test_loss']:.4f}  "
                f"train loss {r['final_train_loss']:.4f}  ({r['steps']} steps, {r['seconds']:.1f} s)",
                file=sys.stderr,
            )
    judged = "converted" if "converted" in runs else variants[1]
    converted = runs[judged][args.seeds[0]]
    print(converted["report"], file=sys.stderr)

    n_test = 450
    verdict = within_noise(runs, n_test)
    within = all(verdict[m][judged]["within"] for m in METRICS)
    no_worse = all(verdict[m][judged]["no_worse"] for m in METRICS)
    for metric, v in verdict.items():
        print(f"{metric}: original {v['original_mean']:.4f}, seed spread {v['seed_spread']:.4f}", file=sys.stderr)
        for variant in variants[1:]:
            w = v[variant]
            print(
                f"  {variant:>10} {w['mean']:.4f}; max |same-seed gap| {w['max_abs_gap']:.4f} vs tolerance "
                f"{v['tolerance']:.4f} -> {'within noise' if w['within'] else 'OUTSIDE noise'}"
                f"{'' if w['within'] else (', no worse' if w['no_worse'] else ', WORSE')}",
                file=sys.stderr,
            )
    print(
        f"verdict ({judged} vs original, tolerance = seed spread of the original): "
        f"{'within noise' if within else 'outside noise'}; {'no worse than noise' if no_worse else 'WORSE than noise'}",
        file=sys.stderr,
    )
    steps = runs["original"][args.seeds[0]]["steps"]
    if out is not None and not args.no_plot:
        plot(
            runs, steps // args.epochs, out,
            f"tiny ViT on sklearn digits {args.image_size}x{args.image_size}, seeds {args.seeds}, {steps} steps: "
            "original vs lowmembp_convert (same init and batch order per seed)",
        )  # fmt: skip
        print(f"curves written to {out}", file=sys.stderr)
    summary = {
        "task": f"sklearn digits {args.image_size}x{args.image_size}, 1347 train / {n_test} test",
        "model": "timm VisionTransformer patch 4, dim 64, depth 4, heads 4, avg pool",
        "tiny": args.tiny,
        "seeds": args.seeds,
        "variants": variants,
        "epochs": args.epochs,
        "steps": steps,
        "conversion": converted["conversion"],
        "runs": {
            v: {str(s): {k: x for k, x in r.items() if k not in ("history", "report")} for s, r in by_seed.items()}
            for v, by_seed in runs.items()
        },
        "noise": verdict,
        "judged": judged,
        "within_noise": within,
        "no_worse_than_noise": no_worse,
        "plot": str(out) if out is not None and not args.no_plot else None,
        "seconds": round(time.perf_counter() - start, 1),
        "machine": machine(f"{jobs} run(s) in parallel, 1 thread each"),
        "date": datetime.date.today().isoformat(),
        "command": "python examples/train_digits.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print(json.dumps(summary))
    # a few steps say nothing about accuracy: --tiny only checks that everything runs
    return 0 if no_worse or args.tiny else 1


if __name__ == "__main__":
    sys.exit(main())
