"""Argument checks shared by the public entry points (``fused_ce.functional``,
``fused_ce.linear``, ``fused_ce.nn``): each raises torch's error type with a message that
names the argument, and none syncs with the host (an out-of-range class index is caught by
``torch._assert_async``; on the CPU, outside ``torch.compile``, the scalar losses read the
indices' range directly, which waits for no device: see :func:`all_in_range_on_host`)."""

from __future__ import annotations

import math
import operator
from typing import NamedTuple

import torch
from torch import Tensor


class CETarget(NamedTuple):
    """A checked cross-entropy target, as the ops and the reduction take it."""

    label_smoothing: float  # >= 0 (torch treats a negative smoothing as none)
    out_dtype: torch.dtype  # the loss's dtype
    valid: Tensor | None  # non-ignored class indices; None for probability targets
    prob_target: bool  # probabilities of the input's shape, not class indices


_REDUCTIONS = ("none", "mean", "sum")


def check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"reduction: {reduction!r} is not a valid value for reduction; "
            f"expected one of {_REDUCTIONS}"
        )


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def check_ignore_index(ignore_index: int) -> int:
    """``ignore_index`` as the Python int the kernels compare with, accepting what torch's
    ``cross_entropy`` accepts: an int within int64, a NumPy integer, or an integer tensor of
    one element (read on the host, as torch reads it). A bool, a float, an integer outside
    int64 or any other object is refused with a ``TypeError``/``ValueError`` naming the
    argument (torch refuses them too; unchecked, a float compared with the targets or a
    tensor passed to a Triton kernel as a pointer gave wrong numbers or an unclear error).
    A SymInt (``torch.compile`` with dynamic shapes) is passed on unchanged."""
    if type(ignore_index) is int:  # the usual case, first: two comparisons
        value = ignore_index
    elif isinstance(ignore_index, torch.SymInt):
        return ignore_index
    else:
        # operator.index turns a one-element bool tensor into 1: refuse bools first.
        if isinstance(ignore_index, bool) or (
            isinstance(ignore_index, Tensor) and ignore_index.dtype == torch.bool
        ):
            raise TypeError(f"ignore_index: expected an int, got a bool ({ignore_index!r})")
        try:
            value = operator.index(ignore_index)
        except TypeError:
            raise TypeError(
                f"ignore_index: expected an int, got {type(ignore_index).__name__} "
                f"({ignore_index!r})"
            ) from None
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"ignore_index: {value} does not fit in int64")
    return value


def check_floating(name: str, tensor: Tensor) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {tensor.dtype}")


def check_constant(name: str, tensor: Tensor | None, input: Tensor) -> None:
    """Class weights and pos_weight are constants: no gradient, same device as the input."""
    if tensor is None:
        return
    check_floating(name, tensor)
    if tensor.requires_grad:
        raise RuntimeError(
            f"{name}: the loss is not differentiable with respect to {name}; "
            f"pass a tensor that does not require grad (e.g. {name}.detach())"
        )
    if tensor.device != input.device:
        raise RuntimeError(f"{name}: expected a tensor on {input.device}, got {tensor.device}")


def check_target(target: Tensor, input: Tensor) -> None:
    if not isinstance(target, Tensor):
        raise TypeError(f"target: expected a torch.Tensor, got {type(target).__name__}")
    if target.device != input.device:
        raise RuntimeError(f"target: expected a tensor on {input.device}, got {target.device}")


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


def check_options(
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


def check_ce_target(
    target: Tensor,
    input: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    batch_shape: tuple[int, ...],
    prob_shape: tuple[int, ...],
    n_classes: int,
    *,
    all_valid_as_none: bool = False,
    indices_checked_by_op: bool = False,
    weight_dtype: torch.dtype | None = None,
) -> CETarget:
    """The checks :func:`softmax_cross_entropy` and ``linear_cross_entropy`` share after the
    logits' own: ``label_smoothing``, the class ``weight`` and the ``target``, class indices of
    ``batch_shape`` (bounds asserted on the device, no host sync) or probabilities of
    ``prob_shape``. Returns them as the ops and the reduction take them (see
    :class:`CETarget`).

    With ``all_valid_as_none``, class indices that :func:`all_in_range_on_host` finds valid
    (none ignored) come back with ``valid=None``: the caller knows every row counts. With
    ``indices_checked_by_op``, the range of the class indices is left to the op the caller
    runs (the native scalar op checks it on its one read of them), and ``valid`` is None.
    ``weight_dtype`` is the dtype a class weight must have with class indices: the input's
    (torch's rule) unless given (fp32 for the linear heads under autocast, whose loss runs in
    fp32 on bf16/fp16 logits)."""
    if label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing: must be between 0.0 and 1.0. Got: {label_smoothing}")
    # Like torch, a negative (or NaN) smoothing acts as none.
    eps = float(label_smoothing) if label_smoothing > 0.0 else 0.0
    check_constant("weight", weight, input)
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
        return CETarget(eps, torch.promote_types(input.dtype, target.dtype), None, True)
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
    if weight_dtype is None:
        weight_dtype = input.dtype
    if weight is not None and weight.dtype != weight_dtype:
        raise RuntimeError(
            f"weight: expected dtype {weight_dtype} (the input's), got {weight.dtype}"
        )
    if indices_checked_by_op or (
        all_valid_as_none and all_in_range_on_host(target, n_classes, ignore_index)
    ):
        return CETarget(eps, input.dtype, None, False)
    # Compared as int64, as torch does: a uint8 target would wrap ignore_index (-100 to 156).
    valid = (target if target.dtype == torch.int64 else target.long()) != ignore_index
    # Six small ops (on a GPU, six launches), not eight (nine for uint8): clamping to [0, C)
    # changes exactly the indices outside it, and a uint8 index is never negative. No class
    # at all: every row must be ignored.
    if target.dtype == torch.uint8:
        in_range = target < n_classes
    elif n_classes == 0:
        in_range = torch.zeros_like(valid)
    else:
        in_range = target.clamp(0, n_classes - 1) == target
    all_in_range = (valid <= in_range).all()  # every non-ignored index in range
    if _readable_on_host(target):
        # A CPU tensor in eager mode: reading the answer waits for no device, and the message
        # can name the offending index, as torch's does.
        if not all_in_range.item():
            bad = target[valid & ~in_range][0].item()
            # C unnamed: the vocab-parallel losses check before they know the global C.
            raise RuntimeError(
                f"target: a class index is out of bounds: Target {bad} is out of bounds. "
                "(expected values in [0, C), C the number of classes, or ignore_index)"
            )
        return CETarget(eps, input.dtype, valid, False)
    # Under a functorch transform, torch's own loss checks the indices (fused_ce.ops.
    # _composite): _assert_async has no batching rule.
    if not torch._C._are_functorch_transforms_active():
        # A constant message: under torch.compile with dynamic shapes, n_classes and
        # ignore_index may be SymInts, and formatting them breaks the graph.
        torch._assert_async(
            all_in_range,
            "target: a class index is out of bounds (expected values in [0, C), C the number "
            "of classes, or ignore_index)",
        )
    return CETarget(eps, input.dtype, valid, False)


def _readable_on_host(target: Tensor) -> bool:
    """Whether ``target``'s values can be read on the host at no cost: a plain CPU tensor
    outside ``torch.compile`` and functorch transforms."""
    return (
        not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
        and type(target) is Tensor
        and target.device.type == "cpu"
    )


def all_in_range_on_host(target: Tensor, n_classes: int, ignore_index: int) -> bool:
    """Whether class indices ``target`` are all in ``[0, n_classes)`` with none equal to
    ``ignore_index``, decided on the host where that costs no sync: a non-empty plain CPU tensor
    outside ``torch.compile`` and functorch transforms, with ``ignore_index`` outside the class
    range. One ``aminmax`` and a read of two numbers, against the six small ops (an
    ``_assert_async`` among them) of the device-side check; False (run that check) in every
    other case, including a target with ignored or out-of-range entries."""
    if not _readable_on_host(target) or target.numel() == 0 or 0 <= ignore_index < n_classes:
        return False
    low, high = torch.aminmax(target)
    return low.item() >= 0 and high.item() < n_classes


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


def check_inplace(input: Tensor) -> None:
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


def check_linear(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    *,
    allow_no_classes: bool = False,
) -> int:
    """Validate the ``F.linear`` operands; return the number of classes (out_features), which
    may be 0 with ``allow_no_classes`` (a vocab-parallel rank's empty shard)."""
    check_floating("input", input)
    check_floating("linear_weight", linear_weight)
    if input.dim() == 0:
        raise ValueError("input: expected at least 1 dimension (the features), got a 0-d tensor")
    n_features = input.shape[-1]
    if linear_weight.dim() != 2 or linear_weight.shape[1] != n_features:
        raise ValueError(
            f"linear_weight: expected shape (out_features, {n_features}) for input of shape "
            f"{tuple(input.shape)}, got {tuple(linear_weight.shape)}"
        )
    if linear_weight.shape[0] == 0 and not allow_no_classes:
        raise ValueError("linear_weight: expected at least one output feature (class), got 0")
    for name, tensor in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if tensor is None:
            continue
        check_floating(name, tensor)
        if tensor.dtype != input.dtype:
            raise RuntimeError(
                f"{name}: expected dtype {input.dtype} (the input's), got {tensor.dtype}"
            )
        if tensor.device != input.device:
            raise RuntimeError(f"{name}: expected a tensor on {input.device}, got {tensor.device}")
    n_classes = linear_weight.shape[0]
    if linear_bias is not None and tuple(linear_bias.shape) != (n_classes,):
        raise ValueError(
            f"linear_bias: expected shape ({n_classes},), got {tuple(linear_bias.shape)}"
        )
    return n_classes


def check_chunk_size(chunk_size: int | None) -> int:
    """``chunk_size`` as the ops take it: rows per chunk, 0 for automatic."""
    if chunk_size is None:
        return 0
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
    return chunk_size


# The linear heads' ``path`` values.
PATHS = ("auto", "chunked", "fused")


def check_batch_invariant(batch_invariant: bool | None) -> bool:
    """``batch_invariant`` as a bool (``None``: False, the free default of the chunked path)."""
    if batch_invariant is not None and not isinstance(batch_invariant, bool):
        raise TypeError(f"batch_invariant: expected a bool or None, got {batch_invariant!r}")
    return bool(batch_invariant)


def check_bce_weights(
    weight: Tensor | None,
    pos_weight: Tensor | None,
    input: Tensor,
    shape: tuple[int, ...],
    shape_name: str,
) -> None:
    """``weight`` and ``pos_weight`` of a BCE loss: constants (see :func:`check_constant`)
    that broadcast to the elementwise loss's ``shape`` (called ``shape_name`` in messages)
    without enlarging it, as torch requires."""
    for name, tensor in (("weight", weight), ("pos_weight", pos_weight)):
        check_constant(name, tensor, input)
        if tensor is None:
            continue
        try:
            broadcast = torch.broadcast_shapes(tensor.shape, shape)
        except RuntimeError as error:
            raise RuntimeError(
                f"{name}: shape {tuple(tensor.shape)} does not broadcast to {shape_name} "
                f"{tuple(shape)}: {error}"
            ) from None
        if tuple(broadcast) != tuple(shape):
            raise RuntimeError(
                f"{name}: shape {tuple(tensor.shape)} would enlarge the loss beyond {shape_name} "
                f"{tuple(shape)} (broadcast shape {tuple(broadcast)})"
            )


# The distillation losses' options.
_DISTILL_REDUCTIONS = ("none", "batchmean", "sum", "mean")
_DIRECTIONS = ("forward", "reverse")


def check_distill_reduction(reduction: str) -> None:
    if reduction not in _DISTILL_REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_DISTILL_REDUCTIONS}, got {reduction!r}")


def check_direction(direction: str) -> None:
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction: expected one of {_DIRECTIONS}, got {direction!r}")


def check_temperature(temperature: float) -> None:
    if not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature > 0.0
    ):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")


def check_beta(beta: float) -> None:
    if not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta: expected a number in [0, 1], got {beta!r}")


def check_ce_weight(ce_weight: float) -> None:
    if not isinstance(ce_weight, (int, float)) or not 0.0 <= ce_weight <= 1.0:
        raise ValueError(f"ce_weight: expected a number in [0, 1], got {ce_weight!r}")
