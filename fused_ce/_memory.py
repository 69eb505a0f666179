"""Peak memory of a step, read from PyTorch's allocators (for the examples and tests)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def peak_bytes(step: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes of tensor memory ``step()`` holds above what was live when it started.

    CUDA: the caching allocator's ``max_memory_allocated``. CPU: PyTorch's CPU allocator reports
    every allocation and free to the profiler when ``profile_memory=True``, as ``[memory]``
    events with a signed size; replaying them in time order gives the live bytes after each
    event, so their maximum is the allocator's peak, exactly. (Process RSS would add the C
    library's caching and fragmentation, and tracemalloc does not see tensor memory.)

    Examples::

        >>> from fused_ce._memory import peak_bytes
        >>> peak_bytes(lambda: torch.ones(1024, 1024).sum()) // 2**20  # a 4 MiB temporary
        4
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
        step()
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak
