"""The CPU memory benchmark and the GPU script's logic, at tiny sizes, so that neither can rot.

The fast test runs one workload per model family (stock, approx and auto, timed) plus the split
columns on ViT; the slow ones run every workload, the compiled columns and the per-site check.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.append(
    str(Path(__file__).resolve().parents[1] / "bench")
)  # appended: bench/kernel_bench.py must not shadow anything

import cpu_memory  # noqa: E402
import gpu_models  # noqa: E402

ONE_PER_FAMILY = ["vit-amp-full", "llama-bf16-lora", "phi3-bf16-full", "roberta-amp-full", "swin-amp-full"]


def _value(results: dict, workload: str, column: str) -> float:
    cell = results[workload][column]
    assert cell.value is not None, f"{workload}/{column} is n/a: {cell.reason}"
    return cell.value


@pytest.mark.slow  # a whole tiny benchmark run (over a minute on 2 cores)
def test_tiny_benchmark_converted_saves_memory_and_the_table_is_complete(tmp_path: Path) -> None:
    split = ["eager", "approx", "auto", "norms", "ckpt"]
    results = cpu_memory.run_benchmark(tiny=True, only=["vit-amp-full"], columns=split, log=print)
    results.update(
        cpu_memory.run_benchmark(tiny=True, only=ONE_PER_FAMILY[1:], columns=split[:3], log=print, timed=False)
    )
    for name in ONE_PER_FAMILY:
        for column in ("approx", "auto"):
            assert 0 < _value(results, name, column) < _value(results, name, "eager"), (name, column)
        # auto takes, per site, the exact option keeping the fewest bytes (never the 2-bit one); on these
        # families that is the recompute, which keeps no more than the paper's 2-bit codes
        assert _value(results, name, "auto") <= _value(results, name, "approx"), name
    # the fused gate_up MLP: the 2-bit option keeps the whole gate_up output alive through `up`;
    # recompute keeps only that output, so auto clearly beats approx there
    assert _value(results, "phi3-bf16-full", "auto") < 0.8 * _value(results, "phi3-bf16-full", "approx")
    vit = results["vit-amp-full"]
    eager = _value(results, "vit-amp-full", "eager")
    assert _value(results, "vit-amp-full", "auto") < _value(results, "vit-amp-full", "norms") < eager
    assert vit["ckpt"].value is not None and vit["ckpt"].value < eager
    # bf16 autocast: one block's weights are copied to bf16 whatever the batch, and that cancels.
    assert vit["eager"].per_block.per_block > 0
    # timed: five steps each, the converted ones alternated with stock ones
    for key in split:
        assert len(vit[key].step_s) == cpu_memory.TIME_REPEATS and len(vit[key].stock_s) == cpu_memory.TIME_REPEATS
        assert vit[key].ratio is not None and vit[key].ratio > 0
    assert vit["eager"].ratio == 1.0

    argv = ["--tiny", "--markdown"]
    table = cpu_memory.markdown(results, tiny=True, argv=argv)
    header = next(line for line in table.splitlines() if line.startswith("| workload | stock"))
    for key in split:
        title = next(c.title for c in cpu_memory.COLUMNS if c.key == key)
        assert f"| {title} |" in header + "|"
    for needed in ("machine:", "torch ", "date:", "command: `python bench/cpu_memory.py --tiny --markdown`"):
        assert needed in table
    assert "Training step" in table and "x)" in table and "auto meets it" in table
    assert "n/a cells" not in table

    # the JSON round trip gives the same tables, and the Pareto plot is drawn from it
    path = tmp_path / "results.json"
    cpu_memory.save_json(results, str(path), True, "header")
    again, tiny, header = cpu_memory.load_json(str(path))
    assert tiny and header == "header"
    assert cpu_memory.markdown(again, True, argv, header) == cpu_memory.markdown(results, True, argv, header)
    pytest.importorskip("matplotlib")
    png = tmp_path / "pareto.png"
    assert cpu_memory.pareto_plot(again, True, str(png), "caption")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_every_tiny_workload_saves_memory_when_converted() -> None:
    names = [w.name for w in cpu_memory.workloads(tiny=True)]
    columns = ["eager", "approx", "auto"]
    results = cpu_memory.run_benchmark(tiny=True, only=names, columns=columns, log=print, timed=False)
    assert len(results) == len(names)
    for name in results:
        assert _value(results, name, "auto") < _value(results, name, "eager"), name
        assert _value(results, name, "approx") < _value(results, name, "eager"), name


@pytest.mark.slow
def test_compiled_columns_are_measured_and_cross_checked() -> None:
    keys = ["eager", "compile", "compile_budget_0.5", "compile_auto"]
    results = cpu_memory.run_benchmark(tiny=True, only=["vit-fp32-full"], columns=keys, log=print)
    row = results["vit-fp32-full"]
    # n/a would mean the hooks and the autograd graph disagreed, or dynamo did not compile.
    values = {k: _value(results, "vit-fp32-full", k) for k in keys}
    assert values["compile_budget_0.5"] < values["compile"]
    assert values["compile_auto"] < values["compile"]
    assert all(not row[k].reason and row[k].ratio is not None for k in keys)


@pytest.mark.slow
def test_no_site_keeps_more_than_stock() -> None:
    import site_memory

    for name in ("vit-fp32-full", "llama-bf16-full", "phi3-bf16-full"):
        workload = next(w for w in cpu_memory.workloads(tiny=True) if w.name == name)
        checked = site_memory.check_sites(workload, tiny=True, every_block=True, log=print)
        assert checked.sites and checked.auto < checked.stock
        for site in checked.sites:
            assert site.alone <= 0 and site.in_context <= 0, (name, site)


def test_explain_lists_block_tensors_and_sharing() -> None:
    from explain_memory import explain

    text = explain("vit-amp-full", tiny=True)
    assert "== eager" in text and "== approx" in text and "== auto" in text
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


@pytest.mark.slow  # a whole tiny benchmark run (over a minute on 2 cores)
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
            "auto",
            "approx",
            "recompute",
        ]  # fmt: skip
    )
    assert code == 0
    table = (tmp_path / "gpu_models.md").read_text()
    assert "| tiny LLaMA-7B shape" in table and "error" not in table
    assert "| auto (default) | approx (paper) | recompute |" in table
