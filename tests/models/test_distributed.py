"""A converted model trains under DDP and FSDP2 (gloo, 2 CPU processes) exactly like one process.

Two ranks each take half of a batch of 4; DDP (and FSDP2) average the gradients, which is the
full-batch mean gradient, so with SGD every step's global loss equals one process's on the full
batch. Tolerance: relative 1e-5 (fp32; the two-rank all-reduce only reorders the sum). The model is
a tiny timm ViT converted in the parent (folded norms, a keep_affine final norm, ReGELU2), pickled to
the children by ``torch.multiprocessing.spawn``.
"""

from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dist_worker import run, train_single
from tiny_zoo import FAMILIES

from lowmembp_convert import convert

STEPS, LR, WORLD = 3, 0.1, 2

pytestmark = pytest.mark.slow  # two processes per backend (DDP, FSDP2): tens of seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)  # a deadlocked gloo rendezvous fails instead of hanging CI
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed without gloo")
def test_converted_model_trains_under_ddp_and_fsdp_like_one_process(tmp_path) -> None:
    model = convert(FAMILIES["timm_vit"].make()).train()
    report = model.lowmembp_report
    assert report.converted_norms and report.converted_activations
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 32, 32, generator=gen)
    labels = torch.randint(0, 5, (4,), generator=gen)

    reference_model = copy.deepcopy(model)
    reference = train_single(reference_model, images, labels, STEPS, LR)
    assert reference[-1] < reference[0]

    out = tmp_path / "results.pt"
    try:
        mp.spawn(run, args=(WORLD, _free_port(), model, images, labels, STEPS, LR, str(out)), nprocs=WORLD, join=True)
    except mp.ProcessExitedException:
        # gloo can abort a rank in its C++ teardown ("terminate called without an active exception")
        # after the work is done and saved; only a missing result is a failure of what we test
        if not out.exists():
            raise
    results = torch.load(out, weights_only=False)

    print(f"\nDDP losses {results['ddp']} vs one process {reference}")
    assert results["ddp"] == pytest.approx(reference, rel=1e-5)
    for name, p in reference_model.named_parameters():
        torch.testing.assert_close(results["ddp_params"][name], p.detach(), rtol=1e-5, atol=1e-6)
    if "fsdp_error" in results:
        pytest.skip(f"FSDP2 fully_shard does not run on CPU/gloo here: {results['fsdp_error']}")
    print(f"FSDP2 losses {results['fsdp']}")
    assert results["fsdp"] == pytest.approx(reference, rel=1e-5)
