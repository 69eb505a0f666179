"""Shared autograd plumbing: the double-backward guard of the backward ops, and the eager fast
path that runs an op's own bodies without the custom-op layer.

Why an eager path: calling a ``torch.library.custom_op`` costs about 41 us more than its body
on a 2-core CPU (dispatch plus the generated autograd wrapper), which is more than the whole
of torch eager's cross-entropy on small problems. ``torch.compile`` needs the registered ops
(they trace as one node with a fake kernel); eager code does not, so :func:`dispatch` calls an
``autograd.Function`` built from the very same forward body, ``setup_context`` and backward:
one set of code, two entry points, identical results. That ``Function`` also carries the op's
forward-mode derivative (``jvp``); under functorch transforms, which can use neither entry
point, :func:`dispatch` calls the op's torch-op composite (``fused_ce.ops._composite``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch._C import _functions
from torch.autograd import forward_ad

from .._autocast import any_autocast_enabled


def double_backward_message(loss_name: str, torch_name: str) -> str:
    return (
        f"fused_ce: double backward through {loss_name} is not supported; the fused "
        f"backward kernel has no derivative of its own. Use {torch_name} for "
        "higher-order gradients."
    )


def forbid_double_backward(backward_op, loss_name: str, torch_name: str) -> None:
    """Give a backward op an autograd formula that raises a clear error: the fused backward
    kernels have no derivative, and a silent wrong second derivative is worse than none."""
    message = double_backward_message(loss_name, torch_name)

    def _raise(ctx, *grads):
        raise RuntimeError(message)

    def _save_nothing(ctx, inputs, output):
        pass

    backward_op.register_autograd(_raise, setup_context=_save_nothing)


def eager_function(
    name: str,
    forward: Callable,
    setup_context: Callable,
    backward: Callable,
    double_backward_error: str,
    refuse_create_graph: Callable | None = None,
    returned: int | None = None,
    jvp: Callable | None = None,
) -> type[torch.autograd.Function]:
    """An ``autograd.Function`` with an op's forward body, ``setup_context`` and backward
    (``backward`` calls the bodies of the backward ops directly when ``ctx.eager``).

    Under ``create_graph=True`` the gradients it returns carry a node that raises
    ``double_backward_error`` when differentiated, as the registered backward ops do;
    ``refuse_create_graph(ctx)``, when given, may raise at once instead. With ``returned``,
    only the forward's first ``returned`` outputs come back (as a tuple): the others exist for
    ``setup_context`` to save, and autograd need not wrap them.

    ``jvp(inputs, output, tangents)``, when given, is the forward-mode derivative: the
    tangents of the returned outputs (None for non-differentiable ones) from the forward's
    ``inputs``, its ``output`` (the outputs marked non-differentiable or not returned; None in
    place of the others, which hold ctx as their grad_fn) and the inputs' ``tangents`` (None
    where an input has none). Forward-mode AD calls it right after the forward.
    """

    # Old-style forward(ctx, *args): autograd.Function.apply binds the arguments to the
    # forward's signature (inspect.signature, about 20 us) whenever a setup_context is defined.
    def eager_forward(ctx, *inputs):
        if any_autocast_enabled():
            # The bodies choose their precision themselves (the public functions already cast
            # by autocast's policy); autocast must not recast their GEMMs and dot products.
            with torch._C._DisableAutocast():
                output = forward(*inputs)
        else:
            output = forward(*inputs)
        ctx.eager = True
        setup_context(ctx, inputs, output)
        # A forward-mode AD level is open (one read of a module global): inputs may be dual.
        if forward_ad._current_level >= 0:
            ctx.jvp_args = (inputs, _outputs_off_graph(ctx, output, returned))
        return output if returned is None else output[:returned]

    def eager_jvp(ctx, *tangents):
        # Called by the same apply, right after the forward (not at all when no input is dual).
        inputs, output = ctx.jvp_args
        del ctx.jvp_args
        with torch.no_grad():
            results = jvp(inputs, output, tangents)
        if not torch.is_grad_enabled():
            return results
        # The tangents come from the backward kernels, which have no derivative: reverse mode
        # through them (a tangent's gradient) must raise, not see a constant.
        anchors = [
            t for t in (*inputs, *tangents) if isinstance(t, torch.Tensor) and t.requires_grad
        ]
        if not anchors:
            return results
        if isinstance(results, torch.Tensor):  # the tangent of a single output
            return _raising_when_differentiated((results,), anchors, double_backward_error)[0]
        return _raising_when_differentiated(results, anchors, double_backward_error)

    def guarded_backward(ctx, *grads):
        if any_autocast_enabled():  # a backward called inside an autocast region
            with torch._C._DisableAutocast():
                return _guarded_backward(ctx, *grads)
        return _guarded_backward(ctx, *grads)

    def _guarded_backward(ctx, *grads):
        if not torch.is_grad_enabled():
            return backward(ctx, *grads)
        if refuse_create_graph is not None:
            refuse_create_graph(ctx)
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        # create_graph=True: hand out the gradients through a node that raises when it is
        # differentiated, linked to the forward's inputs by a saved operand.
        anchors = [t for t in ctx.saved_tensors if t is not None and t.requires_grad]
        return _raising_when_differentiated(outputs, anchors, double_backward_error)

    methods = {"forward": staticmethod(eager_forward), "backward": staticmethod(guarded_backward)}
    if jvp is not None:
        methods["jvp"] = staticmethod(eager_jvp)
    return type(name, (torch.autograd.Function,), methods)


def _outputs_off_graph(ctx, output, returned: int | None) -> tuple | None:
    """``output`` with the outputs autograd attaches to ``ctx`` (returned and differentiable)
    replaced by None: what ctx may keep for the jvp without a reference cycle through its
    outputs' grad_fn."""
    if isinstance(output, torch.Tensor):
        return None
    n_returned = len(output) if returned is None else returned
    detached = {id(t) for t in getattr(ctx, "non_differentiable", ())}
    return tuple(o if i >= n_returned or id(o) in detached else None for i, o in enumerate(output))


def _raising_when_differentiated(
    values: tuple[torch.Tensor | None, ...], anchors: list[torch.Tensor], message: str
) -> tuple[torch.Tensor | None, ...]:
    """``values`` (None entries kept) handed out through one node that raises ``message`` when
    differentiated. Its extra input, the first of ``anchors`` (a tensor that requires grad),
    links it to the forward's inputs, so that differentiating towards them reaches it (and
    raises) instead of finding no path."""
    anchors = anchors[:1]
    error = _functions.DelayedError(message.encode(), len(values) + len(anchors))
    linked = error(
        *[v.detach().requires_grad_() if v is not None else None for v in values], *anchors
    )
    if isinstance(linked, torch.Tensor):  # a single output comes back unwrapped
        linked = (linked,)
    return tuple(linked[: len(values)])


_is_compiling = torch.compiler.is_compiling
_transforms_active = torch._C._are_functorch_transforms_active


def is_eager() -> bool:
    """Neither ``torch.compile`` tracing, nor a functorch transform (vmap, grad), nor a
    forward-mode AD level is active: the eager fast paths that need none of them (the native
    C++ ops, whose C++ autograd has no forward-mode derivative, and the gradients made during
    the forward) may run instead of the registered custom ops. ``dispatch`` routes forward AD
    to the ``autograd.Function``s, whose ``jvp`` gives the tangent."""
    return not (_is_compiling() or _transforms_active() or forward_ad._current_level >= 0)


def dispatch(
    op,
    function: type[torch.autograd.Function],
    composite: Callable,
    *,
    composite_for_forward_ad: bool = False,
) -> Callable:
    """``op`` (the registered custom op) while ``torch.compile`` traces; ``composite`` (the
    op's outputs from differentiable torch ops, see ``fused_ce.ops._composite``) while a
    functorch transform (vmap, grad, jvp) is active, since functorch can neither batch the
    kernels nor differentiate a custom op, and with ``composite_for_forward_ad`` under
    forward-mode AD too (for a ``function`` without a ``jvp``); ``function``'s apply (the
    eager fast path, same bodies as ``op``) otherwise.

    The apply is entered below ``Function.apply``'s Python wrapper, which only binds arguments
    for a ``setup_context`` (not used here) and unwraps functorch wrappers (none here)."""
    apply = super(torch.autograd.function._SingleLevelFunction, function).apply

    def call(*args):
        if _transforms_active() or (composite_for_forward_ad and forward_ad._current_level >= 0):
            return composite(*args)
        if _is_compiling():
            return op(*args)
        return apply(*args)

    call.__doc__ = op.__doc__
    return call
