"""The vocab-parallel output layer and its cross-entropy: this rank's rows of the head, the
logits made chunk by chunk, the input gradient summed over the group."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._backend import resolve
from .._chunked import LinearGrads, chunk_logits, chunk_rows, row_chunks
from .._common import accumulation_dtype
from .._reduction import CrossEntropyStats, _ce_divisor, _finish
from .._validation import (
    check_ce_target,
    check_chunk_size,
    check_linear,
    check_options,
    check_reduction,
    check_target,
)
from ._dtensor import _from_dtensor, _is_dtensor, _mesh_group, _plain
from ._group import _gather_packed, _group_layout, _OwnRows, _reduce_scatter, _shard_start
from ._protocol import (
    ERROR_TYPES,
    Agreement,
    Claim,
    agree,
    bool_field,
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


@dataclass
class _HeadSpec:
    """The linear head's extras: chunking and where the input gradient goes."""

    rows_per_chunk: int
    sequence_parallel: bool


class _VocabParallelLinearCE(torch.autograd.Function):
    """Per-row loss and lse of ``x @ W_local^T + b_local`` over the group's classes, chunk by
    chunk; backward recomputes each chunk's logits, sums the input gradient over the group."""

    @staticmethod
    def forward(ctx, x, linear_weight, linear_bias, target, spec: _Spec, head: _HeadSpec):
        if head.sequence_parallel:
            # Every rank's tokens, and their class indices, in one collective (probability
            # targets come as this rank's classes of all tokens already).
            if spec.prob_target:
                (x,) = _gather_packed([x], spec.group, spec.world)
            else:
                x, target = _gather_packed([x, target], spec.group, spec.world)
                target = target.reshape(-1)
            # (views of the gathered buffer, whose rows also hold the target: a copy)
            x = x.reshape(-1, x.shape[-1])
        n_rows = x.shape[0]
        floats = x.new_empty(spec.float_columns(), n_rows, dtype=spec.acc)
        ints = x.new_empty(spec.int_columns(), n_rows, dtype=torch.int64)
        buffer = x.new_empty(min(head.rows_per_chunk, n_rows), spec.n_local)
        for rows in row_chunks(n_rows, head.rows_per_chunk):
            logits = chunk_logits(buffer, x, linear_weight, linear_bias, rows)
            z = _final_chunk(logits, spec)
            _local_statistics(z, target[rows], spec, floats[:, rows], ints[:, rows])
        loss, lse, saved, entropy, argmax, target_argmax, smooth_scale = _exchange(
            floats, ints, target, spec
        )
        ctx.save_for_backward(x, linear_weight, linear_bias, target, saved, smooth_scale)
        ctx.spec, ctx.head = spec, head
        ctx.mark_non_differentiable(entropy, argmax, target_argmax, target)
        ctx.set_materialize_grads(False)
        return loss, lse, entropy, argmax, target_argmax, target

    @staticmethod
    @once_differentiable  # double backward raises instead of giving wrong second derivatives
    def backward(ctx, grad_loss, grad_lse, *unused):
        x, linear_weight, linear_bias, target, saved, smooth_scale = ctx.saved_tensors
        spec, head = ctx.spec, ctx.head
        if grad_loss is None:
            grad_loss = saved.new_zeros(saved.shape[1])
        wants = ctx.needs_input_grad
        grads = LinearGrads(x, linear_weight, linear_bias, wants[0], wants[1], wants[2])
        want_target = spec.prob_target and wants[3]
        grad_target = torch.empty_like(target) if want_target else None
        buffer = x.new_empty(min(head.rows_per_chunk, x.shape[0]), spec.n_local)
        for rows in row_chunks(x.shape[0], head.rows_per_chunk):
            logits = chunk_logits(buffer, x, linear_weight, linear_bias, rows)
            grad = _local_gradient_(
                logits.to(spec.acc, copy=True),
                target[rows],
                saved[:, rows],
                smooth_scale,
                grad_loss[rows],
                grad_lse[rows] if grad_lse is not None else None,
                spec,
                grad_target[rows] if grad_target is not None else None,
            )
            grads.add(rows, grad.to(x.dtype))
        grad_input, grad_weight, grad_bias = grads.results()
        if wants[0]:
            grad_input = _sum_input_gradient(grad_input, spec, head)
        return (
            grad_input if wants[0] else None,
            grad_weight if wants[1] else None,
            grad_bias if wants[2] else None,
            grad_target,
            None,
            None,
        )


def _sum_input_gradient(grad_input: Tensor, spec: _Spec, head: _HeadSpec) -> Tensor:
    """Each rank's ``dX`` covers its classes only: the input's gradient is their sum. With
    sequence parallelism each rank keeps its own tokens' rows (a reduce-scatter). fp16/bf16
    partials (each rounded once, by its GEMM) are summed in fp32, so the sum adds one rounding
    rather than one per rank."""
    if spec.world == 1:
        return grad_input
    wide = grad_input.to(spec.acc) if grad_input.dtype != spec.acc else grad_input
    if head.sequence_parallel:
        out = wide.new_empty(wide.shape[0] // spec.world, *wide.shape[1:])
        _reduce_scatter(out, wide.contiguous(), group=spec.group)
    else:
        out = wide.contiguous()
        dist.all_reduce(out, group=spec.group)
    return out.to(grad_input.dtype)


def vocab_parallel_linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    group=None,
    vocab_start_index: int | None = None,
    sequence_parallel: bool = False,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    return_stats: bool = False,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> Tensor | CrossEntropyStats:
    r"""A vocab-parallel output layer and its cross-entropy: on every rank, the result of
    :func:`fused_ce.linear_cross_entropy` with the concatenation of all ranks'
    ``linear_weight`` (and ``linear_bias``) rows, never holding more than a chunk of logits.

    Rank :math:`r` holds rows :math:`[s_r, s_r + V_r)` of the head, :math:`z^{(r)} = x
    W_r^\top + b_r`; the global softmax statistics are combined as in
    :func:`vocab_parallel_cross_entropy`. Gradients: :math:`\partial L/\partial W_r =
    G_r^\top X` is this rank's shard's; :math:`\partial L/\partial x = \sum_r G_r W_r` is summed
    over the group (an ``all_reduce``; a ``reduce_scatter`` with ``sequence_parallel``).
    Errors: as in :func:`vocab_parallel_cross_entropy`, agreed on by every rank from a header
    exchanged first; a rank may hold no rows of the head (``V_r = 0``).

    Shape:
        - input: ``(..., D)``, the same on every rank; with ``sequence_parallel``, this rank's
          block of the tokens (the batch is the ranks' blocks concatenated along dim 0, each
          of the same shape).
        - linear_weight: this rank's ``(V_r, D)`` rows, or a DTensor sharded ``Shard(0)``.
        - linear_bias: this rank's ``(V_r,)``.
        - target: global class indices shaped like ``input``'s leading dims (replicated, or
          this rank's block with ``sequence_parallel``), or this rank's ``(..., V_r)`` slice of
          probability targets (of all tokens, also with ``sequence_parallel``: rows
          ``world * n``, the blocks in rank order).
        - output: the loss of all tokens (the same on every rank); ``'none'`` and the per-token
          stats cover ``input``'s tokens (this rank's block with ``sequence_parallel``).

    Args:
        sequence_parallel: ``input`` and ``target`` are this rank's tokens; they are gathered
            (one ``all_gather``) and the input gradient is reduce-scattered back.
        chunk_size: rows per chunk of logits (see :func:`fused_ce.linear_cross_entropy`).
        The rest: as in :func:`vocab_parallel_cross_entropy` and
            :func:`fused_ce.linear_cross_entropy`.

    Examples::

        >>> # tensor-parallel rank r holds head.weight[r * V_r : (r + 1) * V_r]
        >>> loss = vocab_parallel_linear_cross_entropy(h, w_local, y)  # doctest: +SKIP
    """
    group, rank, world = _group_layout(_mesh_group(linear_weight, group))
    claim: Claim | BaseException
    try:
        call = _validate(
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            group=group,
            rank=rank,
            world=world,
            vocab_start_index=vocab_start_index,
            sequence_parallel=sequence_parallel,
            weight=weight,
            reduction=reduction,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            logit_scale=logit_scale,
            softcap=softcap,
            z_loss=z_loss,
            return_stats=return_stats,
            chunk_size=chunk_size,
            backend=backend,
        )
        claim = call.claim()
    except ERROR_TYPES as error:
        call, claim = None, error
    # Raises the same error on every rank if any rank's claim is an error or they disagree.
    agreement = agree(
        "vocab_parallel_linear_cross_entropy",
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

    input: Tensor  # as passed (its shape and grad requirement go into the claim)
    x: Tensor  # (N_r, D)
    linear_weight: Tensor
    linear_bias: Tensor | None
    rows_target: Tensor  # (N_r,) class indices, or (rows, V_r) probabilities
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
    sequence_parallel: bool  # as passed
    rows_per_chunk: int  # as passed (0: automatic)
    valid: Tensor | None
    out_dtype: torch.dtype
    prob_target: bool

    def claim(self) -> Claim:
        """What the ranks must agree on: the message sizes (dtypes, rows, the features), whether
        the backward sums the input gradient, and the options."""
        replicated = not self.prob_target and not self.sequence_parallel
        return Claim(
            start=self.start,
            n_local=self.linear_weight.shape[0],
            fields=[
                dtype_field("input", "the dtype", self.input.dtype),
                int_field("input", "the number of rows", self.x.shape[0]),
                shape_field("input", "the shape", self.input.shape),
                bool_field(
                    "input",
                    "whether its gradient is wanted",
                    torch.is_grad_enabled() and self.input.requires_grad,
                ),
                bool_field("sequence_parallel", "the value", self.sequence_parallel),
                *option_fields(
                    target=self.target,
                    replicated_indices=replicated,
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
        n_local = self.linear_weight.shape[0]
        spec = _make_spec(
            group=group,
            rank=rank,
            world=world,
            start=self.start,
            n_local=n_local,
            agreement=agreement,
            weight=self.weight,
            ignore_index=self.ignore_index,
            eps=self.eps,
            scale=self.scale,
            cap=self.cap,
            prob_target=self.prob_target,
            return_stats=self.return_stats,
            acc=accumulation_dtype(self.x.dtype, self.target.dtype),
        )
        sequence_parallel = self.sequence_parallel and world > 1
        local_batch = self.input.shape[:-1]
        batch_shape = (world, *local_batch) if sequence_parallel else local_batch
        n_rows = self.x.shape[0] * (world if sequence_parallel else 1)
        head = _HeadSpec(
            rows_per_chunk=chunk_rows(self.rows_per_chunk, n_rows, n_local, self.x),
            sequence_parallel=sequence_parallel,
        )
        loss, lse, entropy, argmax, target_argmax, all_target = _VocabParallelLinearCE.apply(
            self.x, self.linear_weight, self.linear_bias, self.rows_target, spec, head
        )
        target, valid = self.target, self.valid
        if sequence_parallel:
            target = all_target.reshape(*batch_shape, *target.shape[len(local_batch) :])
            valid = None if self.prob_target else target.long() != self.ignore_index
        divisor = _ce_divisor(self.reduction, valid, target, self.weight, n_rows, self.x.dtype)
        stats_targets = self.prob_target and self.return_stats
        result = _finish(
            loss,
            lse,
            entropy,
            argmax,
            batch_shape=batch_shape,
            valid=valid,
            target_classes=target_argmax.view(batch_shape) if stats_targets else target,
            reduction=self.reduction,
            divisor=divisor,
            out_dtype=self.out_dtype,
            z_loss=self.z_loss,
            return_stats=self.return_stats,
        )
        if not sequence_parallel:
            return result

        def own(value: Tensor) -> Tensor:
            return _OwnRows.apply(value, rank, world, group)

        if not self.return_stats:
            return own(result) if self.reduction == "none" else result
        z_rows = own(result.z_loss) if self.reduction == "none" else result.z_loss
        return CrossEntropyStats(
            own(result.loss) if self.reduction == "none" else result.loss,
            own(result.lse),
            z_rows,
            own(result.entropy),
            result.accuracy,
        )


def _validate(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None,
    group,
    rank: int,
    world: int,
    vocab_start_index: int | None,
    sequence_parallel: bool,
    weight: Tensor | None,
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    softcap: float | None,
    z_loss: float,
    return_stats: bool,
    chunk_size: int | None,
    backend: str | None,
) -> _Call:
    """This rank's arguments, checked (no communication: an error raised here is agreed on)."""
    check_reduction(reduction)
    scale, cap = check_options(logit_scale, softcap, z_loss, return_stats)
    if _is_dtensor(linear_weight):
        linear_weight, group, vocab_start_index = _from_dtensor(
            "linear_weight", linear_weight, 0, group
        )
        if _is_dtensor(linear_bias):
            linear_bias = _from_dtensor("linear_bias", linear_bias, 0, group)[0]
    input = _plain("input", input, group)
    target = _plain("target", target, group)
    weight = _plain("weight", weight, group)
    # A rank may hold no classes (shard_range's split of fewer classes than ranks).
    n_local = check_linear(input, linear_weight, linear_bias, allow_no_classes=True)
    rows_per_chunk = check_chunk_size(chunk_size)
    check_target(target, input)
    if not isinstance(sequence_parallel, bool):
        raise TypeError(f"sequence_parallel: expected a bool, got {sequence_parallel!r}")
    resolve(backend, input)
    start = _shard_start(vocab_start_index, rank, n_local)
    local_batch = input.shape[:-1]
    prob_batch = local_batch
    if sequence_parallel and world > 1:
        if input.dim() < 2:
            raise ValueError(
                "input: sequence_parallel needs token rows, (n, ..., D); got a 1-D input"
            )
        prob_batch = (world * local_batch[0], *local_batch[1:])
    # The global C is known after the exchange (where bounds are asserted); until then only
    # weight's length can stand for it.
    n_classes = weight.shape[0] if weight is not None and weight.dim() == 1 else _NO_INDEX
    eps, _, valid, prob_target = check_ce_target(
        target,
        input,
        weight,
        ignore_index,
        label_smoothing,
        local_batch,
        (*prob_batch, n_local),
        n_classes,
    )
    # As fused_ce.linear_cross_entropy: the loss in the accumulation dtype (fp32 for a
    # half-precision head), never rounded to bf16/fp16.
    out_dtype = accumulation_dtype(input.dtype, target.dtype)
    x = input.reshape(-1, input.shape[-1])
    # Rows spelled out: a rank may hold no classes.
    rows_target = (
        target.reshape(torch.Size(prob_batch).numel(), n_local)
        if prob_target
        else target.reshape(-1)
    )
    return _Call(
        input=input,
        x=x,
        linear_weight=linear_weight,
        linear_bias=linear_bias,
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
        sequence_parallel=sequence_parallel,
        rows_per_chunk=rows_per_chunk,
        valid=valid,
        out_dtype=out_dtype,
        prob_target=prob_target,
    )
