"""Launch the fused linear + cross-entropy kernels (the ``"fused"`` path): logits never exist
in memory, not even a chunk of them. See kernels/linear_cross_entropy.py."""

from __future__ import annotations

import torch
import triton.language as tl

from .._backend import INTERPRET
from .._common import CEOptions, accumulation_dtype, forward_outputs
from ..kernels.linear_cross_entropy import (
    lce_backward_input_kernel,
    lce_backward_weight_kernel,
    lce_forward_kernel,
)
from ._common import cdiv, next_power_of_2, tl_dtype, unit_stride_class_weight
from .cross_entropy import option_args

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def _tiles(n_classes: int, n_features: int) -> dict[str, int]:
    """Tile sizes (``tl.dot`` needs 16 or more on every side). Compiled: 64 x 64 logits tiles
    over 32-feature slices keep the fp32 tiles in registers and the operand tiles of every
    dtype within shared memory. Interpreted: the smallest tiles that cover the tiny test
    shapes in few programs."""
    if INTERPRET:
        block_v = min(64, max(16, next_power_of_2(n_classes)))
        block_d = min(32, max(16, next_power_of_2(n_features)))
        return {"BLOCK_N": 16, "BLOCK_V": block_v, "BLOCK_D": block_d, "BLOCK_DO": block_d}
    block_do = min(64, max(16, next_power_of_2(n_features)))
    return {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 32, "BLOCK_DO": block_do, "num_warps": 4}


def _dot_args(input: torch.Tensor) -> dict:
    """``tl.dot`` operands in the input dtype (fp32 when interpreting: the interpreter's bf16
    dot is wrong); IEEE fp32 products, so fp32 inputs are not silently rounded to TF32."""
    dot_dtype = _TL_DTYPES[input.dtype]
    if INTERPRET and input.dtype in (torch.float16, torch.bfloat16):
        dot_dtype = tl.float32
    full_precision = dot_dtype in (tl.float32, tl.float64)
    return {
        "DOT_DTYPE": dot_dtype,
        # fp16/bf16 operands ignore the setting; "tf32" is Triton's default for them.
        "DOT_PRECISION": "ieee" if full_precision else "tf32",
        "ACC_DTYPE": tl_dtype(accumulation_dtype(input.dtype)),
    }


def _operands(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    options: CEOptions,
) -> dict:
    """Arguments shared by the three kernels: operands, sizes, strides, options and constexpr
    flags."""
    prob_target = target.dim() == 2
    n_classes, n_features = linear_weight.shape
    weight = unit_stride_class_weight(weight)
    return {
        "input_ptr": input,
        "linear_weight_ptr": linear_weight,
        # Absent operands: any pointer; the constexpr flags keep it from being read.
        "linear_bias_ptr": linear_bias if linear_bias is not None else input,
        "target_ptr": target,
        "class_weight_ptr": weight if weight is not None else input,
        "n_rows": input.shape[0],
        "n_classes": n_classes,
        "n_features": n_features,
        "input_row_stride": input.stride(0),
        "input_feature_stride": input.stride(1),
        "weight_class_stride": linear_weight.stride(0),
        "weight_feature_stride": linear_weight.stride(1),
        "bias_stride": linear_bias.stride(0) if linear_bias is not None else 0,
        "target_row_stride": target.stride(0),
        "target_class_stride": target.stride(1) if prob_target else 0,
        "HAS_BIAS": linear_bias is not None,
        "HAS_WEIGHT": weight is not None,
        "PROB_TARGET": prob_target,
        **option_args(options),
        **_dot_args(input),
    }


def forward(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    options: CEOptions,
    *,
    with_stats: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Per-row ``(loss, lse, saved, entropy, argmax)`` of ``cross_entropy(input @
    linear_weight.T + linear_bias)`` with the options of ``fused_ce.launch.cross_entropy.
    forward``, returned as that returns them.

    ``input`` ``(N, D)``, ``linear_weight`` ``(V, D)``, ``target`` ``(N,)`` class indices or
    ``(N, V)`` probabilities; any strides.
    """
    n_rows, n_features = input.shape
    n_classes = linear_weight.shape[0]
    dtype = accumulation_dtype(input.dtype, target.dtype)
    outputs = forward_outputs(n_rows, dtype, input.device, with_stats)
    loss, lse, saved, entropy, argmax = outputs
    if n_rows == 0:
        return outputs
    tiles = _tiles(n_classes, n_features)
    del tiles["BLOCK_DO"]
    # .run(grid=...), not [grid](...): see launch/cross_entropy.py.
    lce_forward_kernel.run(
        grid=(cdiv(n_rows, tiles["BLOCK_N"]),),
        warmup=False,
        loss_ptr=loss,
        lse_ptr=lse,
        saved_ptr=saved,
        # Absent outputs: any buffer of their dtype; WITH_STATS keeps them unwritten.
        entropy_ptr=entropy if with_stats else loss,
        argmax_ptr=argmax if with_stats else target,
        saved_stride=saved.stride(0),
        WITH_STATS=with_stats,
        **_operands(input, linear_weight, linear_bias, target, weight, options),
        **tiles,
    )
    return outputs


def backward(
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor | None,
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    saved: torch.Tensor,
    options: CEOptions,
    grad_input: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
    grad_bias: torch.Tensor | None,
    grad_target: torch.Tensor | None,
) -> None:
    """Write the requested gradients (contiguous buffers; ``None`` skips one) from the saved
    per-row ``(m, log_s, U)``; ``grad_loss`` and ``grad_lse`` (optional) are per row, any
    stride."""
    n_rows, n_features = input.shape
    n_classes = linear_weight.shape[0]
    tiles = _tiles(n_classes, n_features)
    feature_blocks = max(1, cdiv(n_features, tiles["BLOCK_DO"]))
    common = {
        "saved_ptr": saved,
        "saved_stride": saved.stride(0),
        "grad_loss_ptr": grad_loss,
        "grad_loss_stride": grad_loss.stride(0),
        "grad_lse_ptr": grad_lse if grad_lse is not None else grad_loss,
        "grad_lse_stride": grad_lse.stride(0) if grad_lse is not None else 0,
        "HAS_GRAD_LSE": grad_lse is not None,
        **_operands(input, linear_weight, linear_bias, target, weight, options),
        **tiles,
    }
    if (grad_input is not None or grad_target is not None) and n_rows > 0:
        # An absent output gets the other's buffer; its constexpr flag keeps it unwritten.
        gi = grad_input if grad_input is not None else grad_target
        gt = grad_target if grad_target is not None else grad_input
        grid = (
            cdiv(n_rows, tiles["BLOCK_N"]),
            feature_blocks if grad_input is not None else 1,
        )
        lce_backward_input_kernel.run(
            grid=grid,
            warmup=False,
            grad_input_ptr=gi,
            grad_target_ptr=gt,
            grad_input_row_stride=gi.stride(0),
            grad_target_row_stride=gt.stride(0),
            COMPUTE_GRAD_INPUT=grad_input is not None,
            COMPUTE_GRAD_TARGET=grad_target is not None,
            **common,
        )
    if grad_weight is not None or grad_bias is not None:
        gw = grad_weight if grad_weight is not None else grad_bias
        gb = grad_bias if grad_bias is not None else grad_weight
        grid = (
            cdiv(n_classes, tiles["BLOCK_V"]),
            feature_blocks if grad_weight is not None else 1,
        )
        lce_backward_weight_kernel.run(
            grid=grid,
            warmup=False,
            grad_weight_ptr=gw,
            grad_bias_ptr=gb,
            grad_weight_row_stride=gw.stride(0),
            COMPUTE_GRAD_WEIGHT=grad_weight is not None,
            COMPUTE_GRAD_BIAS=grad_bias is not None,
            **common,
        )
