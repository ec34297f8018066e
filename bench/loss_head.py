"""Whole training step with the loss: stock, today's convert (loss_head=False), the exact loss head
and the fused one (loss_head="fused": no logits while training; keeps float32 dh and dW instead).

Per workload (bf16 weights unless ``--dtype float32``, one sequence, labels = the ids, random norm
affines), at depths 1 and 2:

- bytes saved for backward by forward + loss (saved-tensor hooks), extrapolated to the full depth
  (depth-1 bytes plus (layers - 1) times the per-layer difference);
- peak memory of forward + loss + backward at depth 2, measured (``bench/peak_meter.py``: the CPU
  profiler's allocation events, or ``max_memory_allocated`` on a GPU); not extrapolated: at these
  shapes the peak can sit where the parameter gradients are allocated, not where activations peak;
- step time (forward + loss + backward) at depth 1, median of ``--reps``, against stock timed in the
  same run.

Usage::

    python bench/loss_head.py [--only qwen2_0.5b ...] [--reps 3] [--device cpu] [--json F] [--tiny]
                              [--dtype bfloat16|float32] [--no-steps]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpu_memory import _cpu_name  # noqa: E402
from peak_meter import peak_bytes  # noqa: E402

import lowmembp_convert as lc  # noqa: E402

WORKLOADS = {
    # Qwen2-0.5B: hidden 896, 14 heads (2 KV), MLP 4864, vocabulary 151,936, tied embeddings, 24 layers
    "qwen2_0.5b": dict(
        cls="Qwen2ForCausalLM", config="Qwen2Config", layers=24, tokens=512,
        kwargs=dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                    vocab_size=151_936, tie_word_embeddings=True),
    ),
    # a 4-layer LLaMA-shaped model with LLaMA-3's vocabulary
    "llama3_vocab_4l": dict(
        cls="LlamaForCausalLM", config="LlamaConfig", layers=4, tokens=512,
        kwargs=dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=8, num_key_value_heads=8,
                    vocab_size=128_256),
    ),
    # Gemma-2-2B: hidden 2304, 8 heads (4 KV) of 256, MLP 9216, vocabulary 256,000, softcapping 30, 26 layers;
    # 128 tokens: a 256k-vocabulary bf16 GEMM runs at a few GFLOP/s on the 2-core CPU VM
    "gemma2_2b": dict(
        cls="Gemma2ForCausalLM", config="Gemma2Config", layers=26, tokens=128,
        kwargs=dict(hidden_size=2304, intermediate_size=9216, num_attention_heads=8, num_key_value_heads=4,
                    head_dim=256, vocab_size=256_000, final_logit_softcapping=30.0),
    ),
}  # fmt: skip
VARIANTS = ("stock", "today", "exact_head", "fused")
LOSS_HEAD = {"today": False, "exact_head": True, "fused": "fused"}  # convert()'s loss_head per variant
TINY = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=3000)


def tiny(spec: dict) -> dict:
    """The same model class and options at toy sizes (the script's own test)."""
    kwargs = {**spec["kwargs"], **TINY}
    if "head_dim" in kwargs:
        kwargs["head_dim"] = 8
    return {**spec, "kwargs": kwargs, "tokens": 32}


def _build(spec: dict, layers: int, device: str, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    import transformers as tr

    torch.manual_seed(0)
    cfg = getattr(tr, spec["config"])(num_hidden_layers=layers, **spec["kwargs"])
    cfg.attention_dropout = 0.0
    with torch.device(device):
        model = getattr(tr, spec["cls"])(cfg).to(dtype).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    return model


def _variant(stock: torch.nn.Module, variant: str, example) -> torch.nn.Module:
    if variant == "stock":
        return stock
    model = copy.deepcopy(stock)
    return lc.convert(model, loss_head=LOSS_HEAD[variant], example_inputs=example)


def _measure(spec: dict, layers: int, device: str, reps: int, dtype: torch.dtype, steps: bool) -> dict[str, dict]:
    """Per variant: saved bytes (one forward + loss); with ``steps``, the peak of one step and
    (``reps`` > 0) the median time of ``reps`` more steps."""
    stock = _build(spec, layers, device, dtype)
    vocab = spec["kwargs"]["vocab_size"]
    ids = torch.randint(0, vocab, (1, spec["tokens"]), generator=torch.Generator().manual_seed(1)).to(device)
    example = ((), {"input_ids": ids[:, :16]})
    out = {}
    for variant in VARIANTS:
        model = _variant(stock, variant, example)

        def loss(m=model):
            return m(input_ids=ids, labels=ids).loss

        def step(m=model):
            m.zero_grad(set_to_none=True)
            loss(m).backward()

        saved = lc.activation_memory(loss, params=model).total
        # every step frees and allocates the gradients (set_to_none)
        peak = peak_bytes(step, device) if steps else None
        times = []
        for _ in range(reps if steps else 0):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        heads = model.lowmembp_report.plan.loss_heads if variant != "stock" else []
        out[variant] = {
            "saved": saved,
            "peak": peak,
            "seconds": statistics.median(times) if times else None,
            "head": heads[0].reason if heads else "",  # starts with "exact:", "fused" or "left stock:"
        }
        del model
    return out


def run(
    name: str, device: str, reps: int, small: bool = False, dtype: torch.dtype = torch.bfloat16, steps: bool = True
) -> dict:
    spec = tiny(WORKLOADS[name]) if small else WORKLOADS[name]
    one = _measure(spec, 1, device, reps, dtype, steps)
    two = _measure(spec, 2, device, 0, dtype, steps)  # timed at depth 1 only
    n = spec["layers"]
    rows = {}
    for variant in VARIANTS:
        a, b = one[variant], two[variant]
        per_layer = b["saved"] - a["saved"]
        rows[variant] = {
            "saved_full": a["saved"] + (n - 1) * per_layer,
            "saved_2": b["saved"],
            "peak_2": b["peak"],
            "time_ratio_1": a["seconds"] / one["stock"]["seconds"] if a["seconds"] else None,
            "seconds_1": a["seconds"],
            "head": b["head"],
        }
    return {"workload": name, "layers": n, "tokens": spec["tokens"], "dtype": str(dtype), "rows": rows}


def markdown(results: list[dict]) -> str:
    mib = 2**20
    lines = [
        "| workload | variant | saved, full depth (extrap.) | vs stock | peak, 2 layers (measured) | vs stock "
        "| step time vs stock (1 layer) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        stock = r["rows"]["stock"]
        for variant, row in r["rows"].items():
            peak = (
                f"{row['peak_2'] / mib:.0f} MiB | {row['peak_2'] / stock['peak_2'] - 1:+.1%}"
                if row["peak_2"] is not None
                else "- | -"
            )
            ratio = f"{row['time_ratio_1']:.2f}" if row["time_ratio_1"] is not None else "-"
            lines.append(
                f"| {r['workload']} ({r['layers']} layers, {r['tokens']} tokens, {r['dtype'].split('.')[-1]}) | "
                f"{variant} | {row['saved_full'] / mib:.0f} MiB | {row['saved_full'] / stock['saved_full'] - 1:+.1%} | "
                f"{peak} | {ratio} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true", help="toy sizes: a dry run of the same code paths")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="the model's weights")
    parser.add_argument(
        "--no-steps", action="store_true", help="saved bytes only (no backward: no peak, no time); for CPUs whose "
        "bf16 matmul backward falls back to a scalar GEMM",
    )  # fmt: skip
    parser.add_argument("--table-from", type=Path, nargs="*", default=None, help="print the tables of saved JSONs")
    args = parser.parse_args()
    if args.table_from:
        print(markdown([r for f in args.table_from for r in json.loads(f.read_text())["results"]]))
        return
    results = []
    dtype = getattr(torch, args.dtype)
    for name in args.only or WORKLOADS:
        start = time.perf_counter()
        results.append(run(name, args.device, args.reps, args.tiny, dtype, not args.no_steps))
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
        for variant, row in results[-1]["rows"].items():
            print(f"  {variant}: {row['head'][:160]}", flush=True)
    print(markdown(results))
    if args.json:
        meta = {
            "machine": torch.cuda.get_device_name() if args.device.startswith("cuda") else _cpu_name(),
            "device": args.device,
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
        }
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
