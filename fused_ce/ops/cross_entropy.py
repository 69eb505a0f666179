"""``fused_ce::ce_forward`` / ``fused_ce::ce_backward``: the softmax + CE kernel pair as
PyTorch custom ops with fake (meta) kernels and autograd, and ``fused_ce::ce_backward_``, the
in-place backward that overwrites the logits with their gradient (``inplace_backward=True``).

The ops see logits as ``(n_outer, C, n_inner)`` and return per-row statistics in the
accumulation dtype; the reduction (sum, divide by the total weight) and the z-loss stay in
plain torch outside, in ``fused_ce.functional``. ``lse`` is a differentiable output (its
gradient adds ``g_lse * p``), which is how the z-loss gets its gradient.
"""

from __future__ import annotations

import torch

from .._common import CEOptions, accumulation_dtype
from ..torch_impl import cross_entropy as torch_impl
from ._autograd import forbid_double_backward
from ._impl import implementation


@torch.library.custom_op("fused_ce::ce_forward", mutates_args=())
def ce_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    softcap: float,
    with_stats: bool,
    inplace_backward: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``(loss, lse, saved, entropy, argmax)`` of ``(n_outer, C, n_inner)`` logits.

    ``target`` is ``(n_outer, n_inner)`` class indices or ``(n_outer, C, n_inner)``
    probabilities; ``saved`` ``(3, n_rows)`` holds the row max, ``log sum exp(x - max)`` and
    ``U = sum_c u_c`` for the backward; entropy and argmax are empty unless ``with_stats``.
    ``softcap`` 0 means none; ``inplace_backward`` makes the backward overwrite ``logits``.
    """
    options = CEOptions(ignore_index, label_smoothing, logit_scale, softcap)
    return implementation("cross_entropy", backend).forward(
        logits, target, weight, options, with_stats=with_stats
    )


@ce_forward.register_fake
def _(
    logits,
    target,
    weight,
    ignore_index,
    label_smoothing,
    logit_scale,
    softcap,
    with_stats,
    inplace_backward,
    backend,
):
    n_rows = logits.shape[0] * logits.shape[2]
    dtype = accumulation_dtype(logits.dtype, target.dtype)
    return torch_impl.forward_outputs(n_rows, dtype, logits.device, with_stats)


def _run_backward(
    grad_loss,
    grad_lse,
    logits,
    target,
    weight,
    saved,
    options,
    backend,
    grad_logits,
    target_grad,
):
    """Shared body of the two backward ops; returns ``dtarget`` (empty unless wanted)."""
    grad_target = torch.empty_like(target) if target_grad else target.new_empty(0)
    implementation("cross_entropy", backend).backward(
        grad_loss,
        grad_lse,
        logits,
        target,
        weight,
        saved,
        options,
        grad_logits,
        grad_target if target_grad else None,
    )
    return grad_target


@torch.library.custom_op("fused_ce::ce_backward", mutates_args=())
def ce_backward(
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor | None,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    saved: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    softcap: float,
    backend: str,
    target_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dlogits, dtarget)``; ``dtarget`` is empty unless ``target_grad``."""
    grad_logits = torch.empty_like(logits)
    options = CEOptions(ignore_index, label_smoothing, logit_scale, softcap)
    grad_target = _run_backward(
        grad_loss,
        grad_lse,
        logits,
        target,
        weight,
        saved,
        options,
        backend,
        grad_logits,
        target_grad,
    )
    return grad_logits, grad_target


@ce_backward.register_fake
def _(
    grad_loss,
    grad_lse,
    logits,
    target,
    weight,
    saved,
    ignore_index,
    label_smoothing,
    logit_scale,
    softcap,
    backend,
    target_grad,
):
    grad_target = torch.empty_like(target) if target_grad else target.new_empty(0)
    return torch.empty_like(logits), grad_target


@torch.library.custom_op("fused_ce::ce_backward_", mutates_args=("logits",))
def ce_backward_inplace(
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor | None,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    saved: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    softcap: float,
    backend: str,
    target_grad: bool,
) -> torch.Tensor:
    """``ce_backward`` that writes ``dlogits`` over ``logits`` (each element is read before it
    is written); returns ``dtarget`` (empty unless ``target_grad``)."""
    options = CEOptions(ignore_index, label_smoothing, logit_scale, softcap)
    return _run_backward(
        grad_loss,
        grad_lse,
        logits,
        target,
        weight,
        saved,
        options,
        backend,
        logits,
        target_grad,
    )


@ce_backward_inplace.register_fake
def _(
    grad_loss,
    grad_lse,
    logits,
    target,
    weight,
    saved,
    ignore_index,
    label_smoothing,
    logit_scale,
    softcap,
    backend,
    target_grad,
):
    return torch.empty_like(target) if target_grad else target.new_empty(0)


def _setup_context(ctx, inputs, output):
    logits, target, weight, ignore_index, label_smoothing, logit_scale, softcap = inputs[:7]
    _, _, saved, entropy, _ = output
    ctx.save_for_backward(logits, target, weight, saved)
    ctx.mark_non_differentiable(saved, entropy)
    # Unused outputs (lse) then arrive as None, not as zero tensors to read.
    ctx.set_materialize_grads(False)
    ctx.options = (ignore_index, label_smoothing, logit_scale, softcap)
    ctx.inplace_backward, ctx.backend = inputs[8:]


def _backward(ctx, grad_loss, grad_lse, *unused):
    # Unpacking checks the version counters: logits changed since the forward raise here.
    logits, target, weight, saved = ctx.saved_tensors
    target_grad = target.dim() == 3 and ctx.needs_input_grad[1]
    if grad_loss is None:
        grad_loss = saved.new_zeros(saved.shape[1])
    args = (grad_loss, grad_lse, logits, target, weight, saved, *ctx.options, ctx.backend)
    # Logits that need no gradient (only a probability target does) keep their values.
    if ctx.inplace_backward and ctx.needs_input_grad[0]:
        if torch.is_grad_enabled():  # create_graph=True: a graph of the gradient is wanted
            raise RuntimeError(
                "fused_ce: double backward through softmax_cross_entropy is not supported, and "
                "inplace_backward=True gradients have no graph; use inplace_backward=False "
                "with torch.nn.functional.cross_entropy for higher-order gradients."
            )
        grad_target = ce_backward_inplace(*args, target_grad)
        # The logits now hold their gradient: any other saved use of them (or of a view)
        # fails loudly at its unpack, by torch's version check, instead of reading it.
        torch.autograd.graph.increment_version(logits)
        grad_logits = logits.detach()
    else:
        grad_logits, grad_target = ce_backward(*args, target_grad)
    return (grad_logits, grad_target if target_grad else None) + (None,) * 8


ce_forward.register_autograd(_backward, setup_context=_setup_context)


forbid_double_backward(ce_backward, "softmax_cross_entropy", "torch.nn.functional.cross_entropy")
