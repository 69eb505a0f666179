"""Fused linear + loss: ``loss(input @ weight.T, target)`` without materialising the logits.

Providers: fused_ce's ``linear_cross_entropy`` / ``linear_binary_cross_entropy_with_logits``
(where this checkout has them), torch eager and torch.compile of ``F.linear`` + loss, torch's
chunked ``F.linear_cross_entropy`` (where present: torch >= 2.13), Liger-Kernel's and Cut
Cross-Entropy's fused linear CE (CUDA, where installed).

Shapes (N tokens x D features x V classes): GPU 8192 x 4096 x 128256 bf16 (an LLM head) and
8192 x 512 x 32768 in fp32 and bf16; CPU 1024 x 512 x 32768 fp32, and 8192 x 512 x 32768 fp32
with ``--bench-full-cpu`` (minutes: eager alone takes about 12 s a call on 2 cores). Linear BCE:
the majority-bits perceptron, 64 and 1024 rows x 10 bits x 1 output, fp32.
"""

from __future__ import annotations

import pytest
import torch
from benchlib import CUDA, Case, providers_for, run_case


def _ce_cases() -> list:
    if CUDA:
        shapes = [
            ((8192, 4096, 128256), torch.bfloat16),
            ((8192, 512, 32768), torch.float32),
            ((8192, 512, 32768), torch.bfloat16),
        ]
    else:
        shapes = [((1024, 512, 32768), torch.float32), ((8192, 512, 32768), torch.float32)]
    params = []
    for shape, dtype in shapes:
        workload = "llm" if shape[1] >= 4096 else "grid"
        slow_cpu = not CUDA and shape[0] >= 8192
        for backward in (False, True):
            case = Case("linear_ce", workload, shape, dtype, backward)
            marks = [pytest.mark.full_cpu] if slow_cpu else []
            params.append(pytest.param(case, id=case.group.replace(" ", "-"), marks=marks))
    return params


def _bce_cases() -> list:
    cases = [
        Case("linear_bce", "majority-bits", (n, 10, 1), torch.float32, backward)
        for n in (64, 1024)
        for backward in (False, True)
    ]
    return [pytest.param(c, id=c.group.replace(" ", "-")) for c in cases]


@pytest.mark.parametrize("provider", providers_for("linear_ce"))
@pytest.mark.parametrize("case", _ce_cases())
def test_linear_ce(benchmark, ceilings, case: Case, provider: str) -> None:
    run_case(benchmark, case, provider, ceilings)


@pytest.mark.parametrize("provider", providers_for("linear_bce"))
@pytest.mark.parametrize("case", _bce_cases())
def test_linear_bce(benchmark, ceilings, case: Case, provider: str) -> None:
    run_case(benchmark, case, provider, ceilings)
