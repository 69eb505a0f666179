"""The ops' outputs from differentiable torch ops: what runs under functorch transforms
(``torch.func.grad``, ``vmap``, ``jvp``, ``jacrev``, ``functional_call`` inside them).

functorch can neither batch the fused kernels (they have no batching rules, and write into
their outputs) nor differentiate a ``torch.library.custom_op`` (its generated
``autograd.Function`` has no ``setup_context``). So while a transform is active, each op's
dispatcher (``_autograd.dispatch``) calls the function of the same name here instead: the same
math in the accumulation dtype (fp32, fp64 for fp64 operands) through torch's own losses, whose
derivatives and batching rules functorch knows, returning what the op returns. Gradient
buffers the op would make during its forward come back empty: the transform differentiates the
loss itself. The fused linear heads form their logits with ``F.linear`` here (``N x V`` of
them), as the composition their result is defined by; the same holds for forward-mode AD
through them (see ``fused_ce.ops.linear``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._common import accumulation_dtype


def _empty_like(tensor: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    return (tensor if tensor is not None else fallback).new_empty(0)


def ce_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    softcap: float,
    with_stats: bool,
    inplace_backward: bool = False,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fused_ce::ce_forward``'s ``(loss, lse, saved, entropy, argmax)`` of ``(n_outer, C,
    n_inner)`` logits; ``saved`` (only the kernels' backward reads it) is zeros, entropy and
    argmax are detached as the op marks them."""
    dtype = accumulation_dtype(logits.dtype, target.dtype)
    z = logits.to(dtype)
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap > 0.0:
        z = softcap * torch.tanh(z / softcap)
    prob_target = target.is_floating_point()
    # torch's own loss, with its checks of the class indices (an _assert_async of ours has no
    # batching rule).
    loss = F.cross_entropy(
        z,
        target.to(dtype) if prob_target else target,
        weight.to(dtype) if weight is not None else None,
        ignore_index=ignore_index,
        reduction="none",
        label_smoothing=label_smoothing,
    ).reshape(-1)
    lse = torch.logsumexp(z, 1)
    n_rows = loss.shape[0]
    saved = z.new_zeros(3, n_rows)
    if with_stats:
        p = torch.softmax(z, 1)
        entropy = (lse - torch.where(p > 0, p * z, 0.0).sum(1)).detach().reshape(-1)
        argmax = z.detach().argmax(1).reshape(-1)
    else:
        entropy = z.new_empty(0)
        argmax = z.new_empty(0, dtype=torch.int64)
    return loss, lse.reshape(-1), saved, entropy, argmax


def ce_scalar(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    valid: torch.Tensor | None,
    grad_scale: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    softcap: float,
    z_loss: float,
    backend: str,
    logits_grad: bool,
    target_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fused_ce::ce_scalar``'s ``(L, saved, dlogits, dtarget)`` with empty gradients."""
    loss, lse, saved, _, _ = ce_forward(
        logits, target, weight, ignore_index, label_smoothing, logit_scale, softcap, False
    )
    if z_loss > 0.0:
        z_rows = z_loss * lse.square()
        if valid is not None:
            z_rows = torch.where(valid.reshape(-1), z_rows, 0.0)
        loss = loss + z_rows
    return loss.sum() * grad_scale, saved, logits.new_empty(0), target.new_empty(0)


def _bce(input, target, weight, pos_weight) -> torch.Tensor:
    dtype = accumulation_dtype(input.dtype, target.dtype)
    return F.binary_cross_entropy_with_logits(
        input.to(dtype),
        target.to(dtype),
        weight.to(dtype) if weight is not None else None,
        reduction="none",
        pos_weight=pos_weight.to(dtype) if pos_weight is not None else None,
    )


def bce_forward(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    """``fused_ce::bce_forward``: the elementwise loss in ``target``'s dtype."""
    return _bce(input, target, weight, pos_weight).to(target.dtype)


def bce_scalar(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    grad_scale: torch.Tensor,
    backend: str,
    input_grad: bool,
    target_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fused_ce::bce_scalar``'s ``(L, dinput, dtarget)`` with empty gradients."""
    loss = _bce(input, target, weight, pos_weight).sum() * grad_scale
    return loss, input.new_empty(0), target.new_empty(0)


def linear_ce_forward(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    softcap: float,
    with_stats: bool,
    chunk_size: int,
    fused: bool,
    backend: str,
    fixed_rows: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fused_ce::linear_ce_forward``'s outputs, through ``F.linear`` then :func:`ce_forward`
    on the ``(N, V, 1)`` logits (one GEMM of all rows: ``fixed_rows``, the chunked path's
    batch invariance, has nothing to fix here)."""
    logits = F.linear(input, linear_weight, linear_bias)
    return ce_forward(
        logits.unsqueeze(-1),
        target.unsqueeze(-1),
        weight,
        ignore_index,
        label_smoothing,
        logit_scale,
        softcap,
        with_stats,
    )


def _no_linear_grads(input, linear_weight, linear_bias, target):
    return (
        input.new_empty(0),
        linear_weight.new_empty(0),
        _empty_like(linear_bias, linear_weight),
        target.new_empty(0),
    )


def linear_ce_scalar(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    scale: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    softcap: float,
    chunk_size: int,
    backend: str,
    *wanted: bool,
) -> tuple[torch.Tensor, ...]:
    """``fused_ce::linear_ce_scalar``'s ``(L, dX, dW, db, dtarget)`` with empty gradients."""
    loss, *_ = linear_ce_forward(
        input,
        linear_weight,
        linear_bias,
        target,
        weight,
        ignore_index,
        label_smoothing,
        logit_scale,
        softcap,
        False,
        chunk_size,
        False,
        backend,
    )
    loss = loss.sum() * scale.to(loss.dtype)
    return (loss, *_no_linear_grads(input, linear_weight, linear_bias, target))


def linear_bce_forward(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    chunk_size: int,
    backend: str,
    row_sums: bool,
    fixed_rows: bool = False,
) -> torch.Tensor:
    """``fused_ce::linear_bce_forward``: the ``(N, C)`` elementwise loss, or with ``row_sums``
    its ``(N,)`` row sums, in the accumulation dtype (``fixed_rows`` as in
    :func:`linear_ce_forward`)."""
    loss = _bce(F.linear(input, linear_weight, linear_bias), target, weight, pos_weight)
    return loss.sum(1) if row_sums else loss


def linear_bce_scalar(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    scale: torch.Tensor,
    chunk_size: int,
    backend: str,
    *wanted: bool,
) -> tuple[torch.Tensor, ...]:
    """``fused_ce::linear_bce_scalar``'s ``(L, dX, dW, db, dtarget)`` with empty gradients."""
    loss = _bce(F.linear(input, linear_weight, linear_bias), target, weight, pos_weight)
    loss = loss.sum() * scale.to(loss.dtype)
    return (loss, *_no_linear_grads(input, linear_weight, linear_bias, target))


def _where_weighted(prob: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``prob * value`` summed over the class dim, 0 where ``prob`` is 0 (its log may be -inf)."""
    return torch.where(prob > 0.0, prob * value, 0.0).sum(1)


def distill_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    valid: torch.Tensor | None,
    temperature: float,
    beta: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fused_ce::distill_forward``'s per-row loss (the math of ``torch_impl.distill``), with
    zero saved statistics: the transform differentiates the loss itself."""
    dtype = accumulation_dtype(student.dtype, teacher.dtype)
    log_q = torch.log_softmax(student.to(dtype) / temperature, 1)  # the student
    log_p = torch.log_softmax(teacher.to(dtype) / temperature, 1)  # the teacher
    p = log_p.exp()
    if beta == 0.0:
        loss = _where_weighted(p, log_p - log_q)
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        loss = beta * _where_weighted(p, log_p - log_m) + (1.0 - beta) * _where_weighted(
            log_q.exp(), log_q - log_m
        )
    if valid is not None:
        loss = torch.where(valid, loss, 0.0)
    return loss, loss.new_zeros((6, student.shape[0]))
