"""Autograd of the scalar-loss ops (``ce_scalar``, ``bce_scalar``): their forward returns a 0-d
``'mean'``/``'sum'`` loss together with its gradients for an upstream gradient of 1, made in
the same sweep over the operands; the backward has to account for the actual upstream ``g``.

Eager, first backward: the gradients are handed out in their forward buffers. On the Triton
path one kernel reads ``g`` on the device and returns at once when it is 1 (``loss.
backward()``), so a forward + backward reads the operands once and writes the gradient once,
with no host sync; any other ``g`` rewrites the buffers from the operands for ``g`` (exact: one
rounding, as torch's own backward, not a second rounding of the stored gradient). On the CPU
the check is a plain comparison (no device to sync with); other devices always rewrite.

A later backward of a retained graph, and every backward under ``torch.compile`` (through the
``*_scalar_backward`` custom ops, which must not write into their inputs), computes into new
buffers, so a gradient already handed out is never changed. The rewrite uses the same kernels
as the forward's gradient, so all routes give the same bits for the same ``g``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


def scalar_setup_context(
    ctx,
    *,
    backend: str,
    gradients: tuple[torch.Tensor, ...],
    wanted: tuple[bool, ...],
    operands: tuple[torch.Tensor | None, ...],
    n_inputs: int,
    options: tuple,
) -> None:
    """Save the forward's gradients of the op's first ``len(gradients)`` inputs (``wanted``
    says which were made: none under ``torch.compile``, whose backward op makes them) and the
    ``operands`` their rewrite needs, starting with those inputs, for
    :func:`scalar_backward`."""
    ctx.save_for_backward(*gradients, *operands)
    ctx.mark_non_differentiable(*gradients)
    ctx.set_materialize_grads(False)
    ctx.backend = backend
    ctx.wanted = wanted
    ctx.n_inputs = n_inputs
    ctx.options = options
    ctx.handed_out = False


@contextlib.contextmanager
def keeping_versions(*buffers: torch.Tensor | None):
    """Rewriting the forward's own gradient buffers in place is not a modification of a
    saved tensor that torch's version check should report: keep their version counters."""
    with contextlib.ExitStack() as stack:
        for buffer in buffers:
            if buffer is not None:
                stack.enter_context(torch.autograd._unsafe_preserve_version_counter(buffer))
        yield


def is_unit_on_cpu(upstream: torch.Tensor) -> bool:
    """Whether ``upstream`` (0-d: the gradient of a scalar loss) is known to be 1 without a
    device sync (a CPU tensor outside tracing). ``item()`` reads the value without the
    comparison op that ``upstream == 1.0`` would dispatch (0.2 us against 3.6 us)."""
    return (
        upstream.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and upstream.item() == 1.0
    )


def scalar_backward(
    ctx,
    grad_loss: torch.Tensor | None,
    *,
    rewrite: Callable,
    backward_op: Callable,
) -> tuple:
    """The backward of a scalar-loss op. ``rewrite(backend, upstream, operands, options,
    buffers, in_place)`` writes the gradients for ``upstream`` into ``buffers`` (with
    ``in_place`` they hold those for 1 already and may be kept as they are when ``upstream`` is
    1); ``backward_op(upstream, *operands, *options, backend, *wanted)`` is the registered
    op returning new buffers, used under ``torch.compile``."""
    made = ctx.wanted
    n_grads = len(made)
    no_option_grads = (None,) * (ctx.n_inputs - n_grads)
    if grad_loss is None:
        return (None,) * n_grads + no_option_grads
    # Unpacking checks the version counters: operands changed since the forward raise here.
    saved = ctx.saved_tensors
    operands = saved[n_grads:]
    wanted = ctx.needs_input_grad[:n_grads]
    if not getattr(ctx, "eager", False):
        results = backward_op(grad_loss, *operands, *ctx.options, ctx.backend, *wanted)
    elif not ctx.handed_out and (
        wanted == made or all(m or not w for m, w in zip(made, wanted, strict=True))
    ):
        # The first backward: hand out the forward's buffers (rewritten unless upstream is 1).
        ctx.handed_out = True
        results = tuple(g if w else None for g, w in zip(saved[:n_grads], wanted, strict=True))
        rewrite(ctx.backend, grad_loss, operands, ctx.options, results, True)
        return results + no_option_grads
    else:
        # The operands start with the tensors these are the gradients of.
        results = tuple(
            torch.empty_like(operand) if w else None
            for operand, w in zip(operands[:n_grads], wanted, strict=True)
        )
        rewrite(ctx.backend, grad_loss, operands, ctx.options, results, False)
    return tuple(r if w else None for r, w in zip(results, wanted, strict=True)) + no_option_grads
