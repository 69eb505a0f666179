"""Launch the softmax + cross-entropy kernels on ``(n_outer, C, n_inner)`` logits."""

from __future__ import annotations

import struct

import torch
import triton

from .._backend import parallel_slots
from .._common import accumulation_dtype
from ..kernels.cross_entropy import ce_backward_kernel, ce_forward_kernel
from ._common import tile, tl_dtype


def _split_fp64(value: float) -> tuple[float, float]:
    """``value`` as ``hi + lo``, ``hi`` its fp32 rounding: Triton passes a Python float to a
    kernel as fp32, which would round fp64 label smoothing to 24 bits; the pair keeps 48."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, value - hi


def _target_strides(target: torch.Tensor) -> tuple[int, int, int]:
    """(outer, class, inner) strides: class-index targets are ``(n_outer, n_inner)``."""
    if target.dim() == 3:
        return target.stride(0), target.stride(1), target.stride(2)
    return target.stride(0), 0, target.stride(1)


def forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (loss, lse, U) in the accumulation dtype; see kernels/cross_entropy.py."""
    n_outer, n_classes, n_inner = logits.shape
    n_rows = n_outer * n_inner
    prob_target = target.dim() == 3
    dtype = accumulation_dtype(logits.dtype, target.dtype)
    loss = torch.empty(n_rows, device=logits.device, dtype=dtype)
    lse = torch.empty_like(loss)
    linear_sum = torch.empty_like(loss)
    if n_rows == 0:
        return loss, lse, linear_sum
    block_r, block_c, num_warps = tile(n_rows, n_classes)
    ce_forward_kernel[(triton.cdiv(n_rows, block_r),)](
        logits,
        target,
        weight if weight is not None else logits,
        loss,
        lse,
        linear_sum,
        n_rows,
        n_classes,
        n_inner,
        *logits.stride(),
        *_target_strides(target),
        ignore_index,
        *_split_fp64(label_smoothing),
        HAS_WEIGHT=weight is not None,
        PROB_TARGET=prob_target,
        HAS_SMOOTHING=label_smoothing > 0.0,
        ACC_DTYPE=tl_dtype(dtype),
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return loss, lse, linear_sum


def backward(
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor | None,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    lse: torch.Tensor,
    linear_sum: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    grad_logits: torch.Tensor,
    grad_target: torch.Tensor | None,
) -> None:
    """Write ``dlogits`` into ``grad_logits`` (which may be ``logits`` itself) and, for
    probability targets, ``dtarget`` into ``grad_target`` when it is given."""
    n_outer, n_classes, n_inner = logits.shape
    n_rows = n_outer * n_inner
    if n_rows == 0 or n_classes == 0:
        return
    prob_target = target.dim() == 3
    block_r, block_c, num_warps = tile(n_rows, n_classes)
    row_programs = triton.cdiv(n_rows, block_r)
    # Split long rows over several programs when there are too few rows to fill the device.
    col_blocks = triton.cdiv(n_classes, block_c)
    splits = max(1, min(col_blocks, parallel_slots(logits) // row_programs))
    cols_per_program = triton.cdiv(col_blocks, splits) * block_c
    splits = triton.cdiv(n_classes, cols_per_program)
    gt = grad_target if grad_target is not None else grad_logits
    ce_backward_kernel[(row_programs, splits)](
        logits,
        target,
        weight if weight is not None else logits,
        lse,
        linear_sum,
        grad_loss,
        grad_lse if grad_lse is not None else lse,
        grad_logits,
        gt,
        n_rows,
        n_classes,
        n_inner,
        cols_per_program,
        grad_loss.stride(0),
        grad_lse.stride(0) if grad_lse is not None else 0,
        *logits.stride(),
        *_target_strides(target),
        *grad_logits.stride(),
        *gt.stride(),
        ignore_index,
        *_split_fp64(label_smoothing),
        HAS_WEIGHT=weight is not None,
        PROB_TARGET=prob_target,
        HAS_SMOOTHING=label_smoothing > 0.0,
        HAS_GRAD_LSE=grad_lse is not None,
        TARGET_GRAD=grad_target is not None,
        ACC_DTYPE=tl_dtype(lse.dtype),
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
