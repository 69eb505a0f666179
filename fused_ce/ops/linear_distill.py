"""The fused linear distillation heads as custom ops (``_chunked_distill`` does the work):

* ``fused_ce::linear_distill_scalar``: ``grad_scale * sum_n loss_n`` (0-d; ``grad_scale`` 0-d,
  ``1 / divisor`` for a mean) with the gradients of the operands that want one made in the
  same sweep (the logits of each chunk are made once); the backward multiplies them by the
  upstream gradient. The reductions other than ``'none'``.
* ``fused_ce::linear_distill_rows`` / ``fused_ce::linear_distill_rows_backward``: the per-row
  loss, and the backward that recomputes each chunk's logits for a per-row upstream gradient
  (``reduction='none'``).

The operands are the student's and the teacher's ``(hidden, weight, bias)`` (six tensors, the
biases optional), the labels and the valid rows (optional), and the options flat (schemas take
no tuples). Double backward raises.
"""

from __future__ import annotations

import torch
from torch._C import _functions

from .._chunked import LinearGrads
from .._chunked_distill import DistillSpec, Head, linear_distill
from .._common import accumulation_dtype
from ._autograd import double_backward_message, forbid_double_backward

_DOUBLE_BACKWARD = ("linear_kl_div / linear_jsd", "torch.nn.functional.kl_div")
_N_OPERANDS = 6  # student hidden, weight, bias; teacher hidden, weight, bias


def _heads(operands) -> tuple[Head, Head]:
    return Head(*operands[:3]), Head(*operands[3:])


def _grads(heads: tuple[Head, Head], flags) -> tuple[LinearGrads | None, LinearGrads | None]:
    grads = []
    for head, (hidden_grad, weight_grad, bias_grad) in zip(
        heads, (flags[:3], flags[3:]), strict=True
    ):
        wanted = hidden_grad or weight_grad or bias_grad
        grads.append(
            LinearGrads(*head, hidden_grad, weight_grad, bias_grad and head.bias is not None)
            if wanted
            else None
        )
    return tuple(grads)


def _results(heads, grads, flags) -> list[torch.Tensor]:
    """The six gradients in operand order, empty where not wanted."""
    out = []
    for head, head_grads, head_flags in zip(heads, grads, (flags[:3], flags[3:]), strict=True):
        values = head_grads.results() if head_grads is not None else (None, None, None)
        for operand, value, flag in zip(head, values, head_flags, strict=True):
            like = operand if operand is not None else head.weight
            out.append(value if flag and value is not None else like.new_empty(0))
    return out


def _fake_results(operands, flags) -> list[torch.Tensor]:
    out = []
    for index, (operand, flag) in enumerate(zip(operands, flags, strict=True)):
        like = operand if operand is not None else operands[index - 1]  # a bias: its weight
        out.append(torch.empty_like(operand) if flag and operand is not None else like.new_empty(0))
    return out


def _scalar(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    target: torch.Tensor | None,
    valid: torch.Tensor | None,
    grad_scale: torch.Tensor,
    temperature: float,
    beta: float,
    swap: bool,
    ce_weight: float,
    ignore_index: int,
    rows_per_chunk: int,
    backend: str,
    flags: list[bool],
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """``(loss, d student_hidden, d student_weight, d student_bias, d teacher_hidden,
    d teacher_weight, d teacher_bias)``; each gradient empty unless its flag asks."""
    operands = (
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
    )
    heads = _heads(operands)
    grads = _grads(heads, flags)
    spec = DistillSpec(temperature, beta, swap, ce_weight, ignore_index)
    n_rows = student_hidden.shape[0]
    loss = linear_distill(
        *heads,
        target,
        valid,
        spec,
        rows_per_chunk,
        backend,
        grad_rows=grad_scale.expand(n_rows) if any(flags) else None,
        student_grads=grads[0],
        teacher_grads=grads[1],
    )
    return (loss.sum() * grad_scale.to(loss.dtype), *_results(heads, grads, flags))


linear_distill_scalar = torch.library.custom_op(
    "fused_ce::linear_distill_scalar", _scalar, mutates_args=()
)


@linear_distill_scalar.register_fake
def _(sh, sw, sb, th, tw, tb, target, valid, grad_scale, *options_and_flags):
    flags = options_and_flags[-1]
    dtype = accumulation_dtype(sh.dtype, th.dtype)
    return (sh.new_empty((), dtype=dtype), *_fake_results((sh, sw, sb, th, tw, tb), flags))


def _scalar_setup(ctx, inputs, output):
    _, *grads = output
    ctx.operand_sizes = [t.numel() if t is not None else 0 for t in inputs[:_N_OPERANDS]]
    ctx.mark_non_differentiable(*grads)
    ctx.save_for_backward(*grads)
    ctx.set_materialize_grads(False)


def _scalar_backward(ctx, grad_loss, *unused):
    if grad_loss is None:
        return (None,) * 17
    wanted = ctx.needs_input_grad[:_N_OPERANDS]
    for index, (saved, w) in enumerate(zip(ctx.saved_tensors, wanted, strict=True)):
        if w and saved.numel() == 0 and ctx.operand_sizes[index] != 0:
            raise RuntimeError(
                f"fused_ce::linear_distill_scalar: operand {index} needs a gradient its flags "
                "did not ask the forward to make (the flags must match requires_grad)"
            )
    with torch.no_grad():
        grads = [
            saved * grad_loss.to(saved.dtype) if w else None
            for saved, w in zip(ctx.saved_tensors, wanted, strict=True)
        ]
    if torch.is_grad_enabled():
        # create_graph=True: the saved gradients are constants here, so a graph through them
        # would give wrong second derivatives; hand them out through a node that raises when
        # it is differentiated instead.
        message = double_backward_message(*_DOUBLE_BACKWARD).encode()
        present = [g for g in grads if g is not None]
        linked = _functions.DelayedError(message, len(present))(
            *[g.requires_grad_() for g in present]
        )
        linked = iter((linked,) if isinstance(linked, torch.Tensor) else linked)
        grads = [next(linked) if g is not None else None for g in grads]
    return (*grads, *(None,) * 11)


linear_distill_scalar.register_autograd(_scalar_backward, setup_context=_scalar_setup)


def _rows(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    target: torch.Tensor | None,
    valid: torch.Tensor | None,
    temperature: float,
    beta: float,
    swap: bool,
    ce_weight: float,
    ignore_index: int,
    rows_per_chunk: int,
    backend: str,
) -> torch.Tensor:
    """The per-row loss ``(N,)`` in the accumulation dtype."""
    heads = _heads(
        (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)
    )
    spec = DistillSpec(temperature, beta, swap, ce_weight, ignore_index)
    return linear_distill(*heads, target, valid, spec, rows_per_chunk, backend)


linear_distill_rows = torch.library.custom_op(
    "fused_ce::linear_distill_rows", _rows, mutates_args=()
)


@linear_distill_rows.register_fake
def _(sh, sw, sb, th, tw, tb, *rest):
    return sh.new_empty(sh.shape[0], dtype=accumulation_dtype(sh.dtype, th.dtype))


def _rows_backward_op(
    grad_loss: torch.Tensor,
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    target: torch.Tensor | None,
    valid: torch.Tensor | None,
    temperature: float,
    beta: float,
    swap: bool,
    ce_weight: float,
    ignore_index: int,
    rows_per_chunk: int,
    backend: str,
    flags: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The six gradients of ``sum_n grad_loss_n * loss_n`` (each empty unless wanted),
    recomputing every chunk's logits."""
    operands = (
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
    )
    heads = _heads(operands)
    grads = _grads(heads, flags)
    spec = DistillSpec(temperature, beta, swap, ce_weight, ignore_index)
    linear_distill(
        *heads,
        target,
        valid,
        spec,
        rows_per_chunk,
        backend,
        grad_rows=grad_loss,
        student_grads=grads[0],
        teacher_grads=grads[1],
    )
    return tuple(_results(heads, grads, flags))


linear_distill_rows_backward = torch.library.custom_op(
    "fused_ce::linear_distill_rows_backward", _rows_backward_op, mutates_args=()
)


@linear_distill_rows_backward.register_fake
def _(grad_loss, sh, sw, sb, th, tw, tb, *options_and_flags):
    return tuple(_fake_results((sh, sw, sb, th, tw, tb), options_and_flags[-1]))


def _rows_setup(ctx, inputs, output):
    operands, rest = inputs[:_N_OPERANDS], inputs[_N_OPERANDS:]
    target, valid = rest[:2]
    ctx.save_for_backward(*operands, target, valid)
    ctx.options = rest[2:]


def _rows_backward(ctx, grad_loss):
    *operands, target, valid = ctx.saved_tensors
    flags = [
        bool(w) and t is not None
        for w, t in zip(ctx.needs_input_grad[:_N_OPERANDS], operands, strict=True)
    ]
    grads = linear_distill_rows_backward(grad_loss, *operands, target, valid, *ctx.options, flags)
    return (*(g if f else None for g, f in zip(grads, flags, strict=True)), *(None,) * 9)


linear_distill_rows.register_autograd(_rows_backward, setup_context=_rows_setup)
forbid_double_backward(linear_distill_rows_backward, *_DOUBLE_BACKWARD)
