"""``fused_ce::ce_forward`` / ``fused_ce::ce_backward``: the softmax + CE kernel pair as
PyTorch custom ops with fake (meta) kernels and autograd, ``fused_ce::ce_backward_``, the
in-place backward that overwrites the logits with their gradient (``inplace_backward=True``),
and ``fused_ce::ce_scalar``, the ``'mean'``/``'sum'`` loss whose gradient is made during the
forward.

The ops see logits as ``(n_outer, C, n_inner)`` and return per-row statistics in the
accumulation dtype; the reduction (sum, divide by the total weight) and the z-loss stay in
plain torch outside, in ``fused_ce.functional``. ``lse`` is a differentiable output (its
gradient adds ``g_lse * p``), which is how the z-loss gets its gradient.

Each op's body is a plain function; ``ce_forward_call`` and ``ce_scalar_call`` run it through
the registered op under ``torch.compile`` and through an ``autograd.Function`` otherwise (see
``_autograd``).
"""

from __future__ import annotations

import torch

from .._common import CEOptions, accumulation_dtype, class_rows, forward_outputs
from .._impl import implementation
from ..native import op as native_op
from ..torch_impl import cross_entropy as torch_impl
from . import _composite
from ._autograd import (
    dispatch,
    double_backward_message,
    eager_function,
    forbid_double_backward,
    is_eager,
)
from ._scalar import is_unit_on_cpu, keeping_versions, scalar_backward, scalar_setup_context

_DOUBLE_BACKWARD = ("softmax_cross_entropy", "torch.nn.functional.cross_entropy")


def _forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    softcap: float,
    with_stats: bool,
    inplace_backward: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``(loss, lse, saved, entropy, argmax)`` of ``(n_outer, C, n_inner)`` logits.

    ``target`` is ``(n_outer, n_inner)`` class indices or ``(n_outer, C, n_inner)``
    probabilities; ``saved`` ``(3, n_rows)`` holds the row max, ``log sum exp(x - max)`` and
    ``U = sum_c u_c`` for the backward; entropy and argmax are empty unless ``with_stats``.
    ``softcap`` 0 means none; ``inplace_backward`` makes the backward overwrite ``logits``.
    """
    options = CEOptions(ignore_index, label_smoothing, logit_scale, softcap)
    return implementation("cross_entropy", backend).forward(
        logits, target, weight, options, with_stats=with_stats
    )


ce_forward = torch.library.custom_op("fused_ce::ce_forward", _forward, mutates_args=())


@ce_forward.register_fake
def _(
    logits,
    target,
    weight,
    ignore_index,
    label_smoothing,
    logit_scale,
    softcap,
    with_stats,
    inplace_backward,
    backend,
):
    n_rows = logits.shape[0] * logits.shape[2]
    dtype = accumulation_dtype(logits.dtype, target.dtype)
    return forward_outputs(n_rows, dtype, logits.device, with_stats)


def _run_backward(
    grad_loss,
    grad_lse,
    logits,
    target,
    weight,
    saved,
    options,
    backend,
    grad_logits,
    target_grad,
):
    """Shared body of the two backward ops; returns ``dtarget`` (empty unless wanted)."""
    grad_target = torch.empty_like(target) if target_grad else target.new_empty(0)
    implementation("cross_entropy", backend).backward(
        grad_loss,
        grad_lse,
        logits,
        target,
        weight,
        saved,
        options,
        grad_logits,
        grad_target if target_grad else None,
    )
    return grad_target


def _backward_op(
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor | None,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    saved: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    softcap: float,
    backend: str,
    target_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dlogits, dtarget)``; ``dtarget`` is empty unless ``target_grad``."""
    grad_logits = torch.empty_like(logits)
    options = CEOptions(ignore_index, label_smoothing, logit_scale, softcap)
    grad_target = _run_backward(
        grad_loss,
        grad_lse,
        logits,
        target,
        weight,
        saved,
        options,
        backend,
        grad_logits,
        target_grad,
    )
    return grad_logits, grad_target


ce_backward = torch.library.custom_op("fused_ce::ce_backward", _backward_op, mutates_args=())


@ce_backward.register_fake
def _(
    grad_loss,
    grad_lse,
    logits,
    target,
    weight,
    saved,
    ignore_index,
    label_smoothing,
    logit_scale,
    softcap,
    backend,
    target_grad,
):
    grad_target = torch.empty_like(target) if target_grad else target.new_empty(0)
    return torch.empty_like(logits), grad_target


def _backward_inplace_op(
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor | None,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    saved: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    softcap: float,
    backend: str,
    target_grad: bool,
) -> torch.Tensor:
    """``ce_backward`` that writes ``dlogits`` over ``logits`` (each element is read before it
    is written); returns ``dtarget`` (empty unless ``target_grad``)."""
    options = CEOptions(ignore_index, label_smoothing, logit_scale, softcap)
    return _run_backward(
        grad_loss,
        grad_lse,
        logits,
        target,
        weight,
        saved,
        options,
        backend,
        logits,
        target_grad,
    )


ce_backward_inplace = torch.library.custom_op(
    "fused_ce::ce_backward_", _backward_inplace_op, mutates_args=("logits",)
)


@ce_backward_inplace.register_fake
def _(
    grad_loss,
    grad_lse,
    logits,
    target,
    weight,
    saved,
    ignore_index,
    label_smoothing,
    logit_scale,
    softcap,
    backend,
    target_grad,
):
    return torch.empty_like(target) if target_grad else target.new_empty(0)


def _setup_context(ctx, inputs, output):
    (
        logits,
        target,
        weight,
        ignore_index,
        label_smoothing,
        logit_scale,
        softcap,
        _with_stats,
        inplace_backward,
        backend,
    ) = inputs
    _, _, saved, entropy, _ = output
    ctx.save_for_backward(logits, target, weight, saved)
    ctx.mark_non_differentiable(saved, entropy)
    # Unused outputs (lse) then arrive as None, not as zero tensors to read.
    ctx.set_materialize_grads(False)
    ctx.options = (ignore_index, label_smoothing, logit_scale, softcap)
    ctx.inplace_backward = inplace_backward
    ctx.backend = backend


def _refuse_graph_of_inplace(ctx) -> None:
    """``create_graph=True`` asks for a graph of the gradient; ``inplace_backward``'s has
    none."""
    if ctx.inplace_backward and ctx.needs_input_grad[0]:
        raise RuntimeError(
            "fused_ce: double backward through softmax_cross_entropy is not supported, and "
            "inplace_backward=True gradients have no graph; use inplace_backward=False "
            "with torch.nn.functional.cross_entropy for higher-order gradients."
        )


# Gradients of ce_forward's inputs after (logits, target): none for the eight options.
_NO_OPTION_GRADS = (None,) * 8


def _backward(ctx, grad_loss, grad_lse, *unused):
    # Unpacking checks the version counters: logits changed since the forward raise here.
    logits, target, weight, saved = ctx.saved_tensors
    target_grad = target.dim() == 3 and ctx.needs_input_grad[1]
    if grad_loss is None:
        grad_loss = saved.new_zeros(saved.shape[1])
    args = (grad_loss, grad_lse, logits, target, weight, saved, *ctx.options, ctx.backend)
    eager = getattr(ctx, "eager", False)
    # Logits that need no gradient (only a probability target does) keep their values.
    if ctx.inplace_backward and ctx.needs_input_grad[0]:
        if torch.is_grad_enabled():
            _refuse_graph_of_inplace(ctx)
        run_inplace = _backward_inplace_op if eager else ce_backward_inplace
        grad_target = run_inplace(*args, target_grad)
        # The logits now hold their gradient: any other saved use of them (or of a view)
        # fails loudly at its unpack, by torch's version check, instead of reading it.
        torch.autograd.graph.increment_version(logits)
        grad_logits = logits.detach()
    else:
        grad_logits, grad_target = (_backward_op if eager else ce_backward)(*args, target_grad)
    return (grad_logits, grad_target if target_grad else None) + _NO_OPTION_GRADS


ce_forward.register_autograd(_backward, setup_context=_setup_context)
forbid_double_backward(ce_backward, *_DOUBLE_BACKWARD)


def _upcast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A floating operand in ``dtype`` (exact: the kernels upcast every load to it anyway)."""
    if tensor is None or not tensor.is_floating_point():
        return tensor
    return tensor.to(dtype)


def _row_dot(grad: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """``sum_c grad[:, c, :] * tangent[:, c, :]`` of ``(n_outer, C, n_inner)`` tensors, flat
    over the rows, in ``grad``'s dtype."""
    return (grad * tangent.to(grad.dtype)).sum(1).reshape(-1)


def _jvp(inputs, output, tangents):
    """Forward-mode derivative of ``ce_forward``: the tangent of each row's loss is
    ``sum_c G_c dz_c + sum_c H_c dt_c`` with ``G = dloss_n/dlogits`` and ``H = dloss_n/dtarget``
    (the backward kernel's gradients for a unit upstream gradient per row, made from the saved
    statistics on the operands upcast to the accumulation dtype, so rounded only in that
    dtype), and that of the row's lse ``sum_c p_c dz_c`` (the backward kernel's gradient for a
    unit ``grad_lse``). The logit scale and the soft cap are inside ``G`` and ``p``."""
    logits, target, weight, *options, _with_stats, _inplace, backend = inputs
    saved = output[2]
    d_logits, d_target = tangents[0], tangents[1]
    dtype = saved.dtype
    n_rows = saved.shape[1]
    target_tangent = target.is_floating_point() and d_target is not None
    args = (
        logits.to(dtype),
        _upcast(target, dtype),
        _upcast(weight, dtype),
        saved,
        *options,
        backend,
    )
    ones = saved.new_ones(n_rows)
    grad_logits, grad_target = _backward_op(ones, None, *args, target_tangent)
    d_loss = _row_dot(grad_logits, d_logits) if d_logits is not None else saved.new_zeros(n_rows)
    if target_tangent:
        d_loss = d_loss + _row_dot(grad_target, d_target)
    d_lse = None
    if d_logits is not None:
        softmax, _ = _backward_op(saved.new_zeros(n_rows), ones, *args, False)
        d_lse = _row_dot(softmax, d_logits)
    return d_loss, d_lse, None, None, None


ce_forward_call = dispatch(
    ce_forward,
    eager_function(
        "CrossEntropyFunction",
        _forward,
        _setup_context,
        _backward,
        double_backward_message(*_DOUBLE_BACKWARD),
        refuse_create_graph=_refuse_graph_of_inplace,
        jvp=_jvp,
    ),
    _composite.ce_forward,
)


# --- 'mean' / 'sum': the gradient made during the forward ------------------------------------


def _scalar(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    valid: torch.Tensor | None,
    grad_scale: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    softcap: float,
    z_loss: float,
    backend: str,
    logits_grad: bool,
    target_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L, saved, dL/dlogits, dL/dtarget)`` of ``L = grad_scale * sum_n (loss_n + z_loss *
    v_n * lse_n^2)`` from one forward (``grad_scale``: 0-d, ``1 / divisor`` for a mean, 1 for
    a sum; ``valid``: the non-ignored rows, None for probability targets; ``saved`` as in
    ``ce_forward``). Each gradient is made only when its flag asks (else empty)."""
    options = CEOptions(ignore_index, label_smoothing, logit_scale, softcap)
    grad_logits = torch.empty_like(logits) if logits_grad else None
    grad_target = torch.empty_like(target) if target_grad else None
    loss, lse, saved, _, _ = implementation("cross_entropy", backend).forward(
        logits,
        target,
        weight,
        options,
        z_loss=z_loss,
        grad_scale=grad_scale if logits_grad or target_grad else None,
        grad_logits=grad_logits,
        grad_target=grad_target,
    )
    if z_loss > 0.0:
        z_rows = z_loss * lse.square()
        if valid is not None:
            # where(), not a product: an ignored row's lse may be inf and its term must be 0.
            z_rows = torch.where(valid.reshape(-1), z_rows, 0.0)
        loss = loss + z_rows
    return (
        loss.sum() * grad_scale,
        saved,
        grad_logits if grad_logits is not None else logits.new_empty(0),
        grad_target if grad_target is not None else target.new_empty(0),
    )


ce_scalar = torch.library.custom_op("fused_ce::ce_scalar", _scalar, mutates_args=())


@ce_scalar.register_fake
def _(
    logits,
    target,
    weight,
    valid,
    grad_scale,
    ignore_index,
    label_smoothing,
    logit_scale,
    softcap,
    z_loss,
    backend,
    logits_grad,
    target_grad,
):
    dtype = accumulation_dtype(logits.dtype, target.dtype)
    n_rows = logits.shape[0] * logits.shape[2]
    return (
        logits.new_empty((), dtype=dtype),
        logits.new_empty((3, n_rows), dtype=dtype),
        torch.empty_like(logits) if logits_grad else logits.new_empty(0),
        torch.empty_like(target) if target_grad else target.new_empty(0),
    )


def _rewrite(backend, upstream, operands, options, buffers, in_place) -> None:
    """Write the gradients for ``upstream`` into ``buffers`` (see ``_scalar``)."""
    logits, target, weight, saved, grad_scale = operands
    *ce_options, z_loss = options
    ce_options = CEOptions(*ce_options)
    grad_logits, grad_target = buffers
    if grad_logits is None and grad_target is None:
        return
    if backend == "triton":
        # In place: the kernel compares upstream with 1 on the device and exits at once.
        implementation("cross_entropy", backend).backward(
            grad_scale if in_place else grad_scale * upstream,
            None,
            logits,
            target,
            weight,
            saved,
            ce_options,
            grad_logits,
            grad_target,
            z_loss=z_loss,
            upstream=upstream if in_place else None,
        )
        return
    if in_place and is_unit_on_cpu(upstream):
        return
    grad_loss = (grad_scale * upstream).expand(saved.shape[1])
    grad_lse = None
    if z_loss > 0.0:
        grad_lse = torch_impl.z_loss_grad_lse(
            grad_loss, saved[0] + saved[1], target, ce_options.ignore_index, z_loss
        )
    with keeping_versions(*buffers):
        implementation("cross_entropy", backend).backward(
            grad_loss,
            grad_lse,
            logits,
            target,
            weight,
            saved,
            ce_options,
            grad_logits if grad_logits is not None else torch.empty_like(logits),
            grad_target,
        )


def _scalar_backward_op(
    upstream: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    saved: torch.Tensor,
    grad_scale: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    softcap: float,
    z_loss: float,
    backend: str,
    logits_grad: bool,
    target_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dlogits, dL/dtarget)`` of ``ce_scalar``'s loss for the upstream gradient
    ``upstream``, in new buffers (each empty unless asked for)."""
    grad_logits = torch.empty_like(logits) if logits_grad else None
    grad_target = torch.empty_like(target) if target_grad else None
    _rewrite(
        backend,
        upstream,
        (logits, target, weight, saved, grad_scale),
        (ignore_index, label_smoothing, logit_scale, softcap, z_loss),
        (grad_logits, grad_target),
        False,
    )
    return (
        grad_logits if grad_logits is not None else logits.new_empty(0),
        grad_target if grad_target is not None else target.new_empty(0),
    )


ce_scalar_backward = torch.library.custom_op(
    "fused_ce::ce_scalar_backward", _scalar_backward_op, mutates_args=()
)


@ce_scalar_backward.register_fake
def _(upstream, logits, target, weight, saved, grad_scale, *options_and_flags):
    logits_grad, target_grad = options_and_flags[-2:]
    return (
        torch.empty_like(logits) if logits_grad else logits.new_empty(0),
        torch.empty_like(target) if target_grad else target.new_empty(0),
    )


def _scalar_setup(ctx, inputs, output):
    (
        logits,
        target,
        weight,
        _valid,
        grad_scale,
        ignore_index,
        label_smoothing,
        logit_scale,
        softcap,
        z_loss,
        backend,
        logits_grad,
        target_grad,
    ) = inputs
    _, saved, grad_logits, grad_target = output
    ctx.mark_non_differentiable(saved)
    scalar_setup_context(
        ctx,
        backend=backend,
        gradients=(grad_logits, grad_target),
        wanted=(logits_grad, target_grad),
        operands=(logits, target, weight, saved, grad_scale),
        n_inputs=len(inputs),
        options=(ignore_index, label_smoothing, logit_scale, softcap, z_loss),
    )


def _scalar_backward(ctx, grad_loss, *unused):
    return scalar_backward(ctx, grad_loss, rewrite=_rewrite, backward_op=ce_scalar_backward)


ce_scalar.register_autograd(_scalar_backward, setup_context=_scalar_setup)
forbid_double_backward(ce_scalar_backward, *_DOUBLE_BACKWARD)


def _scalar_jvp(inputs, output, tangents):
    """Forward-mode derivative of ``ce_scalar``: ``sum(G * dlogits) + sum(H * dtarget)``, with
    ``G``, ``H`` the loss's gradients (as its backward makes them for an upstream gradient of
    1, on operands upcast to the accumulation dtype)."""
    logits, target, weight, _valid, grad_scale, *options, backend, _, _ = inputs
    saved = output[1]
    d_logits, d_target = tangents[0], tangents[1]
    dtype = saved.dtype
    target_tangent = target.is_floating_point() and d_target is not None
    grad_logits, grad_target = _scalar_backward_op(
        saved.new_ones(()),
        logits.to(dtype),
        _upcast(target, dtype),
        _upcast(weight, dtype),
        saved,
        grad_scale,
        *options,
        backend,
        d_logits is not None,
        target_tangent,
    )
    d_loss = saved.new_zeros(())
    if d_logits is not None:
        d_loss = d_loss + (grad_logits * d_logits.to(dtype)).sum()
    if target_tangent:
        d_loss = d_loss + (grad_target * d_target.to(dtype)).sum()
    return (d_loss,)


ce_scalar_call = dispatch(
    ce_scalar,
    eager_function(
        "CrossEntropyScalarFunction",
        _scalar,
        _scalar_setup,
        _scalar_backward,
        double_backward_message(*_DOUBLE_BACKWARD),
        returned=1,
        jvp=_scalar_jvp,
    ),
    _composite.ce_scalar,
)


def ce_scalar_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    valid: torch.Tensor | None,
    grad_scale: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    softcap: float,
    z_loss: float,
    backend: str,
) -> torch.Tensor:
    """``ce_scalar``'s loss of the public function's ``input`` and ``target`` (class indices of
    the batch shape, or probabilities of ``input``'s shape), on their ``(n_outer, C, n_inner)``
    views, with the gradients made during the forward in eager mode only (under
    ``torch.compile`` the backward op makes them: a compiled graph cannot hand out its
    forward's buffers as they are)."""
    logits = class_rows(input)
    prob_target = target.is_floating_point()
    if prob_target:
        rows_target = class_rows(target)
    else:
        rows_target = target.reshape(logits.shape[0], logits.shape[2])
    grad_enabled = is_eager() and torch.is_grad_enabled()
    loss, *_ = ce_scalar_call(
        logits,
        rows_target,
        weight,
        valid,
        grad_scale,
        ignore_index,
        label_smoothing,
        logit_scale,
        softcap,
        z_loss,
        backend,
        grad_enabled and input.requires_grad,
        grad_enabled and prob_target and target.requires_grad,
    )
    return loss


def ce_scalar_native(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    mean: bool,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    softcap: float,
    z_loss: float,
) -> torch.Tensor:
    """The same loss on the native backend in eager mode: one call of the C++ op whose
    autograd is C++ (``fused_ce_native::ce_scalar``, csrc/autograd.cpp), which also checks
    the class indices and finds ``'mean'``'s divisor (``mean``; else a sum): the
    ``(n_outer, C, n_inner)`` views are made in C++, so autograd records no view node. Called
    straight, with flat options: this is the whole Python layer of an eager native call."""
    return native_op("ce_scalar")(
        input, target, weight, mean, ignore_index, label_smoothing, logit_scale, softcap, z_loss
    )


def ce_unreduced_native(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    softcap: float,
) -> torch.Tensor:
    """``reduction='none'`` (no z-loss, no stats, no in-place backward) on the native backend in
    eager mode: the per-row loss of the batch shape, in the accumulation dtype, from one call
    of the C++ op whose autograd is C++ (``fused_ce_native::ce_unreduced``), which also checks
    the class indices."""
    return native_op("ce_unreduced")(
        input, target, weight, ignore_index, label_smoothing, logit_scale, softcap
    )
