"""Public loss functions: drop-in replacements for ``torch.nn.functional``'s.

Each function validates its arguments the way torch does (with messages that name the
argument), reshapes without copying, calls one fused custom op, and reduces in plain torch.
No function syncs with the host: an out-of-range class index is caught by
``torch._assert_async`` (an error on CPU and under ``torch.compile``, a device-side assert on
CUDA), and the kernels never read memory through an unchecked target.
"""

from __future__ import annotations

import math
from typing import Any, Literal, overload

import torch
from torch import Tensor

from ._autocast import any_autocast_enabled, autocast_cast, autocast_dtype
from ._backend import resolve
from ._common import accumulation_dtype, class_rows
from ._docs import share_ce_math
from ._reduction import CrossEntropyStats, _ce_divisor, _finish, _grad_scale, _target_log_prob
from ._validation import (
    check_bce_weights,
    check_ce_target,
    check_floating,
    check_ignore_index,
    check_inplace,
    check_options,
    check_reduction,
    check_target,
)
from .linear import (  # noqa: F401  (re-exported: the fused linear heads)
    linear_binary_cross_entropy_with_logits,
    linear_cross_entropy,
)
from .ops._autograd import is_eager
from .ops.bce import bce_forward_call, bce_scalar_loss, bce_scalar_native, bce_unreduced_native
from .ops.cross_entropy import (
    ce_forward_call,
    ce_scalar_loss,
    ce_scalar_native,
    ce_unreduced_native,
)


@overload
def softmax_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = ...,
    size_average: bool | None = ...,
    ignore_index: int = ...,
    reduce: bool | None = ...,
    reduction: str = ...,
    label_smoothing: float = ...,
    *,
    logit_scale: float = ...,
    softcap: float | None = ...,
    z_loss: float = ...,
    return_stats: Literal[False] = ...,
    inplace_backward: bool = ...,
    backend: str | None = ...,
) -> Tensor: ...


@overload
def softmax_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = ...,
    size_average: bool | None = ...,
    ignore_index: int = ...,
    reduce: bool | None = ...,
    reduction: str = ...,
    label_smoothing: float = ...,
    *,
    logit_scale: float = ...,
    softcap: float | None = ...,
    z_loss: float = ...,
    return_stats: Literal[True],
    inplace_backward: bool = ...,
    backend: str | None = ...,
) -> CrossEntropyStats: ...


@overload
def softmax_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = ...,
    size_average: bool | None = ...,
    ignore_index: int = ...,
    reduce: bool | None = ...,
    reduction: str = ...,
    label_smoothing: float = ...,
    *,
    logit_scale: float = ...,
    softcap: float | None = ...,
    z_loss: float = ...,
    return_stats: bool,
    inplace_backward: bool = ...,
    backend: str | None = ...,
) -> Tensor | CrossEntropyStats: ...


@share_ce_math
def softmax_cross_entropy(
    input: Tensor,
    target: Tensor,
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
) -> Tensor | CrossEntropyStats:
    r"""Softmax + cross-entropy, fused: the same result and gradients as
    :func:`torch.nn.functional.cross_entropy`, plus options large-model training asks for.

    The logits :math:`z` are ``input``, the class dim 1 (0 for 1-D input).
    {CE_MATH}

    Args:
        input (Tensor): logits; fp16, bf16, fp32 or fp64.
        target (Tensor): class indices (int64 or uint8), or probabilities of ``input``'s shape.
        weight (Tensor, optional): class weights ``(C)`` of ``input``'s dtype; not
            differentiable. Default: ``None`` (all ones).
        ignore_index (int, optional): class index whose rows contribute nothing (any int, even
            a valid class); must be negative with probability targets. Default: ``-100``.
        size_average (bool, optional), reduce (bool, optional): deprecated, as in torch:
            when either is not ``None`` they set ``reduction`` as torch sets it (with torch's
            deprecation warning). Default: ``None``.
        reduction (str, optional): ``'none'``, ``'mean'`` or ``'sum'``. Default: ``'mean'``.
        label_smoothing (float, optional): :math:`\varepsilon \in [0, 1]`; negative values act
            as 0. Default: ``0.0``.
        logit_scale (float, optional): finite multiplier applied to the logits first.
            Default: ``1.0``.
        softcap (float, optional): a positive cap :math:`c`: :math:`z \leftarrow c\tanh(z/c)`.
            Default: ``None`` (no cap).
        z_loss (float, optional): :math:`\lambda \ge 0`, the weight of the
            :math:`\mathrm{lse}^2` term. Default: ``0.0``.
        return_stats (bool, optional): return a :class:`CrossEntropyStats` ``(loss, lse,
            z_loss, entropy, accuracy, target_log_prob, argmax, correct)`` instead of the loss
            alone. Default: ``False``.
        inplace_backward (bool, optional): the backward writes the input gradient over
            ``input``'s memory (saves an ``N x C`` buffer). ``input`` must not be a leaf that
            requires grad, and nothing else may need its values later: a use saved by another
            op fails loudly (torch's "modified by an inplace operation" error), as does a
            change to ``input`` before the backward. Default: ``False``.
        backend (str, optional): ``'auto'``, ``'triton'``, ``'native'`` or ``'torch'``.
            Default: ``None`` (``$FUSED_CE_BACKEND``, else ``'auto'``).

    Returns:
        Tensor: the loss, in ``input``'s dtype (the promoted dtype of input and target for
        probability targets); computed in fp32 (fp64 for fp64 operands). Under
        ``torch.autocast``, fp32 (torch's autocast runs this loss in fp32).
        CrossEntropyStats: with ``return_stats=True``, whose ``loss`` is that loss.

    Shape:
        - Input: :math:`(C)`, :math:`(N, C)` or :math:`(N, C, d_1, ..., d_K)`.
        - Target: class indices :math:`()`, :math:`(N)` or :math:`(N, d_1, ..., d_K)`, each in
          :math:`[0, C)` or ``ignore_index``; or probabilities of the input's shape.
        - Output: a scalar; with ``reduction='none'`` the target's batch shape, :math:`()`,
          :math:`(N)` or :math:`(N, d_1, ..., d_K)`.

    Examples::

        >>> logits = torch.randn(3, 5, requires_grad=True)
        >>> target = torch.tensor([1, 0, 4])
        >>> loss = fused_ce.softmax_cross_entropy(logits, target, label_smoothing=0.1)
        >>> loss.backward()
        >>> torch.allclose(loss, F.cross_entropy(logits, target, label_smoothing=0.1))
        True
        >>> stats = fused_ce.softmax_cross_entropy(logits, target, return_stats=True)
        >>> stats.lse.shape, stats.accuracy.shape
        (torch.Size([3]), torch.Size([]))
    """
    if size_average is not None or reduce is not None:
        # torch's deprecated pair, mapped as torch maps it (with its deprecation warning).
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    check_reduction(reduction)
    ignore_index = check_ignore_index(ignore_index)
    scale, cap = check_options(logit_scale, softcap, z_loss, return_stats)
    check_floating("input", input)
    check_target(target, input)
    # torch's autocast runs this loss in fp32.
    if any_autocast_enabled() and autocast_dtype(input) is not None:
        input, target, weight = (autocast_cast(t, torch.float32) for t in (input, target, weight))
    if input.dim() == 0:
        raise ValueError("input: expected at least 1 dimension (the class dim), got a 0-d tensor")
    if input.dim() == 1 and target.shape == (1,) and not target.is_floating_point():
        # As torch: a 1-D input's class index may also come as a (1,) tensor, read as the 0-d
        # one (the loss then has the 0-d target's shape).
        target = target.view(())
    class_dim = 0 if input.dim() == 1 else 1
    n_classes = input.shape[class_dim]
    batch_shape = input.shape[:class_dim] + input.shape[class_dim + 1 :]
    # 'mean'/'sum': the gradient is made during the forward (one read of the logits, one write
    # of their gradient). Not with return_stats, whose lse stays differentiable, nor with
    # inplace_backward, whose in-place backward already writes the gradient once.
    scalar_loss = reduction != "none" and not return_stats and not inplace_backward
    backend = resolve(backend, input)
    if not n_classes:
        # No class: nothing for a kernel to read; the torch path gives torch's numbers (its
        # 'mean' over probability targets divides by numel / C = 0 / 0).
        backend = "torch"
    # On the native backend in eager mode, one C++ op with C++ autograd checks the class
    # indices, finds the divisor and makes the loss (and for 'mean'/'sum' its gradients).
    # return_stats, inplace_backward and a per-row z-loss keep the custom ops.
    native_op = (
        backend == "native"
        and not return_stats
        and not inplace_backward
        and (scalar_loss or z_loss == 0.0)
        and is_eager()
    )
    checked = check_ce_target(
        target,
        input,
        weight,
        ignore_index,
        label_smoothing,
        batch_shape,
        input.shape,
        n_classes,
        all_valid_as_none=scalar_loss,
        indices_checked_by_op=native_op,
    )
    prob_target = checked.prob_target
    if inplace_backward:
        check_inplace(input)

    if native_op:
        if scalar_loss:
            loss = ce_scalar_native(
                input,
                target,
                weight,
                reduction == "mean",
                ignore_index,
                checked.label_smoothing,
                scale,
                cap,
                float(z_loss),
            )
        else:
            loss = ce_unreduced_native(
                input, target, weight, ignore_index, checked.label_smoothing, scale, cap
            )
        return loss if loss.dtype == checked.out_dtype else loss.to(checked.out_dtype)
    n_rows = math.prod(batch_shape) if n_classes or not prob_target else math.nan
    if scalar_loss:
        grad_scale = _grad_scale(reduction, checked, target, weight, n_rows, input)
        loss = ce_scalar_loss(
            input,
            target,
            weight,
            checked.valid if z_loss > 0.0 else None,
            grad_scale,
            ignore_index,
            checked.label_smoothing,
            scale,
            cap,
            float(z_loss),
            backend,
        )
        return loss if loss.dtype == checked.out_dtype else loss.to(checked.out_dtype)
    # (n_outer, C, n_inner) views: NCHW logits keep their strides, no transposed copy.
    logits = class_rows(input)
    n_outer, _, n_inner = logits.shape
    rows_target = class_rows(target) if prob_target else target.reshape(n_outer, n_inner)
    loss, lse, saved, entropy, argmax = ce_forward_call(
        logits,
        rows_target,
        weight,
        ignore_index,
        checked.label_smoothing,
        scale,
        cap,
        return_stats,
        bool(inplace_backward),
        backend,
    )
    divisor = _ce_divisor(
        reduction, checked.valid, target, weight, n_rows, input.dtype, checked.label_smoothing
    )
    target_classes = target.argmax(class_dim) if prob_target and return_stats else target
    target_log_prob = None
    if return_stats:
        target_logit = None
        if n_classes and (prob_target or weight is not None or checked.label_smoothing > 0.0):
            index = target_classes.long()
            if checked.valid is not None:
                index = torch.where(checked.valid, index, 0)
            # One logit per row: (N, 1, d...) indices along the class dim.
            target_logit = input.detach().gather(class_dim, index.unsqueeze(class_dim))
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
        out_dtype=checked.out_dtype,
        z_loss=float(z_loss),
        return_stats=return_stats,
        target_log_prob=target_log_prob,
    )


def sigmoid_binary_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    pos_weight: Tensor | None = None,
    *,
    backend: str | None = None,
) -> Tensor:
    r"""Sigmoid + binary cross-entropy, fused: the same result and gradients as
    :func:`torch.nn.functional.binary_cross_entropy_with_logits`.

    Elementwise, with :math:`o = \sigma(x)`, weight :math:`w` and positive-class weight
    :math:`p_w` (ones when ``None``), in the stable form

    .. math:: \ell = w\,[(1-t)\,x + ((p_w-1)t+1)(\log(1+e^{-|x|}) + \max(-x,0))]

    which is :math:`-w[p_w t\log o + (1-t)\log(1-o)]`. Gradients:
    :math:`\partial\ell/\partial x = w\,(((p_w-1)t+1)\,o - p_w t)` (the lecture's :math:`o - t`
    when unweighted) and :math:`\partial\ell/\partial t = w\,(-x - (p_w-1)\log o)`.

    Args:
        input (Tensor): logits; fp16, bf16, fp32 or fp64.
        target (Tensor): floating-point targets of ``input``'s size (usually in [0, 1]).
        weight (Tensor, optional): weight broadcastable to ``input`` (right-aligned); not
            differentiable. Default: ``None`` (all ones).
        size_average (bool, optional), reduce (bool, optional): deprecated, as in torch:
            when either is not ``None`` they set ``reduction`` as torch sets it (with torch's
            deprecation warning). Default: ``None``.
        reduction (str, optional): ``'none'``, ``'mean'`` (divides by ``input.numel()``) or
            ``'sum'``. Default: ``'mean'``.
        pos_weight (Tensor, optional): positive-class weight broadcastable to ``input``; a
            ``(C,)`` tensor applies to the last dim. Not differentiable. Default: ``None``.
        backend (str, optional): ``'auto'``, ``'triton'``, ``'native'`` or ``'torch'``.
            Default: ``None`` (``$FUSED_CE_BACKEND``, else ``'auto'``).

    Returns:
        Tensor: the loss in ``target``'s dtype (as torch), computed in fp32 (fp64 for fp64
        operands). Under ``torch.autocast``, fp32 (torch's autocast runs this loss in fp32).

    Shape:
        - Input: :math:`(*)`, any number of dimensions.
        - Target: :math:`(*)`, the input's shape.
        - Output: a scalar; with ``reduction='none'`` the input's shape.

    Examples::

        >>> logits = torch.randn(4, 3, requires_grad=True)
        >>> labels = torch.rand(4, 3)
        >>> loss = fused_ce.sigmoid_binary_cross_entropy(logits, labels, pos_weight=torch.ones(3))
        >>> loss.backward()
        >>> torch.allclose(loss, F.binary_cross_entropy_with_logits(logits, labels))
        True
    """
    if size_average is not None or reduce is not None:
        # torch's deprecated pair, mapped as torch maps it (with its deprecation warning).
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    check_reduction(reduction)
    check_floating("input", input)
    check_target(target, input)
    if target.shape != input.shape:
        raise ValueError(
            f"target: Target size ({target.shape}) must be the same as input size ({input.shape})"
        )
    check_floating("target", target)
    # torch's autocast runs this loss in fp32.
    if any_autocast_enabled() and autocast_dtype(input) is not None:
        input, target, weight, pos_weight = (
            autocast_cast(t, torch.float32) for t in (input, target, weight, pos_weight)
        )
    check_bce_weights(weight, pos_weight, input, input.shape, "input's shape")
    backend = resolve(backend, input)
    native_op = backend == "native" and is_eager()
    if reduction == "none":
        if native_op:
            return bce_unreduced_native(input, target, weight, pos_weight)
        return bce_forward_call(input, target, weight, pos_weight, backend)
    # 'mean'/'sum': one launch makes the summed loss (per-program partial sums, no elementwise
    # loss in memory) and, in eager mode, the gradients, which the backward then only checks
    # against the upstream gradient (see fused_ce.ops._scalar).
    if native_op:
        loss = bce_scalar_native(input, target, weight, pos_weight, reduction == "mean")
    else:
        numel = input.numel()
        acc = accumulation_dtype(input.dtype, target.dtype)
        value = 1.0 if reduction == "sum" else (1.0 / numel if numel else math.nan)
        loss = bce_scalar_loss(
            input,
            target,
            weight,
            pos_weight,
            torch.full((), value, dtype=acc, device=input.device),
            backend,
        )
    return loss if loss.dtype == target.dtype else loss.to(target.dtype)


cross_entropy = softmax_cross_entropy
binary_cross_entropy_with_logits = sigmoid_binary_cross_entropy


# ``import fused_ce.functional as F`` stands in for ``import torch.nn.functional as F``: the
# losses above replace torch's, the fused linear heads are fused_ce.linear's, and every other
# name is torch's own object.
def __getattr__(name: str) -> Any:
    if not name.startswith("__") and hasattr(torch.nn.functional, name):
        return getattr(torch.nn.functional, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *dir(torch.nn.functional)})
