"""Public loss functions: drop-in replacements for ``torch.nn.functional``'s.

Each function validates its arguments the way torch does (with messages that name the
argument), reshapes without copying, calls one fused custom op, and reduces in plain torch.
No function syncs with the host: an out-of-range class index is caught by
``torch._assert_async`` (an error on CPU and under ``torch.compile``, a device-side assert on
CUDA), and the kernels never read memory through an unchecked target.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ._backend import resolve
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


def _check_target(target: Tensor, input: Tensor) -> None:
    if not isinstance(target, Tensor):
        raise TypeError(f"target: expected a torch.Tensor, got {type(target).__name__}")
    if target.device != input.device:
        raise RuntimeError(f"target: expected a tensor on {input.device}, got {target.device}")


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


class CrossEntropyStats(NamedTuple):
    """What a cross-entropy entry point returns with ``return_stats=True``.

    * ``loss``: the loss exactly as without stats (z-loss included), differentiable.
    * ``lse``: per-token log-sum-exp of the final logits (after ``logit_scale`` and
      ``softcap``), shape of the target's batch dims, accumulation dtype (fp32, fp64 for fp64);
      defined for ignored tokens too. Differentiable (its gradient is ``softmax``).
    * ``z_loss``: the z-loss term ``z_loss * lse^2`` over non-ignored tokens, reduced like
      ``loss`` (per token for ``'none'``; 0 when ``z_loss=0``); detached, for logging.
    * ``entropy``: per-token entropy of the softmax, ``lse - sum_c p_c z_c``, accumulation
      dtype, defined for ignored tokens too; detached (for logging and RL advantages, not for
      gradients).
    * ``accuracy``: 0-d, the fraction of non-ignored tokens whose argmax (first index of the
      max of the final logits) is the target class (the target's argmax for probability
      targets); NaN when every token is ignored. Detached.
    """

    loss: Tensor
    lse: Tensor
    z_loss: Tensor
    entropy: Tensor
    accuracy: Tensor


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: float) -> bool:
    # Comparisons, not math.isfinite: torch.compile traces them on an unspecialised float.
    return -math.inf < value < math.inf


# The magnitudes the Triton kernels carry exactly: a float kernel argument arrives as fp32,
# so logit_scale and softcap travel as two fp32 halves (hi + lo), and beyond fp32's normal
# range the high half overflows (1e39 gave NaN) or the low half underflows. Every backend
# refuses such values alike.
_FP32_TINY = torch.finfo(torch.float32).tiny
_FP32_MAX = torch.finfo(torch.float32).max


def _check_fp32_range(name: str, value: float) -> None:
    if value != 0.0 and not _FP32_TINY <= abs(value) <= _FP32_MAX:
        raise ValueError(
            f"{name}: expected a magnitude within fp32's normal range [{_FP32_TINY:.6g}, "
            f"{_FP32_MAX:.6g}] (the kernels take it as a pair of fp32 numbers), got {value!r}"
        )


def _check_options(
    logit_scale: float, softcap: float | None, z_loss: float, return_stats: bool
) -> tuple[float, float]:
    """Validate the options beyond torch; return ``(logit_scale, softcap)`` as the ops take
    them (softcap 0.0 for none)."""
    if not _is_number(logit_scale) or not _finite(logit_scale):
        raise ValueError(f"logit_scale: expected a finite number, got {logit_scale!r}")
    _check_fp32_range("logit_scale", logit_scale)
    if softcap is not None and (not _is_number(softcap) or not _finite(softcap) or softcap <= 0):
        raise ValueError(f"softcap: expected a positive finite number or None, got {softcap!r}")
    if softcap is not None:
        _check_fp32_range("softcap", softcap)
    if not _is_number(z_loss) or not _finite(z_loss) or z_loss < 0:
        raise ValueError(f"z_loss: expected a non-negative finite number, got {z_loss!r}")
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats: expected a bool, got {return_stats!r}")
    return float(logit_scale), float(softcap) if softcap is not None else 0.0


def _check_ce_target(
    target: Tensor,
    input: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    batch_shape: tuple[int, ...],
    prob_shape: tuple[int, ...],
    n_classes: int,
) -> tuple[float, torch.dtype, Tensor | None]:
    """The checks :func:`softmax_cross_entropy` and ``linear_cross_entropy`` share after the
    logits' own: ``label_smoothing``, the class ``weight`` and the ``target``, class indices of
    ``batch_shape`` (bounds asserted on the device, no host sync) or probabilities of
    ``prob_shape``. Returns the smoothing as the ops take it, the loss's dtype, and the
    non-ignored mask of class-index targets (None for probabilities)."""
    if label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing: must be between 0.0 and 1.0. Got: {label_smoothing}")
    # Like torch, a negative (or NaN) smoothing acts as none.
    eps = float(label_smoothing) if label_smoothing > 0.0 else 0.0
    _check_constant("weight", weight, input)
    if weight is not None and (weight.dim() != 1 or weight.shape[0] != n_classes):
        raise RuntimeError(
            f"weight: should be defined either for all {n_classes} classes or no classes "
            f"but got weight tensor of shape: {list(weight.shape)}"
        )
    if target.is_floating_point():
        if tuple(target.shape) != tuple(prob_shape):
            raise ValueError(
                f"target: probability targets must have shape {tuple(prob_shape)} (one per "
                f"class of each row), got {tuple(target.shape)}"
            )
        if ignore_index >= 0:
            raise RuntimeError(
                f"ignore_index: not supported for probability (floating point) targets; "
                f"got {ignore_index}, expected a negative value"
            )
        return eps, torch.promote_types(input.dtype, target.dtype), None
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(
            f"target: expected target dtype to be Long or Byte (class indices) or a "
            f"floating dtype (probabilities), but got {target.dtype}"
        )
    if tuple(target.shape) != tuple(batch_shape):
        raise ValueError(
            f"target: expected shape {tuple(batch_shape)} (one class index per row) for input "
            f"of shape {tuple(input.shape)}, got {tuple(target.shape)}"
        )
    if weight is not None and weight.dtype != input.dtype:
        raise RuntimeError(
            f"weight: expected dtype {input.dtype} (the input's), got {weight.dtype}"
        )
    # Compared as int64, as torch does: a uint8 target would wrap ignore_index (-100 to 156).
    valid = target.long() != ignore_index
    in_range = (target >= 0) & (target < n_classes)
    # A constant message: under torch.compile with dynamic shapes, n_classes and
    # ignore_index may be SymInts, and formatting them breaks the graph.
    torch._assert_async(
        (in_range | ~valid).all(),
        "target: a class index is out of bounds (expected values in [0, C), C the number of "
        "classes, or ignore_index)",
    )
    return eps, input.dtype, valid


def _ce_divisor(
    reduction: str,
    valid: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    n_rows: int,
    dtype: torch.dtype,
) -> Tensor | int:
    """What ``'mean'`` divides the summed loss by: torch's rule, the (weighted) count of
    non-ignored class indices, in the accumulation dtype of ``dtype`` (the input's); the row
    count for probability targets and the other reductions."""
    if reduction != "mean" or valid is None:
        return n_rows
    acc = accumulation_dtype(dtype)
    if weight is None:
        return valid.sum().to(acc)
    return (weight.to(acc)[torch.where(valid, target, 0).long()] * valid).sum()


def _finish(
    loss_rows: Tensor,
    lse: Tensor,
    entropy: Tensor,
    argmax: Tensor,
    *,
    batch_shape: torch.Size,
    valid: Tensor | None,
    target_classes: Tensor,
    reduction: str,
    divisor: Tensor | int,
    out_dtype: torch.dtype,
    z_loss: float,
    return_stats: bool,
) -> Tensor | CrossEntropyStats:
    """Add the z-loss to the per-row CE, reduce, and gather the stats when asked.

    ``valid`` marks the non-ignored rows (None: all rows); ``target_classes`` is what the
    argmax is compared with for accuracy.
    """
    loss_rows = loss_rows.view(batch_shape)
    lse = lse.view(batch_shape)
    if z_loss > 0.0:
        z_rows = z_loss * lse.square()
        if valid is not None:
            # where(), not a product: an ignored row's lse may be inf and its term must be 0.
            z_rows = torch.where(valid, z_rows, 0.0)
        loss_rows = loss_rows + z_rows
    else:
        z_rows = torch.zeros_like(lse)
    loss = _reduce(loss_rows, reduction, divisor, out_dtype)
    if not return_stats:
        return loss
    acc = lse.dtype
    correct = argmax.view(batch_shape) == target_classes
    if valid is not None:
        correct = correct & valid
        count = valid.sum(dtype=acc)
    else:
        count = correct.numel()
    return CrossEntropyStats(
        loss,
        lse,
        _reduce(z_rows.detach(), reduction, divisor, out_dtype),
        entropy.view(batch_shape),
        correct.sum(dtype=acc) / count,
    )


def _may_overlap(tensor: Tensor) -> bool:
    """Whether two indices of ``tensor`` may address the same memory (metadata only, no sync).

    A sufficient test for no overlap: with the dims sorted by stride, each stride must step
    over everything the smaller strides reach. It answers every layout that
    ``torch._debug_has_internal_overlap`` settles (a stride of 0: overlap; dense: none) and the
    strided ones it calls "too hard" (``unfold`` windows overlap, ``x[:, ::2]`` does not),
    and, unlike that function, torch.compile traces it."""
    reach = 0
    for stride, size in sorted(zip(tensor.stride(), tensor.shape, strict=True)):
        if size <= 1:
            continue
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


def _check_inplace(input: Tensor) -> None:
    """``inplace_backward`` writes the gradient over ``input``: refuse where that cannot be
    right (a leaf's ``.grad`` would share its memory, also through a view of the leaf;
    overlapping memory would make the writes race)."""
    if input.is_leaf and input.requires_grad:
        raise RuntimeError(
            "inplace_backward: input is a leaf tensor that requires grad, so its .grad would "
            "share memory with it; pass logits computed from parameters (e.g. a matmul's "
            "output), or inplace_backward=False"
        )
    base = input._base
    if base is not None and base.is_leaf and base.requires_grad:
        raise RuntimeError(
            "inplace_backward: input is a view of a leaf tensor that requires grad (e.g. p.t() "
            "of a parameter p): the gradient would overwrite that leaf's data; pass logits "
            "computed from parameters (e.g. a matmul's output), or inplace_backward=False"
        )
    if _may_overlap(input):
        raise RuntimeError(
            "inplace_backward: input has overlapping memory (e.g. a stride of 0 from expand(), "
            "or windows from unfold()); the gradient cannot be written over it; pass "
            "input.contiguous(), or inplace_backward=False"
        )


def softmax_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
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
    :func:`torch.nn.functional.cross_entropy`, plus options large-model training asks for
    (their defaults keep torch's results; see docs/options.md).

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

    Options: the logits become :math:`z = s\,x` (``logit_scale``), then
    :math:`z \leftarrow c\tanh(z/c)` (``softcap`` :math:`c`), and everything above uses
    :math:`z`; ``z_loss`` adds :math:`\lambda\,\mathrm{lse}_n^2` per non-ignored row, reduced
    like the CE term (``'mean'`` uses the same divisor).

    Args:
        input: logits ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dK)``; fp16, bf16, fp32 or fp64.
        target: class indices ``()``, ``(N)`` or ``(N, d1, ..., dK)`` (int64 or uint8), or
            probabilities of ``input``'s shape.
        weight: optional class weights ``(C)`` of ``input``'s dtype; not differentiable.
        ignore_index: class index whose rows contribute nothing (any int, even a valid class);
            must be negative with probability targets.
        reduction: ``'none'`` (shape of the target's batch dims), ``'mean'`` or ``'sum'``.
        label_smoothing: :math:`\varepsilon \in [0, 1]`; negative values act as 0.
        logit_scale: finite multiplier applied to the logits first.
        softcap: ``None`` or a positive cap :math:`c`: :math:`z \leftarrow c\tanh(z/c)`.
        z_loss: :math:`\lambda \ge 0`, the weight of the :math:`\mathrm{lse}^2` term.
        return_stats: return a :class:`CrossEntropyStats` ``(loss, lse, z_loss, entropy,
            accuracy)`` instead of the loss alone.
        inplace_backward: the backward writes the input gradient over ``input``'s memory
            (saves an ``N x C`` buffer). ``input`` must not be a leaf that requires grad, and
            nothing else may need its values later: a use saved by another op fails loudly
            (torch's "modified by an inplace operation" error), as does a change to ``input``
            before the backward.
        backend: ``'auto'`` (default, or ``$FUSED_CE_BACKEND``), ``'triton'`` or ``'torch'``.

    Returns:
        The loss, in ``input``'s dtype (the promoted dtype of input and target for probability
        targets); computed in fp32 (fp64 for fp64 operands). With ``return_stats``, a
        :class:`CrossEntropyStats` whose ``loss`` is that loss.
    """
    _check_reduction(reduction)
    scale, cap = _check_options(logit_scale, softcap, z_loss, return_stats)
    _check_floating("input", input)
    _check_target(target, input)
    if input.dim() == 0:
        raise ValueError("input: expected at least 1 dimension (the class dim), got a 0-d tensor")
    class_dim = 0 if input.dim() == 1 else 1
    n_classes = input.shape[class_dim]
    batch_shape = input.shape[:class_dim] + input.shape[class_dim + 1 :]
    eps, out_dtype, valid = _check_ce_target(
        target, input, weight, ignore_index, label_smoothing, batch_shape, input.shape, n_classes
    )
    prob_target = valid is None
    if inplace_backward:
        _check_inplace(input)

    # (n_outer, C, n_inner) views: NCHW logits keep their strides, no transposed copy.
    logits = _as_rows(input, class_dim)
    n_outer, _, n_inner = logits.shape
    rows_target = _as_rows(target, class_dim) if prob_target else target.reshape(n_outer, n_inner)

    loss, lse, _, entropy, argmax = ce_forward(
        logits,
        rows_target,
        weight,
        ignore_index,
        eps,
        scale,
        cap,
        return_stats,
        bool(inplace_backward),
        resolve(backend, input),
    )
    divisor = _ce_divisor(reduction, valid, target, weight, n_outer * n_inner, input.dtype)
    return _finish(
        loss,
        lse,
        entropy,
        argmax,
        batch_shape=batch_shape,
        valid=valid,
        target_classes=target.argmax(class_dim) if prob_target and return_stats else target,
        reduction=reduction,
        divisor=divisor,
        out_dtype=out_dtype,
        z_loss=float(z_loss),
        return_stats=return_stats,
    )


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
    _check_target(target, input)
    if target.shape != input.shape:
        raise ValueError(
            f"target: Target size ({target.shape}) must be the same as input size ({input.shape})"
        )
    _check_floating("target", target)
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
    loss = bce_forward(input, target, weight, pos_weight, resolve(backend, input))
    return _reduce(loss, reduction, input.numel(), target.dtype)


cross_entropy = softmax_cross_entropy
binary_cross_entropy_with_logits = sigmoid_binary_cross_entropy
