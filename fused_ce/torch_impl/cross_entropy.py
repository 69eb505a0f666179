"""Softmax + cross-entropy in plain PyTorch, chunked over rows (same math as the kernels).

A chunk holds about ``CHUNK_ELEMENTS`` logits: whole outer blocks of the ``(n_outer, C,
n_inner)`` view while one fits, else pieces of one block's inner dim (a ``(1, C, H, W)`` input
is no single ``C * H * W`` chunk). Each chunk is worked in place in one ``rows x C`` buffer of
the accumulation dtype. In the backward that buffer is the caller's gradient buffer itself
whenever it has that dtype and a row-major view (the fused linear heads pass their fp32 logits
buffer as both logits and gradient), so the backward then makes no chunk-sized temporary at
all; otherwise it is one copy of the chunk. The forward holds two (a copy of the logits and
their exponentials)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .._common import CEOptions, accumulation_dtype, forward_outputs
from . import CHUNK_ELEMENTS


def _rows_view(t: torch.Tensor) -> torch.Tensor | None:
    """(n, C, s) as an (n * s, C) view, or None when the strides allow none (NCHW)."""
    try:
        return t.movedim(1, -1).view(-1, t.shape[1])
    except RuntimeError:
        return None


def _copy_rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A private (n * s, C) copy of an (n, C, s) chunk in ``dtype``."""
    n, n_classes, s = t.shape
    out = torch.empty(n, s, n_classes, dtype=dtype, device=t.device)
    out.copy_(t.movedim(1, -1))
    return out.view(n * s, n_classes)  # not view(-1, C): C may be 0


def _final_logits_(z: torch.Tensor, logit_scale: float, softcap: float) -> torch.Tensor | None:
    """In place: ``z *= logit_scale``, then ``z = softcap * tanh(z / softcap)`` when
    ``softcap > 0``; returns ``1 - tanh^2`` (the cap's slope) for the backward, else None."""
    if logit_scale != 1.0:
        z.mul_(logit_scale)
    if softcap <= 0.0:
        return None
    z.div_(softcap).tanh_()
    slope = z.square().neg_().add_(1.0)
    z.mul_(softcap)
    return slope


class _Chunk(NamedTuple):
    """One chunk of ``(n_outer, C, n_inner)`` logits: ``logits[outer, :, inner]``, whose rows
    are ``rows`` of the flat per-row outputs."""

    outer: slice
    inner: slice
    rows: slice

    def shape(self) -> tuple[int, int]:
        """``(outer count, inner count)``."""
        return self.outer.stop - self.outer.start, self.inner.stop - self.inner.start


def _chunks(n_outer: int, n_classes: int, n_inner: int):
    """Chunks of about ``CHUNK_ELEMENTS`` logits (at least one row): whole outer blocks while
    one fits, else pieces of one block's inner dim, so a ``(1, C, H, W)`` input is worked in
    bounded slices too, not as one ``C * H * W`` chunk."""
    block = n_classes * n_inner
    if block <= CHUNK_ELEMENTS or n_inner == 1:
        step = max(1, CHUNK_ELEMENTS // max(block, 1))
        for start in range(0, n_outer, step):
            stop = min(start + step, n_outer)
            yield _Chunk(
                slice(start, stop), slice(0, n_inner), slice(start * n_inner, stop * n_inner)
            )
        return
    step = max(1, CHUNK_ELEMENTS // max(n_classes, 1))
    for outer in range(n_outer):
        for start in range(0, n_inner, step):
            stop = min(start + step, n_inner)
            first = outer * n_inner
            yield _Chunk(
                slice(outer, outer + 1), slice(start, stop), slice(first + start, first + stop)
            )


def _smoothed_target_(t: torch.Tensor, weight, label_smoothing: float, n_classes: int):
    """In place: ``u = w * ((1 - eps) * t + eps / C)`` for a probability-target chunk."""
    if label_smoothing > 0.0:
        t.mul_(1.0 - label_smoothing).add_(label_smoothing / n_classes)
    if weight is not None:
        t.mul_(weight)
    return t


def forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    options: CEOptions,
    *,
    with_stats: bool = False,
    z_loss: float = 0.0,
    grad_scale: torch.Tensor | None = None,
    grad_logits: torch.Tensor | None = None,
    grad_target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Per-row ``(loss, lse, saved, entropy, argmax)`` for ``(n_outer, C, n_inner)`` logits
    (see :func:`forward_outputs` and kernels/cross_entropy.py).

    With ``grad_scale`` (0-d) it also writes the gradient of ``grad_scale * sum_n (loss_n +
    z_loss * v_n * lse_n^2)`` into ``grad_logits`` (may be ``logits``) and ``grad_target``, as
    ``launch.cross_entropy.forward`` does (here by the backward's chunked pass)."""
    outputs = _forward(logits, target, weight, options, with_stats)
    if grad_scale is not None and (grad_logits is not None or grad_target is not None):
        n_rows = outputs[0].shape[0]
        dtype = outputs[0].dtype
        grad_loss = grad_scale.to(dtype).expand(n_rows)
        grad_lse = None
        if z_loss > 0.0:
            grad_lse = z_loss_grad_lse(grad_loss, outputs[1], target, options.ignore_index, z_loss)
        backward(
            grad_loss,
            grad_lse,
            logits,
            target,
            weight,
            outputs[2],
            options,
            grad_logits if grad_logits is not None else torch.empty_like(logits),
            grad_target,
        )
    return outputs


def z_loss_grad_lse(
    grad_loss: torch.Tensor,
    lse: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    z_loss: float,
) -> torch.Tensor:
    """Per row, the upstream gradient of lse that ``grad_loss * z_loss * v * lse^2`` sends:
    ``2 z_loss grad_loss v lse`` (0 for ignored rows, whatever their lse)."""
    grad_lse = (2.0 * z_loss) * grad_loss * lse
    if target.dim() == 3:
        return grad_lse
    # As int64, as torch compares: a uint8 target would wrap ignore_index.
    return torch.where(target.reshape(-1).long() != ignore_index, grad_lse, 0.0)


def _forward(logits, target, weight, options, with_stats):
    ignore_index, label_smoothing, logit_scale, softcap = options
    n_outer, n_classes, n_inner = logits.shape
    dtype = accumulation_dtype(logits.dtype, target.dtype)
    prob_target = target.dim() == 3
    outputs = forward_outputs(n_outer * n_inner, dtype, logits.device, with_stats)
    loss, lse, saved, entropy, argmax = outputs
    row_max, log_sum, linear_sum = saved
    if not n_classes:
        # No class (every class index must be ignored): torch's loss is 0 per row, NaN with
        # label smoothing over class indices (its eps / C is inf, times 0); the statistics
        # are the kernels' (lse -inf, entropy NaN, argmax 0).
        loss.fill_(math.nan if label_smoothing > 0.0 and not prob_target else 0.0)
        row_max.zero_()
        log_sum.fill_(-math.inf)
        linear_sum.zero_()
        lse.fill_(-math.inf)
        if with_stats:
            entropy.fill_(math.nan)
            argmax.zero_()
        return outputs
    w = weight.to(dtype) if weight is not None else None
    for chunk in _chunks(n_outer, n_classes, n_inner):
        rows = chunk.rows
        z = _copy_rows(logits[chunk.outer, :, chunk.inner], dtype)
        _final_logits_(z, logit_scale, softcap)
        if with_stats:
            argmax[rows] = z.argmax(1) if n_classes else 0
        # Relative to the row max, as in the kernel: lse - x from an already rounded lse loses
        # |x| * eps (5e-4 at |x| = 1e4 in fp32); (lse - m) - (x - m) keeps it.
        m = z.amax(1) if n_classes else z.new_zeros(z.shape[0])
        # An all -inf row shifts by 0 (as the kernel's reference); a +inf (or NaN) max stays,
        # so that row's loss and gradient are NaN, as torch's.
        m = torch.where(m == float("-inf"), 0.0, m)
        z.sub_(m[:, None])
        e = z.exp()
        s = e.sum(1)
        ls = s.log()
        if with_stats:
            # H = log_s - sum_c e_c (x_c - m) / s; lanes with e == 0 add 0, not 0 * -inf.
            entropy[rows] = ls - torch.where(e > 0.0, e.mul_(z), 0.0).sum(1) / s
        del e
        if prob_target:
            u = _smoothed_target_(
                _copy_rows(target[chunk.outer, :, chunk.inner], dtype),
                w,
                label_smoothing,
                n_classes,
            )
            u_sum = u.sum(1)
            loss[rows] = u_sum * ls - torch.linalg.vecdot(u, z)
            linear_sum[rows] = u_sum
        else:
            y = target[chunk.outer, chunk.inner].reshape(-1).long()
            valid = y != ignore_index
            y_safe = torch.where(valid, y, 0)
            nll = ls - z.gather(1, y_safe[:, None]).squeeze(1)
            if w is not None:
                nll = nll * w[y_safe]
            if label_smoothing > 0.0:
                # sum_c w_c (lse - x_c) = W log_s - sum_c w_c (x_c - m): one matrix-vector product.
                u_sum = w.sum() if w is not None else float(n_classes)
                dot = z @ w if w is not None else z.sum(1)
                smooth = u_sum * ls - dot
                nll = (1.0 - label_smoothing) * nll + (label_smoothing / n_classes) * smooth
                linear_sum[rows] = u_sum
            else:
                linear_sum[rows] = 0.0
            loss[rows] = torch.where(valid, nll, 0.0)
        row_max[rows] = m
        log_sum[rows] = ls
        lse[rows] = m + ls
    return outputs


def backward(
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor | None,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    saved: torch.Tensor,
    options: CEOptions,
    grad_logits: torch.Tensor,
    grad_target: torch.Tensor | None,
) -> None:
    """Write ``dlogits`` into ``grad_logits`` (which may be ``logits`` itself) and, for
    probability targets, ``dtarget`` into ``grad_target``, chunk by chunk, in place::

        p = exp((z - m) - log_s);  dz = p * coef_p - coef_y * onehot(y) - coef_u * u

    then ``dx = dz * logit_scale * (1 - tanh^2)`` (the per-row coefficients carry the scale).
    """
    ignore_index, label_smoothing, logit_scale, softcap = options
    n_outer, n_classes, n_inner = logits.shape
    if not n_classes:
        return  # empty gradients
    dtype = saved.dtype
    prob_target = target.dim() == 3
    row_max, log_sum, linear_sum = saved
    w = weight.to(dtype) if weight is not None else None
    for chunk in _chunks(n_outer, n_classes, n_inner):
        rows = chunk.rows
        n_chunk_outer, n_chunk_inner = chunk.shape()
        part, out = logits[chunk.outer, :, chunk.inner], grad_logits[chunk.outer, :, chunk.inner]
        if prob_target:
            # Copied first: with an in-place backward the target may share the logits' memory.
            u = _smoothed_target_(
                _copy_rows(target[chunk.outer, :, chunk.inner], dtype),
                w,
                label_smoothing,
                n_classes,
            )
        direct = _rows_view(out) if out.dtype == dtype else None
        if direct is None:
            buf = _copy_rows(part, dtype)
        else:
            buf = direct
            if out.data_ptr() != part.data_ptr() or out.stride() != part.stride():
                out.copy_(part)
        slope = _final_logits_(buf, logit_scale, softcap)
        buf.sub_(row_max[rows][:, None])  # z - m: exact near the max
        ls = log_sum[rows][:, None]
        g = grad_loss[rows].to(dtype)
        if prob_target and grad_target is not None:
            # d loss / d t_c = g (1 - eps) w_c (lse - z_c), before buf turns into p.
            grad_t = torch.sub(ls, buf).mul_((g * (1.0 - label_smoothing))[:, None])
            if w is not None:
                grad_t.mul_(w)
            grad_target[chunk.outer, :, chunk.inner].copy_(
                grad_t.view(n_chunk_outer, n_chunk_inner, n_classes).movedim(-1, 1)
            )
        p = buf.sub_(ls).exp_()
        if prob_target:
            coef_u = g * logit_scale
            coef_p = coef_u * linear_sum[rows]
        else:
            y = target[chunk.outer, chunk.inner].reshape(-1).long()
            valid = y != ignore_index
            y_safe = torch.where(valid, y, 0)
            coef_y = ((1.0 - label_smoothing) * logit_scale) * g
            if w is not None:
                coef_y = coef_y * w[y_safe]
            # where(), not a product with v: g is inf for an all-ignored 'mean' (0/0), and the
            # gradient of an ignored row must stay exactly 0.
            coef_y = torch.where(valid, coef_y, 0.0)
            coef_p = coef_y
            if label_smoothing > 0.0:
                coef_u = torch.where(valid, (label_smoothing / n_classes * logit_scale) * g, 0.0)
                coef_p = coef_p + coef_u * linear_sum[rows]
        if grad_lse is not None:
            coef_p = coef_p + logit_scale * grad_lse[rows].to(dtype)
        grad = p.mul_(coef_p[:, None])
        if prob_target:
            grad.addcmul_(u, coef_u[:, None], value=-1.0)
        else:
            grad.scatter_add_(1, y_safe[:, None], -coef_y[:, None])
            if label_smoothing > 0.0:
                if w is not None:
                    grad.addcmul_(coef_u[:, None], w[None, :], value=-1.0)
                else:
                    grad.sub_(coef_u[:, None])
        if slope is not None:
            grad.mul_(slope)
        if direct is None:
            out.copy_(grad.view(n_chunk_outer, n_chunk_inner, n_classes).movedim(-1, 1))
