"""Distillation losses between a student's and a teacher's logits in plain PyTorch, chunked over
rows (the math of kernels/distill.py; see docs/distillation.md).

Operands are ``(N, V)`` logits (any strides, any floating dtypes); a row is one distribution.
With ``x = student / T`` and ``y = teacher / T``, ``lq = log_softmax(x)`` (the student),
``lp = log_softmax(y)`` (the teacher), ``q = exp(lq)``, ``p = exp(lp)``, per row:

* ``beta == 0``: ``loss = KL(p || q) = sum_v p_v (lp_v - lq_v)``;
* ``0 < beta < 1``: ``m = beta p + (1 - beta) q``, ``c_p = KL(p || m)``, ``c_q = KL(q || m)``,
  ``loss = beta c_p + (1 - beta) c_q``.

(Reverse KL and ``beta == 1`` are these with student and teacher swapped, by the caller.) The
forward saves ``(m_x, log_s_x, m_y, log_s_y, c_q, c_p)`` per row (``m`` the row max, ``log_s =
log sum exp(x - m)``; ``c_p = loss`` and ``c_q = 0`` for the KL); the backward recomputes the
log-probabilities ``(x - m_x) - log_s_x`` from them (``x - m`` is exact near the max, so logits
of size 1e4 lose nothing to a rounded lse). Rows where ``valid`` is False get
loss 0 and gradient 0. Each chunk is upcast to the accumulation dtype (fp32, fp64 for fp64).
"""

from __future__ import annotations

import math

import torch

from .._common import accumulation_dtype
from . import CHUNK_ELEMENTS


def _row_chunks(n_rows: int, n_classes: int):
    step = max(1, CHUNK_ELEMENTS // max(n_classes, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _scaled(logits: torch.Tensor, rows: slice, dtype: torch.dtype, temperature: float):
    chunk = logits[rows].to(dtype)
    return chunk / temperature if temperature != 1.0 else chunk


def _max_and_log_sum(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, log sum exp(z - m))`` per row, keeping the dim."""
    m = z.amax(1, keepdim=True)
    return m, (z - m).exp_().sum(1, keepdim=True).log_()


def _weighted(prob: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``prob * value`` with 0 where ``prob`` is 0 (its log-probability may be -inf there)."""
    return torch.where(prob > 0.0, prob * value, 0.0)


def _log_mixture(lp: torch.Tensor, lq: torch.Tensor, beta: float) -> torch.Tensor:
    """``log(beta p + (1 - beta) q)`` from the log-probabilities, without underflow."""
    return torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))


def forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    valid: torch.Tensor | None,
    temperature: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(loss (N,), saved (6, N))`` in the accumulation dtype."""
    n_rows, n_classes = student.shape
    dtype = accumulation_dtype(student.dtype, teacher.dtype)
    loss = torch.empty(n_rows, dtype=dtype, device=student.device)
    saved = torch.empty(6, n_rows, dtype=dtype, device=student.device)
    for rows in _row_chunks(n_rows, n_classes):
        x = _scaled(student, rows, dtype, temperature)
        y = _scaled(teacher, rows, dtype, temperature)
        m_x, log_s_x = _max_and_log_sum(x)
        m_y, log_s_y = _max_and_log_sum(y)
        lq, lp = (x - m_x) - log_s_x, (y - m_y) - log_s_y
        p = lp.exp()
        if beta == 0.0:
            c_p = _weighted(p, lp - lq).sum(1)
            c_q = torch.zeros_like(c_p)
            row_loss = c_p
        else:
            lm = _log_mixture(lp, lq, beta)
            c_p = _weighted(p, lp - lm).sum(1)
            c_q = _weighted(lq.exp(), lq - lm).sum(1)
            row_loss = beta * c_p + (1.0 - beta) * c_q
        if valid is not None:
            row_loss = torch.where(valid[rows], row_loss, 0.0)
        loss[rows] = row_loss
        saved[:, rows] = torch.cat((m_x, log_s_x, m_y, log_s_y, c_q[:, None], c_p[:, None]), 1).t()
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
    ``grad_teacher`` (each when given; either may be its logits themselves)."""
    n_rows, n_classes = student.shape
    dtype = saved.dtype
    for rows in _row_chunks(n_rows, n_classes):
        x = _scaled(student, rows, dtype, temperature)
        y = _scaled(teacher, rows, dtype, temperature)
        m_x, log_s_x, m_y, log_s_y, c_q, c_p = saved[:, rows].unsqueeze(-1)
        lq, lp = (x - m_x) - log_s_x, (y - m_y) - log_s_y
        q, p = lq.exp(), lp.exp()
        g = (grad_loss[rows].to(dtype) / temperature).unsqueeze(1)
        keep = valid[rows].unsqueeze(1) if valid is not None else None
        if beta == 0.0:
            d_student = g * (q - p) if grad_student is not None else None
            d_teacher = g * _weighted(p, lp - lq - c_p) if grad_teacher is not None else None
        else:
            lm = _log_mixture(lp, lq, beta)
            d_student = (
                g * (1.0 - beta) * _weighted(q, lq - lm - c_q) if grad_student is not None else None
            )
            d_teacher = g * beta * _weighted(p, lp - lm - c_p) if grad_teacher is not None else None
        for out, value in ((grad_student, d_student), (grad_teacher, d_teacher)):
            if out is not None:
                if keep is not None:
                    value = torch.where(keep, value, 0.0)
                out[rows] = value
