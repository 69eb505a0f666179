"""Small helpers shared by the ops and both implementations."""

from __future__ import annotations

import math
from collections.abc import Sequence
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
        # work, not the kernel, is the cost.
        if tensor.numel() == 1 or (tensor.shape != shape or not tensor.is_contiguous()):
            # One value (see bce_rows_2d: a flat operand is dense of ``shape`` or uniform).
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


def _uniform(tensor: torch.Tensor) -> bool:
    """One value for every element: one element, or one expanded (every stride 0)."""
    return tensor.numel() == 1 or all(
        stride == 0 or size == 1 for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
    )


def _broadcast(tensor: torch.Tensor) -> bool:
    """Some element stands for several (a stride-0 dim of size > 1)."""
    return any(
        stride == 0 and size > 1 for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
    )


def bce_rows_2d(
    shape: torch.Size, operands: Sequence[torch.Tensor | None], *, loss_sum: bool
) -> list[torch.Tensor | None]:
    """BCE's operands (input, target, weight, pos_weight, upstream gradient; ``None`` where
    absent) as the (rows, cols) views every BCE kernel reads, by one rule for all backends.

    One long row (``flat``) when every operand is dense of ``shape`` or one value (a 0-d or
    expanded upstream gradient, a one-element weight): the kernels then cut it into blocks of
    their own size, whatever ``shape[-1]`` is (an ``(N, 1)`` input is not N rows of one
    element). Else ``(prod(shape[:-1]), shape[-1])`` views, broadcast dims with stride 0.

    A loss sum is summed by the kernels in blocks of the view, so its bits depend on the view:
    with ``loss_sum``, operands that are strided but not broadcast are copied dense when that
    makes the view flat, so a strided problem sums to the bits of the dense one (an operand
    broadcast along a dim keeps the (rows, cols) view for both).
    """
    dense = [t is None or (t.shape == shape and t.is_contiguous()) or _uniform(t) for t in operands]
    copyable = loss_sum and not all(dense)
    if copyable and all(
        d or (t.shape == shape and not _broadcast(t)) for t, d in zip(operands, dense, strict=True)
    ):
        operands = [t if d else t.contiguous() for t, d in zip(operands, dense, strict=True)]
        dense = [True] * len(dense)
    flat = all(dense)
    return [as_rows_2d(t, shape, flat) if t is not None else None for t in operands]


def forward_outputs(
    n_rows: int, dtype: torch.dtype, device: torch.device, with_stats: bool
) -> tuple[torch.Tensor, ...]:
    """Uninitialised ``(loss, lse, saved, entropy, argmax)`` as the cross-entropy forward
    returns them: ``saved`` is ``(3, n_rows)`` (row max, log-sum-exp minus it, U); entropy and
    argmax are empty unless ``with_stats``.

    Shape:
        loss, lse: ``(n_rows,)``; saved: ``(3, n_rows)``; entropy, argmax: ``(n_rows,)`` or
        ``(0,)``.

    Examples::

        >>> [tuple(t.shape) for t in forward_outputs(4, torch.float32, torch.device("cpu"), False)]
        [(4,), (4,), (3, 4), (0,), (0,)]
    """
    n_stats = n_rows if with_stats else 0
    return (
        torch.empty(n_rows, device=device, dtype=dtype),
        torch.empty(n_rows, device=device, dtype=dtype),
        torch.empty(3, n_rows, device=device, dtype=dtype),
        torch.empty(n_stats, device=device, dtype=dtype),
        torch.empty(n_stats, device=device, dtype=torch.int64),
    )
