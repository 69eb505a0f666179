"""Which implementation serves a call: the Triton kernels, the native C++ CPU kernels, or the
plain-PyTorch path."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from . import native

BACKENDS = ("auto", "triton", "native", "torch")


def checked_backend(backend: str | None) -> str | None:
    """``backend`` checked where a module is built, so a typo fails there rather than at its
    first forward."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
    return backend


HAS_TRITON = importlib.util.find_spec("triton") is not None

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when fused_ce.kernels is
# first imported; reading it once here keeps the choice consistent with the kernels and
# keeps os.environ out of traced code.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on ``device`` here: Triton is installed (the
    ``triton`` extra; CUDA builds of torch bring it) and the device is CUDA, or the CPU under
    ``TRITON_INTERPRET=1``."""
    device_type = torch.device(device).type
    return HAS_TRITON and (device_type == "cuda" or (INTERPRET and device_type == "cpu"))


# FUSED_CE_BACKEND is read on every call that passes no backend (a script or a test may set it
# after import), but os.environ.get costs about 1 us a call (it encodes the key and decodes the
# value), a tenth of a whole small eager loss: the raw mapping behind os.environ (CPython's
# os._Environ._data, updated with it) is read instead, and the decoded value kept for the raw
# bytes last seen. Where that mapping is missing, and while torch.compile traces, os.environ.
_ENVIRON = getattr(os.environ, "_data", None)
_BACKEND_KEY = "FUSED_CE_BACKEND"
_RAW_BACKEND_KEY = os.environ.encodekey(_BACKEND_KEY) if _ENVIRON is not None else None
_last_from_environment: tuple[object, str] = (None, "auto")


def backend_from_environment() -> str:
    """``$FUSED_CE_BACKEND``, ``"auto"`` when unset, as of this call."""
    global _last_from_environment
    if _ENVIRON is None or torch.compiler.is_compiling():
        return os.environ.get(_BACKEND_KEY, "auto")
    raw = _ENVIRON.get(_RAW_BACKEND_KEY)
    last_raw, last = _last_from_environment
    if raw is last_raw or raw == last_raw:
        return last
    value = os.environ.get(_BACKEND_KEY, "auto")
    _last_from_environment = (raw, value)
    return value


def resolve(backend: str | None, tensor: torch.Tensor) -> str:
    """Resolve ``backend`` for a call whose main operand is ``tensor`` to the implementation
    that runs it: ``"triton"``, ``"native"`` or ``"torch"``.

    ``None`` reads ``FUSED_CE_BACKEND`` (default ``"auto"``). ``"auto"`` picks Triton for CUDA
    tensors; for CPU tensors the native kernels when they are built (``fused_ce.native``),
    else the torch path. Under ``TRITON_INTERPRET=1`` (a testing mode: the Triton kernels run
    in Python on the CPU) ``"auto"`` picks Triton for CPU tensors too, as that setting asks;
    ``backend="native"`` still picks the C++ kernels there.
    """
    if backend is None:
        backend = backend_from_environment()
        if backend not in BACKENDS:
            raise ValueError(
                f"backend: None reads the environment variable FUSED_CE_BACKEND, which must be "
                f"one of {BACKENDS}; it is {backend!r}"
            )
    elif backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    # is_cpu / is_cuda, not tensor.device.type: building the torch.device costs 0.5 us, and this
    # runs on every loss.
    if backend == "native":
        if not tensor.is_cpu:
            raise RuntimeError(
                f"backend='native' runs on CPU tensors, got a tensor on {tensor.device}"
            )
        if not native_available():
            raise RuntimeError(f"backend='native' is unavailable: {native.unavailable_reason()}")
        return "native"
    if backend == "auto":
        # triton_runs_on, inlined.
        is_cpu = tensor.is_cpu
        if HAS_TRITON and (INTERPRET if is_cpu else tensor.is_cuda):
            return "triton"
        return "native" if is_cpu and native_available() else "torch"
    if not HAS_TRITON:
        raise RuntimeError(
            "backend='triton' needs the triton package, which is not installed "
            "(pip install 'fused_ce[triton]')"
        )
    if not triton_runs_on(tensor.device):
        raise RuntimeError(
            f"backend='triton' runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), "
            f"got a tensor on {tensor.device}"
        )
    return "triton"


def native_available() -> bool:
    """Whether the native C++ kernels are built and load here (cached after the first call)."""
    return native.available()


# A constant to torch.compile: it calls this once while tracing rather than tracing the loader.
# This is the mark torch.compiler.assume_constant_result sets; the decorator itself imports
# torch._dynamo (about 2 s, as long as `import torch`) at import time, so the mark is set here
# (tests/test_install.py checks it is still the decorator's mark and that compile folds it).
native_available._dynamo_marked_constant = True  # type: ignore[attr-defined]


@functools.cache
def multiprocessor_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the query costs microseconds)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def parallel_slots(tensor: torch.Tensor) -> int:
    """How many programs keep the device busy; 1 under the interpreter, where fewer is faster."""
    if tensor.device.type != "cuda":
        return 1
    return 4 * multiprocessor_count(tensor.device.index or 0)
