"""Vocab-parallel cross-entropy over ``torch.distributed``: the classes (the vocabulary) are
split across the ranks of a group, each rank holding a contiguous slice of the logits (or of
the output layer's rows), and every rank gets the loss of the concatenated logits.

The softmax needs three global per-row numbers, and each is a combination of per-rank ones
(``m_r`` the row max of rank ``r``'s slice, ``s_r = sum_c exp(z_c - m_r)`` over it)::

    M = max_r m_r        S = sum_r exp(m_r - M) s_r        lse = M + log S

and every other term of the loss is a sum over classes, so it splits the same way: the target
logit is held by one rank, ``sum_c w_c (z_c - M) = sum_r [d_r + W_r (m_r - M)]`` (label
smoothing, with ``d_r = sum_c w_c (z_c - m_r)`` over the slice), the entropy's
``sum_c e^(z_c - M) (z_c - M)`` likewise, and the argmax is the first rank's whose max is ``M``.
So each rank computes its columns of per-row statistics, one ``all_gather`` exchanges them (with
a small header: the slice's start and size, and a checksum of the targets), and every rank
combines them in the same order, so all ranks hold the same bits. The backward needs no
communication for the logits: ``dz = p * coef_p - coef_y * onehot - coef_u * u`` with
``p = exp(z - lse)`` and per-row coefficients known on every rank. The linear head adds the
input gradient's sum over the group (``all_reduce``, or ``reduce_scatter`` with sequence
parallelism). See docs/distributed.md for what is sent, in bytes per row.

The local per-chunk math runs as plain torch operations on the rank's slice (on any device);
the linear head makes its logits chunk by chunk with the package's chunked driver
(``fused_ce._chunked``), so no more than a chunk of them exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._backend import resolve
from ._chunked import LinearGrads, chunk_logits, chunk_rows, row_chunks
from ._common import accumulation_dtype
from ._validation import (
    check_ce_target,
    check_chunk_size,
    check_floating,
    check_linear,
    check_options,
    check_reduction,
    check_target,
)
from .functional import CrossEntropyStats, _ce_divisor, _finish
from .torch_impl import CHUNK_ELEMENTS
from .torch_impl.cross_entropy import _final_logits_

__all__ = ["shard_range", "vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]

# torch >= 2.12 names the tensor collectives *_single; older releases only have the old names.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# An argmax index no real class has: loses every "first index" comparison.
_NO_INDEX = torch.iinfo(torch.int64).max


# --------------------------------------------------------------------------- collectives


def _group_layout(group) -> tuple[object, int, int]:
    """``(group, rank, world size)``; ``None`` is the default group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "group: torch.distributed is not initialized; call "
            "torch.distributed.init_process_group first (a group of one rank works)"
        )
    group = group if group is not None else dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError("group: this process is not a member of the given process group")
    return group, rank, dist.get_world_size(group)


def _gather_packed(parts: list[Tensor], group, world: int) -> list[Tensor]:
    """All-gather several tensors in ONE collective: their bytes travel concatenated (so an
    int64 column rides bit-exact beside fp32 ones). Returns each part as ``(world, *shape)``.
    Every rank must pass parts of the same shapes and dtypes."""
    flat = torch.cat([p.contiguous().view(-1).view(torch.uint8) for p in parts])
    if world == 1:
        gathered = flat.unsqueeze(0)
    else:
        gathered = flat.new_empty(world * flat.numel())
        _all_gather(gathered, flat, group=group)
        gathered = gathered.view(world, -1)
    out, offset = [], 0
    for p in parts:
        n_bytes = p.numel() * p.element_size()
        chunk = gathered[:, offset : offset + n_bytes].contiguous()
        out.append(chunk.view(p.dtype).view(world, *p.shape))
        offset += n_bytes
    return out


class _OwnRows(torch.autograd.Function):
    """Sequence parallelism: this rank's block ``full[rank]`` of a ``(world, ...)`` tensor that
    every rank computed identically. Backward: the full tensor's gradient is every rank's
    gradient of its own block, i.e. an ``all_gather`` (torch.distributed.nn's would sum a
    replicated result ``world`` times over; this one is written for this use)."""

    @staticmethod
    def forward(ctx, full: Tensor, rank: int, world: int, group) -> Tensor:
        ctx.world, ctx.group = world, group
        return full[rank].clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        gathered = grad.new_empty(ctx.world * grad.numel())
        _all_gather(gathered, grad.contiguous().view(-1), group=ctx.group)
        return gathered.view(ctx.world, *grad.shape), None, None, None


# --------------------------------------------------------------------------- the math


@dataclass
class _Spec:
    """Everything the per-chunk math needs, fixed for one call."""

    group: object
    rank: int
    world: int
    start: int  # this rank's first global class
    n_local: int  # C_local
    weight: Tensor | None  # full (C,), accumulation dtype
    weight_local: Tensor | None  # this rank's (C_local,) slice of it
    ignore_index: int
    eps: float
    logit_scale: float
    softcap: float
    prob_target: bool
    with_stats: bool
    acc: torch.dtype

    def float_columns(self) -> int:
        """Per-row statistics each rank sends (besides the int64 argmax columns)."""
        base = 4 if self.prob_target else 3  # m, s, then t (target logit) or a, b
        extra = (self.eps > 0.0) + self.with_stats * (1 + self.prob_target)
        return base + extra

    def int_columns(self) -> int:
        return self.with_stats * (1 + self.prob_target)


def _local_statistics(z: Tensor, target: Tensor, spec: _Spec, floats: Tensor, ints: Tensor) -> None:
    """One chunk's columns of per-row statistics of this rank's final logits ``z`` (rows x
    C_local, accumulation dtype; overwritten), into ``floats`` (k x rows) and ``ints``.

    Columns: ``m`` the row max (raw, -inf for an all -inf slice), ``s = sum exp(z - m')``
    with ``m'`` the max (0 for an all -inf slice); class-index targets: ``t = z_y - m'`` where
    this rank holds ``y``, else 0; probability targets ``t``: ``a = sum w t``,
    ``b = sum w t (z - m')``; with smoothing ``d = sum w (z - m')``; with stats
    ``e = sum exp(z - m')(z - m')`` and, for probability targets, the target's row max.
    int64 columns: the global argmax (and the target's).
    """
    n_classes = z.shape[1]
    col = iter(range(floats.shape[0]))
    if not n_classes:  # an empty slice: no max, no argmax
        m = z.new_full((z.shape[0],), -torch.inf)
        argmax = torch.full_like(m, _NO_INDEX, dtype=torch.int64)
    elif spec.with_stats:
        m, argmax = z.max(1)
        argmax = argmax + spec.start
    else:
        m = z.amax(1)
    if spec.with_stats:
        ints[0] = argmax
    floats[next(col)] = m
    # Only an all -inf slice shifts by 0 (as the torch path): +inf and NaN make NaN, as torch.
    m = torch.where(m == -torch.inf, 0.0, m)
    z.sub_(m[:, None])  # z - m': exact near the max
    e = z.exp()
    floats[next(col)] = e.sum(1)
    w = spec.weight_local
    if spec.prob_target:
        wt = target.to(spec.acc) if w is None else target.to(spec.acc) * w
        floats[next(col)] = wt.sum(1)
        floats[next(col)] = torch.linalg.vecdot(wt, z)
        del wt
    else:
        y = target.long() - spec.start
        mine = (y >= 0) & (y < n_classes)
        picked = z.gather(1, torch.where(mine, y, 0)[:, None]).squeeze(1) if n_classes else m
        floats[next(col)] = torch.where(mine, picked, 0.0)
    if spec.eps > 0.0:
        floats[next(col)] = z @ w if w is not None else z.sum(1)
    if spec.with_stats:
        # Lanes with e == 0 add 0, not 0 * -inf.
        floats[next(col)] = torch.where(e > 0.0, e * z, 0.0).sum(1)
        if spec.prob_target:
            if n_classes:
                t_max, t_argmax = target.max(1)
                t_argmax = t_argmax + spec.start
            else:
                t_max = z.new_full((z.shape[0],), -torch.inf)
                t_argmax = argmax
            floats[next(col)] = t_max.to(spec.acc)
            ints[1] = t_argmax


def _check_layout(header: Tensor, spec: _Spec, n_weight: int | None, check_target: bool) -> Tensor:
    """Device-side checks of the gathered ``(world, 3)`` header (start, size, target checksum),
    identical on every rank (so all raise together, none hangs); returns the global C (0-d)."""
    starts, sizes, checksums = header.unbind(1)
    order = torch.argsort(starts, stable=True)
    starts, sizes = starts[order], sizes[order]
    ends = starts + sizes
    tiled = (starts[0] == 0) & (starts[1:] == ends[:-1]).all()
    n_classes = ends[-1]
    if n_weight is not None:
        tiled = tiled & (n_classes == n_weight)
    torch._assert_async(
        tiled,
        "vocab_start_index: the ranks' class slices [start, start + C_local) do not tile "
        "[0, C) without gaps or overlaps (shards of different sizes need vocab_start_index; "
        "with weight, C must be weight's length)",
    )
    if check_target:
        torch._assert_async(
            (checksums == checksums[0]).all(),
            "target: the class-index targets differ across the ranks of the group; every rank "
            "must pass the same (replicated) target",
        )
    return n_classes


def _target_checksum(target: Tensor) -> Tensor:
    """An int64 digest of class-index targets that differs when values or their order do."""
    flat = target.reshape(-1).long()
    position = torch.arange(flat.numel(), device=flat.device) % 8191 + 1
    return (flat * position).sum().view(1)


def _combine(
    floats: Tensor,
    ints: Tensor,
    header: Tensor,
    target: Tensor,
    spec: _Spec,
    check_target: bool,
) -> tuple[Tensor, ...]:
    """Every rank's statistics ``(world, k, R)`` -> per-row ``(loss, lse, saved, entropy,
    argmax, target_argmax)``, ``saved = (M', log S, U)`` for the backward, plus ``eps / C``
    (0-d). The same arithmetic in the same order on every rank."""
    n_weight = spec.weight.shape[0] if spec.weight is not None else None
    n_classes = _check_layout(header, spec, n_weight, check_target)
    starts, sizes = header[:, 0], header[:, 1]
    cols = iter(floats.unbind(1))
    m = next(cols)
    s = next(cols)
    present = m != -torch.inf  # ranks with a finite (or +inf/NaN) max in the row
    row_max = m.amax(0)
    row_max = torch.where(row_max == -torch.inf, 0.0, row_max)
    shift = torch.where(present, m, 0.0) - row_max  # m_r' - M' (world, R)
    factor = torch.where(present, shift.exp(), 0.0)
    total = (s * factor).sum(0)
    log_sum = total.log()
    lse = row_max + log_sum
    acc = spec.acc
    if spec.weight is not None:
        cumulative = torch.cat([spec.weight.new_zeros(1), spec.weight.cumsum(0)])
        rank_weight = cumulative[starts + sizes] - cumulative[starts]  # W_r
    else:
        rank_weight = sizes.to(acc)
    rank_weight = rank_weight[:, None]
    total_weight = rank_weight.sum()
    smooth_scale = spec.eps / n_classes.to(acc)  # eps / C, 0-d
    if spec.prob_target:
        a, b = next(cols), next(cols)
        u_sum = a.sum(0)
        dot = (b + a * shift).sum(0)
        if spec.eps > 0.0:
            d = next(cols)
            u_sum = (1.0 - spec.eps) * u_sum + smooth_scale * total_weight
            dot = (1.0 - spec.eps) * dot + smooth_scale * (d + rank_weight * shift).sum(0)
        loss = u_sum * log_sum - dot
        valid = None
    else:
        t = next(cols)
        y = target.long()
        owner = (y >= starts[:, None]) & (y < (starts + sizes)[:, None])
        target_logit = torch.where(owner, t + shift, 0.0).sum(0)  # z_y - M'
        valid = y != spec.ignore_index
        torch._assert_async(
            ((y >= 0) & (y < n_classes) | ~valid).all(),
            "target: a class index is out of bounds (expected values in [0, C), C the number "
            "of classes over all ranks, or ignore_index)",
        )
        loss = log_sum - target_logit
        if spec.weight is not None:
            loss = loss * spec.weight[torch.where(valid, y, 0)]
        u_sum = torch.zeros_like(loss)
        if spec.eps > 0.0:
            d = next(cols)
            smooth = total_weight * log_sum - (d + rank_weight * shift).sum(0)
            loss = (1.0 - spec.eps) * loss + smooth_scale * smooth
            u_sum = u_sum + total_weight
        loss = torch.where(valid, loss, 0.0)
    entropy = argmax = target_argmax = loss.new_empty(0)
    if spec.with_stats:
        e = next(cols)
        entropy = log_sum - (factor * (e + shift * s)).sum(0) / total
        winners = m == m.amax(0)
        argmax = torch.where(winners, ints[:, 0], _NO_INDEX).amin(0)
        if spec.prob_target:
            t_max = next(cols)
            t_winners = t_max == t_max.amax(0)
            target_argmax = torch.where(t_winners, ints[:, 1], _NO_INDEX).amin(0)
    saved = torch.stack([row_max, log_sum, u_sum])
    return loss, lse, saved, entropy, argmax, target_argmax, smooth_scale.to(acc)


def _local_gradient_(
    z: Tensor,
    target: Tensor,
    saved: Tensor,
    smooth_scale: Tensor,
    grad_loss: Tensor,
    grad_lse: Tensor | None,
    spec: _Spec,
    grad_target: Tensor | None,
) -> Tensor:
    """In place over ``z`` (raw local logits of a chunk, accumulation dtype): ``dL/dx`` for
    this rank's classes, from the saved global ``(M', log S, U)``; no communication::

        p = exp(z - M' - log S);  dz = p coef_p - coef_y onehot(y) - coef_u u

    times ``logit_scale * (1 - tanh^2)``. Probability targets also write ``dL/dt`` into
    ``grad_target``."""
    scale = spec.logit_scale
    slope = _final_logits_(z, scale, spec.softcap)
    row_max, log_sum, u_sum = saved
    z.sub_(row_max[:, None])
    g = grad_loss.to(spec.acc)
    w = spec.weight_local
    if spec.prob_target:
        u = target.to(spec.acc)
        if grad_target is not None:
            # d loss / d t_c = g (1 - eps) w_c (lse - z_c)
            grad_t = torch.sub(log_sum[:, None], z).mul_((g * (1.0 - spec.eps))[:, None])
            grad_target.copy_(grad_t * w if w is not None else grad_t)
        if spec.eps > 0.0:
            u = u * (1.0 - spec.eps) + smooth_scale
        if w is not None:
            u = u * w
        coef_u = scale * g
        coef_p = coef_u * u_sum
    else:
        y = target.long()
        valid = y != spec.ignore_index
        y_local = y - spec.start
        mine = valid & (y_local >= 0) & (y_local < z.shape[1])
        coef_y = ((1.0 - spec.eps) * scale) * g
        if spec.weight is not None:
            coef_y = coef_y * spec.weight[torch.where(valid, y, 0)]
        # where(), not a product: g is inf for an all-ignored 'mean' (0/0).
        coef_y = torch.where(valid, coef_y, 0.0)
        coef_p = coef_y
        if spec.eps > 0.0:
            coef_u = torch.where(valid, (smooth_scale * scale) * g, 0.0)
            coef_p = coef_p + coef_u * u_sum
    if grad_lse is not None:
        coef_p = coef_p + scale * grad_lse.to(spec.acc)
    grad = z.sub_(log_sum[:, None]).exp_().mul_(coef_p[:, None])
    if spec.prob_target:
        grad.addcmul_(u, coef_u[:, None], value=-1.0)
    else:
        if z.shape[1]:
            index = torch.where(mine, y_local, 0)[:, None]
            grad.scatter_add_(1, index, torch.where(mine, -coef_y, 0.0)[:, None])
        if spec.eps > 0.0:
            if w is not None:
                grad.addcmul_(coef_u[:, None], w[None, :], value=-1.0)
            else:
                grad.sub_(coef_u[:, None])
    if slope is not None:
        grad.mul_(slope)
    return grad


def _final_chunk(logits: Tensor, spec: _Spec) -> Tensor:
    """A chunk's final logits ``softcap(scale * x)`` as a private accumulation-dtype copy."""
    z = logits.to(spec.acc, copy=True)
    _final_logits_(z, spec.logit_scale, spec.softcap)
    return z


def _exchange(
    floats: Tensor, ints: Tensor, target: Tensor, spec: _Spec, check_target: bool
) -> tuple[Tensor, ...]:
    """The one collective of the forward, then :func:`_combine`."""
    # Filled on the device (no host-to-device copy, which can wait on the stream).
    header = torch.zeros(3, dtype=torch.int64, device=floats.device)
    header[0] = spec.start
    header[1] = spec.n_local
    if check_target:
        header[2:] = _target_checksum(target)
    floats, ints, header = _gather_packed([floats, ints, header], spec.group, spec.world)
    return _combine(floats, ints, header, target, spec, check_target)


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
                target = target.view(-1)
            x = x.view(-1, x.shape[-1])
        n_rows = x.shape[0]
        floats = x.new_empty(spec.float_columns(), n_rows, dtype=spec.acc)
        ints = x.new_empty(spec.int_columns(), n_rows, dtype=torch.int64)
        buffer = x.new_empty(min(head.rows_per_chunk, n_rows), spec.n_local)
        for rows in row_chunks(n_rows, head.rows_per_chunk):
            logits = chunk_logits(buffer, x, linear_weight, linear_bias, rows)
            z = _final_chunk(logits, spec)
            _local_statistics(z, target[rows], spec, floats[:, rows], ints[:, rows])
        check_target = not head.sequence_parallel and not spec.prob_target
        loss, lse, saved, entropy, argmax, target_argmax, smooth_scale = _exchange(
            floats, ints, target, spec, check_target
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


# --------------------------------------------------------------------------- public API


def _dtensor_types():
    """``(DTensor, Shard, Replicate)``, or None where torch has no DTensor."""
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:
        return None
    return DTensor, Shard, Replicate


def _is_dtensor(value) -> bool:
    types = _dtensor_types()
    return types is not None and isinstance(value, types[0])


def _from_dtensor(name: str, value, shard_dim: int | None, group):
    """A DTensor argument as ``(local tensor, group, start of this rank's shard)``.

    ``shard_dim``: the dim it must be sharded on (``Shard``) over a 1-D mesh; None: it must be
    replicated. The start follows ``torch.chunk``'s split, which DTensor's ``Shard`` uses."""
    DTensor, Shard, Replicate = _dtensor_types()
    mesh = value.device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"{name}: expected a DTensor on a 1-D device mesh, got {mesh.ndim}-D")
    placement = value.placements[0]
    mesh_group = mesh.get_group()
    if group is not None and group is not mesh_group:
        raise ValueError(f"{name}: group must be None (or the mesh's group) for a DTensor")
    if shard_dim is None:
        if not isinstance(placement, Replicate):
            raise ValueError(f"{name}: expected a Replicate() DTensor, got {placement}")
        return value.to_local(), mesh_group, None
    if not isinstance(placement, Shard) or placement.dim % value.dim() != shard_dim:
        raise ValueError(
            f"{name}: expected a DTensor sharded on the class dim (Shard({shard_dim})), "
            f"got {placement}"
        )
    start, _ = _chunk_range(value.shape[shard_dim], mesh.get_local_rank(), mesh.size())
    return value.to_local(), mesh_group, start


def _chunk_range(n_classes: int, rank: int, world: int) -> tuple[int, int]:
    """``torch.chunk``'s split: ``ceil(C / world)`` classes per rank, the last ones shorter
    (or empty)."""
    per_rank = -(-n_classes // world)
    start = min(rank * per_rank, n_classes)
    return start, min(per_rank, n_classes - start)


def shard_range(n_classes: int, group=None) -> tuple[int, int]:
    """``(vocab_start_index, C_r)`` of this rank's classes when ``n_classes`` are split over
    ``group`` as ``torch.chunk`` and DTensor's ``Shard`` split them (equal shards when
    ``world`` divides ``C``; otherwise the last ranks hold fewer, possibly none).

    Examples::

        >>> start, size = shard_range(50257)  # doctest: +SKIP
        >>> local_logits = logits[:, start : start + size]  # doctest: +SKIP
    """
    _, rank, world = _group_layout(group)
    return _chunk_range(n_classes, rank, world)


def _plain(name: str, value, group):
    """A replicated DTensor (target, weight) as its local tensor; anything else unchanged."""
    if _is_dtensor(value):
        return _from_dtensor(name, value, None, group)[0]
    return value


def _shard_start(vocab_start_index: int | None, rank: int, n_local: int) -> int:
    if vocab_start_index is None:
        return rank * n_local
    if isinstance(vocab_start_index, bool) or not isinstance(vocab_start_index, int):
        raise TypeError(f"vocab_start_index: expected an int or None, got {vocab_start_index!r}")
    if vocab_start_index < 0:
        raise ValueError(f"vocab_start_index: expected >= 0, got {vocab_start_index}")
    return vocab_start_index


def _make_spec(
    *,
    group,
    rank: int,
    world: int,
    start: int,
    n_local: int,
    weight: Tensor | None,
    ignore_index: int,
    eps: float,
    scale: float,
    cap: float,
    prob_target: bool,
    return_stats: bool,
    acc: torch.dtype,
) -> _Spec:
    weight_acc = weight.to(acc) if weight is not None else None
    weight_local = None
    if weight_acc is not None:
        if start + n_local > weight_acc.shape[0]:
            # Every rank sees the same weight, so a slice past its end is a layout error; keep
            # this rank in the collective with zeros and let the gathered header's check raise
            # the same error on every rank instead of leaving the others waiting.
            weight_local = weight_acc.new_zeros(n_local)
        else:
            weight_local = weight_acc[start : start + n_local]
    return _Spec(
        group=group,
        rank=rank,
        world=world,
        start=start,
        n_local=n_local,
        weight=weight_acc,
        weight_local=weight_local,
        ignore_index=ignore_index,
        eps=eps,
        logit_scale=scale,
        softcap=cap,
        prob_target=prob_target,
        with_stats=return_stats,
        acc=acc,
    )


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
        input, target, weight, ignore_index, reduction, label_smoothing: as in
            :func:`fused_ce.cross_entropy`, over the global classes.
        logit_scale, softcap, z_loss, return_stats: likewise.
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
    # back through it).
    rows = input.movedim(class_dim, -1).reshape(-1, n_local)
    rows_target = (
        target.movedim(class_dim, -1).reshape(-1, n_local) if prob_target else target.reshape(-1)
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
    n_local = check_linear(input, linear_weight, linear_bias)
    rows_per_chunk = check_chunk_size(chunk_size)
    check_target(target, input)
    if not isinstance(sequence_parallel, bool):
        raise TypeError(f"sequence_parallel: expected a bool, got {sequence_parallel!r}")
    resolve(backend, input)
    group, rank, world = _group_layout(group)
    start = _shard_start(vocab_start_index, rank, n_local)
    local_batch = input.shape[:-1]
    sequence_parallel = sequence_parallel and world > 1
    prob_batch = local_batch
    if sequence_parallel:
        if input.dim() < 2:
            raise ValueError(
                "input: sequence_parallel needs token rows, (n, ..., D); got a 1-D input"
            )
        prob_batch = (world * local_batch[0], *local_batch[1:])
    # The global C is known after the exchange (where bounds are asserted); until then only
    # weight's length can stand for it.
    n_classes = weight.shape[0] if weight is not None and weight.dim() == 1 else _NO_INDEX
    eps, out_dtype, valid, prob_target = check_ce_target(
        target,
        input,
        weight,
        ignore_index,
        label_smoothing,
        local_batch,
        (*prob_batch, n_local),
        n_classes,
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
    x = input.reshape(-1, input.shape[-1])
    rows_target = target.reshape(-1, n_local) if prob_target else target.reshape(-1)
    batch_shape = (world, *local_batch) if sequence_parallel else local_batch
    n_rows = x.shape[0] * (world if sequence_parallel else 1)
    head = _HeadSpec(
        rows_per_chunk=chunk_rows(rows_per_chunk, n_rows, n_local, x),
        sequence_parallel=sequence_parallel,
    )
    loss, lse, entropy, argmax, target_argmax, all_target = _VocabParallelLinearCE.apply(
        x, linear_weight, linear_bias, rows_target, spec, head
    )
    if sequence_parallel:
        target = all_target.view(*batch_shape, *target.shape[len(local_batch) :])
        valid = None if prob_target else target.long() != ignore_index
    divisor = _ce_divisor(reduction, valid, target, weight, n_rows, input.dtype)
    result = _finish(
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
    if not head.sequence_parallel:
        return result

    def own(value: Tensor) -> Tensor:
        return _OwnRows.apply(value, rank, world, group)

    if not return_stats:
        return own(result) if reduction == "none" else result
    z_rows = own(result.z_loss) if reduction == "none" else result.z_loss
    return CrossEntropyStats(
        own(result.loss) if reduction == "none" else result.loss,
        own(result.lse),
        z_rows,
        own(result.entropy),
        result.accuracy,
    )
