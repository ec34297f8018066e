"""Peak memory of one piece of code: the allocator's high-water mark above what was live before.

CPU: the profiler's memory events (``profile_memory=True``: every allocation and free with the op
that made it), replayed in time order; the peak of the running sum. GPU: ``max_memory_allocated``
after ``reset_peak_memory_stats``. Both count everything the code allocates (transient logits, the
float32 upcast, gradients, what autograd keeps), which bytes-saved-for-backward does not.

    from peak_meter import peak_bytes
    peak = peak_bytes(lambda: model(**batch).loss.backward())
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch


def peak_bytes(run: Callable[[], object], device: str = "cpu") -> int:
    """Bytes allocated above the starting point at the peak of ``run()`` (its result is dropped)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    logging.getLogger("torch.profiler").setLevel(logging.ERROR)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


if __name__ == "__main__":  # a self-check on a known allocation pattern

    def pattern() -> None:
        a = torch.ones(10 * 2**20, dtype=torch.uint8)  # 10 MiB
        b = a.float()  # +40 MiB: the peak, 50 MiB
        del b
        c = torch.ones(5 * 2**20)  # 20 MiB after 40 were freed
        (a.sum() + c.sum()).item()

    got = peak_bytes(pattern) / 2**20
    print(f"peak {got:.1f} MiB (expected 50.0)")
    assert abs(got - 50) < 1
