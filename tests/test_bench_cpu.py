"""The CPU memory benchmark and the GPU script's logic, at tiny sizes, so that neither can rot.

The fast test runs one workload per model family (eager and converted) plus the split columns on
ViT; the slow ones run every workload and the compiled columns.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.append(
    str(Path(__file__).resolve().parents[1] / "bench")
)  # appended: bench/kernels.py must not shadow anything

import cpu_memory  # noqa: E402
import gpu_models  # noqa: E402

ONE_PER_FAMILY = ["vit-amp-full", "llama-bf16-lora", "roberta-amp-full", "swin-amp-full"]


def _value(results: dict, workload: str, column: str) -> float:
    cell = results[workload][column]
    assert cell.value is not None, f"{workload}/{column} is n/a: {cell.reason}"
    return cell.value


def test_tiny_benchmark_converted_saves_memory_and_the_table_is_complete() -> None:
    split = ["eager", "converted", "norms", "activations", "ckpt"]
    results = cpu_memory.run_benchmark(tiny=True, only=["vit-amp-full"], columns=split, log=print)
    results.update(cpu_memory.run_benchmark(tiny=True, only=ONE_PER_FAMILY[1:], columns=split[:2], log=print))
    for name in ONE_PER_FAMILY:
        assert 0 < _value(results, name, "converted") < _value(results, name, "eager"), name
    vit = results["vit-amp-full"]
    eager = _value(results, "vit-amp-full", "eager")
    for split in ("norms", "activations"):
        assert _value(results, "vit-amp-full", "converted") < _value(results, "vit-amp-full", split) < eager
    assert vit["ckpt"].value is not None and vit["ckpt"].value < eager
    # bf16 autocast: one block's weights are copied to bf16 whatever the batch, and that cancels.
    assert vit["eager"].per_block.per_block > 0

    table = cpu_memory.markdown(results, tiny=True, argv=["--tiny", "--markdown"])
    header = next(line for line in table.splitlines() if line.startswith("| workload | eager"))
    for column in cpu_memory.COLUMNS:
        assert f"| {column.title} |" in header + "|"
    for needed in ("machine:", "torch ", "date:", "command: `python bench/cpu_memory.py --tiny --markdown`"):
        assert needed in table
    assert "n/a cells" not in table


@pytest.mark.slow
def test_every_tiny_workload_saves_memory_when_converted() -> None:
    results = cpu_memory.run_benchmark(tiny=True, columns=["eager", "converted"], log=print)
    assert len(results) == len(cpu_memory.workloads(tiny=True))
    for name in results:
        assert _value(results, name, "converted") < _value(results, name, "eager"), name


@pytest.mark.slow
def test_compiled_columns_are_measured_and_cross_checked() -> None:
    keys = ["eager", "compile", "compile_budget", "converted_compile"]
    results = cpu_memory.run_benchmark(tiny=True, only=["vit-fp32-full"], columns=keys, log=print)
    row = results["vit-fp32-full"]
    # n/a would mean the hooks and the autograd graph disagreed, or dynamo did not compile.
    values = {k: _value(results, "vit-fp32-full", k) for k in keys}
    assert values["compile_budget"] < values["compile"]
    assert values["converted_compile"] < values["compile"]
    assert all(not row[k].reason for k in keys)


def test_explain_lists_block_tensors_and_sharing() -> None:
    from explain_memory import explain

    text = explain("vit-amp-full", tiny=True)
    assert "== eager" in text and "== converted" in text
    assert "shared   blocks.1.norm1 -> blocks.1.attn.qkv" in text


def test_largest_batch_reports_only_a_checked_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_steps(row, column, batch, device, tiny, warmup, steps):
        peak = 1000.0 + 30.0 * batch + (50.0 if batch > 150 else 0.0)  # a jump the linear fit misses
        return gpu_models.Result(row.key, column.key, batch, peak_mib=peak, samples_per_s=1.0)

    monkeypatch.setattr(gpu_models, "train_steps", fake_steps)
    row = gpu_models.gpu_models(tiny=True)[0]
    batch, how = gpu_models.largest_batch(row, gpu_models.COLUMNS[0], 5600.0, torch.device("cpu"), True)
    assert batch is not None and 1000 + 30 * batch + (50 if batch > 150 else 0) <= 5600
    assert "checked" in how


def test_gpu_script_dry_run_on_cpu(tmp_path: Path) -> None:
    code = gpu_models.main(
        [
            "--device",
            "cpu",
            "--tiny",
            "--steps",
            "1",
            "--out",
            str(tmp_path),
            "--only",
            "llama-lora",
            "--columns",
            "baseline",
            "converted",
        ]  # fmt: skip
    )
    assert code == 0
    table = (tmp_path / "gpu_models.md").read_text()
    assert "| tiny LLaMA-7B shape" in table and "error" not in table
