"""Which module runs a kernel family's math."""

from __future__ import annotations

import importlib
from types import ModuleType

# Resolved backend -> the package whose modules expose each family's functions under the same
# names: the Triton launchers, the native C++ kernels' wrappers, the plain-PyTorch reference path.
_PACKAGES = {"triton": "launch", "native": "native", "torch": "torch_impl"}


def implementation(family: str, backend: str) -> ModuleType:
    """``fused_ce.<package>.<family>`` for a resolved ``backend`` (see ``_backend.resolve``).
    The modules are imported on first use, so ``import fused_ce`` neither needs Triton nor
    compiles anything."""
    module = _MODULES.get((family, backend))
    if module is None:
        module = importlib.import_module(f"fused_ce.{_PACKAGES[backend]}.{family}")
        _MODULES[family, backend] = module
    return module


# Looked up on every op call: a dict hit is cheaper than importlib's sys.modules path.
_MODULES: dict[tuple[str, str], ModuleType] = {}
