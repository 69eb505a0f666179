"""``nn.Module`` losses: subclasses of torch's, with the same constructors and buffers.

Each takes one extra keyword, ``backend`` (see :func:`fused_ce.softmax_cross_entropy`), so a
training script swaps ``torch.nn.CrossEntropyLoss`` for ``fused_ce.nn.CrossEntropyLoss`` and
nothing else changes: ``state_dict``, ``repr`` and the ``weight``/``pos_weight`` buffers are
torch's own. The cross-entropy modules also take the functions' options beyond torch
(``logit_scale``, ``softcap``, ``z_loss``, ``return_stats``; ``inplace_backward`` for
:class:`CrossEntropyLoss`) as keyword-only constructor arguments, checked at construction.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._backend import checked_backend as _checked_backend
from ._distill_modules import (  # noqa: F401  (re-exported: the distillation losses)
    JSDWithLogitsLoss,
    KLDivWithLogitsLoss,
    LinearJSDLoss,
    LinearKLDivLoss,
)
from ._validation import check_batch_invariant, check_options
from .functional import CrossEntropyStats, sigmoid_binary_cross_entropy, softmax_cross_entropy
from .linear import linear_binary_cross_entropy_with_logits, linear_cross_entropy


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """:class:`torch.nn.CrossEntropyLoss` computed by :func:`fused_ce.softmax_cross_entropy`.

    Args: torch's, in torch's order and with its defaults (``weight``, ``size_average``,
    ``ignore_index``, ``reduce``, ``reduction``, ``label_smoothing``; the deprecated pair sets
    ``reduction`` as in torch), then, keyword-only, the function's options beyond torch
    (``logit_scale``, ``softcap``, ``z_loss``, ``return_stats``, ``inplace_backward``) and
    ``backend``, checked here.

    Shape:
        As :func:`fused_ce.softmax_cross_entropy`: input :math:`(C)`, :math:`(N, C)` or
        :math:`(N, C, d_1, ..., d_K)`; target class indices of the batch shape or
        probabilities of the input's shape; output a scalar, or the batch shape for
        ``reduction='none'``.

    Examples::

        >>> loss_fn = fused_ce.nn.CrossEntropyLoss(label_smoothing=0.1)
        >>> logits = torch.randn(3, 5, requires_grad=True)
        >>> loss = loss_fn(logits, torch.tensor([1, 0, 4]))
        >>> loss.backward()
        >>> loss.shape
        torch.Size([])
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        logit_scale: float = 1.0,
        softcap: float | None = None,
        z_loss: float = 0.0,
        return_stats: bool = False,
        inplace_backward: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        check_options(logit_scale, softcap, z_loss, return_stats)
        self.logit_scale = logit_scale
        self.softcap = softcap
        self.z_loss = z_loss
        self.return_stats = return_stats
        self.inplace_backward = inplace_backward
        self.backend = _checked_backend(backend)

    def forward(self, input: Tensor, target: Tensor) -> Tensor | CrossEntropyStats:
        return softmax_cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            logit_scale=self.logit_scale,
            softcap=self.softcap,
            z_loss=self.z_loss,
            return_stats=self.return_stats,
            inplace_backward=self.inplace_backward,
            backend=self.backend,
        )


class BCEWithLogitsLoss(torch.nn.BCEWithLogitsLoss):
    """:class:`torch.nn.BCEWithLogitsLoss` computed by
    :func:`fused_ce.sigmoid_binary_cross_entropy`.

    Args: torch's, in torch's order and with its defaults (``weight``, ``size_average``,
    ``reduce``, ``reduction``, ``pos_weight``; the deprecated pair sets ``reduction`` as in
    torch), then, keyword-only, ``backend``, checked here.

    Shape:
        Input :math:`(*)`; target the input's shape; output a scalar, or :math:`(*)` for
        ``reduction='none'``.

    Examples::

        >>> loss_fn = fused_ce.nn.BCEWithLogitsLoss(pos_weight=torch.full((3,), 2.0))
        >>> logits = torch.randn(4, 3, requires_grad=True)
        >>> loss = loss_fn(logits, torch.rand(4, 3))
        >>> loss.backward()
        >>> loss_fn.pos_weight
        tensor([2., 2., 2.])
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
        pos_weight: Tensor | None = None,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__(weight, size_average, reduce, reduction, pos_weight)
        self.backend = _checked_backend(backend)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return sigmoid_binary_cross_entropy(
            input,
            target,
            weight=self.weight,
            reduction=self.reduction,
            pos_weight=self.pos_weight,
            backend=self.backend,
        )


class _LinearLossHead(torch.nn.Module):
    """An output layer and its loss in one module: owns ``linear_weight`` ``(out_features,
    in_features)`` and ``linear_bias`` ``(out_features,)``, created and initialised exactly as
    :class:`torch.nn.Linear`'s ``weight`` and ``bias``, so ``head = nn.Linear(D, V)`` plus
    ``loss_fn(head(h), y)`` becomes ``loss_fn = LinearCrossEntropyLoss(D, V)`` plus
    ``loss_fn(h, y)``. :meth:`from_linear` shares an existing Linear's parameters instead (tied
    embeddings, a pretrained head); :meth:`logits` gives the logits when they are wanted
    (sampling, evaluation).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        factory = {"device": device, "dtype": dtype}
        self.linear_weight = torch.nn.Parameter(torch.empty(out_features, in_features, **factory))
        if bias:
            self.linear_bias = torch.nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("linear_bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch.nn.Linear's initialisation (Kaiming-uniform weight, uniform bias)."""
        torch.nn.init.kaiming_uniform_(self.linear_weight, a=math.sqrt(5))
        if self.linear_bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            torch.nn.init.uniform_(self.linear_bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, **kwargs):
        """A head that shares ``linear``'s ``weight`` and ``bias`` Parameters (no copy);
        ``kwargs`` go to the constructor."""
        head = cls(linear.in_features, linear.out_features, bias=False, device="meta", **kwargs)
        head.linear_weight = linear.weight
        head.linear_bias = linear.bias
        return head

    def logits(self, input: Tensor) -> Tensor:
        """``F.linear(input, linear_weight, linear_bias)``: the ``(..., out_features)`` logits."""
        return torch.nn.functional.linear(input, self.linear_weight, self.linear_bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.linear_bias is not None}, reduction={self.reduction!r}"
        )


class LinearCrossEntropyLoss(_LinearLossHead):
    r"""Output head + softmax cross-entropy: ``forward(input (..., in_features), target)``
    returns :func:`fused_ce.linear_cross_entropy` of the head's parameters, never holding the
    ``N x out_features`` logits. ``weight`` (class weights) is a buffer, as in
    :class:`torch.nn.CrossEntropyLoss`; the other keywords are the function's (``shift=True``:
    a causal LM's ``(B, T, in_features)`` hidden states against their ``(B, T)`` labels, shifted
    inside the op).

    Shape:
        Input :math:`(*, \text{in\_features})`; target class indices :math:`(*)` or
        probabilities :math:`(*, \text{out\_features})`; output a scalar, or :math:`(*)` for
        ``reduction='none'``.

    Examples::

        >>> head = fused_ce.nn.LinearCrossEntropyLoss(16, 100)
        >>> hidden = torch.randn(6, 16, requires_grad=True)
        >>> loss = head(hidden, torch.randint(0, 100, (6,)))
        >>> loss.backward()
        >>> head.linear_weight.grad.shape
        torch.Size([100, 16])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        chunk_size: int | None = None,
        path: str = "auto",
        logit_scale: float = 1.0,
        softcap: float | None = None,
        z_loss: float = 0.0,
        return_stats: bool = False,
        shift: bool = False,
        backend: str | None = None,
        batch_invariant: bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        check_options(logit_scale, softcap, z_loss, return_stats)
        check_batch_invariant(batch_invariant)
        self.batch_invariant = batch_invariant
        self.register_buffer("weight", weight)
        self.shift = shift
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.chunk_size = chunk_size
        self.path = path
        self.logit_scale = logit_scale
        self.softcap = softcap
        self.z_loss = z_loss
        self.return_stats = return_stats
        self.backend = _checked_backend(backend)

    def forward(self, input: Tensor, target: Tensor) -> Tensor | CrossEntropyStats:
        return linear_cross_entropy(
            input,
            self.linear_weight,
            target,
            linear_bias=self.linear_bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            chunk_size=self.chunk_size,
            path=self.path,
            logit_scale=self.logit_scale,
            softcap=self.softcap,
            z_loss=self.z_loss,
            return_stats=self.return_stats,
            shift=self.shift,
            backend=self.backend,
            batch_invariant=self.batch_invariant,
        )


class LinearBCEWithLogitsLoss(_LinearLossHead):
    r"""Output head + sigmoid binary cross-entropy (the sigmoid neuron for ``out_features=1``, a
    multi-label head above): ``forward(input (..., in_features), target (..., out_features))``
    returns :func:`fused_ce.linear_binary_cross_entropy_with_logits` of the head's parameters.
    ``weight`` and ``pos_weight`` are buffers, as in :class:`torch.nn.BCEWithLogitsLoss`.

    Shape:
        Input :math:`(*, \text{in\_features})`; target :math:`(*, \text{out\_features})`;
        output a scalar, or :math:`(*, \text{out\_features})` for ``reduction='none'``.

    Examples::

        >>> neuron = fused_ce.nn.LinearBCEWithLogitsLoss(10, 1)  # the lecture's sigmoid neuron
        >>> bits = torch.randint(0, 2, (64, 10)).float()
        >>> loss = neuron(bits, (bits.sum(1, keepdim=True) > 5).float())
        >>> loss.backward()
        >>> neuron.linear_bias.grad.shape
        torch.Size([1])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight: Tensor | None = None,
        pos_weight: Tensor | None = None,
        reduction: str = "mean",
        chunk_size: int | None = None,
        backend: str | None = None,
        batch_invariant: bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        check_batch_invariant(batch_invariant)
        self.batch_invariant = batch_invariant
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)
        self.reduction = reduction
        self.chunk_size = chunk_size
        self.backend = _checked_backend(backend)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return linear_binary_cross_entropy_with_logits(
            input,
            self.linear_weight,
            target,
            linear_bias=self.linear_bias,
            weight=self.weight,
            pos_weight=self.pos_weight,
            reduction=self.reduction,
            chunk_size=self.chunk_size,
            backend=self.backend,
            batch_invariant=self.batch_invariant,
        )


class VocabParallelCrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """:class:`torch.nn.CrossEntropyLoss` of logits whose classes are split across a process
    group, computed by :func:`fused_ce.distributed.vocab_parallel_cross_entropy`: ``forward``
    takes this rank's ``(N, C_r)`` slice and the global class indices (the same on every
    rank) and returns the loss of the concatenated logits. ``weight`` is the full ``(C,)``
    vector; ``group`` and ``vocab_start_index`` (None: equal shards in rank order) are the
    function's, as are the other keywords."""

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        group=None,
        vocab_start_index: int | None = None,
        logit_scale: float = 1.0,
        softcap: float | None = None,
        z_loss: float = 0.0,
        return_stats: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        check_options(logit_scale, softcap, z_loss, return_stats)
        self.group = group
        self.vocab_start_index = vocab_start_index
        self.logit_scale = logit_scale
        self.softcap = softcap
        self.z_loss = z_loss
        self.return_stats = return_stats
        self.backend = _checked_backend(backend)

    def forward(self, input: Tensor, target: Tensor) -> Tensor | CrossEntropyStats:
        # Imported on use (no cycle: distributed is below nn): fused_ce.distributed would
        # add some 15 ms to every `import fused_ce`.
        from .distributed import vocab_parallel_cross_entropy

        return vocab_parallel_cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            group=self.group,
            vocab_start_index=self.vocab_start_index,
            logit_scale=self.logit_scale,
            softcap=self.softcap,
            z_loss=self.z_loss,
            return_stats=self.return_stats,
            backend=self.backend,
        )


class VocabParallelLinearCrossEntropyLoss(_LinearLossHead):
    """A vocab-parallel output head and its cross-entropy (Megatron-style tensor parallelism):
    each rank of ``group`` owns rows ``[vocab_start_index, vocab_start_index + V_r)`` of the
    ``(out_features, in_features)`` head, split as ``torch.chunk`` (and DTensor's ``Shard(0)``)
    splits it, and ``forward(input, target)`` returns
    :func:`fused_ce.distributed.vocab_parallel_linear_cross_entropy`: the loss of the whole
    head on every rank, the logits never held beyond a chunk. ``linear_weight`` /
    ``linear_bias`` are this rank's shard (initialised as :class:`torch.nn.Linear`'s, per
    shard); :meth:`from_linear` shards an existing full Linear; :meth:`logits` gives this
    rank's ``(..., V_r)`` slice of the logits. ``out_features`` is the global ``V``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        group=None,
        sequence_parallel: bool = False,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        chunk_size: int | None = None,
        logit_scale: float = 1.0,
        softcap: float | None = None,
        z_loss: float = 0.0,
        return_stats: bool = False,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        from .distributed import shard_range

        start, size = shard_range(out_features, group)
        super().__init__(in_features, size, bias, device, dtype)
        check_options(logit_scale, softcap, z_loss, return_stats)
        self.out_features = out_features
        self.vocab_start_index = start
        self.group = group
        self.sequence_parallel = sequence_parallel
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.chunk_size = chunk_size
        self.logit_scale = logit_scale
        self.softcap = softcap
        self.z_loss = z_loss
        self.return_stats = return_stats
        self.backend = _checked_backend(backend)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, **kwargs):
        """A sharded head holding this rank's rows of a full ``linear`` (the same on every
        rank, e.g. a pretrained head): its own Parameters, copies of the rows (a view would
        keep the whole head alive); ``kwargs`` go to the constructor."""
        head = cls(linear.in_features, linear.out_features, bias=False, device="meta", **kwargs)
        rows = slice(head.vocab_start_index, head.vocab_start_index + head.linear_weight.shape[0])
        head.linear_weight = torch.nn.Parameter(linear.weight.detach()[rows].clone())
        if linear.bias is not None:
            head.linear_bias = torch.nn.Parameter(linear.bias.detach()[rows].clone())
        return head

    def forward(self, input: Tensor, target: Tensor) -> Tensor | CrossEntropyStats:
        from .distributed import vocab_parallel_linear_cross_entropy

        return vocab_parallel_linear_cross_entropy(
            input,
            self.linear_weight,
            target,
            linear_bias=self.linear_bias,
            group=self.group,
            vocab_start_index=self.vocab_start_index,
            sequence_parallel=self.sequence_parallel,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            logit_scale=self.logit_scale,
            softcap=self.softcap,
            z_loss=self.z_loss,
            return_stats=self.return_stats,
            chunk_size=self.chunk_size,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, rows=[{self.vocab_start_index}, "
            f"{self.vocab_start_index + self.linear_weight.shape[0]})"
        )
