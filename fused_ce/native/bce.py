"""Sigmoid + BCE through the native kernel (csrc/bce.h): ``run`` as in
``fused_ce.torch_impl.bce``."""

from __future__ import annotations

import torch

from .._common import bce_rows_2d
from . import ops


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
    """Fill the given contiguous outputs in one pass: the elementwise ``loss``, its sum into
    ``loss_sum`` (0-d, accumulation dtype), and ``grad_input``/``grad_target`` from ``grad``
    (any shape broadcastable to the input's, e.g. a 0-d uniform upstream gradient)."""
    operands = bce_rows_2d(
        input.shape, (input, target, weight, pos_weight, grad), loss_sum=loss_sum is not None
    )
    ops().bce(*operands, loss, grad_input, grad_target, loss_sum)
