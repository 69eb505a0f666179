"""Test set-up: on a machine without CUDA the Triton kernels run on the CPU through the
interpreter. TRITON_INTERPRET is read when kernels are decorated (at import), so it is set
here, before anything imports fused_ce or triton."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fused_ce  # noqa: E402,F401
from fused_ce._backend import HAS_TRITON, INTERPRET  # noqa: E402

CUDA = torch.cuda.is_available()


def backend_cases() -> list[tuple[str, str]]:
    """(backend, device) pairs this machine can test: the torch path on CPU, the Triton kernels
    on CUDA or through the interpreter on CPU, and the torch path on CUDA too."""
    cases = [("torch", "cpu")]
    if CUDA:
        cases += [("torch", "cuda")]
        if HAS_TRITON:
            cases += [("triton", "cuda")]
    elif HAS_TRITON and INTERPRET:
        cases += [("triton", "cpu")]
    return cases


@pytest.fixture(params=backend_cases(), ids=lambda c: f"{c[0]}-{c[1]}")
def backend_device(request):
    return request.param
