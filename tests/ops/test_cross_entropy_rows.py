"""The loss head's row op: cross-entropy of [R, V] logits and its gradient in place, kernel and reference.

Oracle: float64 torch (log-sum-exp, the loss per row, softmax - one-hot times the scale). The
Triton kernel runs compiled on a GPU, else under TRITON_INTERPRET=1 (tests/conftest.py); the
reference is torch in float32. Bounds: the loss within a few float32 ulps of lse (an online log-sum-exp sums in another
order); the gradient within one ulp of its storage dtype plus float32 exp error.
"""

from __future__ import annotations

import pytest
import torch

from lowmembp_convert.dispatch import force_triton, triton_available
from lowmembp_convert.ops.cross_entropy_rows import (
    MAX_BLOCK_V,
    ce_rows,
    ce_rows_grad_,
    launch_settings,
    reference_ce_rows,
    triton_ce_rows,
)

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not importable")
IGNORE = -100
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # compiled kernels on a GPU
UNIT = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _case(rows: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen) * 4).to(dtype)
    target = torch.randint(0, vocab, (rows,), generator=gen)
    target[1::3] = IGNORE
    return logits.to(DEVICE), target.to(DEVICE)


def _oracle(logits: torch.Tensor, target: torch.Tensor, scale: float):
    x = logits.double()
    lse = torch.logsumexp(x, -1)
    counted = target != IGNORE
    safe = torch.where(counted, target, 0)
    loss = torch.where(counted, lse - x.gather(1, safe[:, None]).squeeze(1), 0.0)
    grad = torch.softmax(x, -1)
    grad[torch.arange(len(target)), safe] -= 1
    return loss, lse, grad * torch.where(counted, scale, 0.0)[:, None]


def _assert_close(logits, target, scale, loss, lse, grad=None):
    ref_loss, ref_lse, ref_grad = _oracle(logits, target, scale)
    u = UNIT[torch.float32]
    bound = 16 * u * ref_lse.abs().clamp_min(1) + 16 * u * logits.double().abs().max()
    assert ((lse.double() - ref_lse).abs() <= bound).all()
    assert ((loss.double() - ref_loss).abs() <= 2 * bound).all()
    assert torch.equal(loss[target == IGNORE], torch.zeros_like(loss[target == IGNORE]))
    if grad is not None:
        assert grad.dtype == logits.dtype
        err = (grad.double() - ref_grad).abs()
        # one rounding to the storage dtype: to nearest (torch, compiled Triton) or truncated (the
        # interpreter's float32 -> bfloat16), so up to one ulp: 2 units of roundoff
        allowed = 2 * UNIT[logits.dtype] * ref_grad.abs() + 64 * u * scale + 1e-30
        assert (err <= allowed).all(), float((err - allowed).max())
        assert torch.equal(grad[target == IGNORE], torch.zeros_like(grad[target == IGNORE]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [3, 1000, MAX_BLOCK_V + 17])
def test_reference_and_kernel_against_float64(dtype: torch.dtype, vocab: int) -> None:
    logits, target = _case(7, vocab, dtype)
    scale = torch.tensor(1 / 5)
    for run in ("reference", "triton"):
        if run == "triton" and not triton_available():
            continue
        if run == "reference":
            loss, lse, grad = reference_ce_rows(logits, target, IGNORE, scale)
        else:
            grad = torch.empty_like(logits)
            loss, lse = triton_ce_rows(logits, target, IGNORE, scale, grad)
        _assert_close(logits, target, 0.2, loss, lse, grad)


@needs_triton
def test_kernel_handles_the_largest_vocabulary_and_masked_entries() -> None:
    """262,144 columns (Gemma 3's vocabulary): 64 blocks per row; -inf logits count as probability 0."""
    logits, target = _case(2, 262_144, torch.bfloat16, seed=1)
    logits[0, :1000] = float("-inf")
    target[0] = 5000
    grad = logits.clone()
    loss, lse = triton_ce_rows(grad, target, IGNORE, torch.tensor(1.0), grad)  # in place
    _assert_close(logits, target, 1.0, loss, lse, grad)
    assert torch.equal(grad[0, :1000], torch.zeros_like(grad[0, :1000]))


@needs_triton
def test_in_place_gradient_through_the_custom_op_on_both_paths() -> None:
    logits, target = _case(5, 300, torch.float32, seed=2)
    results = []
    for forced in (False, True):
        work = logits.clone()
        with force_triton(forced):
            loss, lse = ce_rows_grad_(work, target, torch.tensor(0.5), IGNORE)
            loss_only, _ = ce_rows(logits, target, IGNORE)
        _assert_close(logits, target, 0.5, loss, lse, work)
        torch.testing.assert_close(loss_only, loss, rtol=0, atol=1e-5)
        results.append((loss, work))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=1e-6)


def test_gradient_matches_autograd_of_the_stock_loss() -> None:
    """The reference's gradient is autograd's of ``cross_entropy(x.float(), reduction='sum') * scale``."""
    logits, target = _case(6, 50, torch.float32, seed=3)
    x = logits.clone().requires_grad_(True)
    stock = torch.nn.functional.cross_entropy(x.float(), target, ignore_index=IGNORE, reduction="sum") * 0.25
    stock.backward()
    work = logits.clone()
    loss, _ = ce_rows_grad_(work, target, torch.tensor(0.25), IGNORE)
    torch.testing.assert_close(loss.sum() * 0.25, stock.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(work, x.grad, rtol=1e-6, atol=1e-7)


def test_custom_ops_opcheck() -> None:
    logits, target = _case(4, 40, torch.float32, seed=4)
    torch.library.opcheck(ce_rows, (logits, target, IGNORE))
    torch.library.opcheck(ce_rows_grad_, (logits.clone(), target, torch.tensor(0.5), IGNORE))


def test_bad_input_is_refused_with_the_reason() -> None:
    logits, target = _case(4, 40, torch.float32)
    with pytest.raises(ValueError, match=r"logits must be \[R, V\] and target \[R\]"):
        ce_rows(logits, target[:3], IGNORE)
    with pytest.raises(TypeError, match="target must be int64"):
        ce_rows(logits, target.int(), IGNORE)
    with pytest.raises(ValueError, match="rows must be contiguous"):
        ce_rows(logits.t().contiguous().t(), target, IGNORE)


def test_launch_settings_cover_any_vocabulary_in_bounded_blocks() -> None:
    assert launch_settings(3).block_v == 16
    assert launch_settings(1000).block_v == 1024
    for vocab in (32_000, 128_256, 151_936, 256_000, 262_144):
        s = launch_settings(vocab)
        assert s.block_v == MAX_BLOCK_V and s.num_warps == 8


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_head_through_the_row_kernel_matches_stock(dtype: torch.dtype) -> None:
    """The fused loss head takes the row kernel on its Triton path (forced here): loss and gradients as
    stock's cross-entropy of the head's logits, within the kernel's rounding (bf16: the GEMMs' own)."""
    from lowmembp_convert.ops.fused_linear_cross_entropy import fused_linear_cross_entropy

    gen = torch.Generator().manual_seed(5)
    h0 = torch.randn(40, 16, generator=gen).to(DEVICE, dtype)
    w0 = (torch.randn(300, 16, generator=gen) / 4).to(DEVICE, dtype)
    target = torch.randint(0, 300, (40,), generator=gen).to(DEVICE)
    target[::5] = IGNORE
    results = []
    for forced in (None, True):
        h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        if forced is None:
            loss = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w).float(), target)
        else:
            with force_triton(True):
                loss = fused_linear_cross_entropy(h, w, None, target, chunk=16)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    (loss_s, dh_s, dw_s), (loss_f, dh_f, dw_f) = results
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss_f, loss_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dh_f, dh_s, rtol=tol, atol=tol * float(dh_s.abs().max()))
    torch.testing.assert_close(dw_f, dw_s, rtol=tol, atol=tol * float(dw_s.abs().max()))
