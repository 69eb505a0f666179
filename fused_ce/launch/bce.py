"""Launch the sigmoid + BCE kernel on operands of any shape."""

from __future__ import annotations

import torch
import triton

from .._common import accumulation_dtype
from ..kernels.bce import bce_kernel
from ._common import MAX_TILE, tl_dtype

_MAX_BLOCK_C = 1024


def _as_2d(tensor: torch.Tensor, shape: torch.Size, flat: bool) -> torch.Tensor:
    """View a tensor broadcast to ``shape`` as (rows, cols): one row when ``flat``, else
    (prod(shape[:-1]), shape[-1]). Stride-0 (broadcast) dims stay stride 0; a layout that no
    view can express is copied."""
    tensor = tensor.expand(shape)
    if flat:
        return tensor.reshape(1, -1)
    if len(shape) == 0:
        return tensor.reshape(1, 1)
    try:
        return tensor.view(-1, shape[-1])
    except RuntimeError:
        return tensor.reshape(-1, shape[-1])


def run(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    grad: torch.Tensor | None,
    loss: torch.Tensor | None,
    grad_input: torch.Tensor | None,
    grad_target: torch.Tensor | None,
) -> None:
    """Fill the given contiguous outputs (``loss``, or ``grad_input``/``grad_target`` from
    ``grad``) for ``input`` and ``target`` of one shape; absent outputs are skipped."""
    shape = input.shape
    numel = input.numel()
    if numel == 0:
        return
    # Everything dense and unbroadcast: one long row, the friendliest layout for the loads.
    flat = all(
        t is None or (t.shape == shape and t.is_contiguous())
        for t in (input, target, weight, pos_weight, grad)
    )
    operands = [
        _as_2d(t, shape, flat) if t is not None else None
        for t in (input, target, weight, pos_weight, grad)
    ]
    x2, t2 = operands[0], operands[1]
    n_rows, n_cols = x2.shape
    block_c = min(triton.next_power_of_2(n_cols), _MAX_BLOCK_C)
    block_r = max(1, min(triton.next_power_of_2(n_rows), MAX_TILE // 4 // block_c))
    n_col_blocks = triton.cdiv(n_cols, block_c)

    def strides(t: torch.Tensor | None) -> tuple[int, int]:
        return (t.stride(0), t.stride(1)) if t is not None else (0, 0)

    placeholder = (
        loss if loss is not None else (grad_input if grad_input is not None else grad_target)
    )
    bce_kernel[(triton.cdiv(n_rows, block_r) * n_col_blocks,)](
        x2,
        t2,
        operands[2] if weight is not None else x2,
        operands[3] if pos_weight is not None else x2,
        operands[4] if grad is not None else x2,
        loss if loss is not None else placeholder,
        grad_input if grad_input is not None else placeholder,
        grad_target if grad_target is not None else placeholder,
        n_rows,
        n_cols,
        n_col_blocks,
        *strides(x2),
        *strides(t2),
        *strides(operands[2]),
        *strides(operands[3]),
        *strides(operands[4]),
        HAS_WEIGHT=weight is not None,
        HAS_POS_WEIGHT=pos_weight is not None,
        COMPUTE_LOSS=loss is not None,
        COMPUTE_GRAD_INPUT=grad_input is not None,
        COMPUTE_GRAD_TARGET=grad_target is not None,
        ACC_DTYPE=tl_dtype(accumulation_dtype(input.dtype, target.dtype)),
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=4 if block_r * block_c <= 1024 else 8,
    )
