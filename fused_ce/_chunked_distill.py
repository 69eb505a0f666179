"""The chunked driver of the fused linear distillation heads (``linear_kl_div``, ``linear_jsd``),
shared by every backend, on the pieces of ``_chunked`` (chunk logits GEMM, gradient
accumulation in fp32).

Per chunk of rows, the student's and the teacher's logits ``z = h @ W^T + b`` come from one
GEMM each into two reused buffers (the heads may differ in hidden size; only the vocabulary is
shared). The backend's logits-form distillation kernels (``fused_ce.<backend>.distill``) turn
them into per-row losses and, when gradients are wanted, into ``dL/dz`` in place (both buffers
at once: every kernel reads an element before writing it). With a hard-label term
(``ce_weight`` alpha > 0) the backend's CE kernels add ``alpha * CE`` of the student's logits
at temperature 1, its gradient made into a third buffer before the divergence's overwrites the
logits. Then ``dH = G @ W`` for the chunk's rows and ``dW += G^T @ h``, ``db += sum G``
accumulated in fp32 (``_chunked.LinearGrads``). No ``N x V`` tensor exists.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._chunked import LinearGrads, chunk_logits, chunk_rows, row_chunks
from ._common import CEOptions, accumulation_dtype
from ._impl import implementation


class Head(NamedTuple):
    """One linear head: ``(N, D)`` hidden states, ``(V, D)`` weight, optional ``(V,)`` bias."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None


class DistillSpec(NamedTuple):
    """What is computed: ``beta`` 0 is KL(teacher || student), else the JSD; ``swap``
    exchanges the roles (reverse KL, JSD at beta 1); ``ce_weight`` alpha mixes in the hard-label
    CE: ``alpha * CE + (1 - alpha) * divergence`` per row."""

    temperature: float
    beta: float
    swap: bool
    ce_weight: float
    ignore_index: int


def rows_per_chunk(chunk_size: int, student: Head, teacher: Head, backend: str) -> int:
    """Rows per chunk: ``chunk_size`` when positive, else half of linear CE's budget rule (two
    logits buffers live at once where linear CE has one)."""
    n_rows, n_classes = student.hidden.shape[0], student.weight.shape[0]
    rows = chunk_rows(chunk_size, n_rows, n_classes, student.hidden, backend=backend)
    return rows if chunk_size > 0 else max(1, rows // 2)


def linear_distill(
    student: Head,
    teacher: Head,
    target: torch.Tensor | None,
    valid: torch.Tensor | None,
    spec: DistillSpec,
    rows_per_chunk: int,
    backend: str,
    *,
    grad_rows: torch.Tensor | None = None,
    student_grads: LinearGrads | None = None,
    teacher_grads: LinearGrads | None = None,
) -> torch.Tensor:
    """The per-row loss ``(N,)`` (accumulation dtype; 0 on rows that are not ``valid``) and,
    with ``grad_rows`` ``(N,)``, the gradients of ``sum_n grad_rows_n * loss_n`` into the
    ``LinearGrads`` given (``None``: that head needs none)."""
    n_rows = student.hidden.shape[0]
    n_classes = student.weight.shape[0]
    dtype = accumulation_dtype(student.hidden.dtype, teacher.hidden.dtype)
    loss = torch.empty(n_rows, dtype=dtype, device=student.hidden.device)
    kernels = implementation("distill", backend)
    ce = implementation("cross_entropy", backend) if spec.ce_weight > 0.0 else None
    ce_options = CEOptions(ignore_index=spec.ignore_index)
    size = min(rows_per_chunk, n_rows)
    student_buffer = student.hidden.new_empty(size, n_classes)
    teacher_buffer = teacher.hidden.new_empty(size, n_classes)
    ce_buffer = student_buffer.new_empty(size, n_classes) if ce is not None else None
    want_student = student_grads is not None
    want_teacher = teacher_grads is not None
    for rows in row_chunks(n_rows, rows_per_chunk):
        z_student = chunk_logits(student_buffer, *student, rows)
        z_teacher = chunk_logits(teacher_buffer, *teacher, rows)
        chunk_valid = valid[rows] if valid is not None else None
        # The kernels' (student, teacher) slots: swapped for the reverse direction.
        first, second = (z_teacher, z_student) if spec.swap else (z_student, z_teacher)
        divergence, saved = kernels.forward(first, second, chunk_valid, spec.temperature, spec.beta)
        chunk_loss = divergence
        if ce is not None:
            # (rows, V, 1) logits and (rows, 1) labels: the CE kernels' layout.
            ce_logits = z_student.unsqueeze(-1)
            ce_target = target[rows].unsqueeze(-1)
            ce_loss, _, ce_saved, _, _ = ce.forward(ce_logits, ce_target, None, ce_options)
            chunk_loss = spec.ce_weight * ce_loss + (1.0 - spec.ce_weight) * divergence
        loss[rows] = chunk_loss
        if grad_rows is None or not (want_student or want_teacher):
            continue
        chunk_grad = grad_rows[rows].to(dtype)
        if ce is not None and want_student:
            ce.backward(
                spec.ce_weight * chunk_grad,
                None,
                ce_logits,
                ce_target,
                None,
                ce_saved,
                ce_options,
                ce_buffer[: rows.stop - rows.start].unsqueeze(-1),
                None,
            )
        wants = (want_teacher, want_student) if spec.swap else (want_student, want_teacher)
        kernels.backward(
            chunk_grad * (1.0 - spec.ce_weight) if ce is not None else chunk_grad,
            first,
            second,
            chunk_valid,
            saved,
            spec.temperature,
            spec.beta,
            first if wants[0] else None,  # in place: the logits become dL/dz
            second if wants[1] else None,
        )
        if want_student:
            if ce is not None:
                z_student += ce_buffer[: rows.stop - rows.start]
            student_grads.add(rows, z_student)
        if want_teacher:
            teacher_grads.add(rows, z_teacher)
    return loss
