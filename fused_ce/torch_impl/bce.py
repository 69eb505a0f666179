"""Sigmoid + BCE in plain PyTorch (same math as kernels/bce.py), elementwise in fp32."""

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
) -> None:
    """Fill the given outputs, like ``launch.bce.run``."""
    dtype = accumulation_dtype(input.dtype, target.dtype)
    x = input.to(dtype)
    t = target.to(dtype)
    w = weight.to(dtype) if weight is not None else None
    pw = pos_weight.to(dtype) if pos_weight is not None else None
    neg_log_sigmoid = -F.logsigmoid(x)
    if loss is not None:
        c = (pw - 1.0) * t + 1.0 if pw is not None else 1.0
        value = (1.0 - t) * x + c * neg_log_sigmoid
        loss.copy_(value * w if w is not None else value)
    if grad is None:
        return
    g = grad.to(dtype) * w if w is not None else grad.to(dtype)
    if grad_input is not None:
        pos = t * torch.sigmoid(-x)
        grad_input.copy_(g * ((1.0 - t) * torch.sigmoid(x) - (pw * pos if pw is not None else pos)))
    if grad_target is not None:
        value = (pw - 1.0) * neg_log_sigmoid - x if pw is not None else -x
        grad_target.copy_(g * value)
