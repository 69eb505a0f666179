"""Small helpers shared by the ops and both implementations."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp64 when any operand is fp64 (so gradcheck sees fp64 math), fp32 otherwise."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


class CEOptions(NamedTuple):
    """The softmax cross-entropy options, as one value from the custom ops down to the kernels
    (custom-op schemas take no tuples, so each op takes them flat and packs them here)."""

    ignore_index: int = -100
    label_smoothing: float = 0.0
    logit_scale: float = 1.0
    softcap: float = 0.0  # 0: no cap


def class_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Logits (or probabilities) ``(C)``, ``(N, C)`` or ``(N, C, d1..dK)`` as the
    ``(n_outer, C, n_inner)`` view the CE kernels take (a copy only when the spatial dims cannot
    be merged by a view). csrc/autograd.cpp's ``class_rows`` is the same rule."""
    if tensor.dim() == 1:
        return tensor.view(1, -1, 1)
    if tensor.dim() == 2:
        return tensor.unsqueeze(-1)
    return tensor.flatten(2)


def as_rows_2d(tensor: torch.Tensor, shape: torch.Size, flat: bool) -> torch.Tensor:
    """View a tensor broadcast to ``shape`` as (rows, cols): one row when ``flat``, else
    (prod(shape[:-1]), shape[-1]). Stride-0 (broadcast) dims stay stride 0; a layout that no
    view can express is copied. (The elementwise BCE kernels' operand layout.)"""
    if flat:
        # One view op where two would do (expand, then reshape): on small inputs the host
        # work, not the kernel, is the cost. A flat operand is dense of ``shape`` or one value.
        if tensor.numel() == 1:
            return tensor.as_strided((1, math.prod(shape)), (0, 0))
        return tensor.view(1, tensor.numel())
    if len(shape) == 2 and tensor.shape == shape:
        return tensor  # (rows, cols) already: no view op at all
    tensor = tensor.expand(shape)
    if len(shape) == 0:
        return tensor.reshape(1, 1)
    try:
        return tensor.view(-1, shape[-1])
    except RuntimeError:
        return tensor.reshape(-1, shape[-1])
