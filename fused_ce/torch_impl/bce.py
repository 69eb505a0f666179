"""Sigmoid + BCE in plain PyTorch (the math of kernels/bce.py), elementwise in fp32.

The elementwise loss is torch's own fused ``binary_cross_entropy_with_logits`` on upcast
operands (one pass, no temporaries of ours); the gradients are the analytic
``w * (((pw - 1) t + 1) sigmoid(x) - pw t)`` and ``w * (log_sigmoid(-x) - pw log_sigmoid(x))``
(in the form of kernels/bce.py, finite parts split from infinite ones), formed
in place in one buffer each, so a backward costs a few passes over the input, not a dozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._common import accumulation_dtype


def run(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    grad: torch.Tensor | None,
    loss: torch.Tensor | None,
    grad_input: torch.Tensor | None,
    grad_target: torch.Tensor | None,
    *,
    loss_sum: torch.Tensor | None = None,
) -> None:
    """Fill the given outputs, like ``launch.bce.run`` (``grad`` may be 0-d; ``loss_sum``,
    0-d, receives the sum of the elementwise loss)."""
    dtype = accumulation_dtype(input.dtype, target.dtype)
    x = input.to(dtype)
    t = target.to(dtype)
    w = weight.to(dtype) if weight is not None else None
    pw = pos_weight.to(dtype) if pos_weight is not None else None
    if loss is not None or loss_sum is not None:
        value = F.binary_cross_entropy_with_logits(x, t, w, reduction="none", pos_weight=pw)
        if loss is not None:
            loss.copy_(value)
        if loss_sum is not None:
            # Summed in the logical order, so a strided operand sums to the same bits as a
            # dense one.
            loss_sum.copy_(value.contiguous().sum())
    if grad is None:
        return
    g = grad.to(dtype) * w if w is not None else grad.to(dtype)
    if grad_input is not None:
        value = torch.sigmoid(x)
        if pw is None:
            value.sub_(t)
        else:
            value.mul_((pw - 1.0) * t + 1.0).sub_(pw * t)
        grad_input.copy_(value.mul_(g))
    if grad_target is not None:
        value = torch.neg(x)
        if pw is not None:
            # (pw - 1) log1p(e^-|x|) - (x >= 0 ? x : pw x): torch's log_sigmoid(-x) - pw
            # log_sigmoid(x) with no inf - inf or 0 * inf at x = -inf (see kernels/bce.py).
            value = torch.where(x >= 0, value, value * pw)
            value.addcmul_(pw - 1.0, x.abs().neg_().exp_().log1p_())
        grad_target.copy_(value.mul_(g))
