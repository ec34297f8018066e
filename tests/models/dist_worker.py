"""Worker processes of test_distributed.py (a module of its own, so spawned children import little).

Each rank trains a copy of the same converted model on its half of the batch, with DDP or FSDP2
(``fully_shard``) over gloo, and rank 0 saves the global loss of every step.
"""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist
import torch.nn as nn


def _loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(images), labels)


def train_single(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, lr: float) -> list[float]:
    """The reference: one process, the full batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = _loss(model, images, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _train_sharded(model: nn.Module, images, labels, steps: int, lr: float, rank: int, world: int) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    mine = slice(rank * len(images) // world, (rank + 1) * len(images) // world)
    losses = []
    for _ in range(steps):
        loss = _loss(model, images[mine], labels[mine])
        optimizer.zero_grad()
        loss.backward()  # DDP / FSDP average the gradients over ranks: the full-batch mean gradient
        optimizer.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses


def run(rank: int, world: int, port: int, model: nn.Module, images, labels, steps: int, lr: float, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results: dict[str, object] = {}
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(_copy(model))
        results["ddp"] = _train_sharded(ddp, images, labels, steps, lr, rank, world)
        results["ddp_params"] = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
        try:
            from torch.distributed.fsdp import fully_shard

            sharded = _copy(model)
            for block in sharded.blocks:
                fully_shard(block)
            fully_shard(sharded)
            results["fsdp"] = _train_sharded(sharded, images, labels, steps, lr, rank, world)
        except Exception as exc:  # reported by the test as the precise reason to skip
            results["fsdp_error"] = f"{type(exc).__name__}: {exc}"
        if rank == 0:
            torch.save(results, out)
        dist.barrier()  # nobody tears down while the other rank still communicates
        del ddp
        gc.collect()
    finally:
        dist.destroy_process_group()


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).train()
