"""Vocab-parallel cross-entropy of logits already split by classes."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._backend import resolve
from .._chunked import row_chunks
from .._common import accumulation_dtype
from .._validation import (
    check_ce_target,
    check_floating,
    check_options,
    check_reduction,
    check_target,
)
from ..functional import CrossEntropyStats, _ce_divisor, _finish
from ..torch_impl import CHUNK_ELEMENTS
from ._dtensor import _from_dtensor, _is_dtensor, _plain
from ._group import _group_layout, _shard_start
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
    def forward(ctx, logits: Tensor, target: Tensor, spec: _Spec, check_target: bool):
        n_rows = logits.shape[0]
        floats = logits.new_empty(spec.float_columns(), n_rows, dtype=spec.acc)
        ints = logits.new_empty(spec.int_columns(), n_rows, dtype=torch.int64)
        step = max(1, CHUNK_ELEMENTS // max(spec.n_local, 1))
        for rows in row_chunks(n_rows, step):
            z = _final_chunk(logits[rows], spec)
            _local_statistics(z, target[rows], spec, floats[:, rows], ints[:, rows])
        loss, lse, saved, entropy, argmax, target_argmax, smooth_scale = _exchange(
            floats, ints, target, spec, check_target
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
        return grad_logits, grad_target, None, None


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

    Shape:
        - input: this rank's ``(N, C_r)``, ``(C_r)`` or ``(N, C_r, d1..dK)`` slice (class
          dim 1, 0 for 1-D), or a DTensor sharded on the class dim over a 1-D mesh.
        - target: global class indices ``(N)`` / ``()`` / ``(N, d1..dK)``, the same on every
          rank; or this rank's slice of probability targets, ``input``'s shape.
        - weight: the full ``(C)`` class weights (the same on every rank).
        - output: as :func:`fused_ce.cross_entropy`'s, the same on every rank.

    Args:
        input, target, weight, ignore_index, reduction, label_smoothing, logit_scale, softcap,
            z_loss, return_stats: as in :func:`fused_ce.cross_entropy`, over the global classes.
        group: the process group the classes are split over (None: the default group; a
            DTensor input brings its mesh's).
        vocab_start_index: this rank's first class; None means equal shards in rank order.
            The ranks' slices must tile ``[0, C)``: checked on the device after the exchange,
            so every rank raises the same error.
        backend: validated as in :func:`fused_ce.cross_entropy`; the per-chunk math of the
            vocab-parallel path is plain torch operations on every backend.

    Examples::

        >>> # rank r of 2 holds logits[:, r * 500 : (r + 1) * 500] of a 1000-class head
        >>> loss = vocab_parallel_cross_entropy(local_logits, target)  # doctest: +SKIP
        >>> loss.backward()  # local_logits.grad: this rank's slice of the gradient
    """
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
    group, rank, world = _group_layout(group)
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
    acc = accumulation_dtype(input.dtype, target.dtype)
    spec = _make_spec(
        group=group,
        rank=rank,
        world=world,
        start=start,
        n_local=n_local,
        weight=weight,
        ignore_index=ignore_index,
        eps=eps,
        scale=scale,
        cap=cap,
        prob_target=prob_target,
        return_stats=return_stats,
        acc=acc,
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
    loss, lse, entropy, argmax, target_argmax = _VocabParallelCE.apply(
        rows, rows_target, spec, not prob_target
    )
    divisor = _ce_divisor(reduction, valid, target, weight, rows.shape[0], input.dtype)
    return _finish(
        loss,
        lse,
        entropy,
        argmax,
        batch_shape=batch_shape,
        valid=valid,
        target_classes=target_argmax.view(batch_shape) if prob_target and return_stats else target,
        reduction=reduction,
        divisor=divisor,
        out_dtype=out_dtype,
        z_loss=float(z_loss),
        return_stats=return_stats,
    )
