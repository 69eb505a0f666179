"""``fused_ce::ce_forward`` / ``fused_ce::ce_backward``: the softmax + CE kernel pair as
PyTorch custom ops with fake (meta) kernels and autograd.

The ops see logits as ``(n_outer, C, n_inner)`` and return per-row statistics in the
accumulation dtype; the reduction (sum, divide by the total weight) stays in plain torch
outside, in ``fused_ce.functional``.
"""

from __future__ import annotations

import torch

from .._common import accumulation_dtype
from ..torch_impl import cross_entropy as torch_impl
from ._autograd import forbid_double_backward


def _impl(use_triton: bool):
    if use_triton:
        from ..launch import cross_entropy as triton_impl

        return triton_impl
    return torch_impl


@torch.library.custom_op("fused_ce::ce_forward", mutates_args=())
def ce_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``(loss, lse, U)`` of ``(n_outer, C, n_inner)`` logits.

    ``target`` is ``(n_outer, n_inner)`` class indices or ``(n_outer, C, n_inner)``
    probabilities; ``U = sum_c u_c`` is saved for the backward.
    """
    return _impl(use_triton).forward(logits, target, weight, ignore_index, label_smoothing)


@ce_forward.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, use_triton):
    n_rows = logits.shape[0] * logits.shape[2]
    dtype = accumulation_dtype(logits.dtype, target.dtype)
    return tuple(logits.new_empty(n_rows, dtype=dtype) for _ in range(3))


@torch.library.custom_op("fused_ce::ce_backward", mutates_args=())
def ce_backward(
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor | None,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    lse: torch.Tensor,
    linear_sum: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    use_triton: bool,
    target_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dlogits, dtarget)``; ``dtarget`` is empty unless ``target_grad``."""
    grad_logits = torch.empty_like(logits)
    grad_target = torch.empty_like(target) if target_grad else target.new_empty(0)
    _impl(use_triton).backward(
        grad_loss,
        grad_lse,
        logits,
        target,
        weight,
        lse,
        linear_sum,
        ignore_index,
        label_smoothing,
        grad_logits,
        grad_target if target_grad else None,
    )
    return grad_logits, grad_target


@ce_backward.register_fake
def _(
    grad_loss,
    grad_lse,
    logits,
    target,
    weight,
    lse,
    linear_sum,
    ignore_index,
    label_smoothing,
    use_triton,
    target_grad,
):
    grad_target = torch.empty_like(target) if target_grad else target.new_empty(0)
    return torch.empty_like(logits), grad_target


def _setup_context(ctx, inputs, output):
    logits, target, weight, ignore_index, label_smoothing, use_triton = inputs
    _, lse, linear_sum = output
    ctx.save_for_backward(logits, target, weight, lse, linear_sum)
    # Unused outputs (lse, U) then arrive as None, not as zero tensors to read.
    ctx.set_materialize_grads(False)
    ctx.ignore_index = ignore_index
    ctx.label_smoothing = label_smoothing
    ctx.use_triton = use_triton


def _backward(ctx, grad_loss, grad_lse, grad_linear_sum):
    logits, target, weight, lse, linear_sum = ctx.saved_tensors
    target_grad = target.dim() == 3 and ctx.needs_input_grad[1]
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    grad_logits, grad_target = ce_backward(
        grad_loss,
        grad_lse,
        logits,
        target,
        weight,
        lse,
        linear_sum,
        ctx.ignore_index,
        ctx.label_smoothing,
        ctx.use_triton,
        target_grad,
    )
    return grad_logits, grad_target if target_grad else None, None, None, None, None


ce_forward.register_autograd(_backward, setup_context=_setup_context)


forbid_double_backward(ce_backward, "softmax_cross_entropy", "torch.nn.functional.cross_entropy")
