"""``fused_ce::distill_forward`` / ``fused_ce::distill_backward``: the distillation kernel pair
(KL divergence and generalized JSD between student and teacher logits) as PyTorch custom ops
with fake kernels and autograd.

The ops see ``(N, V)`` logits and return per-row losses in the accumulation dtype with the
saved per-row statistics ``(6, N)``; masking is the ``valid`` rows, and the reduction stays in
plain torch outside (``fused_ce.distill``). ``beta == 0`` is ``KL(teacher || student)``,
``0 < beta < 1`` the generalized JSD; the public functions swap the operands for the reverse
KL and ``beta == 1``. Both logits receive gradients, each only when it requires them.

Eager calls go through an ``autograd.Function`` with the same bodies (see ``_autograd``).
"""

from __future__ import annotations

import torch

from .._common import accumulation_dtype
from .._impl import implementation
from . import _composite
from ._autograd import dispatch, double_backward_message, eager_function, forbid_double_backward

_DOUBLE_BACKWARD = ("kl_div_with_logits / jsd_with_logits", "torch.nn.functional.kl_div")


def _forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    valid: torch.Tensor | None,
    temperature: float,
    beta: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(loss (N,), saved (6, N))`` of ``(N, V)`` student and teacher logits."""
    return implementation("distill", backend).forward(student, teacher, valid, temperature, beta)


distill_forward = torch.library.custom_op("fused_ce::distill_forward", _forward, mutates_args=())


@distill_forward.register_fake
def _(student, teacher, valid, temperature, beta, backend):
    n_rows = student.shape[0]
    dtype = accumulation_dtype(student.dtype, teacher.dtype)
    return student.new_empty(n_rows, dtype=dtype), student.new_empty((6, n_rows), dtype=dtype)


def _backward_op(
    grad_loss: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    valid: torch.Tensor | None,
    saved: torch.Tensor,
    temperature: float,
    beta: float,
    backend: str,
    student_grad: bool,
    teacher_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dstudent, dteacher)`` for the per-row upstream ``grad_loss``; each is empty unless
    its flag asks for it."""
    grad_student = torch.empty_like(student) if student_grad else None
    grad_teacher = torch.empty_like(teacher) if teacher_grad else None
    implementation("distill", backend).backward(
        grad_loss.to(saved.dtype).contiguous(),
        student,
        teacher,
        valid,
        saved,
        temperature,
        beta,
        grad_student,
        grad_teacher,
    )
    return (
        grad_student if grad_student is not None else student.new_empty(0),
        grad_teacher if grad_teacher is not None else teacher.new_empty(0),
    )


distill_backward = torch.library.custom_op(
    "fused_ce::distill_backward", _backward_op, mutates_args=()
)


@distill_backward.register_fake
def _(grad_loss, student, teacher, valid, saved, temperature, beta, backend, sg, tg):
    return (
        torch.empty_like(student) if sg else student.new_empty(0),
        torch.empty_like(teacher) if tg else teacher.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    student, teacher, valid, temperature, beta, backend = inputs
    _, saved = output
    ctx.save_for_backward(student, teacher, valid, saved)
    ctx.mark_non_differentiable(saved)
    ctx.set_materialize_grads(False)
    ctx.options = (temperature, beta, backend)


def _backward(ctx, grad_loss, _grad_saved):
    student, teacher, valid, saved = ctx.saved_tensors
    student_grad, teacher_grad = ctx.needs_input_grad[:2]
    if grad_loss is None or not (student_grad or teacher_grad):
        return (None,) * 6
    run = _backward_op if getattr(ctx, "eager", False) else distill_backward
    grad_student, grad_teacher = run(
        grad_loss, student, teacher, valid, saved, *ctx.options, student_grad, teacher_grad
    )
    return (
        grad_student if student_grad else None,
        grad_teacher if teacher_grad else None,
        None,
        None,
        None,
        None,
    )


distill_forward.register_autograd(_backward, setup_context=_setup_context)
forbid_double_backward(distill_backward, *_DOUBLE_BACKWARD)

distill_forward_call = dispatch(
    distill_forward,
    eager_function(
        "DistillFunction",
        _forward,
        _setup_context,
        _backward,
        double_backward_message(*_DOUBLE_BACKWARD),
    ),
    _composite.distill_forward,
    # The eager Function has no jvp: forward-mode AD runs the composite too.
    composite_for_forward_ad=True,
)
