"""Softmax + cross-entropy through the native kernels (csrc/cross_entropy.h): the functions of
``fused_ce.torch_impl.cross_entropy``, same arguments and outputs."""

from __future__ import annotations

import torch

from .._common import CEOptions, accumulation_dtype
from .._outputs import forward_outputs
from . import op as _op
from . import ops


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
    """Per-row ``(loss, lse, saved, entropy, argmax)`` (see ``forward_outputs``) of
    ``(n_outer, C, n_inner)`` logits, in one pass over them.

    With ``grad_scale`` (0-d), the same pass also writes into ``grad_logits`` (the logits' shape
    and dtype; may be ``logits`` itself) the gradient of
    ``grad_scale * sum_n (loss_n + z_loss * v_n * lse_n^2)`` and, for probability targets when
    ``grad_target`` is given, its gradient with respect to the target: one exp per logit for
    the forward and the backward together.
    """
    dtype = accumulation_dtype(logits.dtype, target.dtype)
    n_rows = logits.shape[0] * logits.shape[2]
    outputs = forward_outputs(n_rows, dtype, logits.device, with_stats)
    if grad_scale is not None:
        grad_scale = grad_scale.to(dtype)
    ops().ce_forward(
        logits,
        target,
        weight,
        *options,
        *outputs,
        grad_scale,
        float(z_loss),
        grad_logits,
        grad_target,
    )
    return outputs


def backward(
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor | None,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    saved: torch.Tensor,
    options: CEOptions,
    grad_logits: torch.Tensor,
    grad_target: torch.Tensor | None,
) -> None:
    """Write ``dlogits`` into ``grad_logits`` (which may be ``logits`` itself) and, for
    probability targets, ``dtarget`` into ``grad_target``, from the forward's ``saved``."""
    dtype = saved.dtype
    ops().ce_backward(
        grad_loss.to(dtype),
        grad_lse.to(dtype) if grad_lse is not None else None,
        logits,
        target,
        weight,
        saved,
        *options,
        grad_logits,
        grad_target,
    )


def scalar_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    mean: bool,
    options: CEOptions,
    z_loss: float,
) -> torch.Tensor:
    """The ``'mean'`` (``mean``) or ``'sum'`` of ``loss_n + z_loss * v_n * lse_n^2``, 0-d in
    the accumulation dtype, of the public function's ``input`` and ``target`` (not the
    ``(n_outer, C, n_inner)`` views: the C++ op makes them, so autograd records no view node),
    through ``fused_ce_native::ce_scalar``, whose autograd is C++ too (csrc/autograd.cpp):
    it checks the class indices, finds the divisor, and makes the gradients of the inputs that
    require grad in the same pass, for its backward to hand out. Eager CPU calls only;
    ``torch.compile`` and functorch go through ``fused_ce::ce_scalar``."""
    return _op("ce_scalar")(input, target, weight, mean, *options, z_loss)


def unreduced_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    options: CEOptions,
) -> torch.Tensor:
    """The per-row loss (``reduction='none'``, no z-loss) of the batch shape, in the
    accumulation dtype, through ``fused_ce_native::ce_unreduced`` (C++ autograd: the backward
    recomputes the gradient from the saved row statistics). Eager CPU calls only."""
    return _op("ce_unreduced")(input, target, weight, *options)
