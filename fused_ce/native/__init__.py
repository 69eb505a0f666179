"""The native CPU backend: C++ kernels from ``csrc/``, built by ``setup.py`` when torch and a
C++ compiler are there at install time (see docs/native.md).

The kernels are compiled once per CPU capability (``_C_default``, ``_C_avx2``, ``_C_avx512``);
the best one this CPU runs (``torch.backends.cpu.get_cpu_capability()``) is loaded on first
use, which registers the ``torch.ops.fused_ce_native`` ops, then ``_C_autograd``, built once:
the C++ autograd of the scalar-loss ops (``ce_scalar``, ``bce_scalar``), which calls the
loaded kernels through their ops. The backend is unavailable, and
``backend="native"`` raises saying why, when no library was built, when loading one fails
(e.g. it was built against another torch), or when ``FUSED_CE_DISABLE_NATIVE=1``.
"""

from __future__ import annotations

import functools
import importlib.machinery
import os
from pathlib import Path

import torch

_PREFERENCE = {
    "AVX512": ("avx512", "avx2", "default"),
    "AVX2": ("avx2", "default"),
}


def _library_path(name: str) -> Path | None:
    folder = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = folder / f"_C_{name}{suffix}"
        if path.exists():
            return path
    return None


@functools.cache
def _load() -> tuple[str | None, str]:
    """``(capability loaded, "")`` or ``(None, why not)``; runs once per process."""
    if os.environ.get("FUSED_CE_DISABLE_NATIVE", "0") == "1":
        return None, "it is disabled by FUSED_CE_DISABLE_NATIVE=1"
    cpu = torch.backends.cpu.get_cpu_capability()
    for name in _PREFERENCE.get(cpu, ("default",)):
        path = _library_path(name)
        if path is None:
            continue
        # The kernels first (they define the ops' schemas), then the capability-independent
        # C++ autograd of the scalar-loss ops.
        autograd = _library_path("autograd")
        if autograd is None:
            return None, "its autograd library (_C_autograd) is not built"
        try:
            torch.ops.load_library(str(path))
            torch.ops.load_library(str(autograd))
        except OSError as error:
            return None, f"loading the native libraries failed ({error})"
        # The one native op that returns a tensor needs a fake kernel: fake tensors (the fake
        # kernels of the fused_ce:: ops under torch.compile) reach it through _outputs.
        torch.library.register_fake("fused_ce_native::empty_output")(_empty_output_fake)
        return name, ""
    return None, (
        "the C++ extension is not built (reinstall with a C++ compiler and "
        "`pip install --no-build-isolation`, or run `python setup.py build_ext --inplace`)"
    )


def _empty_output_fake(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


def available() -> bool:
    """Whether the native kernels can run here (loads them on the first call)."""
    return _load()[0] is not None


def capability() -> str | None:
    """The CPU capability whose build is loaded (``"avx512"``, ``"avx2"``, ``"default"``), or
    None when the backend is unavailable."""
    return _load()[0]


def unavailable_reason() -> str:
    """Why the backend is unavailable ("" when it is available)."""
    return _load()[1]


def ops():
    """``torch.ops.fused_ce_native``, loading the library first; raises if unavailable."""
    name, reason = _load()
    if name is None:
        raise RuntimeError(f"backend='native' is unavailable: {reason}")
    return torch.ops.fused_ce_native


def op(name: str):
    """The overload ``torch.ops.fused_ce_native.<name>.default``, looked up once (the
    per-call path of the scalar losses calls it directly)."""
    overload = _OPS.get(name)
    if overload is None:
        overload = getattr(ops(), name).default
        _OPS[name] = overload
    return overload


_OPS: dict = {}
