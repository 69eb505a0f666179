"""Launch the distillation kernels (kernels/distill.py) on ``(N, V)`` student and teacher
logits: the functions of ``fused_ce.torch_impl.distill``, same arguments and outputs."""

from __future__ import annotations

import functools

import torch

from .._common import accumulation_dtype
from ..kernels.distill import distill_backward_kernel, distill_forward_kernel
from ._common import Launch, cdiv, launch_arguments, tile, tl_dtype
from .cross_entropy import _split_fp64

_FORWARD_POINTERS = ("student_ptr", "teacher_ptr", "valid_ptr", "loss_ptr", "saved_ptr")
_BACKWARD_POINTERS = (
    "student_ptr",
    "teacher_ptr",
    "valid_ptr",
    "saved_ptr",
    "grad_loss_ptr",
    "grad_student_ptr",
    "grad_teacher_ptr",
)


@functools.lru_cache(maxsize=16)
def _option_args(temperature: float, beta: float) -> dict:
    temperature_hi, temperature_lo = _split_fp64(temperature)
    beta_hi, beta_lo = _split_fp64(beta)
    return {
        "temperature_hi": temperature_hi,
        "temperature_lo": temperature_lo,
        "beta_hi": beta_hi,
        "beta_lo": beta_lo,
        "JSD": beta > 0.0,
    }


def forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    valid: torch.Tensor | None,
    temperature: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(loss (N,), saved (6, N))`` in the accumulation dtype, from one launch."""
    n_rows = student.shape[0]
    dtype = accumulation_dtype(student.dtype, teacher.dtype)
    loss = torch.empty(n_rows, dtype=dtype, device=student.device)
    saved = torch.empty(6, n_rows, dtype=dtype, device=student.device)
    launch = _forward_launch(
        student.shape,
        student.stride(),
        teacher.stride(),
        dtype,
        temperature,
        beta,
        valid is not None,
    )
    if launch.grid is not None:
        distill_forward_kernel.run(
            student,
            teacher,
            valid if valid is not None else loss,  # valid_ptr: unread without HAS_VALID
            loss,
            saved,
            *launch.arguments,
            grid=launch.grid,
            warmup=False,
            num_warps=launch.num_warps,
        )
    return loss, saved


@functools.lru_cache(maxsize=64)
def _forward_launch(shape, student_strides, teacher_strides, dtype, temperature, beta, has_valid):
    n_rows, n_classes = shape
    if n_rows == 0:
        return Launch(None, 0, ())
    block_r, block_c, num_warps = tile(n_rows, n_classes)
    named = {
        "n_rows": n_rows,
        "n_classes": n_classes,
        "saved_stride": n_rows,
        "student_row_stride": student_strides[0],
        "student_col_stride": student_strides[1],
        "teacher_row_stride": teacher_strides[0],
        "teacher_col_stride": teacher_strides[1],
        **_option_args(temperature, beta),
        "HAS_VALID": has_valid,
        "ACC_DTYPE": tl_dtype(dtype),
        "BLOCK_R": block_r,
        "BLOCK_C": block_c,
    }
    return Launch(
        (cdiv(n_rows, block_r),),
        num_warps,
        launch_arguments(distill_forward_kernel, _FORWARD_POINTERS, named),
    )


def backward(
    grad_loss: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    valid: torch.Tensor | None,
    saved: torch.Tensor,
    temperature: float,
    beta: float,
    grad_student: torch.Tensor | None,
    grad_teacher: torch.Tensor | None,
) -> None:
    """Write the gradients of ``sum_n grad_loss_n * loss_n`` into ``grad_student`` and
    ``grad_teacher`` (each when given; either may be its logits themselves)."""
    # An absent gradient output gets another buffer; its constexpr flag keeps it unwritten.
    gs = grad_student if grad_student is not None else student
    gt = grad_teacher if grad_teacher is not None else teacher
    launch = _backward_launch(
        student.shape,
        student.stride(),
        teacher.stride(),
        gs.stride(),
        gt.stride(),
        saved.stride(0),
        grad_loss.stride(0),
        saved.dtype,
        temperature,
        beta,
        valid is not None,
        grad_student is not None,
        grad_teacher is not None,
    )
    if launch.grid is None:
        return
    distill_backward_kernel.run(
        student,
        teacher,
        valid if valid is not None else saved,  # valid_ptr: unread without HAS_VALID
        saved,
        grad_loss,
        gs,
        gt,
        *launch.arguments,
        grid=launch.grid,
        warmup=False,
        num_warps=launch.num_warps,
    )


@functools.lru_cache(maxsize=64)
def _backward_launch(
    shape,
    student_strides,
    teacher_strides,
    grad_student_strides,
    grad_teacher_strides,
    saved_stride,
    grad_loss_stride,
    dtype,
    temperature,
    beta,
    has_valid,
    student_grad,
    teacher_grad,
):
    n_rows, n_classes = shape
    if n_rows == 0 or not (student_grad or teacher_grad):
        return Launch(None, 0, ())
    block_r, block_c, num_warps = tile(n_rows, n_classes)
    named = {
        "n_rows": n_rows,
        "n_classes": n_classes,
        "saved_stride": saved_stride,
        "grad_loss_stride": grad_loss_stride,
        "student_row_stride": student_strides[0],
        "student_col_stride": student_strides[1],
        "teacher_row_stride": teacher_strides[0],
        "teacher_col_stride": teacher_strides[1],
        "grad_student_row_stride": grad_student_strides[0],
        "grad_student_col_stride": grad_student_strides[1],
        "grad_teacher_row_stride": grad_teacher_strides[0],
        "grad_teacher_col_stride": grad_teacher_strides[1],
        **_option_args(temperature, beta),
        "HAS_VALID": has_valid,
        "STUDENT_GRAD": student_grad,
        "TEACHER_GRAD": teacher_grad,
        "ACC_DTYPE": tl_dtype(dtype),
        "BLOCK_R": block_r,
        "BLOCK_C": block_c,
    }
    return Launch(
        (cdiv(n_rows, block_r),),
        num_warps,
        launch_arguments(distill_backward_kernel, _BACKWARD_POINTERS, named),
    )
