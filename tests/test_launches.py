"""The GPU path's host cost (issue 16): kernel launches per op, the eager fast path against the
registered custom ops, and the scalar-loss path whose gradient is made during the forward.

Launch counts are those of docs/perf-notes.md; a change that adds a launch fails here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _reference import generator, positive, randn
from conftest import backend_cases

import fused_ce
from fused_ce._backend import INTERPRET

TRITON_CASES = [case for case in backend_cases() if case[0] == "triton"]


def _index_target(n, n_classes, device, ignored=(1,)):
    target = torch.randint(0, n_classes, (n,), generator=generator(7)).to(device)
    target[list(ignored)] = -100
    return target


def _prob_target(shape, device):
    return torch.rand(shape, generator=generator(8)).softmax(-1).to(device)


# (name, call(leaf, device, backend) -> loss, {kernel: launches} forward, {kernel: launches}
# backward): the minimum for each op, see docs/perf-notes.md.
LAUNCH_CASES = [
    (
        "ce_mean",
        lambda x, d, b: fused_ce.cross_entropy(x, _index_target(6, 5, d), backend=b),
        {"ce_forward_kernel": 1},  # loss and the gradient for an upstream of 1, one launch
        {"ce_backward_kernel": 1},  # reads the upstream on the device; moves nothing for 1
    ),
    (
        "ce_sum_zloss_smoothing",
        lambda x, d, b: fused_ce.cross_entropy(
            x, _index_target(6, 5, d), reduction="sum", z_loss=1e-3, label_smoothing=0.1, backend=b
        ),
        {"ce_forward_kernel": 1},
        {"ce_backward_kernel": 1},
    ),
    (
        "ce_none",
        lambda x, d, b: fused_ce.cross_entropy(
            x, _index_target(6, 5, d), reduction="none", backend=b
        ),
        {"ce_forward_kernel": 1},
        {"ce_backward_kernel": 1},
    ),
    (
        "ce_stats",
        lambda x, d, b: (
            fused_ce.cross_entropy(
                x, _index_target(6, 5, d), return_stats=True, z_loss=1e-3, backend=b
            ).loss
        ),
        {"ce_forward_kernel": 1},
        {"ce_backward_kernel": 1},
    ),
    (
        "bce_mean",
        lambda x, d, b: fused_ce.binary_cross_entropy_with_logits(
            x, _prob_target((6, 5), d), pos_weight=positive((5,), 3, d), backend=b
        ),
        {"bce_kernel": 1},  # summed loss (partial sums) and the gradient, one launch
        {"bce_kernel": 1},
    ),
    (
        "bce_none",
        lambda x, d, b: fused_ce.binary_cross_entropy_with_logits(
            x, _prob_target((6, 5), d), reduction="none", backend=b
        ),
        {"bce_kernel": 1},
        {"bce_kernel": 1},
    ),
]


@pytest.mark.skipif(not TRITON_CASES, reason="no Triton backend here (CUDA or the interpreter)")
@pytest.mark.parametrize(
    ("name", "call", "forward", "backward"),
    LAUNCH_CASES,
    ids=lambda c: c if isinstance(c, str) else "",
)
def test_launches_per_op(name, call, forward, backward):
    """Each op's forward and backward launch the kernels listed, no more."""
    from fused_ce.launch.counting import count_launches

    _, device = TRITON_CASES[0]
    x = randn((6, 5), 0, device).requires_grad_()
    with count_launches() as counts:
        loss = call(x, device, "triton")
    assert dict(counts) == forward
    with count_launches() as counts:
        loss.backward(torch.ones_like(loss))
    assert dict(counts) == backward
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.skipif(not TRITON_CASES, reason="no Triton backend here (CUDA or the interpreter)")
@pytest.mark.parametrize("path", ["chunked", "fused"])
def test_launches_linear_cross_entropy(path):
    """Chunked: one CE launch per chunk during the forward (loss and gradient: the 'mean'
    gradient is made there), none in the backward (torch scales the gradients). Fused: one
    forward launch; the backward one per gradient kernel (input, weight)."""
    from fused_ce.launch.counting import count_launches

    _, device = TRITON_CASES[0]
    x = randn((8, 16), 0, device).requires_grad_()
    w = randn((5, 16), 1, device).requires_grad_()
    target = _index_target(8, 5, device)
    with count_launches() as counts:
        loss = fused_ce.linear_cross_entropy(
            x, w, target, chunk_size=4, path=path, backend="triton"
        )
    chunked = path == "chunked"
    assert dict(counts) == ({"ce_forward_kernel": 2} if chunked else {"lce_forward_kernel": 1})
    with count_launches() as counts:
        loss.backward()
    assert dict(counts) == (
        {} if chunked else {"lce_backward_input_kernel": 1, "lce_backward_weight_kernel": 1}
    )


@pytest.mark.skipif(not TRITON_CASES, reason="no Triton backend here (CUDA or the interpreter)")
def test_cached_launch_arguments_follow_the_kernel_signature():
    """The launchers pass their cached arguments positionally: they are ordered by the kernel's
    parameter names, and a name set that does not match the kernel's parameters raises."""
    from fused_ce.kernels.bce import bce_kernel
    from fused_ce.launch import bce
    from fused_ce.launch._common import launch_arguments

    names = list(bce_kernel.arg_names[len(bce._POINTERS) :])
    named = {name: index for index, name in enumerate(names)}
    shuffled = dict(reversed(named.items()))
    assert launch_arguments(bce_kernel, bce._POINTERS, shuffled) == tuple(range(len(names)))
    with pytest.raises(RuntimeError, match="bce_kernel.*do not match"):
        launch_arguments(bce_kernel, bce._POINTERS, {**named, "extra": 0})
    with pytest.raises(RuntimeError, match="do not match"):
        launch_arguments(bce_kernel, bce._POINTERS[::-1], named)


# --- the eager fast path against torch.compile -------------------------------------------------


def _eager_cases(device):
    x = randn((6, 5), 0, device)
    return {
        "ce_index": (
            fused_ce.softmax_cross_entropy,
            (x, _index_target(6, 5, device)),
            dict(weight=positive((5,), 2, device), label_smoothing=0.1, z_loss=1e-2),
            (0,),
        ),
        "ce_prob": (
            fused_ce.softmax_cross_entropy,
            (x, _prob_target((6, 5), device)),
            dict(logit_scale=0.7, softcap=3.0),
            (0, 1),
        ),
        "bce": (
            fused_ce.sigmoid_binary_cross_entropy,
            (x, _prob_target((6, 5), device)),
            dict(weight=positive((6, 1), 3, device), pos_weight=positive((5,), 4, device)),
            (0, 1),
        ),
    }


def _graph(node) -> set[str]:
    """The names of the autograd nodes reachable from ``node``."""
    names, todo = set(), [node]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            todo.extend(next_node for next_node, _ in node.next_functions)
    return names


def _grads(fn, args, kwargs, wrt, upstream):
    args = [a.detach().clone().requires_grad_(i in wrt) for i, a in enumerate(args)]
    loss = fn(*args, **kwargs)
    grads = torch.autograd.grad(loss, [args[i] for i in wrt], upstream(loss))
    return loss, grads


@pytest.mark.parametrize("case", ["ce_index", "ce_prob", "bce"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("unit", [True, False], ids=["upstream_1", "upstream_random"])
def test_eager_fast_path_matches_compiled(backend_device, case, reduction, unit):
    """Eager calls skip the custom-op layer (an autograd.Function runs the ops' bodies);
    torch.compile(fullgraph=True) traces the registered ops. Loss and gradients are bitwise
    equal, for an upstream gradient of 1 (eager hands out the forward's buffers as they are)
    and for any other (eager rewrites them)."""
    backend, device = backend_device
    fn, args, kwargs, wrt = _eager_cases(device)[case]
    kwargs = {**kwargs, "reduction": reduction, "backend": backend}

    def upstream(loss):
        if unit:
            return torch.ones_like(loss)
        return torch.rand(loss.shape, generator=generator(9)).to(loss) + 0.5

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager_loss, eager_grads = _grads(fn, args, kwargs, wrt, upstream)
    # The eager loss comes from a fast path, not from a custom op: on the native backend from
    # the C++ op's own autograd node (but a per-row z-loss), the rest from the Python Function
    # that runs the ops' bodies.
    if backend == "native" and (reduction != "none" or not kwargs.get("z_loss")):
        assert eager_loss.grad_fn.name().startswith("fused_ce_native::")
    else:
        assert any(name.endswith("FunctionBackward") for name in _graph(eager_loss.grad_fn))
    compiled_loss, compiled_grads = _grads(compiled, args, kwargs, wrt, upstream)
    torch.testing.assert_close(eager_loss, compiled_loss, rtol=0, atol=0)
    for ours, theirs in zip(eager_grads, compiled_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


# --- the scalar-loss path: gradient made during the forward ------------------------------------


def _ce_reference(x, target, **kwargs):
    kwargs = dict(kwargs)
    z_loss = kwargs.pop("z_loss", 0.0)
    x64 = x.detach().double().requires_grad_()
    target = target.double() if target.is_floating_point() else target
    loss = F.cross_entropy(x64, target, **kwargs)
    if z_loss:
        lse = x64.logsumexp(-1)
        valid = target != kwargs.get("ignore_index", -100) if not target.is_floating_point() else 1
        z = z_loss * (lse.square() * valid)
        loss = loss + (
            z.sum() / valid.sum() if kwargs.get("reduction", "mean") == "mean" else z.sum()
        )
    return x64, loss


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_scalar_path_upstreams_retain_graph_and_accumulation(backend_device, reduction, z_loss):
    """A non-unit first upstream, then a retained second backward with another: each gradient
    is the reference's times its upstream, and the first one handed out is not changed by the
    second. A second forward accumulates into .grad."""
    backend, device = backend_device
    target = _index_target(6, 5, device)
    x = randn((6, 5), 0, device).requires_grad_()
    kwargs = dict(reduction=reduction, z_loss=z_loss, label_smoothing=0.1)
    loss = fused_ce.cross_entropy(x, target, backend=backend, **kwargs)
    x64, ref = _ce_reference(x, target.cpu() if False else target, **kwargs)
    (ref_grad,) = torch.autograd.grad(ref, x64)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-7)

    (first,) = torch.autograd.grad(loss, x, torch.tensor(0.3, device=device), retain_graph=True)
    kept = first.clone()
    (second,) = torch.autograd.grad(loss, x, torch.tensor(1.0, device=device), retain_graph=True)
    (third,) = torch.autograd.grad(loss, x, torch.tensor(-2.5, device=device))
    torch.testing.assert_close(first.double(), 0.3 * ref_grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(second.double(), ref_grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(third.double(), -2.5 * ref_grad, rtol=1e-5, atol=1e-7)
    assert torch.equal(first, kept)

    for _ in range(2):  # gradient accumulation into .grad
        fused_ce.cross_entropy(x, target, backend=backend, **kwargs).backward()
    torch.testing.assert_close(x.grad.double(), 2 * ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scalar_path_bce_non_unit_upstream_is_one_rounding(backend_device, dtype):
    """A 'mean' BCE whose upstream gradient is not 1 gets its gradient rewritten from the
    operands: each element is within one rounding of the input's dtype of the float64
    reference (plus fp32 arithmetic), not the two of scaling the forward's rounded
    gradient."""
    backend, device = backend_device
    x = randn((5, 7), 0, device, dtype, scale=3.0).requires_grad_()
    target = _prob_target((5, 7), device).to(dtype)
    g = torch.tensor(0.37, device=device, dtype=dtype)
    loss = fused_ce.binary_cross_entropy_with_logits(x, target, backend=backend)
    (grad,) = torch.autograd.grad(loss, x, g)
    x64 = x.detach().double().requires_grad_()
    ref = F.binary_cross_entropy_with_logits(x64, target.double())
    (ref_grad,) = torch.autograd.grad(ref, x64, g.double())
    # One rounding: half an ulp, or a whole one under the Triton interpreter, whose fp32 ->
    # bf16 cast truncates.
    rounding = 1.0 if backend == "triton" and INTERPRET else 0.5
    eps = rounding * torch.finfo(dtype).eps + 8 * torch.finfo(torch.float32).eps
    bound = eps * ref_grad.abs()
    assert ((grad.double() - ref_grad).abs() <= bound + 1e-30).all()


def test_scalar_path_inplace_and_stats_fall_back(backend_device):
    """inplace_backward and return_stats keep the saved-statistics path (the gradient is
    written over the logits in the backward; lse stays differentiable) and agree with the
    scalar path."""
    backend, device = backend_device
    target = _index_target(6, 5, device)
    weight = randn((5, 3), 1, device).requires_grad_()
    hidden = randn((6, 3), 2, device)
    results = []
    for kwargs in ({}, {"inplace_backward": True}, {"return_stats": True}):
        weight.grad = None
        out = fused_ce.cross_entropy(hidden @ weight.t(), target, backend=backend, **kwargs)
        loss = out.loss if kwargs.get("return_stats") else out
        # The scalar path's node: the Python Function's, or the native C++ op's.
        scalar_node = loss.grad_fn.name() in (
            "CrossEntropyScalarFunctionBackward",
            "fused_ce_native::CrossEntropyScalarBackward",
        )
        assert scalar_node == (not kwargs)
        (loss * 1.7).backward()
        results.append((loss.detach(), weight.grad.clone()))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-5, atol=1e-7)


def test_scalar_path_probability_target_gradient(backend_device):
    backend, device = backend_device
    x = randn((4, 6), 0, device).requires_grad_()
    target = _prob_target((4, 6), device).requires_grad_()
    loss = fused_ce.cross_entropy(x, target, label_smoothing=0.2, backend=backend)
    gx, gt = torch.autograd.grad(loss, (x, target), torch.tensor(3.0, device=device))
    x64 = x.detach().double().requires_grad_()
    t64 = target.detach().double().requires_grad_()
    ref = F.cross_entropy(x64, t64, label_smoothing=0.2)
    rx, rt = torch.autograd.grad(ref, (x64, t64), torch.tensor(3.0, dtype=torch.float64))
    torch.testing.assert_close(gx.double(), rx, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gt.double(), rt, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_opcheck_scalar_ops(backend_device, kind):
    """The scalar-loss ops and their backward ops pass torch.library.opcheck (schema, fake
    kernels, autograd registration), with a permuted layout for the logits."""
    from fused_ce.ops import bce as bce_ops
    from fused_ce.ops import cross_entropy as ce_ops

    backend, device = backend_device
    logits = randn((5, 4), 0, device).t().unsqueeze(-1)  # (4, 5, 1), permuted
    if kind == "index":
        target = _index_target(4, 5, device).view(4, 1)
        valid = target != -100
    else:
        target = _prob_target((4, 5), device).unsqueeze(-1)
        valid = None
    scale = torch.tensor(0.25, device=device)
    options = (-100, 0.1, 0.7, 3.0, 1e-2)  # ignore_index, smoothing, scale, softcap, z_loss
    flags = (True, kind == "prob")
    torch.library.opcheck(
        ce_ops.ce_scalar, (logits, target, None, valid, scale, *options, backend, *flags)
    )
    saved = ce_ops.ce_scalar(logits, target, None, valid, scale, *options, backend, False, False)[1]
    upstream = torch.tensor(1.5, device=device)
    torch.library.opcheck(
        ce_ops.ce_scalar_backward,
        (upstream, logits, target, None, saved, scale, *options, backend, *flags),
    )
    x = randn((3, 5), 1, device)
    t = _prob_target((3, 5), device)
    pos_weight = positive((5,), 2, device)
    torch.library.opcheck(bce_ops.bce_scalar, (x, t, None, pos_weight, scale, backend, True, True))
    torch.library.opcheck(
        bce_ops.bce_scalar_backward,
        (upstream, x, t, None, pos_weight, scale, backend, True, True),
    )
