"""Custom ops for the fused linear + loss heads, with fake kernels and autograd.

Two kinds of op pair, for each head (softmax CE and sigmoid BCE):

* ``*_forward`` / ``*_backward``: the forward returns per-row statistics (CE: loss, lse, the
  saved row max / log-sum / U, and optional entropy and argmax; BCE: the elementwise loss or
  its per-row sums) and saves only its inputs and those statistics; the
  backward recomputes the logits from them, so any upstream gradient, per token included
  (``reduction='none'``), is exact.
* ``*_scalar``: for a ``'mean'`` or ``'sum'`` loss whose gradient is wanted. The forward takes
  the reduction's scale (``1 / divisor`` or 1, a 0-d tensor), returns the reduced loss and
  computes the gradients of that loss in the same sweep (each chunk's logits are made once:
  three GEMMs in all, against four for forward + recompute). The upstream gradient of a 0-d
  loss is one number, which the backward multiplies in: exact whenever it is a power of two
  (1 from ``loss.backward()``, a ``GradScaler`` scale), otherwise one extra rounding in the
  operands' dtype.

Inputs are 2-D: ``input (N, D)``, ``linear_weight (V, D)``; the public functions in
``fused_ce.linear`` flatten leading dims and reduce in plain torch.
"""

from __future__ import annotations

import torch

from .. import _chunked as chunked
from .._common import CEOptions, accumulation_dtype, forward_outputs
from .._impl import implementation
from . import _composite
from ._autograd import dispatch, double_backward_message, eager_function, forbid_double_backward


def _rows(
    chunk_size: int,
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    backend: str,
    fixed_rows: bool = False,
) -> int:
    if fixed_rows:
        return chunked.fixed_chunk_rows(chunk_size, linear_weight.shape[0], input, backend=backend)
    return chunked.chunk_rows(
        chunk_size, input.shape[0], linear_weight.shape[0], input, backend=backend
    )


def _grads(input, linear_weight, linear_bias, input_grad, weight_grad, bias_grad):
    return chunked.LinearGrads(
        input,
        linear_weight,
        linear_bias,
        input_grad,
        weight_grad,
        bias_grad and linear_bias is not None,
    )


def _grad_target(target: torch.Tensor, wanted: bool) -> torch.Tensor:
    if wanted:
        return torch.empty(target.shape, dtype=target.dtype, device=target.device)
    return target.new_empty(0)


def _grad_buffers(
    input, linear_weight, linear_bias, target, input_grad, weight_grad, bias_grad, target_grad
):
    """Uninitialised ``(dX, dW, db, dtarget)`` as the ops return them (contiguous, the
    operands' dtypes; empty when not wanted): the fake kernels' outputs and the fused path's
    buffers."""

    def like(t, wanted):
        if t is None or not wanted:
            return input.new_empty(0) if t is None else t.new_empty(0)
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)

    return (
        like(input, input_grad),
        like(linear_weight, weight_grad),
        like(linear_bias, bias_grad) if linear_bias is not None else linear_weight.new_empty(0),
        like(target, target_grad),
    )


# --- softmax cross-entropy head ---------------------------------------------------------------


def _linear_ce_forward(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    softcap: float,
    with_stats: bool,
    chunk_size: int,
    fused: bool,
    backend: str,
    fixed_rows: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``(loss, lse, saved, entropy, argmax)`` (see ``fused_ce::ce_forward``) of
    ``cross_entropy(input @ linear_weight.T + linear_bias)``; ``target`` is ``(N,)`` class
    indices or ``(N, V)`` probabilities; ``chunk_size`` 0 is automatic; ``fused`` picks the
    Triton kernels that never write logits; ``fixed_rows`` makes every chunk the same shape
    (batch invariance, see ``fused_ce._chunked.cross_entropy``)."""
    operands = (input, linear_weight, linear_bias, target, weight)
    options = CEOptions(ignore_index, label_smoothing, logit_scale, softcap)
    if fused:
        return implementation("linear_cross_entropy", "triton").forward(
            *operands, options, with_stats=with_stats
        )
    return chunked.cross_entropy(
        *operands,
        options,
        _rows(chunk_size, input, linear_weight, backend, fixed_rows),
        implementation("cross_entropy", backend),
        with_stats=with_stats,
        fixed_rows=fixed_rows,
    )


linear_ce_forward = torch.library.custom_op(
    "fused_ce::linear_ce_forward", _linear_ce_forward, mutates_args=()
)


@linear_ce_forward.register_fake
def _(
    input,
    linear_weight,
    linear_bias,
    target,
    weight,
    ignore_index,
    label_smoothing,
    logit_scale,
    softcap,
    with_stats,
    chunk_size,
    fused,
    backend,
    fixed_rows=False,
):
    dtype = accumulation_dtype(input.dtype, target.dtype)
    return forward_outputs(input.shape[0], dtype, input.device, with_stats)


def _linear_ce_backward(
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor | None,
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    saved: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    softcap: float,
    chunk_size: int,
    fused: bool,
    backend: str,
    input_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
    target_grad: bool,
    fixed_rows: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dX, dW, db, dtarget)`` for a per-row ``grad_loss`` (and optionally ``grad_lse``),
    recomputing the logits; each is empty unless asked for."""
    grad_target = _grad_target(target, target_grad)
    options = CEOptions(ignore_index, label_smoothing, logit_scale, softcap)
    if fused:
        grad_input, grad_weight, grad_bias, _ = _grad_buffers(
            input, linear_weight, linear_bias, target, input_grad, weight_grad, bias_grad, False
        )
        implementation("linear_cross_entropy", "triton").backward(
            grad_loss,
            grad_lse,
            input,
            linear_weight,
            linear_bias,
            target,
            weight,
            saved,
            options,
            grad_input if input_grad else None,
            grad_weight if weight_grad else None,
            grad_bias if bias_grad and linear_bias is not None else None,
            grad_target if target_grad else None,
        )
        return grad_input, grad_weight, grad_bias, grad_target
    grads = _grads(input, linear_weight, linear_bias, input_grad, weight_grad, bias_grad)
    chunked.cross_entropy(
        input,
        linear_weight,
        linear_bias,
        target,
        weight,
        options,
        _rows(chunk_size, input, linear_weight, backend, fixed_rows),
        implementation("cross_entropy", backend),
        saved=saved,
        grad_loss=grad_loss,
        grad_lse=grad_lse,
        grads=grads,
        grad_target=grad_target if target_grad else None,
        fixed_rows=fixed_rows,
    )
    return (*grads.results(), grad_target)


linear_ce_backward = torch.library.custom_op(
    "fused_ce::linear_ce_backward", _linear_ce_backward, mutates_args=()
)


@linear_ce_backward.register_fake
def _(
    grad_loss,
    grad_lse,
    input,
    linear_weight,
    linear_bias,
    target,
    weight,
    saved,
    ignore_index,
    label_smoothing,
    logit_scale,
    softcap,
    chunk_size,
    fused,
    backend,
    input_grad,
    weight_grad,
    bias_grad,
    target_grad,
    fixed_rows=False,
):
    return _grad_buffers(
        input, linear_weight, linear_bias, target, input_grad, weight_grad, bias_grad, target_grad
    )


def _ce_setup_context(ctx, inputs, output):
    (
        input,
        linear_weight,
        linear_bias,
        target,
        weight,
        ignore_index,
        label_smoothing,
        logit_scale,
        softcap,
        _with_stats,
        chunk_size,
        fused,
        backend,
        *fixed_rows,
    ) = inputs
    _, _, saved, entropy, _ = output
    ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, saved)
    ctx.mark_non_differentiable(saved, entropy)
    ctx.set_materialize_grads(False)
    ctx.options = (ignore_index, label_smoothing, logit_scale, softcap)
    ctx.path = (chunk_size, fused, backend)
    ctx.fixed_rows = bool(fixed_rows and fixed_rows[0])


# linear_ce_forward's inputs: 4 that may have gradients (input, linear_weight, linear_bias,
# target), then the class weight and 9 options, which have none.
_CE_NO_GRADS = (None,) * 10


def _ce_backward(ctx, grad_loss, grad_lse, *unused):
    input, linear_weight, linear_bias, target, weight, saved = ctx.saved_tensors
    if grad_loss is None and grad_lse is None:
        return (None,) * 4 + _CE_NO_GRADS
    if grad_loss is None:
        grad_loss = saved.new_zeros(saved.shape[1])
    needs = ctx.needs_input_grad
    target_grad = target.is_floating_point() and needs[3]
    run = _linear_ce_backward if getattr(ctx, "eager", False) else linear_ce_backward
    grads = run(
        grad_loss,
        grad_lse,
        input,
        linear_weight,
        linear_bias,
        target,
        weight,
        saved,
        *ctx.options,
        *ctx.path,
        needs[0],
        needs[1],
        needs[2],
        target_grad,
        ctx.fixed_rows,
    )
    return _wanted(grads, needs[:3] + (target_grad,)) + _CE_NO_GRADS


linear_ce_forward.register_autograd(_ce_backward, setup_context=_ce_setup_context)


def _linear_ce_scalar(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    scale: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    softcap: float,
    chunk_size: int,
    backend: str,
    input_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
    target_grad: bool,
    fixed_rows: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scale * sum_n loss_n, dX, dW, db, dtarget)``: the reduced loss and its gradients from
    one chunked sweep (the chunked path only)."""
    grads = _grads(input, linear_weight, linear_bias, input_grad, weight_grad, bias_grad)
    grad_target = _grad_target(target, target_grad)
    loss, *_ = chunked.cross_entropy(
        input,
        linear_weight,
        linear_bias,
        target,
        weight,
        CEOptions(ignore_index, label_smoothing, logit_scale, softcap),
        _rows(chunk_size, input, linear_weight, backend, fixed_rows),
        implementation("cross_entropy", backend),
        grad_scale=scale.to(accumulation_dtype(input.dtype, target.dtype)),
        grads=grads,
        grad_target=grad_target if target_grad else None,
        fixed_rows=fixed_rows,
    )
    return (loss.sum() * scale, *grads.results(), grad_target)


linear_ce_scalar = torch.library.custom_op(
    "fused_ce::linear_ce_scalar", _linear_ce_scalar, mutates_args=()
)


@linear_ce_scalar.register_fake
def _(
    input,
    linear_weight,
    linear_bias,
    target,
    weight,
    scale,
    ignore_index,
    label_smoothing,
    logit_scale,
    softcap,
    chunk_size,
    backend,
    input_grad,
    weight_grad,
    bias_grad,
    target_grad,
    fixed_rows=False,
):
    dtype = accumulation_dtype(input.dtype, target.dtype)
    return (
        input.new_empty((), dtype=dtype),
        *_grad_buffers(
            input,
            linear_weight,
            linear_bias,
            target,
            input_grad,
            weight_grad,
            bias_grad,
            target_grad,
        ),
    )


# --- sigmoid binary cross-entropy head --------------------------------------------------------


def _linear_bce_forward(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    chunk_size: int,
    backend: str,
    row_sums: bool,
    fixed_rows: bool = False,
) -> torch.Tensor:
    """The ``(N, C)`` elementwise loss of ``binary_cross_entropy_with_logits(input @
    linear_weight.T + linear_bias, target)``, or with ``row_sums`` its ``(N,)`` row sums, in
    the accumulation dtype, with no ``N x C`` buffer. ``target``, ``weight`` and
    ``pos_weight`` are ``(N, C)`` (broadcast weights as stride-0 views)."""
    loss = _bce_loss_buffer(input, linear_weight, target, row_sums)
    chunked.binary_cross_entropy(
        input,
        linear_weight,
        linear_bias,
        target,
        weight,
        pos_weight,
        _rows(chunk_size, input, linear_weight, backend, fixed_rows),
        implementation("bce", backend),
        loss=loss,
        fixed_rows=fixed_rows,
    )
    return loss


def _bce_loss_buffer(input, linear_weight, target, row_sums):
    """The loss in the accumulation dtype: ``(N,)`` row sums, or the ``(N, C)`` elementwise loss
    (fp32 for half-precision operands, as the reduced loss)."""
    dtype = accumulation_dtype(input.dtype, target.dtype)
    if row_sums:
        return input.new_empty(input.shape[0], dtype=dtype)
    return torch.empty(target.shape, dtype=dtype, device=target.device)


linear_bce_forward = torch.library.custom_op(
    "fused_ce::linear_bce_forward", _linear_bce_forward, mutates_args=()
)


@linear_bce_forward.register_fake
def _(
    input,
    linear_weight,
    linear_bias,
    target,
    weight,
    pos_weight,
    chunk_size,
    backend,
    row_sums,
    fixed_rows=False,
):
    return _bce_loss_buffer(input, linear_weight, target, row_sums)


def _linear_bce_backward(
    grad: torch.Tensor,
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    chunk_size: int,
    backend: str,
    input_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
    target_grad: bool,
    fixed_rows: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dX, dW, db, dtarget)`` for ``grad`` of the elementwise loss (``(N, C)``) or of its row
    sums (``(N,)``), recomputing the logits; each is empty unless asked for."""
    if grad.dim() == 1:
        grad = grad[:, None].expand(target.shape)
    grads = _grads(input, linear_weight, linear_bias, input_grad, weight_grad, bias_grad)
    grad_target = _grad_target(target, target_grad)
    chunked.binary_cross_entropy(
        input,
        linear_weight,
        linear_bias,
        target,
        weight,
        pos_weight,
        _rows(chunk_size, input, linear_weight, backend, fixed_rows),
        implementation("bce", backend),
        grad=grad,
        grads=grads,
        grad_target=grad_target if target_grad else None,
        fixed_rows=fixed_rows,
    )
    return (*grads.results(), grad_target)


linear_bce_backward = torch.library.custom_op(
    "fused_ce::linear_bce_backward", _linear_bce_backward, mutates_args=()
)


@linear_bce_backward.register_fake
def _(
    grad,
    input,
    linear_weight,
    linear_bias,
    target,
    weight,
    pos_weight,
    chunk_size,
    backend,
    input_grad,
    weight_grad,
    bias_grad,
    target_grad,
    fixed_rows=False,
):
    return _grad_buffers(
        input, linear_weight, linear_bias, target, input_grad, weight_grad, bias_grad, target_grad
    )


def _bce_setup_context(ctx, inputs, output):
    (
        input,
        linear_weight,
        linear_bias,
        target,
        weight,
        pos_weight,
        chunk_size,
        backend,
        _row_sums,
        *fixed_rows,
    ) = inputs
    ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, pos_weight)
    ctx.options = (chunk_size, backend)
    ctx.fixed_rows = bool(fixed_rows and fixed_rows[0])


# linear_bce_forward's inputs after the 4 that may have gradients: weight, pos_weight and 4
# options.
_BCE_NO_GRADS = (None,) * 6


def _bce_backward(ctx, grad):
    input, linear_weight, linear_bias, target, weight, pos_weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    run = _linear_bce_backward if getattr(ctx, "eager", False) else linear_bce_backward
    grads = run(
        grad,
        input,
        linear_weight,
        linear_bias,
        target,
        weight,
        pos_weight,
        *ctx.options,
        needs[0],
        needs[1],
        needs[2],
        needs[3],
        ctx.fixed_rows,
    )
    return _wanted(grads, needs[:4]) + _BCE_NO_GRADS


linear_bce_forward.register_autograd(_bce_backward, setup_context=_bce_setup_context)


def _linear_bce_scalar(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    scale: torch.Tensor,
    chunk_size: int,
    backend: str,
    input_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
    target_grad: bool,
    fixed_rows: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scale * sum loss, dX, dW, db, dtarget)`` from one chunked sweep."""
    loss = _bce_loss_buffer(input, linear_weight, target, True)
    grads = _grads(input, linear_weight, linear_bias, input_grad, weight_grad, bias_grad)
    grad_target = _grad_target(target, target_grad)
    chunked.binary_cross_entropy(
        input,
        linear_weight,
        linear_bias,
        target,
        weight,
        pos_weight,
        _rows(chunk_size, input, linear_weight, backend, fixed_rows),
        implementation("bce", backend),
        loss=loss,
        grad=scale.to(loss.dtype).expand(target.shape),
        grads=grads,
        grad_target=grad_target if target_grad else None,
        fixed_rows=fixed_rows,
    )
    return (loss.sum() * scale, *grads.results(), grad_target)


linear_bce_scalar = torch.library.custom_op(
    "fused_ce::linear_bce_scalar", _linear_bce_scalar, mutates_args=()
)


@linear_bce_scalar.register_fake
def _(
    input,
    linear_weight,
    linear_bias,
    target,
    weight,
    pos_weight,
    scale,
    chunk_size,
    backend,
    input_grad,
    weight_grad,
    bias_grad,
    target_grad,
    fixed_rows=False,
):
    return (
        input.new_empty((), dtype=accumulation_dtype(input.dtype, target.dtype)),
        *_grad_buffers(
            input,
            linear_weight,
            linear_bias,
            target,
            input_grad,
            weight_grad,
            bias_grad,
            target_grad,
        ),
    )


# --- shared autograd --------------------------------------------------------------------------


def _wanted(grads, wanted) -> tuple:
    return tuple(g if w else None for g, w in zip(grads, wanted, strict=True))


def _scalar_setup_context(ctx, inputs, output):
    # The gradients were made in forward; keep them (not the inputs) for the backward.
    ctx.save_for_backward(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.n_inputs = len(inputs)


def _scalar_backward(ctx, grad_loss, *grads_of_grads):
    if any(g is not None for g in grads_of_grads):
        raise RuntimeError(
            "fused_ce: double backward through a fused linear loss is not supported; use "
            "torch.nn.functional.linear followed by the loss for higher-order gradients."
        )
    needs = ctx.needs_input_grad
    scaled = tuple(
        grad * grad_loss if needs[i] else None for i, grad in enumerate(ctx.saved_tensors)
    )
    return scaled + (None,) * (ctx.n_inputs - 4)


linear_ce_scalar.register_autograd(_scalar_backward, setup_context=_scalar_setup_context)
linear_bce_scalar.register_autograd(_scalar_backward, setup_context=_scalar_setup_context)

_CE_NAMES = ("linear_cross_entropy", "F.linear + F.cross_entropy")
_BCE_NAMES = (
    "linear_binary_cross_entropy_with_logits",
    "F.linear + F.binary_cross_entropy_with_logits",
)
forbid_double_backward(linear_ce_backward, *_CE_NAMES)
forbid_double_backward(linear_bce_backward, *_BCE_NAMES)


def _eager(name, forward, setup_context, backward, names) -> type[torch.autograd.Function]:
    return eager_function(name, forward, setup_context, backward, double_backward_message(*names))


linear_ce_forward_call = dispatch(
    linear_ce_forward,
    _eager(
        "LinearCrossEntropyFunction",
        _linear_ce_forward,
        _ce_setup_context,
        _ce_backward,
        _CE_NAMES,
    ),
    _composite.linear_ce_forward,
    composite_for_forward_ad=True,
)
linear_ce_scalar_call = dispatch(
    linear_ce_scalar,
    _eager(
        "LinearCrossEntropyScalarFunction",
        _linear_ce_scalar,
        _scalar_setup_context,
        _scalar_backward,
        _CE_NAMES,
    ),
    _composite.linear_ce_scalar,
    composite_for_forward_ad=True,
)
linear_bce_forward_call = dispatch(
    linear_bce_forward,
    _eager(
        "LinearBinaryCrossEntropyFunction",
        _linear_bce_forward,
        _bce_setup_context,
        _bce_backward,
        _BCE_NAMES,
    ),
    _composite.linear_bce_forward,
    composite_for_forward_ad=True,
)
linear_bce_scalar_call = dispatch(
    linear_bce_scalar,
    _eager(
        "LinearBinaryCrossEntropyScalarFunction",
        _linear_bce_scalar,
        _scalar_setup_context,
        _scalar_backward,
        _BCE_NAMES,
    ),
    _composite.linear_bce_scalar,
    composite_for_forward_ad=True,
)
