"""Sigmoid + binary cross-entropy on logits: fused_ce against torch eager and torch.compile
(no peer ships a fused BCE).

The majority-bits workload (64 and 1024 rows x 1 logit, 0/1 labels, fp32) is launch-bound: its
numbers are per-call overheads. The grid (GPU: 4096 x 1024, 4096 x 32768, 16384 x 32768;
CPU: 4096 x 1024) in fp32 and bf16, with probability targets, is bandwidth-bound.
"""

from __future__ import annotations

import pytest
import torch
from benchlib import CUDA, Case, providers_for, run_case

DTYPES = (torch.float32, torch.bfloat16)
GRID = [(4096, 1024), (4096, 32768), (16384, 32768)] if CUDA else [(4096, 1024)]


def _cases() -> list[Case]:
    cases = [
        Case("bce", "majority-bits", (n, 1), torch.float32, backward)
        for n in (64, 1024)
        for backward in (False, True)
    ]
    cases += [
        Case("bce", "grid", shape, dtype, backward)
        for shape in GRID
        for dtype in DTYPES
        for backward in (False, True)
    ]
    return cases


CASES = _cases()


@pytest.mark.parametrize("provider", providers_for("bce"))
@pytest.mark.parametrize("case", CASES, ids=[c.group.replace(" ", "-") for c in CASES])
def test_bce(benchmark, ceilings, case: Case, provider: str) -> None:
    run_case(benchmark, case, provider, ceilings)
