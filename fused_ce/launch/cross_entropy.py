"""Launch the softmax + cross-entropy kernels on ``(n_outer, C, n_inner)`` logits."""

from __future__ import annotations

import struct

import torch
import triton

from .._backend import parallel_slots
from .._common import CEOptions, accumulation_dtype
from ..kernels.cross_entropy import ce_backward_kernel, ce_forward_kernel
from ..torch_impl.cross_entropy import forward_outputs
from ._common import tile, tl_dtype


def _split_fp64(value: float) -> tuple[float, float]:
    """``value`` as ``hi + lo``, ``hi`` its fp32 rounding: Triton passes a Python float to a
    kernel as fp32, which would round fp64 label smoothing (or scale, or cap) to 24 bits; the
    pair keeps 48."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, value - hi


def option_args(options: CEOptions) -> dict:
    """``options`` as every CE kernel (plain and fused linear) takes them: the scalars by
    name, each float as two fp32 halves, and the constexpr flags that compile their use out."""
    smoothing_hi, smoothing_lo = _split_fp64(options.label_smoothing)
    scale_hi, scale_lo = _split_fp64(options.logit_scale)
    softcap_hi, softcap_lo = _split_fp64(options.softcap)
    return {
        "ignore_index": options.ignore_index,
        "label_smoothing_hi": smoothing_hi,
        "label_smoothing_lo": smoothing_lo,
        "logit_scale_hi": scale_hi,
        "logit_scale_lo": scale_lo,
        "softcap_hi": softcap_hi,
        "softcap_lo": softcap_lo,
        "HAS_SMOOTHING": options.label_smoothing > 0.0,
        "HAS_SOFTCAP": options.softcap > 0.0,
    }


def _target_strides(target: torch.Tensor) -> tuple[int, int, int]:
    """(outer, class, inner) strides: class-index targets are ``(n_outer, n_inner)``."""
    if target.dim() == 3:
        return target.stride(0), target.stride(1), target.stride(2)
    return target.stride(0), 0, target.stride(1)


def forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    options: CEOptions,
    *,
    with_stats: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Per-row ``(loss, lse, saved, entropy, argmax)`` (see :func:`forward_outputs`) in the
    accumulation dtype. See kernels/cross_entropy.py."""
    n_outer, n_classes, n_inner = logits.shape
    n_rows = n_outer * n_inner
    prob_target = target.dim() == 3
    dtype = accumulation_dtype(logits.dtype, target.dtype)
    outputs = forward_outputs(n_rows, dtype, logits.device, with_stats)
    loss, lse, saved, entropy, argmax = outputs
    if n_rows == 0:
        return outputs
    block_r, block_c, num_warps = tile(n_rows, n_classes)
    ce_forward_kernel[(triton.cdiv(n_rows, block_r),)](
        logits,
        target,
        weight if weight is not None else logits,
        loss,
        lse,
        saved,
        entropy if with_stats else loss,
        argmax if with_stats else saved,
        n_rows,
        n_classes,
        n_inner,
        saved.stride(0),
        *logits.stride(),
        *_target_strides(target),
        **option_args(options),
        HAS_WEIGHT=weight is not None,
        PROB_TARGET=prob_target,
        WITH_STATS=with_stats,
        ACC_DTYPE=tl_dtype(dtype),
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return outputs


def backward(
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor | None,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    saved: torch.Tensor,
    options: CEOptions,
    grad_logits: torch.Tensor,
    grad_target: torch.Tensor | None,
) -> None:
    """Write ``dlogits`` into ``grad_logits`` (which may be ``logits`` itself) and, for
    probability targets, ``dtarget`` into ``grad_target`` when it is given; ``saved`` is the
    forward's ``(3, n_rows)`` (unit stride along the rows)."""
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
        saved,
        grad_loss,
        grad_lse if grad_lse is not None else saved,
        grad_logits,
        gt,
        n_rows,
        n_classes,
        n_inner,
        cols_per_program,
        saved.stride(0),
        grad_loss.stride(0),
        grad_lse.stride(0) if grad_lse is not None else 0,
        *logits.stride(),
        *_target_strides(target),
        *grad_logits.stride(),
        *gt.stride(),
        **option_args(options),
        HAS_WEIGHT=weight is not None,
        PROB_TARGET=prob_target,
        HAS_GRAD_LSE=grad_lse is not None,
        TARGET_GRAD=grad_target is not None,
        ACC_DTYPE=tl_dtype(saved.dtype),
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
