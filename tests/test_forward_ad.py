"""Forward-mode AD and torch.func (issue #23, item 6) on every backend: the tangent of each loss
(``torch.autograd.forward_ad`` dual tensors) is torch's, and ``torch.func.grad``, ``vmap`` of
it, ``jvp`` and ``functional_call`` work as with torch's own loss.

Oracle: the same transform of torch's loss (``F.cross_entropy`` /
``F.binary_cross_entropy_with_logits``, with the logit scale, soft cap and z-loss written out
in torch ops) in float64. fp32 and fp64 results compare tightly; bf16 tangents within twice
the error of torch's own bf16 tangent.
"""

from __future__ import annotations

import functools
import gc

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from _reference import REDUCTIONS, generator, positive, randn
from conftest import backend_cases

import fused_ce
from fused_ce.app.check import TIGHT

N_ROWS, N_CLASSES = 6, 5

# name -> fused_ce options; torch_ce below writes the same loss in torch ops.
CE_CASES = {
    "plain": {},
    "weight-ignore-smoothing": {"weight": True, "ignore_index": 2, "label_smoothing": 0.2},
    "scale-softcap-zloss": {"logit_scale": 0.7, "softcap": 2.0, "z_loss": 1e-2},
    "prob-target": {"prob": True, "weight": True, "label_smoothing": 0.1},
}


def torch_ce(
    x,
    target,
    *,
    reduction,
    weight=None,
    ignore_index=-100,
    label_smoothing=0.0,
    logit_scale=1.0,
    softcap=None,
    z_loss=0.0,
):
    """fused_ce.softmax_cross_entropy's loss in torch ops."""
    z = x * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(
        z,
        target,
        weight=weight,
        ignore_index=ignore_index,
        reduction="none",
        label_smoothing=label_smoothing,
    )
    if z_loss:
        valid = target != ignore_index if not target.is_floating_point() else True
        loss = loss + torch.where(valid, z_loss * torch.logsumexp(z, 1).square(), 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if target.is_floating_point():
        return loss.sum() / loss.numel()
    valid = target != ignore_index
    count = weight[target.clamp(min=0)] if weight is not None else torch.ones_like(loss)
    return loss.sum() / (count * valid).sum()


def ce_inputs(case, device, dtype):
    options = dict(CE_CASES[case])
    x = randn((N_ROWS, N_CLASSES), 1, device, dtype, scale=2.0)
    if options.pop("prob", False):
        target = torch.softmax(randn((N_ROWS, N_CLASSES), 2, device, torch.float64), 1).to(dtype)
    else:
        target = torch.randint(0, N_CLASSES, (N_ROWS,), generator=generator(2)).to(device)
        target[::3] = options.get("ignore_index", -100)
    if options.pop("weight", False):
        options["weight"] = positive((N_CLASSES,), 3, device, dtype)
    return x, target, options


def assert_close(value, reference, dtype):
    rtol, atol = TIGHT[dtype]
    torch.testing.assert_close(value.double(), reference.double(), rtol=rtol * 10, atol=atol * 10)


def tangent(fn, primals, tangents):
    """The primal output and its tangent, through forward_ad dual tensors (None tangents: not
    dual)."""
    with fwAD.dual_level():
        duals = [
            fwAD.make_dual(p, t) if t is not None else p
            for p, t in zip(primals, tangents, strict=True)
        ]
        out = fwAD.unpack_dual(fn(*duals))
        return out.primal, out.tangent


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", list(CE_CASES))
def test_cross_entropy_tangent(backend_device, case, reduction, dtype):
    backend, device = backend_device
    x, target, options = ce_inputs(case, device, dtype)
    dx = randn(x.shape, 4, device, dtype)
    dt = randn(target.shape, 5, device, dtype) if target.is_floating_point() else None

    def ours(x, t):
        return fused_ce.softmax_cross_entropy(x, t, reduction=reduction, backend=backend, **options)

    def theirs(x, t):
        return torch_ce(x, t, reduction=reduction, **options)

    loss, ours_tangent = tangent(ours, (x, target), (dx, dt))
    as64 = [t.double() if t is not None and t.is_floating_point() else t for t in (x, target)]
    options = {k: v.double() if torch.is_tensor(v) else v for k, v in options.items()}
    ref_loss, ref_tangent = tangent(
        theirs, as64, (dx.double(), dt.double() if dt is not None else None)
    )
    assert ours_tangent is not None  # the native backend used to drop it silently
    assert ours_tangent.dtype == loss.dtype and ours_tangent.shape == loss.shape
    assert_close(loss, ref_loss, dtype)
    assert_close(ours_tangent, ref_tangent, dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_stats_lse_tangent(backend_device, reduction):
    """return_stats: the loss and the lse (differentiable) carry tangents; lse's is
    sum_c p_c dz_c."""
    backend, device = backend_device
    x = randn((N_ROWS, N_CLASSES), 1, device, torch.float64, scale=2.0)
    target = torch.randint(0, N_CLASSES, (N_ROWS,), generator=generator(2)).to(device)
    dx = randn(x.shape, 4, device, torch.float64)
    with fwAD.dual_level():
        stats = fused_ce.softmax_cross_entropy(
            fwAD.make_dual(x, dx),
            target,
            reduction=reduction,
            z_loss=1e-2,
            return_stats=True,
            backend=backend,
        )
        lse_tangent = fwAD.unpack_dual(stats.lse).tangent
        loss_tangent = fwAD.unpack_dual(stats.loss).tangent
    _, ref_lse = tangent(lambda z: torch.logsumexp(z, 1), (x,), (dx,))
    _, ref_loss = tangent(
        lambda z: torch_ce(z, target, reduction=reduction, z_loss=1e-2), (x,), (dx,)
    )
    assert_close(lse_tangent, ref_lse, torch.float64)
    assert_close(loss_tangent, ref_loss, torch.float64)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_bf16_tangent_within_torch_error(backend_device, reduction):
    backend, device = backend_device
    x, target, options = ce_inputs("weight-ignore-smoothing", device, torch.bfloat16)
    dx = randn(x.shape, 4, device, torch.bfloat16)

    def loss_fn(fn, **extra):
        return lambda z: fn(z, target, reduction=reduction, **options, **extra)

    _, ours = tangent(loss_fn(fused_ce.softmax_cross_entropy, backend=backend), (x,), (dx,))
    _, theirs = tangent(loss_fn(torch_ce), (x,), (dx,))
    options = {k: v.double() if torch.is_tensor(v) else v for k, v in options.items()}
    _, reference = tangent(loss_fn(torch_ce), (x.double(),), (dx.double(),))
    assert ours.dtype == theirs.dtype == torch.bfloat16
    error = float((ours.double() - reference).abs().max())
    torch_error = float((theirs.double() - reference).abs().max())
    eps = torch.finfo(torch.bfloat16).eps
    assert error <= 2 * torch_error + eps * float(reference.abs().max())


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weights", [False, True], ids=["plain", "weight-pos_weight"])
def test_bce_tangent(backend_device, reduction, weights):
    """Tangents of input and target, with and without weight and pos_weight."""
    backend, device = backend_device
    x = randn((N_ROWS, 3), 1, device, scale=3.0)
    target = torch.rand((N_ROWS, 3), generator=generator(2)).to(device)
    options = {}
    if weights:
        options = {"weight": positive((3,), 3, device), "pos_weight": positive((3,), 4, device)}
    dx, dt = randn(x.shape, 5, device), randn(x.shape, 6, device)
    loss, ours = tangent(
        lambda a, b: fused_ce.sigmoid_binary_cross_entropy(
            a, b, reduction=reduction, backend=backend, **options
        ),
        (x, target),
        (dx, dt),
    )
    options = {k: v.double() for k, v in options.items()}
    ref_loss, reference = tangent(
        lambda a, b: F.binary_cross_entropy_with_logits(a, b, reduction=reduction, **options),
        (x.double(), target.double()),
        (dx.double(), dt.double()),
    )
    assert ours is not None and ours.dtype == torch.float32
    assert_close(loss, ref_loss, torch.float32)
    assert_close(ours, reference, torch.float32)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_heads_tangent(backend_device, reduction):
    """The fused linear heads (F.linear + the loss under forward AD): tangents of the features,
    the head's weight and bias."""
    backend, device = backend_device
    x, w, b = (randn(s, i, device, torch.float64) for i, s in enumerate([(6, 4), (5, 4), (5,)]))
    tangents = [randn(t.shape, 10 + i, device, torch.float64) for i, t in enumerate((x, w, b))]
    target = torch.randint(0, 5, (6,), generator=generator(2)).to(device)
    labels = torch.rand((6, 5), generator=generator(3), dtype=torch.float64).to(device)
    cases = [
        (
            lambda x, w, b: fused_ce.linear_cross_entropy(
                x, w, target, linear_bias=b, reduction=reduction, backend=backend
            ),
            lambda x, w, b: F.cross_entropy(F.linear(x, w, b), target, reduction=reduction),
        ),
        (
            lambda x, w, b: fused_ce.linear_binary_cross_entropy_with_logits(
                x, w, labels, linear_bias=b, reduction=reduction, backend=backend
            ),
            lambda x, w, b: F.binary_cross_entropy_with_logits(
                F.linear(x, w, b), labels, reduction=reduction
            ),
        ),
    ]
    for ours, theirs in cases:
        _, ours_tangent = tangent(ours, (x, w, b), tangents)
        _, reference = tangent(theirs, (x, w, b), tangents)
        assert_close(ours_tangent, reference, torch.float64)


# --- torch.func ---------------------------------------------------------------------------------


def test_func_grad_vmap_jvp_cross_entropy(backend_device):
    """grad, vmap(grad), jvp and jacrev of the loss, options included, as of torch's."""
    backend, device = backend_device
    x, target, options = ce_inputs("weight-ignore-smoothing", device, torch.float64)
    batch = randn((3, *x.shape), 7, device, torch.float64)

    def ours(z):
        return fused_ce.softmax_cross_entropy(z, target, backend=backend, **options)

    def theirs(z):
        return torch_ce(z, target, reduction="mean", **options)

    func = torch.func
    torch.testing.assert_close(func.grad(ours)(x), func.grad(theirs)(x))
    torch.testing.assert_close(
        func.vmap(func.grad(ours))(batch), func.vmap(func.grad(theirs))(batch)
    )
    direction = randn(x.shape, 8, device, torch.float64)
    torch.testing.assert_close(
        func.jvp(ours, (x,), (direction,)), func.jvp(theirs, (x,), (direction,))
    )
    torch.testing.assert_close(func.hessian(ours)(x), func.hessian(theirs)(x))
    # Per-token losses under vmap(jacrev) and the z-loss / softcap options.
    extra = {"logit_scale": 0.5, "softcap": 3.0, "z_loss": 1e-2}
    ours_rows = func.vmap(
        func.jacrev(
            lambda z: fused_ce.softmax_cross_entropy(
                z, target, reduction="none", backend=backend, **extra
            )
        )
    )(batch)
    theirs_rows = func.vmap(func.jacrev(lambda z: torch_ce(z, target, reduction="none", **extra)))(
        batch
    )
    torch.testing.assert_close(ours_rows, theirs_rows)


def test_func_grad_vmap_bce(backend_device):
    backend, device = backend_device
    x = randn((N_ROWS, 3), 1, device, torch.float64)
    target = torch.rand((N_ROWS, 3), generator=generator(2), dtype=torch.float64).to(device)
    pos_weight = positive((3,), 4, device, torch.float64)
    batch = randn((4, N_ROWS, 3), 7, device, torch.float64)

    def ours(z, t):
        return fused_ce.sigmoid_binary_cross_entropy(z, t, pos_weight=pos_weight, backend=backend)

    def theirs(z, t):
        return F.binary_cross_entropy_with_logits(z, t, pos_weight=pos_weight)

    func = torch.func
    torch.testing.assert_close(
        func.grad(ours, argnums=(0, 1))(x, target), func.grad(theirs, argnums=(0, 1))(x, target)
    )
    batched = func.vmap(func.grad(ours), in_dims=(0, None))(batch, target)
    torch.testing.assert_close(
        batched, func.vmap(func.grad(theirs), in_dims=(0, None))(batch, target)
    )


def test_functional_call_of_modules(backend_device):
    """torch.func.functional_call with a swapped class-weight buffer and linear head, under
    grad and vmap, as with torch's modules."""
    backend, device = backend_device
    x, target, _ = ce_inputs("plain", device, torch.float64)
    weight = positive((N_CLASSES,), 3, device, torch.float64)
    ours = fused_ce.nn.CrossEntropyLoss(backend=backend).to(device)
    theirs = torch.nn.CrossEntropyLoss().to(device)

    def loss(module, z):
        return torch.func.functional_call(module, {"weight": weight}, (z, target))

    torch.testing.assert_close(
        torch.func.grad(lambda z: loss(ours, z))(x), torch.func.grad(lambda z: loss(theirs, z))(x)
    )
    head = fused_ce.nn.LinearCrossEntropyLoss(4, N_CLASSES, backend=backend, dtype=torch.float64)
    head = head.to(device)
    features = randn((N_ROWS, 4), 8, device, torch.float64)
    params = {name: p.detach() for name, p in head.named_parameters()}

    def head_loss(params):
        return torch.func.functional_call(head, params, (features, target))

    grads = torch.func.grad(head_loss)(params)
    reference = torch.func.grad(
        lambda p: F.cross_entropy(F.linear(features, p["linear_weight"], p["linear_bias"]), target)
    )(params)
    for name in params:
        torch.testing.assert_close(grads[name], reference[name])


# CPU only: on CUDA torch's check is a device-side assert, which poisons the process.
CPU_CASES = [c for c in backend_cases() if c[1] == "cpu"]


@pytest.mark.parametrize(("backend", "device"), CPU_CASES, ids=[f"{b}-{d}" for b, d in CPU_CASES])
def test_out_of_range_target_under_vmap_raises(backend, device):
    """Under vmap the class indices are checked by torch's own loss (no corrupt result)."""
    batch = randn((2, N_ROWS, N_CLASSES), 1, device, torch.float64)
    target = torch.full((N_ROWS,), N_CLASSES, device=device)

    def ours(z):
        return fused_ce.softmax_cross_entropy(z, target, backend=backend)

    with pytest.raises((IndexError, RuntimeError), match="out of bounds"):
        torch.func.vmap(torch.func.grad(ours))(batch)


@pytest.mark.parametrize("loss", ["ce-mean", "ce-none", "bce-mean", "bce-none"])
def test_dual_input_that_requires_grad(backend_device, loss):
    """A dual input that also requires grad: the tangent, then the backward's gradient, are
    torch's; differentiating the tangent itself (reverse over forward) raises, since it comes
    from the backward kernels, which have no derivative."""
    backend, device = backend_device
    x = randn((N_ROWS, N_CLASSES), 1, device, torch.float64)
    dx = randn(x.shape, 2, device, torch.float64)
    kind, reduction = loss.split("-")
    if kind == "ce":
        target = torch.randint(0, N_CLASSES, (N_ROWS,), generator=generator(3)).to(device)
        ours_fn, torch_fn = fused_ce.softmax_cross_entropy, F.cross_entropy
    else:
        target = torch.rand(x.shape, generator=generator(3), dtype=torch.float64).to(device)
        ours_fn, torch_fn = (
            fused_ce.sigmoid_binary_cross_entropy,
            F.binary_cross_entropy_with_logits,
        )
    results = []
    for fn, options in ((ours_fn, {"backend": backend}), (torch_fn, {})):
        leaf = x.clone().requires_grad_()
        with fwAD.dual_level():
            out = fn(fwAD.make_dual(leaf, dx), target, reduction=reduction, **options)
            primal, tangent_value = fwAD.unpack_dual(out)
        primal.sum().backward()
        results.append((primal.detach(), tangent_value.detach(), leaf.grad))
        if fn is ours_fn:
            with pytest.raises(RuntimeError, match="double backward"):
                torch.autograd.grad(tangent_value.sum(), leaf)
    for ours, theirs in zip(*results, strict=True):
        assert_close(ours, theirs, torch.float64)


def test_vmap_over_logits_and_targets(backend_device):
    """vmap over both logits and class indices (and probabilities), every reduction, with a
    class weight, ignored rows and label smoothing: the per-sample losses."""
    backend, device = backend_device
    batch = randn((3, N_ROWS, N_CLASSES), 1, device, torch.float64)
    targets = torch.randint(0, N_CLASSES, (3, N_ROWS), generator=generator(2)).to(device)
    targets[:, ::4] = -100
    probs = torch.softmax(randn(batch.shape, 3, device, torch.float64), -1)
    weight = positive((N_CLASSES,), 4, device, torch.float64)
    for reduction in REDUCTIONS:
        options = {"weight": weight, "reduction": reduction, "label_smoothing": 0.1}
        for target in (targets, probs):
            ours = torch.func.vmap(
                functools.partial(fused_ce.softmax_cross_entropy, backend=backend, **options)
            )(batch, target)
            theirs = torch.stack(
                [F.cross_entropy(z, t, **options) for z, t in zip(batch, target, strict=True)]
            )
            assert_close(ours, theirs, torch.float64)


def _live_nodes() -> int:
    """How many autograd contexts of fused_ce's eager Functions are alive."""
    return sum(
        type(o).__name__.endswith("FunctionBackward") and "CrossEntropy" in type(o).__name__
        for o in gc.get_objects()
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_reference_cycle_under_a_dual_level(backend_device, reduction):
    """Inside a dual level a loss of non-dual inputs is freed by reference counting alone (the
    jvp's state on the autograd context keeps no output that holds the context)."""
    backend, device = backend_device
    x = randn((N_ROWS, N_CLASSES), 1, device).requires_grad_()
    target = torch.randint(0, N_CLASSES, (N_ROWS,), generator=generator(2)).to(device)
    gc.collect()
    gc.disable()
    try:
        before = _live_nodes()
        with fwAD.dual_level():
            loss = fused_ce.softmax_cross_entropy(
                x, target, reduction=reduction, return_stats=True, backend=backend
            )
            assert _live_nodes() == before + 1
            del loss
            assert _live_nodes() == before
    finally:
        gc.enable()
