"""How long convert() takes on a 7B-shaped LLaMA built on the meta device (no weights, no forward).

    python bench/convert_time.py [--layers 32] [--markdown]

Prints the graph-capture time, the whole plan_conversion and the convert (plan + apply) times, and
checks that every parameter is still on meta afterwards (nothing was materialised).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import lowmembp_convert as lc


def llama_7b_shape(layers: int) -> torch.nn.Module:
    config = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
        num_hidden_layers=layers, vocab_size=32000,
    )  # fmt: skip
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    model = llama_7b_shape(args.layers)
    params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    plan = lc.plan_conversion(model)
    planned = time.perf_counter() - start
    start = time.perf_counter()
    lc.convert(model)
    converted = time.perf_counter() - start
    assert all(p.device.type == "meta" for p in model.parameters()), "a parameter was materialised"
    report = model.lowmembp_report
    machine = f"{platform.machine()} CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"
    row = (
        f"| LLaMA-7B shape, {args.layers} layers ({params / 1e9:.2f} B params, meta) | {plan.capture} | "
        f"{planned:.1f} s | {converted:.1f} s | {report.converted_norms} norms, "
        f"{report.converted_activations} activations | {machine} | {datetime.date.today()} |"
    )
    if args.markdown:
        print("| model | graph capture | plan_conversion | convert (plan + apply) | converted | machine | date |")
        print("|---|---|---|---|---|---|---|")
    print(row)


if __name__ == "__main__":
    main()
