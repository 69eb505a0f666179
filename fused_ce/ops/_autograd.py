"""Shared autograd plumbing for the backward ops."""

from __future__ import annotations


def forbid_double_backward(backward_op, loss_name: str, torch_name: str) -> None:
    """Give a backward op an autograd formula that raises a clear error: the fused backward
    kernels have no derivative, and a silent wrong second derivative is worse than none."""

    def _raise(ctx, *grads):
        raise RuntimeError(
            f"fused_ce: double backward through {loss_name} is not supported; the fused "
            f"backward kernel has no derivative of its own. Use {torch_name} for "
            "higher-order gradients."
        )

    def _save_nothing(ctx, inputs, output):
        pass

    backward_op.register_autograd(_raise, setup_context=_save_nothing)
