"""``fused_ce::bce_forward`` / ``fused_ce::bce_backward``: the sigmoid + BCE kernel as PyTorch
custom ops with fake kernels and autograd, for ``reduction='none'``; ``fused_ce::bce_scalar``
for ``'mean'``/``'sum'``: the summed loss and its gradients from one launch, with no
elementwise loss in memory. ``bce_forward_call`` and ``bce_scalar_call`` run the ops' bodies
without the custom-op layer when not compiling (see ``_autograd``)."""

from __future__ import annotations

import torch

from .._common import accumulation_dtype
from .._impl import implementation
from .._outputs import gradient_buffers as _grad_buffers
from ..native import op as native_op
from . import _composite
from ._autograd import (
    dispatch,
    double_backward_message,
    eager_function,
    forbid_double_backward,
    is_eager,
)
from ._scalar import is_unit_on_cpu, keeping_versions, scalar_backward, scalar_setup_context

_DOUBLE_BACKWARD = (
    "sigmoid_binary_cross_entropy",
    "torch.nn.functional.binary_cross_entropy_with_logits",
)


def _forward(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    """Elementwise loss, contiguous, of ``input``'s shape and ``target``'s dtype (as torch)."""
    loss = torch.empty(input.shape, dtype=target.dtype, device=input.device)
    implementation("bce", backend).run(input, target, weight, pos_weight, None, loss, None, None)
    return loss


bce_forward = torch.library.custom_op("fused_ce::bce_forward", _forward, mutates_args=())


@bce_forward.register_fake
def _(input, target, weight, pos_weight, backend):
    return torch.empty(input.shape, dtype=target.dtype, device=input.device)


def _backward_op(
    grad: torch.Tensor,
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    backend: str,
    input_grad: bool,
    target_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dinput, dtarget)``, contiguous; each is empty unless asked for."""
    grad_input, grad_target = _grad_buffers(input, target, input_grad, target_grad)
    implementation("bce", backend).run(
        input,
        target,
        weight,
        pos_weight,
        grad,
        None,
        grad_input if input_grad else None,
        grad_target if target_grad else None,
    )
    return grad_input, grad_target


bce_backward = torch.library.custom_op("fused_ce::bce_backward", _backward_op, mutates_args=())


@bce_backward.register_fake
def _(grad, input, target, weight, pos_weight, backend, input_grad, target_grad):
    return _grad_buffers(input, target, input_grad, target_grad)


def _setup_context(ctx, inputs, output):
    input, target, weight, pos_weight, backend = inputs
    ctx.save_for_backward(input, target, weight, pos_weight)
    ctx.backend = backend


def _backward(ctx, grad):
    input, target, weight, pos_weight = ctx.saved_tensors
    input_grad, target_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    run = _backward_op if getattr(ctx, "eager", False) else bce_backward
    grad_input, grad_target = run(
        grad, input, target, weight, pos_weight, ctx.backend, input_grad, target_grad
    )
    return (
        grad_input if input_grad else None,
        grad_target if target_grad else None,
        None,
        None,
        None,
    )


bce_forward.register_autograd(_backward, setup_context=_setup_context)
forbid_double_backward(bce_backward, *_DOUBLE_BACKWARD)


def _upcast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return tensor.to(dtype) if tensor is not None else None


def _tangent(input, target, weight, pos_weight, tangents, gradients) -> torch.Tensor:
    """``G dx + H dt`` elementwise (``G``, ``H`` the loss's gradients ``gradients(dtype,
    operands, input_wanted, target_wanted)`` makes, on operands upcast to the accumulation
    dtype), in that dtype."""
    d_input, d_target = tangents[0], tangents[1]
    dtype = accumulation_dtype(input.dtype, target.dtype)
    operands = [_upcast(t, dtype) for t in (input, target, weight, pos_weight)]
    grad_input, grad_target = gradients(dtype, operands, d_input is not None, d_target is not None)
    tangent = torch.zeros((), dtype=dtype, device=input.device)
    if d_input is not None:
        tangent = tangent + grad_input * d_input.to(dtype)
    if d_target is not None:
        tangent = tangent + grad_target * d_target.to(dtype)
    return tangent


def _jvp(inputs, output, tangents):
    """Forward-mode derivative of ``bce_forward``: elementwise ``dl = G dx + H dt`` with ``G =
    w (((pw-1)t+1) sigmoid(x) - pw t)``, ``H = w (-x - (pw-1) log sigmoid(x))`` from the
    backward kernel (unit upstream gradient), rounded once to the loss's dtype."""
    input, target, weight, pos_weight, backend = inputs

    def gradients(dtype, operands, input_wanted, target_wanted):
        ones = torch.ones((), dtype=dtype, device=input.device).expand(input.shape)
        return _backward_op(ones, *operands, backend, input_wanted, target_wanted)

    tangent = _tangent(input, target, weight, pos_weight, tangents, gradients)
    return tangent.expand(input.shape).to(target.dtype)  # the loss's dtype


bce_forward_call = dispatch(
    bce_forward,
    eager_function(
        "BinaryCrossEntropyFunction",
        _forward,
        _setup_context,
        _backward,
        double_backward_message(*_DOUBLE_BACKWARD),
        jvp=_jvp,
    ),
    _composite.bce_forward,
)


# --- 'mean' / 'sum': the gradient made during the forward ------------------------------------


def _scalar(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    grad_scale: torch.Tensor,
    backend: str,
    input_grad: bool,
    target_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L, dL/dinput, dL/dtarget)`` of ``L = grad_scale * sum loss`` (``grad_scale``: 0-d in
    the accumulation dtype, ``1 / numel`` for a mean, 1 for a sum) from one launch that keeps
    no elementwise loss; each gradient is made only when its flag asks (else empty)."""
    grad_input, grad_target = _grad_buffers(input, target, input_grad, target_grad)
    loss_sum = input.new_empty((), dtype=grad_scale.dtype)
    implementation("bce", backend).run(
        input,
        target,
        weight,
        pos_weight,
        grad_scale if input_grad or target_grad else None,
        None,
        grad_input if input_grad else None,
        grad_target if target_grad else None,
        loss_sum=loss_sum,
    )
    return loss_sum * grad_scale, grad_input, grad_target


bce_scalar = torch.library.custom_op("fused_ce::bce_scalar", _scalar, mutates_args=())


@bce_scalar.register_fake
def _(input, target, weight, pos_weight, grad_scale, backend, input_grad, target_grad):
    loss = input.new_empty((), dtype=grad_scale.dtype)
    return (loss, *_grad_buffers(input, target, input_grad, target_grad))


def _rewrite(backend, upstream, operands, options, buffers, in_place) -> None:
    """Write the gradients for ``upstream`` into ``buffers`` (see ``_scalar``)."""
    input, target, weight, pos_weight, grad_scale = operands
    grad_input, grad_target = buffers
    if grad_input is None and grad_target is None:
        return
    if backend == "triton":
        # In place: the kernel compares upstream with 1 on the device and moves nothing then.
        implementation("bce", backend).run(
            input,
            target,
            weight,
            pos_weight,
            grad_scale if in_place else grad_scale * upstream,
            None,
            grad_input,
            grad_target,
            upstream=upstream if in_place else None,
        )
        return
    if in_place and is_unit_on_cpu(upstream):
        return
    with keeping_versions(*buffers):
        implementation("bce", backend).run(
            input, target, weight, pos_weight, grad_scale * upstream, None, grad_input, grad_target
        )


def _scalar_backward_op(
    upstream: torch.Tensor,
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    grad_scale: torch.Tensor,
    backend: str,
    input_grad: bool,
    target_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dinput, dL/dtarget)`` of ``bce_scalar``'s loss for the upstream gradient
    ``upstream``, in new buffers (each empty unless asked for)."""
    grad_input, grad_target = _grad_buffers(input, target, input_grad, target_grad)
    _rewrite(
        backend,
        upstream,
        (input, target, weight, pos_weight, grad_scale),
        (),
        (grad_input if input_grad else None, grad_target if target_grad else None),
        False,
    )
    return grad_input, grad_target


bce_scalar_backward = torch.library.custom_op(
    "fused_ce::bce_scalar_backward", _scalar_backward_op, mutates_args=()
)


@bce_scalar_backward.register_fake
def _(upstream, input, target, weight, pos_weight, grad_scale, backend, input_grad, target_grad):
    return _grad_buffers(input, target, input_grad, target_grad)


def _scalar_setup(ctx, inputs, output):
    input, target, weight, pos_weight, grad_scale, backend, input_grad, target_grad = inputs
    _, grad_input, grad_target = output
    scalar_setup_context(
        ctx,
        backend=backend,
        gradients=(grad_input, grad_target),
        wanted=(input_grad, target_grad),
        operands=(input, target, weight, pos_weight, grad_scale),
        n_inputs=len(inputs),
        options=(),
    )


def _scalar_backward(ctx, grad_loss, *unused):
    return scalar_backward(ctx, grad_loss, rewrite=_rewrite, backward_op=bce_scalar_backward)


bce_scalar.register_autograd(_scalar_backward, setup_context=_scalar_setup)
forbid_double_backward(bce_scalar_backward, *_DOUBLE_BACKWARD)


def _scalar_jvp(inputs, output, tangents):
    """Forward-mode derivative of ``bce_scalar``: ``sum(G dx + H dt)`` with the gradients of
    its loss (``grad_scale`` included) for an upstream gradient of 1."""
    input, target, weight, pos_weight, grad_scale, backend, _, _ = inputs

    def gradients(dtype, operands, input_wanted, target_wanted):
        upstream = torch.ones((), dtype=dtype, device=input.device)
        return _scalar_backward_op(
            upstream, *operands, grad_scale, backend, input_wanted, target_wanted
        )

    return (_tangent(input, target, weight, pos_weight, tangents, gradients).sum(),)


bce_scalar_call = dispatch(
    bce_scalar,
    eager_function(
        "BinaryCrossEntropyScalarFunction",
        _scalar,
        _scalar_setup,
        _scalar_backward,
        double_backward_message(*_DOUBLE_BACKWARD),
        returned=1,
        jvp=_scalar_jvp,
    ),
    _composite.bce_scalar,
)


def bce_scalar_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    grad_scale: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    """``bce_scalar``'s loss, with the gradients made during the forward in eager mode only
    (under ``torch.compile`` the backward op makes them)."""
    grad_enabled = is_eager() and torch.is_grad_enabled()
    loss, *_ = bce_scalar_call(
        input,
        target,
        weight,
        pos_weight,
        grad_scale,
        backend,
        grad_enabled and input.requires_grad,
        grad_enabled and target.requires_grad,
    )
    return loss


def bce_scalar_native(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    mean: bool,
) -> torch.Tensor:
    """The same loss (``'mean'`` when ``mean``, else ``'sum'``) on the native backend in eager
    mode: one call of the C++ op whose autograd is C++ (``fused_ce_native::bce_scalar``)."""
    return native_op("bce_scalar")(input, target, weight, pos_weight, mean)


def bce_unreduced_native(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
) -> torch.Tensor:
    """``reduction='none'`` on the native backend in eager mode: the elementwise loss from one
    call of the C++ op whose autograd is C++ (``fused_ce_native::bce_unreduced``)."""
    return native_op("bce_unreduced")(input, target, weight, pos_weight)
