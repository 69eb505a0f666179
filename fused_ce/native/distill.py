"""Distillation losses through the native kernels (csrc/distill.h): the functions of
``fused_ce.torch_impl.distill``, same arguments and outputs."""

from __future__ import annotations

import torch

from .._common import accumulation_dtype
from . import ops


def forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    valid: torch.Tensor | None,
    temperature: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(loss (N,), saved (6, N))`` in the accumulation dtype, from one pass per row."""
    n_rows = student.shape[0]
    dtype = accumulation_dtype(student.dtype, teacher.dtype)
    loss = torch.empty(n_rows, dtype=dtype, device=student.device)
    saved = torch.empty(6, n_rows, dtype=dtype, device=student.device)
    ops().distill_forward(student, teacher, valid, temperature, beta, loss, saved)
    return loss, saved


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
    ``grad_teacher`` (each when given; ``grad_student`` may be ``student`` itself)."""
    ops().distill_backward(
        grad_loss.to(saved.dtype),
        student,
        teacher,
        valid,
        saved,
        temperature,
        beta,
        grad_student,
        grad_teacher,
    )
