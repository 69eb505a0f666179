"""``fused_ce::bce_forward`` / ``fused_ce::bce_backward``: the sigmoid + BCE kernel as PyTorch
custom ops with fake kernels and autograd. The reduction stays outside, in plain torch."""

from __future__ import annotations

import torch

from ._autograd import forbid_double_backward
from ._impl import implementation


@torch.library.custom_op("fused_ce::bce_forward", mutates_args=())
def bce_forward(
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


@bce_forward.register_fake
def _(input, target, weight, pos_weight, backend):
    return torch.empty(input.shape, dtype=target.dtype, device=input.device)


@torch.library.custom_op("fused_ce::bce_backward", mutates_args=())
def bce_backward(
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


def _grad_buffers(input, target, input_grad, target_grad):
    def buffer(like, wanted):
        shape = like.shape if wanted else (0,)
        return torch.empty(shape, dtype=like.dtype, device=like.device)

    return buffer(input, input_grad), buffer(target, target_grad)


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
    grad_input, grad_target = bce_backward(
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


forbid_double_backward(
    bce_backward,
    "sigmoid_binary_cross_entropy",
    "torch.nn.functional.binary_cross_entropy_with_logits",
)
