"""The reductions of the losses, below the public functions that share them: what
``'mean'`` divides by (torch's rule), the factor a scalar loss's gradient is made with, and the
z-loss, reduction and statistics that finish a cross-entropy (:class:`CrossEntropyStats`).

``fused_ce.functional``, ``fused_ce.linear`` and ``fused_ce.distributed`` finish their losses
here; csrc/autograd.cpp's ``ce_grad_scale`` is the native library's copy of
:func:`_grad_scale`, held to its bits by tests/test_shared_rules.py.
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple

import torch
from torch import Tensor

from ._common import accumulation_dtype
from ._validation import CETarget


def _reduce(loss: Tensor, reduction: str, divisor: Tensor | int, dtype: torch.dtype) -> Tensor:
    if reduction == "none":
        return loss.to(dtype)
    total = loss.sum(dtype=accumulation_dtype(loss.dtype))
    if reduction == "mean":
        total = total / divisor
    return total.to(dtype)


class CrossEntropyStats(NamedTuple):
    r"""What a cross-entropy entry point returns with ``return_stats=True``.

    * ``loss``: the loss exactly as without stats (z-loss included), differentiable.
    * ``lse``: per-token log-sum-exp of the final logits (after ``logit_scale`` and
      ``softcap``), shape of the target's batch dims, accumulation dtype (fp32, fp64 for fp64);
      defined for ignored tokens too. Differentiable (its gradient is ``softmax``).
    * ``z_loss``: the z-loss term ``z_loss * lse^2`` over non-ignored tokens, reduced like
      ``loss`` (per token for ``'none'``; 0 when ``z_loss=0``); detached, for logging.
    * ``entropy``: per-token entropy of the softmax, ``lse - sum_c p_c z_c``, accumulation
      dtype, defined for ignored tokens too; detached (for logging and RL advantages, not for
      gradients).
    * ``accuracy``: 0-d, the fraction of non-ignored tokens whose argmax (first index of the
      max of the final logits) is the target class (the target's argmax for probability
      targets); NaN when every token is ignored. Detached.

    Per-token outputs (appended after the five above, so positional unpacking of the first
    five keeps working), each of the target's batch shape and made in the same pass over the
    logits:

    * ``target_log_prob``: :math:`\log p_{y}` = final logit of the target class minus ``lse``
      (the target's argmax class for probability targets); 0 at ignored tokens. Accumulation
      dtype, detached (for a differentiable version use :func:`fused_ce.linear_log_probs` or
      the loss). ``None`` from the vocab-parallel losses of ``fused_ce.distributed``.
    * ``argmax``: the predicted token, int64, the first index of the max of the final logits
      (``torch.argmax``'s tie rule); defined for ignored tokens too.
    * ``correct``: bool, ``argmax`` equals the target class and the token is not ignored
      (``accuracy`` is its mean over non-ignored tokens).
    """

    loss: Tensor
    lse: Tensor
    z_loss: Tensor
    entropy: Tensor
    accuracy: Tensor
    target_log_prob: Tensor | None = None
    argmax: Tensor | None = None
    correct: Tensor | None = None


def _ce_divisor(
    reduction: str,
    valid: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    n_rows: int,
    dtype: torch.dtype,
    label_smoothing: float = 0.0,
) -> Tensor | int:
    """What ``'mean'`` divides the summed loss by: torch's rule, the (weighted) count of
    non-ignored class indices, in the accumulation dtype of ``dtype`` (the input's); the row
    count for probability targets and the other reductions. See :func:`_smoothed_divisor`
    for ``label_smoothing``."""
    if reduction != "mean" or valid is None:
        return n_rows
    acc = accumulation_dtype(dtype)
    if weight is None:
        return valid.sum().to(acc)
    if not weight.numel():  # no class: every row is ignored
        divisor = torch.zeros((), dtype=acc, device=valid.device)
    else:
        divisor = (weight.to(acc)[torch.where(valid, target, 0).long()] * valid).sum()
    return _smoothed_divisor(divisor, label_smoothing)


def _smoothed_divisor(divisor: Tensor, label_smoothing: float) -> Tensor:
    """A class-weighted ``'mean'`` divisor with label smoothing, zero made NaN. torch adds
    ``(1 - eps) * nll_sum / d`` and ``(eps / C) * smooth_sum / d``: when every target's weight
    is 0, ``d = 0`` and the first term is ``0 / 0``, NaN, whatever the second; our one sum of
    both over ``d`` would give inf. (Weights of both signs that cancel to ``d = 0`` give
    torch +-inf in each term, inf or NaN by their signs; we give NaN.)"""
    if label_smoothing > 0.0:
        return torch.where(divisor == 0.0, math.nan, divisor)
    return divisor


def _finish(
    loss_rows: Tensor,
    lse: Tensor,
    entropy: Tensor,
    argmax: Tensor,
    *,
    batch_shape: torch.Size,
    valid: Tensor | None,
    target_classes: Tensor,
    reduction: str,
    divisor: Tensor | int,
    out_dtype: torch.dtype,
    z_loss: float,
    return_stats: bool,
    target_log_prob: Tensor | None = None,
) -> Tensor | CrossEntropyStats:
    """Add the z-loss to the per-row CE, reduce, and gather the stats when asked.

    ``valid`` marks the non-ignored rows (None: all rows); ``target_classes`` is what the
    argmax is compared with for accuracy; ``target_log_prob`` (per row, from
    :func:`_target_log_prob`) is masked to 0 at ignored rows.
    """
    loss_rows = loss_rows.view(batch_shape)
    lse = lse.view(batch_shape)
    if z_loss > 0.0:
        z_rows = z_loss * lse.square()
        if valid is not None:
            # where(), not a product: an ignored row's lse may be inf and its term must be 0.
            z_rows = torch.where(valid, z_rows, 0.0)
        loss_rows = loss_rows + z_rows
    else:
        z_rows = torch.zeros_like(lse)
    loss = _reduce(loss_rows, reduction, divisor, out_dtype)
    if not return_stats:
        return loss
    acc = lse.dtype
    argmax = argmax.view(batch_shape)
    correct = argmax == target_classes
    if target_log_prob is not None:
        target_log_prob = target_log_prob.detach().view(batch_shape)
    if valid is not None:
        correct = correct & valid
        count = valid.sum(dtype=acc)
        if target_log_prob is not None:
            target_log_prob = torch.where(valid, target_log_prob, 0.0)
    else:
        count = correct.numel()
    return CrossEntropyStats(
        loss,
        lse,
        _reduce(z_rows.detach(), reduction, divisor, out_dtype),
        entropy.view(batch_shape),
        correct.sum(dtype=acc) / count,
        target_log_prob,
        argmax,
        correct,
    )


def _final_logits(z: Tensor, logit_scale: float, softcap: float, dtype: torch.dtype) -> Tensor:
    """Logits as the kernels see them: upcast to ``dtype``, times ``logit_scale``, then capped
    (``softcap * tanh(z / softcap)``) when ``softcap > 0``."""
    z = z.to(dtype) * logit_scale
    return softcap * torch.tanh(z / softcap) if softcap > 0.0 else z


def _target_log_prob(
    loss_rows: Tensor,
    saved: Tensor,
    target_logit: Tensor | None,
    logit_scale: float,
    softcap: float,
) -> Tensor:
    """Per row ``log p_y`` from the forward's outputs, detached. ``target_logit`` is the raw
    logit of the class compared for accuracy, or None when the per-row loss is the plain
    NLL (class indices, no class weight, no label smoothing): then ``log p_y = -loss``, the
    kernels' own bits. Else ``(z_y - m) - log_s`` from the saved shift ``m`` and log-sum
    ``log_s``: exact near the max, as the kernels compute the loss (``z_y - lse`` would lose
    ``|z_y| * eps``)."""
    if target_logit is None:
        return -loss_rows.detach()
    z_y = _final_logits(target_logit.detach(), logit_scale, softcap, saved.dtype)
    return (z_y.reshape(-1) - saved[0]) - saved[1]


def _as_fp32(value: float) -> float:
    """``value`` rounded to the nearest fp32 number (as ``tensor.to(torch.float32)`` rounds)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _grad_scale(
    reduction: str,
    checked: CETarget,
    target: Tensor,
    weight: Tensor | None,
    n_rows: int,
    input: Tensor,
) -> Tensor:
    """The 0-d factor a ``'mean'``/``'sum'`` applies to the summed loss: ``1 / divisor`` (see
    :func:`_ce_divisor`) or 1, in the accumulation dtype, on the input's device."""
    acc = accumulation_dtype(input.dtype)
    if reduction == "sum":
        return torch.ones((), dtype=acc, device=input.device)
    if checked.valid is None and not checked.prob_target:
        # Every class index counts (checked on the host, see all_in_range_on_host).
        if weight is not None:
            divisor = weight.to(acc)[target.long()].sum()
            return torch.reciprocal(_smoothed_divisor(divisor, checked.label_smoothing))
        # The same bits as the reciprocal of the count in ``acc``: the fp32 count is rounded
        # first, and 1 / count in double then rounded to fp32 is the correctly rounded fp32
        # quotient (double has more than 2 * 24 + 2 bits).
        count = float(n_rows) if acc == torch.float64 else _as_fp32(float(n_rows))
        return torch.full((), 1.0 / count, dtype=acc, device=input.device)
    divisor = _ce_divisor(
        reduction, checked.valid, target, weight, n_rows, input.dtype, checked.label_smoothing
    )
    if isinstance(divisor, Tensor):
        return torch.reciprocal(divisor)
    return torch.full((), 1.0 / divisor if divisor else math.nan, dtype=acc, device=input.device)
