"""Vocab-parallel cross-entropy of logits already split by classes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._backend import resolve
from .._chunked import row_chunks
from .._common import accumulation_dtype
from .._reduction import CrossEntropyStats, _ce_divisor, _finish
from .._validation import (
    check_ce_target,
    check_floating,
    check_options,
    check_reduction,
    check_target,
)
from ..torch_impl import CHUNK_ELEMENTS
from ._dtensor import _from_dtensor, _is_dtensor, _mesh_group, _plain
from ._group import _group_layout, _shard_start
from ._protocol import (
    ERROR_TYPES,
    Agreement,
    Claim,
    agree,
    dtype_field,
    header_device,
    int_field,
    option_fields,
    shape_field,
)
from ._statistics import (
    _NO_INDEX,
    _exchange,
    _final_chunk,
    _local_gradient_,
    _local_statistics,
    _make_spec,
    _Spec,
)


class _VocabParallelCE(torch.autograd.Function):
    """Per-row loss and lse of ``(R, C_local)`` logits (and stats); backward local."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, spec: _Spec):
        n_rows = logits.shape[0]
        floats = logits.new_empty(spec.float_columns(), n_rows, dtype=spec.acc)
        ints = logits.new_empty(spec.int_columns(), n_rows, dtype=torch.int64)
        step = max(1, CHUNK_ELEMENTS // max(spec.n_local, 1))
        for rows in row_chunks(n_rows, step):
            z = _final_chunk(logits[rows], spec)
            _local_statistics(z, target[rows], spec, floats[:, rows], ints[:, rows])
        loss, lse, saved, entropy, argmax, target_argmax, smooth_scale = _exchange(
            floats, ints, target, spec
        )
        ctx.save_for_backward(logits, target, saved, smooth_scale)
        ctx.spec = spec
        ctx.mark_non_differentiable(entropy, argmax, target_argmax)
        ctx.set_materialize_grads(False)
        return loss, lse, entropy, argmax, target_argmax

    @staticmethod
    @once_differentiable  # double backward raises instead of giving wrong second derivatives
    def backward(ctx, grad_loss, grad_lse, *unused):
        logits, target, saved, smooth_scale = ctx.saved_tensors
        spec = ctx.spec
        if grad_loss is None:
            grad_loss = saved.new_zeros(saved.shape[1])
        grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
        want_target = spec.prob_target and ctx.needs_input_grad[1]
        grad_target = torch.empty_like(target) if want_target else None
        # In the accumulation dtype the gradient's own rows serve as the chunk's work buffer.
        in_place = grad_logits.dtype == spec.acc
        step = max(1, CHUNK_ELEMENTS // max(spec.n_local, 1))
        for rows in row_chunks(logits.shape[0], step):
            if in_place:
                buffer = grad_logits[rows]
                buffer.copy_(logits[rows])
            else:
                buffer = logits[rows].to(spec.acc, copy=True)
            grad = _local_gradient_(
                buffer,
                target[rows],
                saved[:, rows],
                smooth_scale,
                grad_loss[rows],
                grad_lse[rows] if grad_lse is not None else None,
                spec,
                grad_target[rows] if grad_target is not None else None,
            )
            if not in_place:
                grad_logits[rows] = grad
        return grad_logits, grad_target, None


def vocab_parallel_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
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
) -> Tensor | CrossEntropyStats:
    r"""Softmax cross-entropy of logits whose classes are split across ``group``: on every rank,
    the result of :func:`fused_ce.cross_entropy` on the concatenation of all ranks' ``input``
    along the class dim, with every option.

    Rank :math:`r` holds classes :math:`[s_r, s_r + C_r)`. With :math:`m_r` and
    :math:`S_r = \sum_{c \in r} e^{z_c - m_r}` from its slice, the global
    :math:`\mathrm{lse} = M + \log\sum_r e^{m_r - M} S_r` (:math:`M = \max_r m_r`); the loss,
    label smoothing over the global :math:`C`, the z-loss on the global lse and the stats
    (entropy, accuracy with torch's first-index argmax) are combined from per-row statistics
    exchanged in one ``all_gather`` (see docs/distributed.md). The logit gradient is local.

    Before it, the ranks exchange a fixed-size header and agree: ranks whose arguments differ
    (dtype, rows, options, targets, class weights) or of which one rejects its arguments raise
    the same error on every rank, naming the argument (and the rank).

    Shape:
        - input: this rank's ``(N, C_r)``, ``(C_r)`` or ``(N, C_r, d1..dK)`` slice (class
          dim 1, 0 for 1-D), or a DTensor sharded on the class dim over a 1-D mesh.
        - target: global class indices ``(N)`` / ``()`` / ``(N, d1..dK)``, the same on every
          rank; or this rank's slice of probability targets, ``input``'s shape.
        - weight: the full ``(C)`` class weights (the same on every rank).
        - output: as :func:`fused_ce.cross_entropy`'s, the same on every rank.

    Args:
        input, target, weight, ignore_index, reduction, label_smoothing: as in
            :func:`fused_ce.cross_entropy`, over the global classes.
        logit_scale, softcap, z_loss, return_stats: likewise.
        group: the process group the classes are split over (None: the default group; a
            DTensor input brings its mesh's).
        vocab_start_index: this rank's first class; None means equal shards in rank order.
            The ranks' slices must tile ``[0, C)`` (checked from the header, on every rank
            alike); a rank may hold no classes (``C_r = 0``).
        backend: validated as in :func:`fused_ce.cross_entropy`; the per-chunk math of the
            vocab-parallel path is plain torch operations on every backend.

    Examples::

        >>> # rank r of 2 holds logits[:, r * 500 : (r + 1) * 500] of a 1000-class head
        >>> loss = vocab_parallel_cross_entropy(local_logits, target)  # doctest: +SKIP
        >>> loss.backward()  # local_logits.grad: this rank's slice of the gradient
    """
    group, rank, world = _group_layout(_mesh_group(input, group))
    claim: Claim | BaseException
    try:
        call = _validate(
            input,
            target,
            weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            group=group,
            rank=rank,
            vocab_start_index=vocab_start_index,
            logit_scale=logit_scale,
            softcap=softcap,
            z_loss=z_loss,
            return_stats=return_stats,
            backend=backend,
        )
        claim = call.claim()
    except ERROR_TYPES as error:
        call, claim = None, error
    # Raises the same error on every rank if any rank's claim is an error or they disagree.
    agreement = agree(
        "vocab_parallel_cross_entropy",
        claim,
        group=group,
        rank=rank,
        world=world,
        device=header_device(input, group),
    )
    return call.run(agreement, group=group, rank=rank, world=world)


@dataclass
class _Call:
    """One rank's validated call, before any communication."""

    rows: Tensor  # (R, C_local) logits, the class dim last
    rows_target: Tensor  # (R,) class indices, or (R, C_local) probabilities
    target: Tensor
    weight: Tensor | None
    ignore_index: int
    reduction: str
    eps: float
    scale: float
    cap: float
    z_loss: float
    return_stats: bool
    start: int
    batch_shape: tuple[int, ...]
    valid: Tensor | None
    out_dtype: torch.dtype
    prob_target: bool

    def claim(self) -> Claim:
        """What the ranks must agree on: the message sizes (dtypes, rows) and the options."""
        return Claim(
            start=self.start,
            n_local=self.rows.shape[1],
            fields=[
                dtype_field("input", "the dtype", self.rows.dtype),
                int_field("input", "the number of rows", self.rows.shape[0]),
                shape_field("input", "the shape outside the class dim", self.batch_shape),
                *option_fields(
                    target=self.target,
                    replicated_indices=not self.prob_target,
                    weight=self.weight,
                    ignore_index=self.ignore_index,
                    reduction=self.reduction,
                    eps=self.eps,
                    scale=self.scale,
                    cap=self.cap,
                    z_loss=self.z_loss,
                    return_stats=self.return_stats,
                ),
            ],
            weight_length=self.weight.shape[0] if self.weight is not None else None,
        )

    def run(
        self, agreement: Agreement, *, group, rank: int, world: int
    ) -> Tensor | CrossEntropyStats:
        spec = _make_spec(
            group=group,
            rank=rank,
            world=world,
            start=self.start,
            n_local=self.rows.shape[1],
            agreement=agreement,
            weight=self.weight,
            ignore_index=self.ignore_index,
            eps=self.eps,
            scale=self.scale,
            cap=self.cap,
            prob_target=self.prob_target,
            return_stats=self.return_stats,
            acc=accumulation_dtype(self.rows.dtype, self.target.dtype),
        )
        loss, lse, entropy, argmax, target_argmax = _VocabParallelCE.apply(
            self.rows, self.rows_target, spec
        )
        divisor = _ce_divisor(
            self.reduction,
            self.valid,
            self.target,
            self.weight,
            self.rows.shape[0],
            self.rows.dtype,
        )
        stats_targets = self.prob_target and self.return_stats
        return _finish(
            loss,
            lse,
            entropy,
            argmax,
            batch_shape=self.batch_shape,
            valid=self.valid,
            target_classes=target_argmax.view(self.batch_shape) if stats_targets else self.target,
            reduction=self.reduction,
            divisor=divisor,
            out_dtype=self.out_dtype,
            z_loss=self.z_loss,
            return_stats=self.return_stats,
        )


def _validate(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    *,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    group,
    rank: int,
    vocab_start_index: int | None,
    logit_scale: float,
    softcap: float | None,
    z_loss: float,
    return_stats: bool,
    backend: str | None,
) -> _Call:
    """This rank's arguments, checked (no communication: an error raised here is agreed on)."""
    check_reduction(reduction)
    scale, cap = check_options(logit_scale, softcap, z_loss, return_stats)
    if _is_dtensor(input):
        class_dim = 0 if input.dim() == 1 else 1
        input, group, vocab_start_index = _from_dtensor("input", input, class_dim, group)
    target = _plain("target", target, group)
    weight = _plain("weight", weight, group)
    check_floating("input", input)
    check_target(target, input)
    if input.dim() == 0:
        raise ValueError("input: expected at least 1 dimension (the class dim), got a 0-d tensor")
    resolve(backend, input)
    class_dim = 0 if input.dim() == 1 else 1
    n_local = input.shape[class_dim]
    start = _shard_start(vocab_start_index, rank, n_local)
    batch_shape = input.shape[:class_dim] + input.shape[class_dim + 1 :]
    # The global C is known after the exchange (where bounds are asserted); until then only
    # weight's length can stand for it.
    n_classes = weight.shape[0] if weight is not None and weight.dim() == 1 else _NO_INDEX
    eps, out_dtype, valid, prob_target = check_ce_target(
        target, input, weight, ignore_index, label_smoothing, batch_shape, input.shape, n_classes
    )
    # (R, C_local) rows: the class dim last (a copy for N-D input; autograd maps the gradient
    # back through it). R spelled out: a rank may hold no classes.
    n_rows = batch_shape.numel()
    rows = input.movedim(class_dim, -1).reshape(n_rows, n_local)
    rows_target = (
        target.movedim(class_dim, -1).reshape(n_rows, n_local)
        if prob_target
        else target.reshape(n_rows)
    )
    return _Call(
        rows=rows,
        rows_target=rows_target,
        target=target,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        eps=eps,
        scale=scale,
        cap=cap,
        z_loss=float(z_loss),
        return_stats=return_stats,
        start=start,
        batch_shape=batch_shape,
        valid=valid,
        out_dtype=out_dtype,
        prob_target=prob_target,
    )
