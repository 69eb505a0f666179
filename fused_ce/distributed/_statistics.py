"""The math of the vocab-parallel softmax: each rank's per-row statistics of its slice of the
logits, their combination into the global loss (the same arithmetic in the same order on every
rank), and the local logit gradient."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..torch_impl.cross_entropy import _final_logits_
from ._group import _gather_packed
from ._protocol import Agreement

# An argmax index no real class has: loses every "first index" comparison.
_NO_INDEX = torch.iinfo(torch.int64).max


@dataclass
class _Spec:
    """Everything the per-chunk math needs, fixed for one call."""

    group: object
    rank: int
    world: int
    start: int  # this rank's first global class
    n_local: int  # C_local
    n_classes: int  # C, over all the ranks
    layout: Tensor  # (world, 2) int64 on the device: every rank's (start, C_local)
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


def _make_spec(
    *,
    group,
    rank: int,
    world: int,
    start: int,
    n_local: int,
    agreement: Agreement,
    weight: Tensor | None,
    ignore_index: int,
    eps: float,
    scale: float,
    cap: float,
    prob_target: bool,
    return_stats: bool,
    acc: torch.dtype,
) -> _Spec:
    # The agreement has checked that the slices tile [0, C) and that weight has C entries.
    weight_acc = weight.to(acc) if weight is not None else None
    weight_local = weight_acc[start : start + n_local] if weight_acc is not None else None
    return _Spec(
        group=group,
        rank=rank,
        world=world,
        start=start,
        n_local=n_local,
        n_classes=agreement.n_classes,
        layout=agreement.layout,
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


def _combine(floats: Tensor, ints: Tensor, target: Tensor, spec: _Spec) -> tuple[Tensor, ...]:
    """Every rank's statistics ``(world, k, R)`` -> per-row ``(loss, lse, saved, entropy,
    argmax, target_argmax)``, ``saved = (M', log S, U)`` for the backward, plus ``eps / C``
    (0-d). The same arithmetic in the same order on every rank."""
    starts, sizes = spec.layout.unbind(1)
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
    smooth_scale = spec.eps / floats.new_full((), spec.n_classes)  # eps / C, 0-d
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
            ((y >= 0) & (y < spec.n_classes) | ~valid).all(),
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
    return loss, lse, saved, entropy, argmax, target_argmax, smooth_scale


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


def _exchange(floats: Tensor, ints: Tensor, target: Tensor, spec: _Spec) -> tuple[Tensor, ...]:
    """The forward's exchange of statistics (sizes agreed by the header), then
    :func:`_combine`."""
    floats, ints = _gather_packed([floats, ints], spec.group, spec.world)
    return _combine(floats, ints, target, spec)
