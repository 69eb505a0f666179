"""Triton's compiled kernels launched from C++ through the CUDA driver (opt-in, unproven on a GPU).

``FUSED_CE_CUDA_LAUNCH=cpp`` (read once, when this module is imported) makes the CE and BCE
launchers of ``fused_ce.launch`` hand each CUDA launch to ``fused_ce_native::cuda_launch``
(``csrc/cuda_launch.cpp``) instead of Triton's Python launcher: Triton still specialises and
compiles each variant (once, through ``JITFunction.run(..., warmup=True)``), and its cubin is
loaded with ``cuModuleLoadData`` and launched with ``cuLaunchKernel`` on torch's current
stream. The default, ``FUSED_CE_CUDA_LAUNCH=triton``, launches through Triton as before. CPU
tensors (the interpreter) and machines without the native extension or a CUDA driver keep
Triton's launch. Why and what is unproven: docs/gpu.md.

The parameters a compiled kernel takes are derived from the signature Triton compiled
(:func:`kernel_params`), and their byte layout is the C++ packer's
(``torch.ops.fused_ce_native.cuda_param_layout``); tests/test_cuda_launch.py checks both
against the PTX of every variant the launchers compile.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from . import native
from ._backend import INTERPRET

LAUNCH_MODES = ("triton", "cpp")
MODE = os.environ.get("FUSED_CE_CUDA_LAUNCH", "triton")
if MODE not in LAUNCH_MODES:
    raise ValueError(f"FUSED_CE_CUDA_LAUNCH: expected one of {LAUNCH_MODES}, got {MODE!r}")

# Triton's scalar types -> the C++ packer's one-character types (csrc/cuda_launch.cpp); as
# Triton's own launcher passes them: i1 as one byte, fp32 as 4 bytes. fp16/bf16 scalars are
# not passed by any fused_ce kernel and are refused.
_SCALAR_TYPES = {
    "i1": "b",
    "i8": "b",
    "u1": "B",
    "u8": "B",
    "i16": "h",
    "u16": "H",
    "i32": "i",
    "u32": "I",
    "i64": "l",
    "u64": "K",
    "fp32": "f",
    "f32": "f",
    "fp64": "d",
}
# The scratch buffers recent Triton appends after the arguments, as null pointers: present
# when the metadata names them, usable only while their size is 0 (fused_ce's kernels).
_SCRATCH = ("global_scratch_size", "profile_scratch_size")


def kernel_params(compiled: Any) -> tuple[tuple[int | None, str], ...]:
    """``(argument index, type)`` of each parameter of a Triton ``CompiledKernel``, in the
    order its cubin takes them: the arguments that are not constexprs (declared, or an int
    Triton specialised to a constant), then a null pointer (index None) per scratch buffer."""
    source = compiled.src
    constants = {key[0] for key in source.constants if len(key) == 1}
    params: list[tuple[int | None, str]] = []
    for index, kind in enumerate(source.signature.values()):
        if kind == "constexpr" or index in constants:
            continue
        if kind.startswith("*"):
            params.append((index, "O"))
        elif kind in _SCALAR_TYPES:
            params.append((index, _SCALAR_TYPES[kind]))
        else:
            raise NotImplementedError(f"{source.name}: parameter type {kind} is not packed")
    for scratch in _SCRATCH:
        if hasattr(compiled.metadata, scratch):
            if getattr(compiled.metadata, scratch) > 0:
                raise NotImplementedError(f"{source.name}: a {scratch} above 0 is not supported")
            params.append((None, "O"))
    return tuple(params)


class CubinLaunch:
    """One compiled variant: its cubin, loaded on each device at its first launch there."""

    def __init__(self, compiled: Any) -> None:
        self.params = kernel_params(compiled)
        self.types = "".join(kind for _, kind in self.params)
        self.name = compiled.metadata.name
        self.shared = compiled.metadata.shared
        self.num_warps = compiled.metadata.num_warps
        self.cubin = torch.frombuffer(bytearray(compiled.asm["cubin"]), dtype=torch.uint8)
        self.handles: dict[int, int] = {}

    def pack(self, args: tuple) -> tuple[list[int], list[float]]:
        """The launch's ``ints`` (pointers and integers) and ``floats``, in parameter order."""
        ints: list[int] = []
        floats: list[float] = []
        for index, kind in self.params:
            value = None if index is None else args[index]
            if kind == "O":
                ints.append(0 if value is None else value.data_ptr())
            elif kind in "fd":
                floats.append(float(value))
            else:
                ints.append(int(value))
        return ints, floats

    def __call__(self, grid: tuple[int, ...], device: int, args: tuple) -> None:
        handle = self.handles.get(device)
        if handle is None:
            handle = native.ops().cuda_load_kernel(self.cubin, self.name, self.shared, device)
            self.handles[device] = handle
        ints, floats = self.pack(args)
        grid = (*grid, 1, 1)
        # torch's current stream of the device, as Triton's launcher and Inductor's take it.
        stream = torch._C._cuda_getCurrentRawStream(device)
        native.ops().cuda_launch(
            handle, grid[0], grid[1], grid[2], self.num_warps, stream, self.types, ints, floats
        )


class CppLaunchedKernel:
    """Stands in for a ``JITFunction`` in the launchers: ``run`` launches CUDA calls through
    :class:`CubinLaunch`, anything else through the Triton kernel it wraps (whose attributes
    it passes through). Every kernel argument is passed by position (as the CE and BCE
    launchers do; the fused linear launcher passes keywords and is not wrapped)."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.variants: dict[tuple, CubinLaunch] = {}
        self.loaded: dict[str, CubinLaunch] = {}  # by Triton's hash: one module per variant

    def __getattr__(self, name: str) -> Any:
        return getattr(self.kernel, name)

    def run(self, *args: Any, grid: tuple[int, ...], warmup: bool, **options: Any) -> Any:
        first = args[0]
        if warmup or not first.is_cuda:
            return self.kernel.run(*args, grid=grid, warmup=warmup, **options)
        # The key: the leading tensors by dtype and 16-byte alignment (what Triton specialises
        # them on), every later argument by value, and the options. The launchers pass the
        # tensors first and the rest from a tuple cached per configuration, so the key is no
        # finer than their own caches, and coarser than nothing Triton distinguishes; a miss
        # asks Triton, whose cache answers, and a variant's module is loaded once.
        tensors = []
        for value in args:
            if not isinstance(value, torch.Tensor):
                break
            tensors.append((value.dtype, value.data_ptr() % 16 == 0))
        key = (tuple(tensors), args[len(tensors) :], tuple(options.items()))
        launch = self.variants.get(key)
        if launch is None:
            compiled = self.kernel.run(*args, grid=grid, warmup=True, **options)
            launch = self.loaded.get(compiled.hash)
            if launch is None:
                launch = self.loaded[compiled.hash] = CubinLaunch(compiled)
            self.variants[key] = launch
        launch(grid, first.device.index, args)
        return None


def cpp_launch_available() -> str:
    """``""`` when launches can go through C++ here, else why not."""
    if not native.available():
        return f"the native extension is unavailable: {native.unavailable_reason()}"
    return native.ops().cuda_driver_error()


def through_cpp(kernel: Any) -> Any:
    """``kernel`` as the launchers should call it: wrapped in :class:`CppLaunchedKernel` under
    ``FUSED_CE_CUDA_LAUNCH=cpp`` where C++ launches are available (the native extension and a
    CUDA driver, kernels compiled rather than interpreted), else unchanged."""
    if MODE != "cpp" or INTERPRET or cpp_launch_available():
        return kernel
    return CppLaunchedKernel(kernel)
