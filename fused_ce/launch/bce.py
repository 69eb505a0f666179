"""Launch the sigmoid + BCE kernel on operands of any shape."""

from __future__ import annotations

import functools

import torch

from .._common import accumulation_dtype, bce_rows_2d
from ..cuda_launch import through_cpp
from ..kernels.bce import bce_kernel
from ._common import MAX_TILE, Launch, cdiv, launch_arguments, next_power_of_2, tl_dtype

# FUSED_CE_CUDA_LAUNCH=cpp: CUDA launches through C++ (fused_ce.cuda_launch); else unchanged.
bce_kernel = through_cpp(bce_kernel)

_MAX_BLOCK_C = 1024


def run(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    grad: torch.Tensor | None,
    loss: torch.Tensor | None,
    grad_input: torch.Tensor | None,
    grad_target: torch.Tensor | None,
    *,
    loss_sum: torch.Tensor | None = None,
    upstream: torch.Tensor | None = None,
) -> None:
    """Fill the given outputs for ``input`` and ``target`` of one shape, in one launch:
    ``loss`` (contiguous, elementwise), ``loss_sum`` (0-d, the accumulation dtype: the sum of
    the elementwise loss, from per-program partial sums), and ``grad_input``/``grad_target``
    (contiguous) from ``grad``, the upstream gradient of the elementwise loss: of ``input``'s
    shape, or 0-d (one value for every element, e.g. a mean's ``1 / numel``). Absent outputs
    are skipped.

    ``upstream`` (0-d, Triton only; the scalar-loss backward): the gradient buffers already
    hold the gradients for ``grad``; the kernel leaves them untouched when ``upstream`` is 1
    (read on the device) and rewrites them for ``grad * upstream`` otherwise."""
    shape = input.shape
    numel = input.numel()
    if numel == 0:
        if loss_sum is not None:
            loss_sum.zero_()
        return
    # The views of bce_rows_2d (one rule with the native kernels): one long row when every
    # operand is dense or one value, the friendliest layout for the loads; a 0-d or expanded
    # upstream gradient is read with strides 0.
    x2, t2, w2, pw2, g2 = bce_rows_2d(
        shape, (input, target, weight, pos_weight, grad), loss_sum=loss_sum is not None
    )
    dtype = accumulation_dtype(input.dtype, target.dtype)
    launch = _launch(
        x2.shape,
        x2.stride(),
        t2.stride(),
        w2.stride() if w2 is not None else None,
        pw2.stride() if pw2 is not None else None,
        g2.stride() if g2 is not None else None,
        dtype,
        loss is not None,
        loss_sum is not None,
        grad_input is not None,
        grad_target is not None,
        upstream is not None,
    )
    partials = (
        torch.empty(launch.grid[0], dtype=dtype, device=input.device)
        if loss_sum is not None
        else None
    )
    # Absent operands and outputs: any pointer of a fitting dtype; the constexpr flags keep
    # them from being read or written.
    placeholder = next(t for t in (loss, grad_input, grad_target, partials) if t is not None)
    # .run(grid=...) with the pointers in _POINTERS' order, then the cached rest: see
    # launch/cross_entropy.py.
    bce_kernel.run(
        x2,
        t2,
        w2 if w2 is not None else x2,  # weight_ptr
        pw2 if pw2 is not None else x2,  # pos_weight_ptr
        g2 if g2 is not None else x2,  # grad_ptr
        upstream if upstream is not None else x2,  # upstream_ptr
        loss if loss is not None else placeholder,  # loss_ptr
        grad_input if grad_input is not None else placeholder,  # grad_input_ptr
        grad_target if grad_target is not None else placeholder,  # grad_target_ptr
        partials if partials is not None else placeholder,  # loss_partials_ptr
        *launch.arguments,
        grid=launch.grid,
        warmup=False,
        num_warps=launch.num_warps,
    )
    if partials is not None:
        # Deterministic: a fixed-order sum of the per-program partials (one small launch).
        torch.sum(partials, dim=0, out=loss_sum)


_POINTERS = (
    "input_ptr",
    "target_ptr",
    "weight_ptr",
    "pos_weight_ptr",
    "grad_ptr",
    "upstream_ptr",
    "loss_ptr",
    "grad_input_ptr",
    "grad_target_ptr",
    "loss_partials_ptr",
)


# The launch's arguments other than its tensors, once per set of shapes, strides and flags
# (see launch/cross_entropy.py).
@functools.lru_cache(maxsize=256)
def _launch(
    shape: torch.Size,
    input_strides: tuple[int, int],
    target_strides: tuple[int, int],
    weight_strides: tuple[int, int] | None,
    pos_weight_strides: tuple[int, int] | None,
    grad_strides: tuple[int, int] | None,
    dtype: torch.dtype,
    compute_loss: bool,
    sum_loss: bool,
    grad_input: bool,
    grad_target: bool,
    skip_unit_upstream: bool,
) -> Launch:
    """The cached part of :func:`run`'s launch on ``(rows, cols)`` operands (strides None:
    absent; a 0-d gradient: strides 0, so every element reads the one value)."""
    n_rows, n_cols = shape
    block_c = min(next_power_of_2(n_cols), _MAX_BLOCK_C)
    block_r = max(1, min(next_power_of_2(n_rows), MAX_TILE // 4 // block_c))
    n_col_blocks = cdiv(n_cols, block_c)
    weight_row, weight_col = weight_strides or (0, 0)
    pos_weight_row, pos_weight_col = pos_weight_strides or (0, 0)
    grad_row, grad_col = grad_strides or (0, 0)
    named = {
        "n_rows": n_rows,
        "n_cols": n_cols,
        "n_col_blocks": n_col_blocks,
        "input_row_stride": input_strides[0],
        "input_col_stride": input_strides[1],
        "target_row_stride": target_strides[0],
        "target_col_stride": target_strides[1],
        "weight_row_stride": weight_row,
        "weight_col_stride": weight_col,
        "pos_weight_row_stride": pos_weight_row,
        "pos_weight_col_stride": pos_weight_col,
        "grad_row_stride": grad_row,
        "grad_col_stride": grad_col,
        "HAS_WEIGHT": weight_strides is not None,
        "HAS_POS_WEIGHT": pos_weight_strides is not None,
        "COMPUTE_LOSS": compute_loss,
        "SUM_LOSS": sum_loss,
        "COMPUTE_GRAD_INPUT": grad_input,
        "COMPUTE_GRAD_TARGET": grad_target,
        "SKIP_UNIT_UPSTREAM": skip_unit_upstream,
        "ACC_DTYPE": tl_dtype(dtype),
        "BLOCK_R": block_r,
        "BLOCK_C": block_c,
    }
    return Launch(
        (cdiv(n_rows, block_r) * n_col_blocks,),
        4 if block_r * block_c <= 1024 else 8,
        launch_arguments(bce_kernel, _POINTERS, named),
    )
