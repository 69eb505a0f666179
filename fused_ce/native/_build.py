"""How the native libraries are compiled: one home for the flags that ``setup.py`` (at install
time) and :mod:`fused_ce.native` (on first use, when nothing was built at install) both use.

No torch import here: ``setup.py`` reads this file before it knows whether torch is there.
"""

from __future__ import annotations

import sys

# Capability -> compiler flags, as ATen builds its own per-capability kernels. Each capability
# is the same source built with its flags, so ``at::vec::Vectorized`` has that width; never
# ``-march=native``, which would make a wheel die with SIGILL on an older CPU.
CAPABILITIES = {
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

# -g0: debug info would double the build time. -fopenmp: at::parallel_for is inline code whose
# `#pragma omp parallel` a build without it ignores, running every kernel on the calling thread
# alone. Linking it names libgomp.so.1, which resolves to the copy torch has already loaded.
KERNEL_COMPILE_ARGS = ["-O3", "-g0", "-std=c++20", "-fopenmp"]
KERNEL_LINK_ARGS = ["-fopenmp"]
KERNEL_SOURCE = "library.cpp"

# The C++ autograd of the scalar-loss ops: no vector code, so built once, not per capability;
# it calls whichever capability's kernels are loaded through their ops. With it, the CUDA
# driver launcher of Triton's cubins (cuda_launch.cpp): it opens libcuda at run time (hence
# -ldl), so it builds without CUDA and loads on machines without a GPU.
AUTOGRAD_COMPILE_ARGS = ["-O2", "-g0", "-std=c++20"]
AUTOGRAD_LINK_ARGS = [] if sys.platform == "win32" else ["-ldl"]
AUTOGRAD_SOURCES = ("autograd.cpp", "cuda_launch.cpp")


def kernel_compile_args(capability: str) -> list[str]:
    """The compiler flags of one capability's kernel library."""
    return [*KERNEL_COMPILE_ARGS, *CAPABILITIES[capability]]
