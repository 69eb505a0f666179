"""Build shim: metadata lives in pyproject.toml; this file adds the optional native CPU kernels.

``csrc/`` is compiled with ``torch.utils.cpp_extension`` into one library per CPU capability
(``fused_ce/native/_C_default``, ``_C_avx2``, ``_C_avx512`` on x86-64): each is the same source
built with that capability's flags, so ``at::vec::Vectorized`` has that width; at run time
``fused_ce.native`` loads the best one the CPU supports (never ``-march=native``, which would
make a wheel die with SIGILL on an older CPU). ``_C_autograd``, the C++ autograd of the
scalar-loss ops and the CUDA driver launcher of Triton's cubins (no CUDA needed to build it),
has no vector code and is built once. The build needs torch at build time: install
with ``pip install --no-build-isolation`` (build isolation would fetch a second torch). Without
torch or a C++ compiler, or with ``FUSED_CE_NO_NATIVE=1``, the package installs without them
and the torch backend serves (``fused-ce check`` says which backend runs).
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from glob import glob

from setuptools import setup

# Capability -> compiler flags, as ATen builds its own per-capability kernels.
_CAPABILITIES = {
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "avx2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "avx512": [
        "-DCPU_CAPABILITY=AVX512",
        "-DCPU_CAPABILITY_AVX512",
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mfma",
        "-mf16c",
    ],
}


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
            "fused_ce: torch not importable at build time; skipping the native kernels "
            "(install with --no-build-isolation to build them)",
            file=sys.stderr,
        )
        return {}
    if not _compiler_found():
        print("fused_ce: no C++ compiler found; skipping the native kernels", file=sys.stderr)
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
            finally:
                self.build_temp = base

    x86 = platform.machine().lower() in ("x86_64", "amd64")
    names = ["default", "avx2", "avx512"] if x86 else ["default"]
    extensions = [
        CppExtension(
            f"fused_ce.native._C_{name}",
            ["csrc/library.cpp"],
            # -g0: debug info would double the build time (2 minutes on 2 cores is the budget).
            # -fopenmp: at::parallel_for is inline code whose `#pragma omp parallel` a build
            # without it ignores, running every kernel on the calling thread alone. Linking it
            # names libgomp.so.1, which resolves to the copy torch has already loaded.
            extra_compile_args=["-O3", "-g0", "-std=c++20", "-fopenmp", *_CAPABILITIES[name]],
            extra_link_args=["-fopenmp"],
            depends=sorted(glob("csrc/*.h")),
            # A failed native build leaves the package usable on the torch path.
            optional=True,
        )
        for name in names
    ]
    # The C++ autograd of the scalar-loss ops: no vector code, so built once, not per
    # capability; it calls whichever capability's kernels are loaded through their ops. With it,
    # the CUDA driver launcher of Triton's cubins (csrc/cuda_launch.cpp): it opens libcuda at
    # run time, so it builds without CUDA and loads on machines without a GPU.
    extensions.append(
        CppExtension(
            "fused_ce.native._C_autograd",
            ["csrc/autograd.cpp", "csrc/cuda_launch.cpp"],
            extra_compile_args=["-O2", "-g0", "-std=c++20"],
            extra_link_args=[] if sys.platform == "win32" else ["-ldl"],
            optional=True,
        )
    )
    return {"ext_modules": extensions, "cmdclass": {"build_ext": BuildNative}}


setup(**_native_build())
