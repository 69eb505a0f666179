"""Launch the softmax + cross-entropy kernels on ``(n_outer, C, n_inner)`` logits."""

from __future__ import annotations

import functools
import struct

import torch

from .._backend import parallel_slots
from .._common import CEOptions, accumulation_dtype, forward_outputs
from ..cuda_launch import through_cpp
from ..kernels.cross_entropy import ce_backward_kernel, ce_forward_kernel
from ._common import (
    Launch,
    cdiv,
    launch_arguments,
    next_power_of_2,
    tile,
    tl_dtype,
    unit_stride_class_weight,
)

# The scalar-loss forward's schedule (loss and gradient from one launch; issue 22, see
# docs/perf-notes.md for the bytes each moves and its predicted H200 time):
#   "loop"        the default: MAX_BLOCK_C-wide blocks; the gradient pass re-reads each row
#                 from its start, the block the forward read first (the first to leave L2).
#   "row_on_chip" a row of at most ROW_ON_CHIP_MAX_C classes is one block, kept in registers
#                 between the forward and gradient passes: the logits are read once. Longer
#                 rows take "l2".
#   "l2"          one row per program in L2_BLOCK_C-wide blocks, re-read from its end (the
#                 blocks read last first), so the re-read hits L2 while the rows in flight
#                 (SMs x resident programs x row bytes) fit in it: num_warps is raised so
#                 that fewer programs are resident, until those rows fill half the L2 (the
#                 other half serves the gradient's write stream).
# Opt-in until an H200 run of bench/issue22.py shows a win: without a GPU this session none
# could be measured. Each element's arithmetic is the same under every schedule (the same bits
# over the same class blocks; the online sums round block by block).
SCALAR_SCHEDULES = ("loop", "row_on_chip", "l2")
scalar_schedule = "loop"
ROW_ON_CHIP_MAX_C = 1 << 15
L2_BLOCK_C = 1 << 14
# Where no CUDA device answers (the interpreter, the GPU-compile test): an H200's.
_H200_CACHES = (132, 60 << 20)
_WARPS_PER_SM = 64  # 2048 resident threads


@functools.cache
def _device_caches(device: torch.device) -> tuple[int, int]:
    """``(multiprocessors, L2 bytes)`` of ``device``, the H200's off CUDA."""
    if device.type != "cuda":
        return _H200_CACHES
    props = torch.cuda.get_device_properties(device.index or 0)
    return props.multi_processor_count, props.L2_cache_size


# FUSED_CE_CUDA_LAUNCH=cpp: CUDA launches through C++ (fused_ce.cuda_launch); else unchanged.
ce_forward_kernel = through_cpp(ce_forward_kernel)
ce_backward_kernel = through_cpp(ce_backward_kernel)


def _split_fp64(value: float) -> tuple[float, float]:
    """``value`` as ``hi + lo``, ``hi`` its fp32 rounding: Triton passes a Python float to a
    kernel as fp32, which would round fp64 label smoothing (or scale, or cap) to 24 bits; the
    pair keeps 48."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, value - hi


@functools.lru_cache(maxsize=64)
def option_args(options: CEOptions) -> dict:
    """``options`` as every CE kernel (plain and fused linear) takes them: the scalars by
    name, each float as two fp32 halves, and the constexpr flags that compile their use out.
    Cached: a training run uses one set of options (callers unpack the dict, never change
    it)."""
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


def _strides(logits, target, grad_logits, grad_target) -> dict[str, int]:
    """The ``*_outer/class/inner_stride`` arguments of the ``(n_outer, C, n_inner)`` operands,
    from their ``stride()`` tuples; class-index targets are ``(n_outer, n_inner)`` (class
    stride 0)."""
    logits_outer, logits_class, logits_inner = logits
    grad_outer, grad_class, grad_inner = grad_logits
    if len(target) == 3:
        target_outer, target_class, target_inner = target
    else:
        (target_outer, target_inner), target_class = target, 0
    if len(grad_target) == 3:
        grad_target_outer, grad_target_class, grad_target_inner = grad_target
    else:
        (grad_target_outer, grad_target_inner), grad_target_class = grad_target, 0
    return {
        "logits_outer_stride": logits_outer,
        "logits_class_stride": logits_class,
        "logits_inner_stride": logits_inner,
        "target_outer_stride": target_outer,
        "target_class_stride": target_class,
        "target_inner_stride": target_inner,
        "grad_outer_stride": grad_outer,
        "grad_class_stride": grad_class,
        "grad_inner_stride": grad_inner,
        "grad_target_outer_stride": grad_target_outer,
        "grad_target_class_stride": grad_target_class,
        "grad_target_inner_stride": grad_target_inner,
    }


def forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    options: CEOptions,
    *,
    with_stats: bool = False,
    z_loss: float = 0.0,
    grad_scale: torch.Tensor | None = None,
    grad_logits: torch.Tensor | None = None,
    grad_target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Per-row ``(loss, lse, saved, entropy, argmax)`` (see :func:`forward_outputs`) in the
    accumulation dtype, from one launch. See kernels/cross_entropy.py.

    With ``grad_scale`` (0-d, the accumulation dtype) the same launch also writes the gradient
    of ``grad_scale * sum_n (loss_n + z_loss * v_n * lse_n^2)`` into ``grad_logits`` (which may
    be ``logits`` itself) and, for probability targets, into ``grad_target``, each when given:
    the scalar-loss path, whose backward has nothing left to do for an upstream gradient of
    1."""
    n_outer, n_classes, n_inner = logits.shape
    dtype = accumulation_dtype(logits.dtype, target.dtype)
    outputs = forward_outputs(n_outer * n_inner, dtype, logits.device, with_stats)
    loss, lse, saved, entropy, argmax = outputs
    if grad_scale is None:
        grad_logits = grad_target = None
    # An absent gradient output gets another buffer; its constexpr flag keeps it unwritten.
    gl = grad_logits if grad_logits is not None else logits
    gt = grad_target if grad_target is not None else gl
    schedule = scalar_schedule if grad_scale is not None else "loop"
    # Only the opt-in schedules size their tiles by the device's caches and the element size:
    # the default's call does no more host work than before.
    opt_in = schedule != "loop"
    launch = _forward_launch(
        schedule,
        _device_caches(logits.device) if opt_in else None,
        logits.element_size() if opt_in else 0,
        logits.shape,
        logits.stride(),
        target.stride(),
        gl.stride(),
        gt.stride(),
        dtype,
        options,
        z_loss,
        weight is not None,
        with_stats,
        grad_logits is not None,
        grad_target is not None,
    )
    if launch.grid is None:
        return outputs
    weight = unit_stride_class_weight(weight)
    # .run(grid=...), not [grid](...): the same entry without the proxy lambda, which copies
    # the arguments once more. The pointers in _FORWARD_POINTERS' order, then the cached rest.
    ce_forward_kernel.run(
        logits,
        target,
        weight if weight is not None else logits,  # class_weight_ptr
        loss,
        lse,
        saved,
        # Absent operands and outputs: any buffer of their dtype; the constexpr flags keep them
        # unread and unwritten.
        entropy if with_stats else loss,  # entropy_ptr
        argmax if with_stats else saved,  # argmax_ptr
        grad_scale if grad_scale is not None else loss,  # grad_scale_ptr
        gl,  # grad_logits_ptr
        gt,  # grad_target_ptr
        *launch.arguments,
        grid=launch.grid,
        warmup=False,
        num_warps=launch.num_warps,
    )
    return outputs


# A launch's arguments other than its tensors depend only on the operands' shapes, strides
# and dtypes and on the options: computed once per such set and reused. A training run sees
# a handful of sets.
_LAUNCH_CACHE_SIZE = 256

_FORWARD_POINTERS = (
    "logits_ptr",
    "target_ptr",
    "class_weight_ptr",
    "loss_ptr",
    "lse_ptr",
    "saved_ptr",
    "entropy_ptr",
    "argmax_ptr",
    "grad_scale_ptr",
    "grad_logits_ptr",
    "grad_target_ptr",
)
_BACKWARD_POINTERS = (
    "logits_ptr",
    "target_ptr",
    "class_weight_ptr",
    "saved_ptr",
    "grad_loss_ptr",
    "grad_lse_ptr",
    "upstream_ptr",
    "grad_logits_ptr",
    "grad_target_ptr",
)


def _scalar_tile(
    schedule: str,
    caches: tuple[int, int] | None,
    element_size: int,
    n_rows: int,
    n_classes: int,
) -> tuple[int, int, int, bool, bool]:
    """``(BLOCK_R, BLOCK_C, num_warps, ROW_ON_CHIP, REVERSE_SECOND_READ)`` of a scalar-loss
    forward under ``schedule`` (see ``SCALAR_SCHEDULES``; ``caches``: the device's
    ``(multiprocessors, L2 bytes)``)."""
    if schedule not in SCALAR_SCHEDULES:
        raise ValueError(f"scalar_schedule must be one of {SCALAR_SCHEDULES}, got {schedule!r}")
    if schedule == "row_on_chip" and n_classes <= ROW_ON_CHIP_MAX_C:
        # The whole row in one block, several short rows per program as tile() gives them;
        # 32 values a thread (tile()'s load) up to 32 warps at 2^15 classes, where the sm_90
        # cubin spills 88-128 B a thread (bench/ce_schedule_resources.py): measure before use.
        block_c = next_power_of_2(max(n_classes, 1))
        block_r = tile(n_rows, n_classes, max_block_c=block_c)[0]
        num_warps = min(32, max(4, block_r * block_c // 1024))
        return block_r, block_c, num_warps, True, False
    if schedule == "loop":
        return (*tile(n_rows, n_classes), False, False)
    block_c = min(next_power_of_2(max(n_classes, 1)), L2_BLOCK_C)
    # One row per program: the in-flight set is a row per resident program. Resident programs
    # per SM whose rows fill half the L2, as a power-of-two warp count (at most 32). At 2^14-wide
    # blocks the sm_90 cubin takes 43-76 registers a thread (bench/ce_schedule_resources.py),
    # so 16 or 32 warps leave one program per SM.
    multiprocessors, l2_bytes = caches
    resident = (l2_bytes // 2) // (multiprocessors * max(n_classes * element_size, 1))
    warps = _WARPS_PER_SM // max(1, min(resident, 16))
    num_warps = max(tile(1, block_c)[2], min(32, 1 << (warps.bit_length() - 1)))
    return 1, block_c, num_warps, False, n_classes > block_c


@functools.lru_cache(maxsize=_LAUNCH_CACHE_SIZE)
def _forward_launch(
    schedule: str,
    caches: tuple[int, int] | None,
    element_size: int,
    shape: torch.Size,
    logits_strides: tuple[int, ...],
    target_strides: tuple[int, ...],
    grad_strides: tuple[int, ...],
    grad_target_strides: tuple[int, ...],
    dtype: torch.dtype,
    options: CEOptions,
    z_loss: float,
    has_weight: bool,
    with_stats: bool,
    logits_grad: bool,
    target_grad: bool,
) -> Launch:
    """The cached part of :func:`forward`'s launch (``schedule``: the scalar-loss forward's,
    "loop" for a forward without gradients); no grid when there is no row."""
    n_outer, n_classes, n_inner = shape
    n_rows = n_outer * n_inner
    if n_rows == 0:
        return Launch(None, 0, ())
    block_r, block_c, num_warps, row_on_chip, reverse = _scalar_tile(
        schedule, caches, element_size, n_rows, n_classes
    )
    named = {
        "n_rows": n_rows,
        "n_classes": n_classes,
        "n_inner": n_inner,
        "saved_stride": n_rows,  # forward_outputs' saved: contiguous (3, n_rows)
        **_strides(logits_strides, target_strides, grad_strides, grad_target_strides),
        **option_args(options),
        **_z_loss_args(z_loss),
        "HAS_WEIGHT": has_weight,
        "PROB_TARGET": len(target_strides) == 3,
        "WITH_STATS": with_stats,
        "LOGITS_GRAD": logits_grad,
        "TARGET_GRAD": target_grad,
        "ROW_ON_CHIP": row_on_chip,
        "REVERSE_SECOND_READ": reverse,
        "ACC_DTYPE": tl_dtype(dtype),
        "BLOCK_R": block_r,
        "BLOCK_C": block_c,
    }
    return Launch(
        (cdiv(n_rows, block_r),),
        num_warps,
        launch_arguments(ce_forward_kernel, _FORWARD_POINTERS, named),
    )


@functools.lru_cache(maxsize=16)
def _z_loss_args(z_loss: float) -> dict:
    hi, lo = _split_fp64(z_loss)
    return {"z_loss_hi": hi, "z_loss_lo": lo, "HAS_Z_LOSS": z_loss > 0.0}


def backward(
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor | None,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    saved: torch.Tensor,
    options: CEOptions,
    grad_logits: torch.Tensor | None,
    grad_target: torch.Tensor | None,
    *,
    z_loss: float = 0.0,
    upstream: torch.Tensor | None = None,
) -> None:
    """Write ``dlogits`` into ``grad_logits`` (which may be ``logits`` itself) and, for
    probability targets, ``dtarget`` into ``grad_target`` when it is given; ``saved`` is the
    forward's ``(3, n_rows)`` (unit stride along the rows); ``grad_loss`` is per row, any
    stride, or 0-d (one value for every row).

    The scalar-loss backward's extras (Triton only): ``z_loss`` adds the z-loss term's
    gradient per unit of ``grad_loss``; with ``upstream`` (0-d) the buffers already hold the
    gradient for ``grad_loss`` (the forward wrote it), and the kernel, reading ``upstream`` on
    the device, leaves them untouched when it is 1 and rewrites them for ``grad_loss *
    upstream`` otherwise."""
    # An absent gradient output gets another buffer; its constexpr flag keeps it unwritten.
    gl = grad_logits if grad_logits is not None else logits
    gt = grad_target if grad_target is not None else gl
    launch = _backward_launch(
        logits.shape,
        logits.stride(),
        target.stride(),
        gl.stride(),
        gt.stride(),
        saved.stride(0),
        saved.dtype,
        grad_loss.stride(0) if grad_loss.dim() else 0,
        grad_lse.stride(0) if grad_lse is not None else None,
        options,
        z_loss,
        weight is not None,
        upstream is not None,
        grad_logits is not None,
        grad_target is not None,
        parallel_slots(logits),
    )
    if launch.grid is None:
        return
    weight = unit_stride_class_weight(weight)
    # The pointers in _BACKWARD_POINTERS' order, then the cached rest (see forward).
    ce_backward_kernel.run(
        logits,
        target,
        weight if weight is not None else logits,  # class_weight_ptr
        saved,
        grad_loss,
        grad_lse if grad_lse is not None else saved,  # grad_lse_ptr
        upstream if upstream is not None else saved,  # upstream_ptr
        gl,  # grad_logits_ptr
        gt,  # grad_target_ptr
        *launch.arguments,
        grid=launch.grid,
        warmup=False,
        num_warps=launch.num_warps,
    )


@functools.lru_cache(maxsize=_LAUNCH_CACHE_SIZE)
def _backward_launch(
    shape: torch.Size,
    logits_strides: tuple[int, ...],
    target_strides: tuple[int, ...],
    grad_strides: tuple[int, ...],
    grad_target_strides: tuple[int, ...],
    saved_stride: int,
    dtype: torch.dtype,
    grad_loss_stride: int,
    grad_lse_stride: int | None,
    options: CEOptions,
    z_loss: float,
    has_weight: bool,
    skip_unit_upstream: bool,
    logits_grad: bool,
    target_grad: bool,
    slots: int,
) -> Launch:
    """The cached part of :func:`backward`'s launch (``grad_lse_stride`` None: no
    ``grad_lse``); no grid when there is nothing to write."""
    n_outer, n_classes, n_inner = shape
    n_rows = n_outer * n_inner
    if n_rows == 0 or n_classes == 0:
        return Launch(None, 0, ())
    block_r, block_c, num_warps = tile(n_rows, n_classes)
    row_programs = cdiv(n_rows, block_r)
    # Split long rows over several programs when there are too few rows to fill the device.
    col_blocks = cdiv(n_classes, block_c)
    splits = max(1, min(col_blocks, slots // row_programs))
    cols_per_program = cdiv(col_blocks, splits) * block_c
    splits = cdiv(n_classes, cols_per_program)
    named = {
        "n_rows": n_rows,
        "n_classes": n_classes,
        "n_inner": n_inner,
        "cols_per_program": cols_per_program,
        "saved_stride": saved_stride,
        "grad_loss_stride": grad_loss_stride,
        "grad_lse_stride": grad_lse_stride if grad_lse_stride is not None else 0,
        **_strides(logits_strides, target_strides, grad_strides, grad_target_strides),
        **option_args(options),
        **_z_loss_args(z_loss),
        "HAS_WEIGHT": has_weight,
        "PROB_TARGET": len(target_strides) == 3,
        "HAS_GRAD_LSE": grad_lse_stride is not None,
        "SKIP_UNIT_UPSTREAM": skip_unit_upstream,
        "LOGITS_GRAD": logits_grad,
        "TARGET_GRAD": target_grad,
        "ACC_DTYPE": tl_dtype(dtype),
        "BLOCK_R": block_r,
        "BLOCK_C": block_c,
    }
    return Launch(
        (row_programs, splits),
        num_warps,
        launch_arguments(ce_backward_kernel, _BACKWARD_POINTERS, named),
    )
