"""The per-family table, the loss-head benches and the peak meter, at toy sizes, so that none can rot."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))

import families  # noqa: E402
import head_kernels  # noqa: E402
import loss_head  # noqa: E402
import loss_head_equality  # noqa: E402
from peak_meter import peak_bytes  # noqa: E402


def test_peak_meter_sees_a_known_peak() -> None:
    def pattern() -> None:
        a = torch.ones(4 * 2**20, dtype=torch.uint8)
        b = a.float()  # the peak: 4 + 16 MiB
        del b
        c = torch.ones(2 * 2**20)  # 8 MiB after the 16 were freed
        (a.sum() + c.sum()).item()

    assert abs(peak_bytes(pattern) / 2**20 - 20) < 0.5


def test_family_row_is_exact_and_saves() -> None:
    row = families.run_family("llama")
    assert row["exact"] and row["block_cut"] > 0.2, row
    assert row["acts"] == {"silu:recompute": 2}
    assert "llama" in families.markdown([row])


@pytest.mark.slow  # two toy models at two depths, three variants each, timed
@pytest.mark.parametrize("name", ["qwen2_0.5b", "gemma2_2b"])
def test_loss_head_bench_tiny(name: str) -> None:
    result = loss_head.run(name, "cpu", reps=1, small=True)
    rows = result["rows"]
    assert rows["exact_head"]["head"].startswith("exact")
    assert rows["exact_head"]["saved_full"] < rows["today"]["saved_full"] < rows["stock"]["saved_full"]
    assert rows["exact_head"]["peak_2"] < rows["today"]["peak_2"]
    assert "exact_head" in loss_head.markdown([result])


def test_loss_head_bench_saved_bytes_only() -> None:
    result = loss_head.run("llama3_vocab_4l", "cpu", reps=0, small=True, steps=False)
    rows = result["rows"]
    assert rows["exact_head"]["saved_full"] < rows["today"]["saved_full"] < rows["stock"]["saved_full"]
    assert rows["exact_head"]["peak_2"] is None and "- | -" in loss_head.markdown([result])


def test_head_kernels_bench_variants_agree_with_stock_and_keep_less() -> None:
    """Every variant of bench/head_kernels.py computes stock's loss and gradients (float32 here); the
    fused ones peak lower than stock, which holds the float32 logits and their gradient."""
    shape = head_kernels.TINY["tiny"]
    variants = {"stock": head_kernels._stock, "exact": head_kernels._exact, "fused": head_kernels._fused}
    results = {
        name: head_kernels.measure(name, fn, shape, "cpu", torch.float32, reps=1) for name, fn in variants.items()
    }
    stock = results["stock"]
    for name, r in results.items():
        for key in ("loss", "dw", "dh"):
            assert head_kernels._rel(r[key], stock[key]) < 1e-5, (name, key)
    assert results["fused"]["peak"] < 0.5 * stock["peak"]


@pytest.mark.parametrize("mode", ["exact", "fused"])
def test_loss_head_equality_row_is_stock(mode: str) -> None:
    row = loss_head_equality.run_case("Gemma 2 softcap", mode)
    assert row["taken"] == mode and row["fp32_loss"] < 1e-6 and row["fp32_grads"] < 1e-5
    assert row["fp32_logits_equal"] is (True if mode == "exact" else None)
    assert 0.5 < row["bf16_grad_ratio"] < 2.0
    assert "n/a" in loss_head_equality.markdown([loss_head_equality.run_case("user's own loss on logits", "fused")])
