"""Test set-up: on a machine without CUDA the Triton kernels run on the CPU through the
interpreter. TRITON_INTERPRET is read when kernels are decorated (at import), so it is set
here, before anything imports fused_ce or triton."""

import functools
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fused_ce  # noqa: E402,F401
from fused_ce._backend import native_available, triton_runs_on  # noqa: E402

CUDA = torch.cuda.is_available()


def backend_cases() -> list[tuple[str, str]]:
    """(backend, device) pairs this machine can test: the torch path on CPU (and CUDA), the
    native C++ kernels on CPU when built (tests/test_native.py fails where they should be and
    are not), the Triton kernels wherever they run (CUDA, or the CPU through the interpreter,
    which is only switched on without CUDA)."""
    devices = ["cpu", "cuda"] if CUDA else ["cpu"]
    native = [("native", "cpu")] if native_available() else []
    return (
        [("torch", device) for device in devices]
        + native
        + [("triton", device) for device in devices if triton_runs_on(device)]
    )


@pytest.fixture(params=backend_cases(), ids=lambda c: f"{c[0]}-{c[1]}")
def backend_device(request):
    return request.param


def fresh_launch_caches(monkeypatch, module) -> None:
    """Give ``module``'s cached launch arguments (``functools.lru_cache`` functions named
    ``*_launch``) an empty cache for the rest of the test, so that patched tile sizes take
    effect, and so that what they cache leaves with the patch."""
    for name in dir(module):
        cached = getattr(module, name)
        if name.endswith("_launch") and hasattr(cached, "cache_clear"):
            monkeypatch.setattr(module, name, functools.lru_cache(cached.__wrapped__))
