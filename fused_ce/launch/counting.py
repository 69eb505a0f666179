"""Count the Triton kernel launches a piece of code makes (the launch-count tests and the
host-cost benchmark)."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator

from ..kernels.bce import bce_kernel


@contextlib.contextmanager
def count_launches(execute: bool = True) -> Iterator[collections.Counter]:
    """Within the block, count launches per kernel name into the yielded ``Counter``. With
    ``execute=False`` the kernels do not run at all: what remains of a call is its host work
    (validation, allocation, dispatch, the launchers' argument preparation), which is how
    bench/host_cost.py measures it.

    Patches the ``run`` method of the kernels' class (Triton's ``JITFunction``, or its
    interpreter twin under ``TRITON_INTERPRET=1``), the entry every launch goes through
    (``kernel[grid](...)`` calls it, the launchers call it directly); not thread-safe. On a
    GPU that method is where Triton's own per-launch work happens (the binder's
    specialization key over every argument, the kernel cache lookup, the C launcher), so a
    stubbed figure leaves it out: see docs/perf-notes.md.
    """
    kernel_class = type(bce_kernel)
    original = kernel_class.run
    counts: collections.Counter = collections.Counter()

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            counts[self.fn.__name__] += 1
        if execute:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        return None

    kernel_class.run = run
    try:
        yield counts
    finally:
        kernel_class.run = original
