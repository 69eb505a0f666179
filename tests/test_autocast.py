"""Loss dtypes (issue #23, item 5): the fused linear heads accumulate and return their loss in
fp32 for half-precision operands, and under ``torch.autocast`` every loss follows torch's
autocast policy (``cross_entropy`` and ``binary_cross_entropy_with_logits`` run in fp32, a
linear layer's GEMM in the autocast dtype).

Oracles: float64 PyTorch. Where the fp32 loss of half-precision logits is checked, the
operands are small multiples of 1/16 whose products and sums are exact in fp32 and in the
half dtype, so the logits carry no rounding and the fp64 oracle is exact: an fp32 loss then
compares tightly, while a loss rounded to bf16 (what the heads returned) is off by up to 2**-9.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _reference import REDUCTIONS, generator, positive, randn

import fused_ce
from fused_ce.app.check import TIGHT

N_ROWS, N_FEATURES, N_CLASSES = 13, 8, 11


def autocast(device: torch.device | str):
    """A bf16 autocast region for ``device``'s type (CPU, or CUDA where the tests run there)."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def exact_values(shape, seed: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Multiples of 1/4 in [-1/2, 1/2] (x and W) so that with 8 features every logit is a
    multiple of 1/16 below 2 in magnitude: exact in fp16 and bf16, whatever the GEMM's order."""
    values = torch.randint(-2, 3, shape, generator=generator(seed)).double() / 4
    return values.to(device=device, dtype=dtype)


def assert_tight(value: torch.Tensor, reference: torch.Tensor) -> None:
    rtol, atol = TIGHT[torch.float32]
    torch.testing.assert_close(value.double(), reference, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_returns_float32_for_half_inputs(backend_device, dtype, reduction):
    """The loss (every reduction, label smoothing and a class weight of the input's dtype, some
    rows ignored) is fp32 and equals the fp64 loss of the same logits to fp32 rounding."""
    backend, device = backend_device
    x = exact_values((N_ROWS, N_FEATURES), 1, dtype, device)
    w = exact_values((N_CLASSES, N_FEATURES), 2, dtype, device)
    b = exact_values((N_CLASSES,), 3, dtype, device) / 4
    weight = positive((N_CLASSES,), 4, device, dtype)
    target = torch.randint(0, N_CLASSES, (N_ROWS,), generator=generator(5)).to(device)
    target[::4] = -100
    kwargs = {"weight": weight, "reduction": reduction, "label_smoothing": 0.1}
    loss = fused_ce.linear_cross_entropy(
        x, w, target, linear_bias=b, chunk_size=5, backend=backend, **kwargs
    )
    logits = F.linear(x.double(), w.double(), b.double())
    reference = F.cross_entropy(logits, target, **{**kwargs, "weight": weight.double()})
    assert loss.dtype == torch.float32
    assert_tight(loss, reference)
    # With a gradient wanted (the one-sweep path for 'mean'/'sum'): the same loss.
    x_grad = x.clone().requires_grad_()
    loss = fused_ce.linear_cross_entropy(
        x_grad, w, target, linear_bias=b, chunk_size=5, backend=backend, **kwargs
    )
    assert loss.dtype == torch.float32
    assert_tight(loss.detach(), reference)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_stats_and_fused_path_in_float32(backend_device, reduction):
    """return_stats (loss and z-loss term), and on Triton the fused path: fp32 too."""
    backend, device = backend_device
    x = exact_values((N_ROWS, N_FEATURES), 1, torch.bfloat16, device)
    w = exact_values((N_CLASSES, N_FEATURES), 2, torch.bfloat16, device)
    target = torch.randint(0, N_CLASSES, (N_ROWS,), generator=generator(5)).to(device)
    logits = x.double() @ w.double().T
    reference = F.cross_entropy(logits, target, reduction=reduction)
    stats = fused_ce.linear_cross_entropy(
        x, w, target, reduction=reduction, return_stats=True, z_loss=1e-4, backend=backend
    )
    assert stats.loss.dtype == stats.z_loss.dtype == torch.float32
    z_rows = 1e-4 * torch.logsumexp(logits, 1).square()
    z_term = {"none": z_rows, "mean": z_rows.mean(), "sum": z_rows.sum()}[reduction]
    assert_tight(stats.z_loss, z_term)
    assert_tight(stats.loss, reference + z_term)
    if backend == "triton":
        fused = fused_ce.linear_cross_entropy(
            x, w, target, reduction=reduction, path="fused", backend=backend
        )
        assert fused.dtype == torch.float32
        assert_tight(fused, reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_bce_returns_float32_for_half_inputs(backend_device, dtype, reduction):
    backend, device = backend_device
    x = exact_values((N_ROWS, N_FEATURES), 1, dtype, device)
    w = exact_values((4, N_FEATURES), 2, dtype, device)
    target = torch.rand((N_ROWS, 4), generator=generator(6)).to(device, dtype)
    pos_weight = positive((4,), 7, device, dtype)
    kwargs = {"reduction": reduction, "pos_weight": pos_weight}
    reference = F.binary_cross_entropy_with_logits(
        x.double() @ w.double().T,
        target.double(),
        reduction=reduction,
        pos_weight=pos_weight.double(),
    )
    for requires_grad in (False, True):
        loss = fused_ce.linear_binary_cross_entropy_with_logits(
            x.clone().requires_grad_(requires_grad),
            w,
            target,
            chunk_size=5,
            backend=backend,
            **kwargs,
        )
        assert loss.dtype == torch.float32
        assert_tight(loss.detach(), reference)


# --- torch.autocast ---------------------------------------------------------------------------


def _for(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A constant operand of torch's loss as given (autocast casts it), in fp64 for the fp64
    oracle (torch wants one dtype there)."""
    return weight.double() if x.dtype == torch.float64 else weight


def _torch_and_ours(torch_fn, our_fn, tensors, wrt, upstream_seed=9):
    """(torch's, ours): each the (loss, grads of tensors[i] for i in wrt) under CPU autocast,
    with the same random upstream gradient."""
    results = []
    for fn in (torch_fn, our_fn):
        leaves = [t.clone().requires_grad_(i in wrt) for i, t in enumerate(tensors)]
        with autocast(tensors[0].device):
            loss = fn(*leaves)
        upstream = torch.rand(loss.shape, generator=generator(upstream_seed)).to(loss.dtype) + 0.5
        loss.backward(upstream)
        results.append((loss.detach(), [leaves[i].grad for i in wrt], upstream))
    return results


def _oracle(torch_fn, tensors, wrt, upstream):
    """torch's loss and gradients in float64 on the operands autocast gives the loss: the
    fp32 values of the (possibly bf16) inputs, so the oracle of what torch's autocast does."""
    leaves = [
        t.detach().double().requires_grad_(i in wrt) if t.is_floating_point() else t
        for i, t in enumerate(tensors)
    ]
    loss = torch_fn(*leaves)
    loss.backward(upstream.double())
    return loss.detach(), [leaves[i].grad for i in wrt]


def check_autocast(torch_fn, our_fn, tensors, wrt):
    """Ours matches torch under autocast: the same loss dtype (fp32) and gradient dtypes; the
    loss within fp32 rounding of the fp64 oracle; each gradient within twice torch's own
    error (it is rounded to the input's dtype by the cast's backward) plus one rounding."""
    (theirs, their_grads, upstream), (ours, our_grads, _) = _torch_and_ours(
        torch_fn, our_fn, tensors, wrt
    )
    reference, ref_grads = _oracle(torch_fn, tensors, wrt, upstream)
    assert ours.dtype == theirs.dtype == torch.float32
    assert_tight(ours, reference)
    assert_tight(theirs, reference)
    for ours_grad, their_grad, ref in zip(our_grads, their_grads, ref_grads, strict=True):
        assert ours_grad.dtype == their_grad.dtype
        eps = torch.finfo(ours_grad.dtype).eps
        torch_error = float((their_grad.double() - ref).abs().max())
        bound = 2 * torch_error + eps * float(ref.abs().max()) + 1e-12
        assert float((ours_grad.double() - ref).abs().max()) <= bound


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", ["bf16", "bf16-weight-fp32", "fp32", "prob-target"])
def test_cross_entropy_under_autocast_matches_torch(backend_device, reduction, case):
    """torch's autocast runs cross_entropy in fp32 (a bf16 input with an fp32 class weight is
    then allowed); fused_ce gives the same dtypes and fp32-exact values."""
    backend, device = backend_device
    dtype = torch.float32 if case == "fp32" else torch.bfloat16
    logits = randn((N_ROWS, N_CLASSES), 1, device, dtype, scale=3.0)
    weight = positive((N_CLASSES,), 2, device, torch.float32 if case != "bf16" else dtype)
    if case == "prob-target":
        target = torch.softmax(randn((N_ROWS, N_CLASSES), 3, device), 1).to(dtype)
        wrt = (0, 1)
    else:
        target = torch.randint(0, N_CLASSES, (N_ROWS,), generator=generator(3)).to(device)
        target[::5] = -100
        wrt = (0,)
    options = {"reduction": reduction, "label_smoothing": 0.1}

    def theirs(x, t):
        return F.cross_entropy(x, t, weight=_for(x, weight), **options)

    def ours(x, t):
        return fused_ce.softmax_cross_entropy(x, t, weight=weight, backend=backend, **options)

    check_autocast(theirs, ours, (logits, target), wrt)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_bce_under_autocast_matches_torch(backend_device, reduction, dtype):
    backend, device = backend_device
    logits = randn((N_ROWS, 4), 1, device, dtype, scale=3.0)
    target = torch.rand((N_ROWS, 4), generator=generator(2)).to(device, dtype)
    weight = positive((4,), 3, device)  # fp32 with bf16 logits: autocast casts both
    pos_weight = positive((4,), 4, device)
    options = {"reduction": reduction}

    def theirs(x, t):
        return F.binary_cross_entropy_with_logits(
            x, t, weight=_for(x, weight), pos_weight=_for(x, pos_weight), **options
        )

    def ours(x, t):
        return fused_ce.sigmoid_binary_cross_entropy(
            x, t, weight=weight, pos_weight=pos_weight, backend=backend, **options
        )

    check_autocast(theirs, ours, (logits, target), (0, 1))


def test_nn_modules_under_autocast_return_float32():
    logits = randn((N_ROWS, N_CLASSES), 1, "cpu", torch.bfloat16)
    target = torch.randint(0, N_CLASSES, (N_ROWS,), generator=generator(3))
    with autocast("cpu"):
        ce = fused_ce.nn.CrossEntropyLoss(weight=positive((N_CLASSES,), 2, "cpu"))(logits, target)
        bce = fused_ce.nn.BCEWithLogitsLoss()(logits, torch.rand(logits.shape).bfloat16())
    assert ce.dtype == bce.dtype == torch.float32


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_under_autocast_matches_torch(backend_device, reduction):
    """fp32 features and head under autocast: the GEMM in bf16 (as F.linear under autocast,
    so the logits are bf16), the loss in fp32 with an fp32 class weight; the loss equals
    F.linear + F.cross_entropy under autocast to fp32 rounding, and gradients are within twice
    that composition's error against fp64."""
    backend, device = backend_device
    x = randn((N_ROWS, N_FEATURES), 1, device)
    w = randn((N_CLASSES, N_FEATURES), 2, device)
    b = randn((N_CLASSES,), 3, device)
    weight = positive((N_CLASSES,), 4, device)
    target = torch.randint(0, N_CLASSES, (N_ROWS,), generator=generator(5)).to(device)

    def theirs(x, w, b):
        logits = F.linear(x, w, b)
        return F.cross_entropy(logits, target, weight=_for(x, weight), reduction=reduction)

    def ours(x, w, b):
        return fused_ce.linear_cross_entropy(
            x, w, target, linear_bias=b, weight=weight, reduction=reduction, backend=backend
        )

    (their_loss, their_grads, upstream), (our_loss, our_grads, _) = _torch_and_ours(
        theirs, ours, (x, w, b), (0, 1, 2)
    )
    assert our_loss.dtype == their_loss.dtype == torch.float32
    torch.testing.assert_close(our_loss, their_loss, rtol=1e-5, atol=1e-6)
    # The oracle: fp64 from the bf16-rounded operands autocast's GEMM reads.
    rounded = [t.bfloat16() for t in (x, w, b)]
    reference, ref_grads = _oracle(theirs, rounded, (0, 1, 2), upstream)
    assert float((our_loss.double() - reference).abs().max()) <= 2 * float(
        (their_loss.double() - reference).abs().max()
    ) + 1e-6 * float(reference.abs().max().clamp_min(1))
    for ours_grad, their_grad, ref in zip(our_grads, their_grads, ref_grads, strict=True):
        assert ours_grad.dtype == their_grad.dtype == torch.float32
        torch_error = float((their_grad.double() - ref).abs().max())
        bound = 2 * torch_error + 2**-8 * float(ref.abs().max())
        assert float((ours_grad.double() - ref).abs().max()) <= bound


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_bce_under_autocast_matches_torch(backend_device, reduction):
    backend, device = backend_device
    x = randn((N_ROWS, N_FEATURES), 1, device)
    w = randn((4, N_FEATURES), 2, device)
    target = torch.rand((N_ROWS, 4), generator=generator(5)).to(device)
    pos_weight = positive((4,), 4, device)

    def theirs(x, w):
        return F.binary_cross_entropy_with_logits(
            F.linear(x, w), target, pos_weight=pos_weight, reduction=reduction
        )

    def ours(x, w):
        return fused_ce.linear_binary_cross_entropy_with_logits(
            x, w, target, pos_weight=pos_weight, reduction=reduction, backend=backend
        )

    (their_loss, _, _), (our_loss, our_grads, _) = _torch_and_ours(theirs, ours, (x, w), (0, 1))
    assert our_loss.dtype == their_loss.dtype == torch.float32
    assert [g.dtype for g in our_grads] == [torch.float32, torch.float32]
    torch.testing.assert_close(our_loss, their_loss, rtol=1e-5, atol=1e-6)
