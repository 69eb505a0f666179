"""Public loss functions: drop-in replacements for ``torch.nn.functional``'s.

Each function validates its arguments the way torch does (with messages that name the
argument), reshapes without copying, calls one fused custom op, and reduces in plain torch.
No function syncs with the host: an out-of-range class index is caught by
``torch._assert_async`` (an error on CPU and under ``torch.compile``, a device-side assert on
CUDA), and the kernels never read memory through an unchecked target.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._backend import use_triton
from ._common import accumulation_dtype
from .ops.bce import bce_forward
from .ops.cross_entropy import ce_forward

_REDUCTIONS = ("none", "mean", "sum")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"reduction: {reduction!r} is not a valid value for reduction; "
            f"expected one of {_REDUCTIONS}"
        )


def _check_floating(name: str, tensor: Tensor) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {tensor.dtype}")


def _check_constant(name: str, tensor: Tensor | None, input: Tensor) -> None:
    """Class weights and pos_weight are constants: no gradient, same device as the input."""
    if tensor is None:
        return
    _check_floating(name, tensor)
    if tensor.requires_grad:
        raise RuntimeError(
            f"{name}: the loss is not differentiable with respect to {name}; "
            f"pass a tensor that does not require grad (e.g. {name}.detach())"
        )
    if tensor.device != input.device:
        raise RuntimeError(f"{name}: expected a tensor on {input.device}, got {tensor.device}")


def _as_rows(tensor: Tensor, class_dim: int) -> Tensor:
    """``(C)``, ``(N, C)`` or ``(N, C, d1..dK)`` as an ``(n_outer, C, n_inner)`` view (a copy
    only when the spatial dims cannot be merged by a view)."""
    if class_dim == 0:
        return tensor.reshape(1, -1, 1)
    if tensor.dim() == 2:
        return tensor.unsqueeze(-1)
    return tensor.flatten(2)


def _reduce(loss: Tensor, reduction: str, divisor: Tensor | int, dtype: torch.dtype) -> Tensor:
    if reduction == "none":
        return loss.to(dtype)
    total = loss.sum(dtype=accumulation_dtype(loss.dtype))
    if reduction == "mean":
        total = total / divisor
    return total.to(dtype)


def softmax_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    backend: str | None = None,
) -> Tensor:
    r"""Softmax + cross-entropy, fused: the same result and gradients as
    :func:`torch.nn.functional.cross_entropy`.

    With :math:`\mathrm{lse}_n = \log\sum_c e^{x_{n,c}}` (the class dim is 1, or 0 for 1-D input),
    class weights :math:`w` (ones when ``None``), :math:`v_n = [y_n \ne \text{ignore\_index}]`
    and smoothing :math:`\varepsilon`:

    * class-index target :math:`y`:
      :math:`\ell_n = v_n[(1-\varepsilon)\,w_{y_n}(\mathrm{lse}_n - x_{n,y_n})
      + \tfrac{\varepsilon}{C}\sum_c w_c(\mathrm{lse}_n - x_{n,c})]`; ``'mean'`` divides the sum
      by :math:`\sum_n w_{y_n} v_n`.
    * probability target :math:`t` (same shape as ``input``, floating point):
      :math:`\ell_n = \sum_c w_c\,t'_{n,c}(\mathrm{lse}_n - x_{n,c})` with
      :math:`t' = (1-\varepsilon)t + \varepsilon/C`; ``'mean'`` divides by the number of rows.

    The input gradient is the lecture's :math:`o - t` (softmax minus the one-hot or smoothed
    target), weighted; probability targets receive a gradient too.

    Args:
        input: logits ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dK)``; fp16, bf16, fp32 or fp64.
        target: class indices ``()``, ``(N)`` or ``(N, d1, ..., dK)`` (int64 or uint8), or
            probabilities of ``input``'s shape.
        weight: optional class weights ``(C)`` of ``input``'s dtype; not differentiable.
        ignore_index: class index whose rows contribute nothing (any int, even a valid class);
            must be negative with probability targets.
        reduction: ``'none'`` (shape of the target's batch dims), ``'mean'`` or ``'sum'``.
        label_smoothing: :math:`\varepsilon \in [0, 1]`; negative values act as 0.
        backend: ``'auto'`` (default, or ``$FUSED_CE_BACKEND``), ``'triton'`` or ``'torch'``.

    Returns:
        The loss, in ``input``'s dtype (the promoted dtype of input and target for probability
        targets); computed in fp32 (fp64 for fp64 operands).
    """
    _check_reduction(reduction)
    _check_floating("input", input)
    if not isinstance(target, Tensor):
        raise TypeError(f"target: expected a torch.Tensor, got {type(target).__name__}")
    if input.dim() == 0:
        raise ValueError("input: expected at least 1 dimension (the class dim), got a 0-d tensor")
    if target.device != input.device:
        raise RuntimeError(f"target: expected a tensor on {input.device}, got {target.device}")
    if label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing: must be between 0.0 and 1.0. Got: {label_smoothing}")
    # Like torch, a negative (or NaN) smoothing acts as none.
    eps = float(label_smoothing) if label_smoothing > 0.0 else 0.0
    class_dim = 0 if input.dim() == 1 else 1
    n_classes = input.shape[class_dim]
    _check_constant("weight", weight, input)
    if weight is not None and (weight.dim() != 1 or weight.shape[0] != n_classes):
        raise RuntimeError(
            f"weight: should be defined either for all {n_classes} classes or no classes "
            f"but got weight tensor of shape: {list(weight.shape)}"
        )
    batch_shape = input.shape[:class_dim] + input.shape[class_dim + 1 :]
    prob_target = target.is_floating_point()
    if prob_target:
        if target.shape != input.shape:
            raise ValueError(
                f"target: probability targets must have input's shape {tuple(input.shape)}, "
                f"got {tuple(target.shape)}"
            )
        if ignore_index >= 0:
            raise RuntimeError(
                f"ignore_index: not supported for probability (floating point) targets; "
                f"got {ignore_index}, expected a negative value"
            )
        out_dtype = torch.promote_types(input.dtype, target.dtype)
    else:
        if target.dtype not in (torch.int64, torch.uint8):
            raise RuntimeError(
                f"target: expected target dtype to be Long or Byte (class indices) or a "
                f"floating dtype (probabilities), but got {target.dtype}"
            )
        if target.shape != batch_shape:
            raise ValueError(
                f"target: expected shape {tuple(batch_shape)} for input of shape "
                f"{tuple(input.shape)}, got {tuple(target.shape)}"
            )
        if weight is not None and weight.dtype != input.dtype:
            raise RuntimeError(
                f"weight: expected dtype {input.dtype} (the input's), got {weight.dtype}"
            )
        out_dtype = input.dtype

    # (n_outer, C, n_inner) views: NCHW logits keep their strides, no transposed copy.
    logits = _as_rows(input, class_dim)
    n_outer, _, n_inner = logits.shape
    if prob_target:
        rows_target = _as_rows(target, class_dim)
    else:
        rows_target = target.reshape(n_outer, n_inner)
        valid = target != ignore_index
        in_range = (target >= 0) & (target < n_classes)
        # A constant message: under torch.compile with dynamic shapes, n_classes and
        # ignore_index may be SymInts, and formatting them breaks the graph.
        torch._assert_async(
            (in_range | ~valid).all(),
            "target: a class index is out of bounds (expected values in [0, C), C the size of "
            "input's class dim, or ignore_index)",
        )

    loss, _, _ = ce_forward(
        logits, rows_target, weight, ignore_index, eps, use_triton(backend, input)
    )
    if reduction == "mean" and not prob_target:
        acc = accumulation_dtype(input.dtype)
        if weight is None:
            divisor = valid.sum().to(acc)
        else:
            divisor = (weight.to(acc)[torch.where(valid, target, 0).long()] * valid).sum()
    else:
        divisor = n_outer * n_inner
    return _reduce(loss.view(batch_shape), reduction, divisor, out_dtype)


def sigmoid_binary_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
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
        input: logits of any shape; fp16, bf16, fp32 or fp64.
        target: floating-point targets of ``input``'s size (usually in [0, 1]).
        weight: optional weight broadcastable to ``input`` (right-aligned); not differentiable.
        reduction: ``'none'`` (input's shape), ``'mean'`` (divides by ``input.numel()``) or
            ``'sum'``.
        pos_weight: optional positive-class weight broadcastable to ``input``; a ``(C,)`` tensor
            applies to the last dim. Not differentiable.
        backend: ``'auto'`` (default, or ``$FUSED_CE_BACKEND``), ``'triton'`` or ``'torch'``.

    Returns:
        The loss in ``target``'s dtype (as torch), computed in fp32 (fp64 for fp64 operands).
    """
    _check_reduction(reduction)
    _check_floating("input", input)
    if not isinstance(target, Tensor):
        raise TypeError(f"target: expected a torch.Tensor, got {type(target).__name__}")
    if target.shape != input.shape:
        raise ValueError(
            f"target: Target size ({target.shape}) must be the same as input size ({input.shape})"
        )
    _check_floating("target", target)
    if target.device != input.device:
        raise RuntimeError(f"target: expected a tensor on {input.device}, got {target.device}")
    for name, tensor in (("weight", weight), ("pos_weight", pos_weight)):
        _check_constant(name, tensor, input)
        if tensor is not None:
            try:
                shape = torch.broadcast_shapes(tensor.shape, input.shape)
            except RuntimeError as error:
                raise RuntimeError(
                    f"{name}: shape {tuple(tensor.shape)} does not broadcast to input's shape "
                    f"{tuple(input.shape)}: {error}"
                ) from None
            if shape != input.shape:
                raise RuntimeError(
                    f"{name}: shape {tuple(tensor.shape)} would enlarge the loss beyond input's "
                    f"shape {tuple(input.shape)} (broadcast shape {tuple(shape)})"
                )
    loss = bce_forward(input, target, weight, pos_weight, use_triton(backend, input))
    return _reduce(loss, reduction, input.numel(), target.dtype)


cross_entropy = softmax_cross_entropy
binary_cross_entropy_with_logits = sigmoid_binary_cross_entropy
