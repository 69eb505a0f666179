"""Fused linear + loss heads: the loss of ``F.linear(input, linear_weight, linear_bias)``
without the ``N x V`` logits.

The gradient the lecture derives, ``dL/dz = o - t`` (softmax or sigmoid output minus target),
gives ``dW = sum_n (o_n - t_n) x_n^T`` and ``dX = (o - t) W``: both are sums over tiles of the
logits, so no more than a tile (Triton) or a chunk of rows (cuBLAS, torch) of them ever exists.

Paths (``path=``):

* ``"chunked"`` (the default): per chunk of rows, the logits through one GEMM into a reused
  buffer, the core loss kernel (``fused_ce.launch``; the torch path on CPU) turns it into
  ``dL/dz`` in place, ``dX`` rows by one GEMM, ``dW``/``db`` accumulated in fp32. For a
  ``'mean'``/``'sum'`` loss whose gradient is wanted, the gradients are made during the forward
  (three GEMMs in all); otherwise the forward saves the per-row log-sum-exp and the backward
  recomputes (four).
* ``"fused"`` (CE only, Triton): no logits at all; the forward computes the log-sum-exp tile by
  tile, the backward recomputes the tiles and forms ``dX`` and ``dW`` in registers
  (deterministic, no atomics). Best for small ``D``; see ``kernels/linear_cross_entropy.py``.
"""

from __future__ import annotations

from typing import Literal, overload

import torch
from torch import Tensor

from ._autocast import any_autocast_enabled, autocast_cast, autocast_dtype
from ._backend import resolve
from ._chunked import chunk_rows, gathered_logits
from ._common import accumulation_dtype
from ._docs import share_ce_math
from ._reduction import (
    CrossEntropyStats,
    _ce_divisor,
    _finish,
    _grad_scale,
    _reduce,
    _target_log_prob,
)
from ._validation import (
    PATHS,
    check_batch_invariant,
    check_bce_weights,
    check_ce_target,
    check_chunk_size,
    check_floating,
    check_ignore_index,
    check_linear,
    check_options,
    check_reduction,
    check_target,
)
from .ops.linear import (
    linear_bce_forward_call,
    linear_bce_scalar_call,
    linear_ce_forward_call,
    linear_ce_scalar_call,
)


def _grad_flags(*tensors: Tensor | None) -> tuple[bool, ...]:
    """Which operands want a gradient from this call (no host sync: Python attributes)."""
    enabled = torch.is_grad_enabled()
    return tuple(enabled and t is not None and t.requires_grad for t in tensors)


def _autocast_operands(
    input: Tensor, linear_operands: tuple[Tensor | None, ...], loss_operands: tuple
) -> tuple[Tensor, tuple, tuple, bool]:
    """Under ``torch.autocast`` (for ``input``'s device), what ``F.linear`` followed by torch's
    loss would compute on: the linear operands in the autocast dtype (the GEMMs run in it),
    the loss's floating operands (class weights, ``pos_weight``, a floating target) in fp32
    (torch's autocast runs both losses in fp32). Outside autocast, all as given. The last item
    says whether autocast is on."""
    autocast = any_autocast_enabled() and isinstance(input, Tensor)
    dtype = autocast_dtype(input) if autocast else None
    if dtype is None:
        return input, linear_operands, loss_operands, False
    linear_operands = tuple(autocast_cast(t, dtype) for t in linear_operands)
    loss_operands = tuple(autocast_cast(t, torch.float32) for t in loss_operands)
    return autocast_cast(input, dtype), linear_operands, loss_operands, True


def _as_rows(input: Tensor) -> Tensor:
    """``(..., D)`` as ``(N, D)``: a view when the leading dims merge, else a copy of input."""
    return input.reshape(-1, input.shape[-1])


def _shifted(target: Tensor, ignore_index: int) -> Tensor:
    """``target`` moved one place left along its last (sequence) dim, ``ignore_index`` at
    each last position: the labels of a causal LM's next-token loss. int64 (as torch compares
    class indices), whatever the target's integer dtype, so any ``ignore_index`` fits."""
    if target.dtype not in (torch.int64, torch.uint8):
        raise ValueError(
            f"shift: needs class-index targets (int64 or uint8), got dtype {target.dtype}"
        )
    if target.dim() == 0:
        raise ValueError("shift: needs a target with a sequence dim, got a 0-d target")
    shifted = torch.full(target.shape, ignore_index, dtype=torch.int64, device=target.device)
    shifted[..., :-1] = target[..., 1:]
    return shifted


@overload
def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = ...,
    weight: Tensor | None = ...,
    reduction: str = ...,
    ignore_index: int = ...,
    label_smoothing: float = ...,
    chunk_size: int | None = ...,
    path: str = ...,
    logit_scale: float = ...,
    softcap: float | None = ...,
    z_loss: float = ...,
    return_stats: Literal[False] = ...,
    shift: bool = ...,
    backend: str | None = ...,
    batch_invariant: bool | None = ...,
) -> Tensor: ...


@overload
def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = ...,
    weight: Tensor | None = ...,
    reduction: str = ...,
    ignore_index: int = ...,
    label_smoothing: float = ...,
    chunk_size: int | None = ...,
    path: str = ...,
    logit_scale: float = ...,
    softcap: float | None = ...,
    z_loss: float = ...,
    return_stats: Literal[True],
    shift: bool = ...,
    backend: str | None = ...,
    batch_invariant: bool | None = ...,
) -> CrossEntropyStats: ...


@overload
def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = ...,
    weight: Tensor | None = ...,
    reduction: str = ...,
    ignore_index: int = ...,
    label_smoothing: float = ...,
    chunk_size: int | None = ...,
    path: str = ...,
    logit_scale: float = ...,
    softcap: float | None = ...,
    z_loss: float = ...,
    return_stats: bool,
    shift: bool = ...,
    backend: str | None = ...,
    batch_invariant: bool | None = ...,
) -> Tensor | CrossEntropyStats: ...


@share_ce_math
def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
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
) -> Tensor | CrossEntropyStats:
    r"""Linear layer + softmax cross-entropy, fused: the result and gradients of
    ``softmax_cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` (and of
    ``torch.nn.functional.linear_cross_entropy``), without the ``N x V`` logits.

    The logits are :math:`z_n = W x_n + b` over :math:`C = V` classes, never stored whole.
    {CE_MATH}

    Gradients, with :math:`G = \partial L/\partial z` (softmax minus the one-hot or smoothed
    target, weighted, times the upstream gradient): :math:`\partial L/\partial x = G W`,
    :math:`\partial L/\partial W = G^\top X`, :math:`\partial L/\partial b = \sum_n G_n`; the
    probability target receives :math:`-(1-\varepsilon)\,w_c \log p_c` per unit loss.

    Args:
        input (Tensor): features, any leading dims (``N`` rows in all); fp16, bf16, fp32 or
            fp64.
        linear_weight (Tensor): ``input``'s dtype and device.
        target (Tensor): class indices (int64 or uint8), or probabilities (floating point).
        linear_bias (Tensor, optional): ``input``'s dtype. Default: ``None``.
        weight (Tensor, optional): class weights ``(V,)`` (``input``'s dtype for class-index
            targets); not differentiable. Default: ``None`` (all ones).
        reduction (str, optional): ``'none'``, ``'mean'`` or ``'sum'``. Default: ``'mean'``.
        ignore_index (int, optional): class index whose rows contribute nothing (any int);
            must be negative with probability targets. Default: ``-100``.
        label_smoothing (float, optional): :math:`\varepsilon \in [0, 1]`; negative values act
            as 0. Default: ``0.0``.
        chunk_size (int, optional): rows per chunk on the chunked path; bounds the extra
            memory to about ``chunk_size x V`` logits. Results do not depend on it beyond fp32
            summation order. Default: ``None``: a 512 MiB logits buffer on CUDA, 16 MiB of
            fp32 on CPU (see ``fused_ce._chunked``).
        path (str, optional): ``'auto'`` (currently ``'chunked'``), ``'chunked'`` or
            ``'fused'`` (Triton only). Default: ``'auto'``.
        logit_scale (float, optional), softcap (float, optional), z_loss (float, optional),
            return_stats (bool, optional): as in :func:`fused_ce.softmax_cross_entropy`, with
            the same defaults (``1.0``, ``None``, ``0.0``, ``False``); both paths take them.
        shift (bool, optional): the causal-LM label shift inside the op: the row at sequence
            position :math:`t` is scored against ``target``'s class at :math:`t + 1`, and the
            last position of each sequence is ignored, so ``(B, T, D)`` hidden states take their
            ``(B, T)`` labels as they are, with no ``[:, :-1]`` slice (a copy) of the hidden
            states. The sequence dim is ``target``'s last (a 1-D target is one sequence).
            The result is that of ``input[..., :-1, :]`` against ``target[..., 1:]``; with
            ``reduction='none'`` it keeps ``target``'s shape, 0 at each last position.
            Class-index targets only. Default: ``False``.
        backend (str, optional): ``'auto'``, ``'triton'``, ``'native'`` or ``'torch'``; on the
            chunked path it picks the per-chunk loss kernels, the GEMMs being torch's. Default:
            ``None`` (``$FUSED_CE_BACKEND``, else ``'auto'``).
        batch_invariant (bool, optional): each row's loss and input gradient are the same bits
            whatever the other rows and the row's place in the batch. The fused path always
            is (tiles of fixed shape); on the chunked path ``True`` gives every GEMM and
            kernel call one shape (``chunk_size`` rows, default at most 256, the last chunk
            padded with zero rows), at the cost of the padded rows' work and, for a large
            ``V``, more and smaller chunks (see docs/determinism.md). Default: ``None``:
            invariant where it costs nothing (the fused path), not on the chunked one.

    Returns:
        Tensor: the loss, accumulated and returned in fp32 (fp64 when an operand is fp64), for
        every reduction: fp16/bf16 heads give an fp32 loss, as transformers' own loss and the
        other fused heads do. ``dW`` and ``db`` are accumulated in fp32 across chunks and
        rounded once to their operands' dtypes. Under ``torch.autocast`` the GEMMs run in the
        autocast dtype and the loss in fp32, as ``F.linear`` then ``F.cross_entropy`` would.
        CrossEntropyStats: with ``return_stats=True``, whose ``loss`` is that loss.

    Shape:
        - Input: :math:`(*, D)`, :math:`N` rows in all.
        - Linear weight: :math:`(V, D)`; linear bias: :math:`(V)`.
        - Target: class indices :math:`(*)`, or probabilities :math:`(*, V)`.
        - Output: a scalar; with ``reduction='none'`` :math:`(*)`.

    Examples::

        >>> x = torch.randn(6, 16, requires_grad=True)
        >>> head = torch.randn(100, 16, requires_grad=True)
        >>> target = torch.randint(0, 100, (6,))
        >>> loss = fused_ce.linear_cross_entropy(x, head, target, chunk_size=4)
        >>> loss.backward()
        >>> torch.allclose(loss, F.cross_entropy(x @ head.T, target))
        True

    With ``reduction='mean'``/``'sum'`` and a gradient wanted, the chunked path computes the
    gradients during the forward (see ``fused_ce.ops.linear``): ``loss.backward()`` then only
    multiplies them by the upstream gradient (not with ``z_loss`` or ``return_stats``, whose
    extra outputs need the saved statistics). Double backward is not supported.
    """
    check_reduction(reduction)
    ignore_index = check_ignore_index(ignore_index)
    scale, cap = check_options(logit_scale, softcap, z_loss, return_stats)
    input, (linear_weight, linear_bias), (target, weight), autocast = _autocast_operands(
        input, (linear_weight, linear_bias), (target, weight)
    )
    n_classes = check_linear(input, linear_weight, linear_bias)
    rows_per_chunk = check_chunk_size(chunk_size)
    check_target(target, input)
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS}, got {path!r}")
    if shift:
        target = _shifted(target, ignore_index)
    fixed_rows = check_batch_invariant(batch_invariant) and path != "fused"
    batch_shape = input.shape[:-1]
    wants = _grad_flags(
        input, linear_weight, linear_bias, target if target.is_floating_point() else None
    )
    one_sweep = reduction != "none" and path != "fused" and z_loss == 0.0 and not return_stats
    checked = check_ce_target(
        target,
        input,
        weight,
        ignore_index,
        label_smoothing,
        batch_shape,
        (*batch_shape, n_classes),
        n_classes,
        all_valid_as_none=one_sweep and any(wants),
        weight_dtype=torch.float32 if autocast else None,
    )
    prob_target = checked.prob_target
    eps = checked.label_smoothing
    rows_target = target.reshape(-1, n_classes) if prob_target else target.reshape(-1)

    backend = resolve(backend, input)
    fused = path == "fused"
    if fused and backend != "triton":
        raise RuntimeError(
            f"path: 'fused' runs the Triton kernels, but the backend resolved to {backend!r} "
            f"(input on {input.device}); use path='chunked'"
        )
    x = _as_rows(input)
    n_rows = x.shape[0]
    acc = accumulation_dtype(input.dtype, target.dtype)
    divisor = _ce_divisor(reduction, checked.valid, target, weight, n_rows, input.dtype, eps)

    if one_sweep and any(wants):
        if checked.valid is None and not prob_target:
            # Every class index counts (checked on the host): no divisor ops.
            reduce_scale = _grad_scale(reduction, checked, target, weight, n_rows, input)
        elif reduction == "sum":
            reduce_scale = torch.ones((), dtype=acc, device=input.device)
        elif isinstance(divisor, Tensor):
            reduce_scale = 1.0 / divisor
        else:
            reduce_scale = torch.full(
                (), 1.0 / divisor if divisor else float("nan"), dtype=acc, device=input.device
            )
        loss, *_ = linear_ce_scalar_call(
            x,
            linear_weight,
            linear_bias,
            rows_target,
            weight,
            reduce_scale,
            ignore_index,
            eps,
            scale,
            cap,
            rows_per_chunk,
            backend,
            *wants,
            fixed_rows,
        )
        return loss  # in the accumulation dtype, as _finish below
    loss, lse, saved, entropy, argmax = linear_ce_forward_call(
        x,
        linear_weight,
        linear_bias,
        rows_target,
        weight,
        ignore_index,
        eps,
        scale,
        cap,
        return_stats,
        rows_per_chunk,
        fused,
        backend,
        fixed_rows,
    )
    target_classes = target.argmax(-1) if prob_target and return_stats else target
    target_log_prob = None
    if return_stats:
        target_logit = None
        if n_classes and (prob_target or weight is not None or eps > 0.0):
            # The loss is not the plain NLL: one gathered logit per row (N x D reads of the
            # head, no logits).
            index = target_classes.reshape(-1).long()
            if checked.valid is not None:
                index = torch.where(checked.valid.reshape(-1), index, 0)
            rows = chunk_rows(rows_per_chunk, n_rows, n_classes, x, backend=backend)
            target_logit = gathered_logits(x, linear_weight, linear_bias, index, rows)
        target_log_prob = _target_log_prob(loss, saved, target_logit, scale, cap)
    return _finish(
        loss,
        lse,
        entropy,
        argmax,
        batch_shape=batch_shape,
        valid=checked.valid,
        target_classes=target_classes,
        reduction=reduction,
        divisor=divisor,
        out_dtype=acc,
        z_loss=float(z_loss),
        return_stats=return_stats,
        target_log_prob=target_log_prob,
    )


def linear_binary_cross_entropy_with_logits(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    pos_weight: Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    backend: str | None = None,
    batch_invariant: bool | None = None,
) -> Tensor:
    r"""Linear layer + sigmoid binary cross-entropy, fused: the result and gradients of
    ``sigmoid_binary_cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)``
    without an ``N x C`` buffer when the loss is reduced.

    The lecture's sigmoid neuron (``C = 1``) and multi-label heads (``C > 1``). With
    :math:`z = W x + b`, :math:`o = \sigma(z)`, weight :math:`w` and positive-class weight
    :math:`p_w` (ones when ``None``), elementwise

    .. math:: \ell = w\,[(1-t)\,z + ((p_w-1)t+1)\log(1+e^{-z})]

    and :math:`G = \partial\ell/\partial z = w\,(((p_w-1)t+1)\,o - p_w t)` (the lecture's
    :math:`o - t` when unweighted), so :math:`\partial L/\partial W = \sum_n G_n x_n^\top`,
    :math:`\partial L/\partial x = G W`, :math:`\partial L/\partial b = \sum_n G_n`; the target
    receives :math:`w\,(-z - (p_w-1)\log o)`.

    Args:
        input (Tensor): features; fp16, bf16, fp32 or fp64.
        linear_weight (Tensor): ``input``'s dtype and device.
        target (Tensor): floating point, the logits' shape.
        linear_bias (Tensor, optional): ``input``'s dtype. Default: ``None``.
        weight (Tensor, optional): broadcastable to the logits' shape (right-aligned); not
            differentiable. Default: ``None`` (all ones).
        pos_weight (Tensor, optional): broadcastable to the logits' shape; a ``(C,)`` tensor
            weighs each output. Not differentiable. Default: ``None``.
        reduction (str, optional): ``'none'``, ``'mean'`` (divides by ``N * C``) or ``'sum'``.
            Default: ``'mean'``.
        chunk_size (int, optional): rows per chunk (see :func:`linear_cross_entropy`).
            Default: ``None``.
        backend (str, optional): ``'auto'``, ``'triton'``, ``'native'`` or ``'torch'``: the
            per-chunk BCE kernel. Default: ``None`` (``$FUSED_CE_BACKEND``, else ``'auto'``).
        batch_invariant (bool, optional): each row's loss and input gradient the same bits in
            any batch, by fixed-shape chunks (see :func:`linear_cross_entropy`; the torch
            backend's elementwise BCE itself is not bitwise invariant, docs/determinism.md).
            Default: ``None`` (off).

    Returns:
        Tensor: the loss, accumulated and returned in fp32 (fp64 when an operand is fp64), for
        every reduction (see :func:`linear_cross_entropy`; under ``torch.autocast`` likewise).

    Shape:
        - Input: :math:`(*, D)`; linear weight :math:`(C, D)`; linear bias :math:`(C)`.
        - Target: :math:`(*, C)`, the logits' shape.
        - Output: a scalar; with ``reduction='none'`` :math:`(*, C)`.

    Examples::

        >>> bits = torch.randint(0, 2, (64, 10)).float()
        >>> neuron = torch.zeros(1, 10, requires_grad=True)
        >>> label = (bits.sum(1, keepdim=True) > 5).float()
        >>> loss = fused_ce.linear_binary_cross_entropy_with_logits(bits, neuron, label)
        >>> loss.backward()
        >>> round(loss.item(), 4)  # log 2: the untrained neuron says 0.5 everywhere
        0.6931
    """
    check_reduction(reduction)
    input, (linear_weight, linear_bias), (target, weight, pos_weight), _ = _autocast_operands(
        input, (linear_weight, linear_bias), (target, weight, pos_weight)
    )
    n_classes = check_linear(input, linear_weight, linear_bias)
    rows_per_chunk = check_chunk_size(chunk_size)
    fixed_rows = check_batch_invariant(batch_invariant)
    check_target(target, input)
    check_floating("target", target)
    logits_shape = (*input.shape[:-1], n_classes)
    if tuple(target.shape) != logits_shape:
        raise ValueError(
            f"target: Target size ({tuple(target.shape)}) must be the same as input size "
            f"{logits_shape} (the logits': input's leading dims and the {n_classes} outputs)"
        )
    check_bce_weights(weight, pos_weight, input, logits_shape, "the logits' shape")
    # (N, C) with stride 0 along broadcast dims (a copy only when no view exists).
    rows = [
        t.expand(logits_shape).reshape(-1, n_classes) if t is not None else None
        for t in (weight, pos_weight)
    ]

    backend = resolve(backend, input)
    x = _as_rows(input)
    rows_target = target.reshape(-1, n_classes)
    acc = accumulation_dtype(input.dtype, target.dtype)
    wants = _grad_flags(input, linear_weight, linear_bias, target)
    if reduction != "none" and any(wants):
        numel = rows_target.numel()
        value = 1.0 if reduction == "sum" else (1.0 / numel if numel else float("nan"))
        scale = torch.full((), value, dtype=acc, device=input.device)
        loss, *_ = linear_bce_scalar_call(
            x,
            linear_weight,
            linear_bias,
            rows_target,
            *rows,
            scale,
            rows_per_chunk,
            backend,
            *wants,
            fixed_rows,
        )
        return loss
    loss = linear_bce_forward_call(
        x,
        linear_weight,
        linear_bias,
        rows_target,
        *rows,
        rows_per_chunk,
        backend,
        reduction != "none",
        fixed_rows,
    )
    if reduction == "none":
        return loss.view(logits_shape)
    return _reduce(loss, reduction, rows_target.numel(), acc)
