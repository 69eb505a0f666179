"""Softmax + cross-entropy through the native kernels (csrc/cross_entropy.h): the functions of
``fused_ce.torch_impl.cross_entropy``, same arguments and outputs."""

from __future__ import annotations

import torch

from .._common import CEOptions, accumulation_dtype, forward_outputs
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
