"""Which module runs a kernel family's math."""

from __future__ import annotations

import importlib
from types import ModuleType


def implementation(family: str, use_triton: bool) -> ModuleType:
    """``fused_ce.launch.<family>`` (the Triton launchers) or ``fused_ce.torch_impl.<family>``
    (the plain-PyTorch path), which expose the same functions. The launchers are imported on
    first use, so ``import fused_ce`` neither needs Triton nor compiles anything."""
    package = "launch" if use_triton else "torch_impl"
    return importlib.import_module(f"fused_ce.{package}.{family}")
