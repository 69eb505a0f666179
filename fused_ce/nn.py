"""``nn.Module`` losses: subclasses of torch's, with the same constructors and buffers.

Each takes one extra keyword, ``backend`` (see :func:`fused_ce.softmax_cross_entropy`), so a
training script swaps ``torch.nn.CrossEntropyLoss`` for ``fused_ce.nn.CrossEntropyLoss`` and
nothing else changes: ``state_dict``, ``repr`` and the ``weight``/``pos_weight`` buffers are
torch's own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .functional import sigmoid_binary_cross_entropy, softmax_cross_entropy


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """:class:`torch.nn.CrossEntropyLoss` computed by :func:`fused_ce.softmax_cross_entropy`."""

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return softmax_cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            backend=self.backend,
        )


class BCEWithLogitsLoss(torch.nn.BCEWithLogitsLoss):
    """:class:`torch.nn.BCEWithLogitsLoss` computed by
    :func:`fused_ce.sigmoid_binary_cross_entropy`."""

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average=None,
        reduce=None,
        reduction: str = "mean",
        pos_weight: Tensor | None = None,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__(weight, size_average, reduce, reduction, pos_weight)
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return sigmoid_binary_cross_entropy(
            input,
            target,
            weight=self.weight,
            reduction=self.reduction,
            pos_weight=self.pos_weight,
            backend=self.backend,
        )
