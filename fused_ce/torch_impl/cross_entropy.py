"""Softmax + cross-entropy in plain PyTorch, chunked over rows (same math as the kernels)."""

from __future__ import annotations

import torch

from .._common import accumulation_dtype
from . import CHUNK_ELEMENTS


def _rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n, C, s) -> (n * s, C) in the accumulation dtype (a copy of one chunk only)."""
    return t.movedim(1, -1).reshape(-1, t.shape[1]).to(dtype)


def _linear_weight(
    target_rows: torch.Tensor | None,
    weight: torch.Tensor | None,
    label_smoothing: float,
    n_classes: int,
    like: torch.Tensor,
) -> torch.Tensor:
    """u: ``w * t'`` for probability targets, ``w`` (or ones) for smoothing."""
    if target_rows is not None:
        u = (1.0 - label_smoothing) * target_rows + label_smoothing / n_classes
    else:
        u = torch.ones_like(like[:1])
    if weight is not None:
        u = u * weight.to(like.dtype)
    return u


def _chunks(n_outer: int, row_elements: int):
    step = max(1, CHUNK_ELEMENTS // max(row_elements, 1))
    for start in range(0, n_outer, step):
        yield start, min(start + step, n_outer)


def forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (loss, lse, U) for ``(n_outer, C, n_inner)`` logits; see kernels/cross_entropy.py."""
    n_outer, n_classes, n_inner = logits.shape
    dtype = accumulation_dtype(logits.dtype, target.dtype)
    prob_target = target.dim() == 3
    losses, lses, linear_sums = [], [], []
    for start, stop in _chunks(n_outer, n_classes * n_inner):
        x = _rows(logits[start:stop], dtype)
        # Relative to the row max, as in the kernel: lse - x from an already rounded lse loses
        # |x| * eps (5e-4 at |x| = 1e4 in fp32); (lse - m) - (x - m) keeps it.
        row_max = x.amax(1) if n_classes else x.new_zeros(x.shape[0])
        ref = torch.where(torch.isfinite(row_max), row_max, 0.0)
        x = x - ref[:, None]
        lse = torch.logsumexp(x, dim=1)
        neg_logp = lse[:, None] - x
        if prob_target:
            u = _linear_weight(
                _rows(target[start:stop], dtype), weight, label_smoothing, n_classes, x
            )
            loss = (u * neg_logp).sum(1)
            linear_sum = u.sum(1).expand_as(lse)
        else:
            y = target[start:stop].reshape(-1).long()
            valid = y != ignore_index
            y_safe = torch.where(valid, y, 0)
            loss = neg_logp.gather(1, y_safe[:, None]).squeeze(1)
            if weight is not None:
                loss = loss * weight.to(dtype)[y_safe]
            if label_smoothing > 0.0:
                u = _linear_weight(None, weight, label_smoothing, n_classes, x)
                smooth = (u * neg_logp).sum(1)
                loss = (1.0 - label_smoothing) * loss + (label_smoothing / n_classes) * smooth
                linear_sum = u.sum(1).expand_as(lse)
            else:
                linear_sum = torch.zeros_like(lse)
            loss = torch.where(valid, loss, 0.0)
        losses.append(loss)
        lses.append(lse + ref)
        linear_sums.append(linear_sum)
    if not losses:
        empty = logits.new_empty(0, dtype=dtype)
        return empty, empty.clone(), empty.clone()
    return torch.cat(losses), torch.cat(lses), torch.cat(linear_sums).contiguous()


def backward(
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor | None,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    lse: torch.Tensor,
    linear_sum: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    grad_logits: torch.Tensor,
    grad_target: torch.Tensor | None,
) -> None:
    """Write ``dlogits`` (and ``dtarget`` for probability targets) chunk by chunk."""
    n_outer, n_classes, n_inner = logits.shape
    dtype = lse.dtype
    prob_target = target.dim() == 3
    for start, stop in _chunks(n_outer, n_classes * n_inner):
        rows = slice(start * n_inner, stop * n_inner)
        x = _rows(logits[start:stop], dtype)
        g = grad_loss[rows].to(dtype)[:, None]
        lse_c = lse[rows][:, None]
        p = torch.exp(x - lse_c)
        if prob_target:
            t = _rows(target[start:stop], dtype)
            u = _linear_weight(t, weight, label_smoothing, n_classes, x)
            grad = p * (g * linear_sum[rows][:, None]) - g * u
            if grad_target is not None:
                gt = g * (1.0 - label_smoothing) * (lse_c - x)
                if weight is not None:
                    gt = gt * weight.to(dtype)
                grad_target[start:stop].copy_(
                    gt.reshape(stop - start, n_inner, n_classes).movedim(-1, 1)
                )
        else:
            y = target[start:stop].reshape(-1).long()
            valid = (y != ignore_index)[:, None]
            y_safe = torch.where(valid.squeeze(1), y, 0)
            coef_y = (1.0 - label_smoothing) * g
            if weight is not None:
                coef_y = coef_y * weight.to(dtype)[y_safe][:, None]
            onehot = torch.zeros_like(x).scatter_(1, y_safe[:, None], 1.0)
            grad = (p - onehot) * coef_y
            if label_smoothing > 0.0:
                u = _linear_weight(None, weight, label_smoothing, n_classes, x)
                coef_u = (label_smoothing / n_classes) * g
                grad = grad + coef_u * (p * linear_sum[rows][:, None] - u)
            # where(), not a product: g is inf for an all-ignored 'mean' (0/0).
            grad = torch.where(valid, grad, 0.0)
        if grad_lse is not None:
            grad = grad + grad_lse[rows].to(dtype)[:, None] * p
        grad_logits[start:stop].copy_(grad.reshape(stop - start, n_inner, n_classes).movedim(-1, 1))
