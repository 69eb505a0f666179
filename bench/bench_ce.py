"""Softmax cross-entropy on logits: fused_ce against torch eager, torch.compile and Liger.

GPU grid: N in {4096, 16384} x C in {1000, 32768, 131072, 262144}, fp32 and bf16. CPU: a quick
subset (N 4096 x C in {1000, 32768}). Both: the popcount workload (64 and 1024 rows x 11
classes, fp32). Forward only and forward+backward throughout.
"""

from __future__ import annotations

import pytest
import torch
from benchlib import CUDA, Case, providers_for, run_case

DTYPES = (torch.float32, torch.bfloat16)

if CUDA:
    GRID = [(n, c) for n in (4096, 16384) for c in (1000, 32768, 131072, 262144)]
else:
    GRID = [(4096, 1000), (4096, 32768)]


def _cases() -> list[Case]:
    cases = [
        Case("ce", "popcount", (n, 11), torch.float32, backward)
        for n in (64, 1024)
        for backward in (False, True)
    ]
    cases += [
        Case("ce", "grid", shape, dtype, backward)
        for shape in GRID
        for dtype in DTYPES
        for backward in (False, True)
    ]
    return cases


CASES = _cases()


@pytest.mark.parametrize("provider", providers_for("ce"))
@pytest.mark.parametrize("case", CASES, ids=[c.group.replace(" ", "-") for c in CASES])
def test_ce(benchmark, ceilings, case: Case, provider: str) -> None:
    run_case(benchmark, case, provider, ceilings)
