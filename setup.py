"""Build shim: metadata lives in pyproject.toml; this file adds the native CPU kernels.

``csrc/`` is compiled with ``torch.utils.cpp_extension`` into one library per CPU capability
(``fused_ce/native/_C_default``, ``_C_avx2``, ``_C_avx512`` on x86-64) and ``_C_autograd`` (with
the CUDA driver launcher of Triton's cubins, which needs no CUDA to build),
with the flags of ``fused_ce/native/_build.py``; at run time ``fused_ce.native`` loads the best
one the CPU supports. That build needs torch at build time: it happens with
``pip install --no-build-isolation`` (build isolation would fetch a second torch). Without
torch or a C++ compiler, or with ``FUSED_CE_NO_NATIVE=1``, the package installs without the
libraries, and ``fused_ce.native`` compiles the sources, which every wheel and sdist ships as
``fused_ce/native/csrc/``, on first use (see docs/native.md; ``fused-ce check`` says which).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import sys
from glob import glob

from setuptools import setup
from setuptools.command.build_py import build_py


def _build_flags():
    """``fused_ce/native/_build.py``, read by path: importing the package would need torch."""
    spec = importlib.util.spec_from_file_location(
        "_fused_ce_build", os.path.join("fused_ce", "native", "_build.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_BUILD = _build_flags()


class BuildPyWithSources(build_py):
    """Ship ``csrc/`` inside the package (``fused_ce/native/csrc/``), so an install built
    without the libraries compiles them on first use."""

    def run(self) -> None:
        super().run()
        target = os.path.join(self.build_lib, "fused_ce", "native", "csrc")
        self.mkpath(target)
        for source in sorted(glob("csrc/*.cpp") + glob("csrc/*.h")):
            self.copy_file(source, os.path.join(target, os.path.basename(source)))


def _compiler_found() -> bool:
    compiler = os.environ.get("CXX", "c++").split()[0]
    return shutil.which(compiler) is not None


def _native_build() -> dict:
    """``ext_modules`` and ``cmdclass`` for the native kernels, or nothing when they cannot be
    built here (the package then installs pure Python)."""
    if os.environ.get("FUSED_CE_NO_NATIVE") == "1" or not os.path.exists("csrc/library.cpp"):
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print(
            "fused_ce: torch not importable at build time; the native kernels will be "
            "compiled on first use (or install with --no-build-isolation)",
            file=sys.stderr,
        )
        return {}
    if not _compiler_found():
        print(
            "fused_ce: no C++ compiler found; skipping the native kernels (the torch path "
            "serves CPU tensors)",
            file=sys.stderr,
        )
        return {}

    class BuildNative(BuildExtension):
        """Each capability's objects in their own folder (the same source compiles to a
        different object per capability); extensions one after another, as that needs."""

        def finalize_options(self) -> None:
            super().finalize_options()
            self.parallel = None

        def build_extension(self, ext) -> None:
            base = self.build_temp
            self.build_temp = os.path.join(base, ext.name.rsplit(".", 1)[-1])
            try:
                super().build_extension(ext)
            except Exception as error:
                # torch's ninja build raises RuntimeError, which setuptools' `optional` does
                # not catch: without this, one failed compile (an old compiler, say) would
                # fail the whole install instead of leaving the first-use build or the torch
                # path to serve.
                if not ext.optional:
                    raise
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
                print(
                    f"fused_ce: building {ext.name} failed ({reason[:200]}); installing "
                    "without it (fused-ce check says what serves the CPU)",
                    file=sys.stderr,
                )
            finally:
                self.build_temp = base

    x86 = platform.machine().lower() in ("x86_64", "amd64")
    names = ["default", "avx2", "avx512"] if x86 else ["default"]
    extensions = [
        CppExtension(
            f"fused_ce.native._C_{name}",
            [f"csrc/{_BUILD.KERNEL_SOURCE}"],
            extra_compile_args=_BUILD.kernel_compile_args(name),
            extra_link_args=_BUILD.KERNEL_LINK_ARGS,
            depends=sorted(glob("csrc/*.h")),
            # A failed native build leaves the package usable (first-use compile, or torch).
            optional=True,
        )
        for name in names
    ]
    extensions.append(
        CppExtension(
            "fused_ce.native._C_autograd",
            [f"csrc/{source}" for source in _BUILD.AUTOGRAD_SOURCES],
            extra_compile_args=_BUILD.AUTOGRAD_COMPILE_ARGS,
            extra_link_args=_BUILD.AUTOGRAD_LINK_ARGS,
            optional=True,
        )
    )
    return {"ext_modules": extensions, "cmdclass": {"build_ext": BuildNative}}


_native = _native_build()
_native["cmdclass"] = {**_native.get("cmdclass", {}), "build_py": BuildPyWithSources}
setup(**_native)
