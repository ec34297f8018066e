"""Peak memory of ``lowmembp-convert`` on a several-GB, 7B-shaped LLaMA checkpoint.

Writes a sharded LLaMA checkpoint with LLaMA-7B shapes (hidden 4096, intermediate 11008, 32 heads,
vocab 32000) and a few layers, random weights, one tensor at a time (the generator never holds more
than one tensor), then runs the CLI in a child process under ``/usr/bin/time -v`` (or psutil polling
where that is missing) and prints one markdown row: machine, date, command, checkpoint size, peak
RSS, and the bound the converter promises (one shard plus one fold's tensors).

    python bench/cli_memory.py --layers 4 --dtype float32 --shard-gb 1 --workdir /tmp/lowmembp-bench

Not run by the tests: it writes about twice the checkpoint size to ``--workdir``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

from lowmembp_convert.checkpoint.safetensors_file import (
    TORCH_TO_SAFETENSORS,
    OutputTensor,
    tensor_bytes,
    write_safetensors,
)

HIDDEN, INTERMEDIATE, HEADS, VOCAB = 4096, 11008, 32, 32000


def llama_tensors(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every LLaMA-7B-shaped tensor, in save order."""
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.input_layernorm.weight", (HIDDEN,)),
            (f"{p}.self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (f"{p}.self_attn.k_proj.weight", (HIDDEN, HIDDEN)),
            (f"{p}.self_attn.v_proj.weight", (HIDDEN, HIDDEN)),
            (f"{p}.self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (f"{p}.post_attention_layernorm.weight", (HIDDEN,)),
            (f"{p}.mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
            (f"{p}.mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
            (f"{p}.mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
        ]
    out += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return out


def _write_random(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int, f) -> None:
    gen = torch.Generator().manual_seed(seed)
    rows = shape[0]
    step = max(1, (1 << 22) // max(1, (shape[1] if len(shape) > 1 else 1)))
    for start in range(0, rows, step):  # row blocks: the generator holds a few MB at a time
        block_shape = (min(step, rows - start), *shape[1:])
        if name.endswith("norm.weight"):
            block = torch.rand(block_shape, generator=gen) + 0.5  # norm weights far from 1
        else:
            block = torch.randn(block_shape, generator=gen) * 0.02
        f.write(tensor_bytes(block.to(dtype)))


def write_checkpoint(path: Path, layers: int, dtype: torch.dtype, shard_bytes: int) -> int:
    """Write config.json, the shards and the index; return the total tensor bytes."""
    from transformers import LlamaConfig

    path.mkdir(parents=True)
    config = LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=HEADS,
        num_key_value_heads=HEADS, num_hidden_layers=layers, vocab_size=VOCAB,
        tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    config.dtype = dtype
    config.save_pretrained(path)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in llama_tensors(layers):
        nbytes = itemsize * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards, start=1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        entries = []
        for seed, (name, shape) in enumerate(tensors):
            nbytes = itemsize * int(torch.Size(shape).numel())
            write = partial(_write_random, name, shape, dtype, hash((i, seed)) % 2**31)
            entries.append(OutputTensor(name, TORCH_TO_SAFETENSORS[dtype], shape, nbytes, write))
            weight_map[name] = file_name
            total += nbytes
        write_safetensors(path / file_name, entries, {"format": "pt"})
        print(f"  wrote {file_name}", file=sys.stderr)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def peak_rss(command: list[str]) -> tuple[int, float, int]:
    """(peak RSS in bytes, wall seconds, exit code) of ``command`` run as a child process."""
    start = time.perf_counter()
    if Path("/usr/bin/time").exists():
        done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
        return int(match.group(1)) * 1024 if match else -1, time.perf_counter() - start, done.returncode
    import psutil

    proc = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    return peak, time.perf_counter() - start, proc.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--shard-gb", type=float, default=1.0, help="maximum shard size of the generated checkpoint")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lowmembp-bench"))
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = parser.parse_args(argv)

    src, dst = args.workdir / "llama7b-shaped", args.workdir / "llama7b-shaped-lowmembp"
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    dtype = getattr(torch, args.dtype)
    print(f"writing a {args.layers}-layer 7B-shaped checkpoint to {src}", file=sys.stderr)
    total = write_checkpoint(src, args.layers, dtype, int(args.shard_gb * 2**30))
    largest_shard = max(p.stat().st_size for p in src.glob("*.safetensors"))
    largest_tensor = VOCAB * HIDDEN * torch.empty((), dtype=dtype).element_size()
    exe = shutil.which("lowmembp-convert") or str(Path(sys.executable).parent / "lowmembp-convert")

    plan_rss, plan_s, _ = peak_rss([exe, str(src), str(dst), "--dry-run", "--quiet"])
    command = [exe, str(src), str(dst), "--quiet"]
    rss, seconds, code = peak_rss(command)
    if code != 0:
        print(f"conversion failed with exit code {code}", file=sys.stderr)
        return code

    gib = 2**30
    machine = f"{platform.node() or 'host'} ({os.cpu_count()} CPU, {platform.machine()})"
    shown = f"lowmembp-convert <ckpt> <out> --quiet ({args.layers} layers, {args.dtype}, {args.shard_gb:g} GB shards)"
    print("| machine | date | command | checkpoint | peak RSS | of which --dry-run (imports + plan) | bound | time |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {machine} | {datetime.date.today().isoformat()} | `{shown}` "
        f"| {total / gib:.2f} GiB in {len(list(src.glob('*.safetensors')))} shards "
        f"| {rss / gib:.2f} GiB | {plan_rss / gib:.2f} GiB "
        f"| dry-run + one shard ({largest_shard / gib:.2f} GiB) + largest tensor ({largest_tensor / gib:.2f} GiB) "
        f"= {(plan_rss + largest_shard + largest_tensor) / gib:.2f} GiB | {seconds:.0f} s |"
    )
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
