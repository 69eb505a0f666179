"""Helpers shared by the launch modules."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton.language as tl

from .._backend import INTERPRET

# Elements per program tile. Compiled: 8192 fp32 values spread over 8 warps (32 a thread) keep
# registers from spilling. Interpreted: the cost is per program and per op, so bigger tiles win.
MAX_TILE = 1 << 16 if INTERPRET else 1 << 13
MAX_BLOCK_C = 1 << 14 if INTERPRET else 1 << 12


def cdiv(numerator: int, denominator: int) -> int:
    """``ceil(numerator / denominator)``. Plain Python: ``triton.cdiv`` is a constexpr
    function whose call from the host costs about a microsecond of wrapping."""
    return -(-numerator // denominator)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``); see :func:`cdiv` for why not
    Triton's."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    """The Triton twin of an accumulation dtype."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def unit_stride_class_weight(weight: torch.Tensor | None) -> torch.Tensor | None:
    """The class weights as the CE kernels read them, at ``class_weight_ptr + class``: a
    ``(C,)`` vector of unit stride. Any other layout (a slice ``w[::2]``, a stride-0
    ``w.expand(C)``) is copied first, else the kernels would read the wrong classes or past
    the buffer. The copy is C values once per launch, against the ``rows x C`` logits the
    launch reads, and only for such views; a stride argument would thread through every
    class-weight load of five kernels for a layout that is rare."""
    if weight is None or weight.is_contiguous():
        return weight
    return weight.contiguous()


def tile(n_rows: int, n_cols: int, max_block_c: int = MAX_BLOCK_C) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) for a row-wise kernel: a whole short row per lane group,
    several rows per program when rows are short."""
    block_c = min(next_power_of_2(max(n_cols, 1)), max_block_c)
    block_r = max(1, min(next_power_of_2(max(n_rows, 1)), MAX_TILE // block_c))
    num_warps = 4 if block_r * block_c <= 2048 else 8
    return block_r, block_c, num_warps


class Launch(NamedTuple):
    """A launch's cached part: the grid (None: nothing to launch), ``num_warps``, and the
    kernel's arguments after its leading tensor pointers, in signature order (see
    :func:`launch_arguments`)."""

    grid: tuple[int, ...] | None
    num_warps: int
    arguments: tuple


def launch_arguments(kernel, pointers: tuple[str, ...], named: dict) -> tuple:
    """``named`` (every argument of ``kernel`` after its leading ``pointers``, by name) as a
    tuple in the kernel's signature order.

    The launchers pass the pointers and this tuple positionally: packing and binding ~47
    keyword arguments costs about 3 us a launch more on the host (measured with the launch
    stubbed; Triton's binder binds positions faster on a GPU too). The names are checked here,
    once per cached launch, so a kernel whose signature changes fails loudly instead of
    receiving its arguments out of order."""
    names = tuple(kernel.arg_names)
    if names[: len(pointers)] != pointers or set(names[len(pointers) :]) != set(named):
        raise RuntimeError(
            f"{kernel.fn.__name__}: the launcher's arguments {(*pointers, *sorted(named))} do "
            f"not match the kernel's parameters {names}"
        )
    return tuple(named[name] for name in names[len(pointers) :])
