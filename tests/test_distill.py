"""Distillation losses on logits (fused_ce.kl_div_with_logits, fused_ce.jsd_with_logits) on every
backend, held against PyTorch's own formulas in float64 (tests/_reference.py's rule: fp32/fp64
tight, fp16/bf16 within twice torch's same-dtype error)."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F

import fused_ce
from fused_ce.ops.distill import distill_backward, distill_forward
from tests._reference import check, randn

REDUCTIONS = ("batchmean", "sum", "mean", "none")


def reference(
    student,
    teacher,
    *,
    temperature=1.0,
    direction="forward",
    beta=None,
    target=None,
    ignore_index=-100,
    mask=None,
    reduction="batchmean",
):
    """The plain PyTorch formula: F.kl_div on log_softmax of the tempered logits (the JSD from
    its mixture), per row, masked, reduced; fp32 for half-precision inputs."""
    log_q = F.log_softmax(student / temperature, -1)
    log_p = F.log_softmax(teacher / temperature, -1)

    def kl(log_a, log_b):  # KL(a || b) per row
        return F.kl_div(log_b, log_a, log_target=True, reduction="none").sum(-1)

    if beta is None:
        rows = kl(log_p, log_q) if direction == "forward" else kl(log_q, log_p)
    elif beta == 0.0:
        rows = kl(log_p, log_q)
    elif beta == 1.0:
        rows = kl(log_q, log_p)
    else:
        # log of the mixture as a log-add-exp: the plain log(beta p + (1 - beta) q) is -inf
        # where both underflow (logits of 1e4), and kl_div then gives 0 * inf = NaN.
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        rows = beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)
    if rows.dtype in (torch.float16, torch.bfloat16):
        rows = rows.float()
    valid = target != ignore_index if target is not None else mask
    if valid is not None:
        rows = torch.where(valid, rows, 0.0)
    if reduction == "none":
        return rows
    if reduction == "batchmean":
        return rows.sum() / student.shape[0]
    if reduction == "mean":
        return rows.sum() / (valid.sum() if valid is not None else rows.numel())
    return rows.sum()


def labels(shape, device, seed=5, ignored=(1,)):
    """Class labels of ``shape`` with the flat positions ``ignored`` set to -100."""
    target = torch.randint(0, 3, shape, generator=torch.Generator().manual_seed(seed))
    target.view(-1)[list(ignored)] = -100
    return target.to(device)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_div_matches_torch(backend_device, direction, reduction):
    backend, device = backend_device
    student = randn((5, 37), 1, device, scale=2.0)
    teacher = randn((5, 37), 2, device, scale=2.0)
    kwargs = {
        "temperature": 2.5,
        "direction": direction,
        "target": labels((5,), device),
        "reduction": reduction,
    }
    check(fused_ce.kl_div_with_logits, reference, (student, teacher), kwargs, (0, 1), backend)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_jsd_matches_torch(backend_device, beta, reduction):
    backend, device = backend_device
    student = randn((2, 3, 29), 3, device, scale=2.0)
    teacher = randn((2, 3, 29), 4, device, scale=2.0)
    mask = torch.tensor([[True, False, True], [True, True, True]], device=device)
    kwargs = {"beta": beta, "temperature": 0.7, "mask": mask, "reduction": reduction}
    check(fused_ce.jsd_with_logits, reference, (student, teacher), kwargs, (0, 1), backend)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "function, kwargs",
    [
        (fused_ce.kl_div_with_logits, {"direction": "forward"}),
        (fused_ce.kl_div_with_logits, {"direction": "reverse"}),
        (fused_ce.jsd_with_logits, {"beta": 0.4}),
    ],
    ids=["forward", "reverse", "jsd"],
)
def test_dtypes(backend_device, dtype, function, kwargs):
    """The loss is fp32 for half-precision logits (fp64 for fp64); the gradients keep the
    logits' dtype; the error rule of the dtype holds. Student-only gradients (the usual case)."""
    backend, device = backend_device
    student = randn((6, 50), 6, device, dtype, scale=3.0)
    teacher = randn((6, 50), 7, device, dtype, scale=3.0)
    kwargs = {**kwargs, "temperature": 2.0, "reduction": "none"}
    ours = check(function, reference, (student, teacher), kwargs, (0,), backend)
    assert ours.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("vocabulary", [1, 2, 3, 200])
def test_vocabulary_sizes(backend_device, vocabulary):
    backend, device = backend_device
    student = randn((3, vocabulary), 8, device)
    teacher = randn((3, vocabulary), 9, device)
    for function, kwargs in (
        (fused_ce.kl_div_with_logits, {"direction": "reverse"}),
        (fused_ce.jsd_with_logits, {"beta": 0.5}),
    ):
        check(
            function,
            reference,
            (student, teacher),
            {**kwargs, "reduction": "none"},
            (0, 1),
            backend,
        )


@pytest.mark.parametrize("beta", [None, 0.5])
def test_extreme_logits(backend_device, beta):
    """Logits of 1e4 (confident rows, a shift of the whole row): finite and within twice
    torch's fp32 error, as the CE tests require."""
    backend, device = backend_device
    student = randn((4, 33), 10, device, scale=1e4)
    teacher = randn((4, 33), 11, device, scale=1e4)
    student[0] = teacher[0] + 1e4  # the same distribution, shifted
    function = fused_ce.kl_div_with_logits if beta is None else fused_ce.jsd_with_logits
    kwargs = {"reduction": "none"} if beta is None else {"beta": beta, "reduction": "none"}
    ours = check(function, reference, (student, teacher), kwargs, (0, 1), backend, torch_rule=True)
    assert torch.isfinite(ours.loss).all() and all(torch.isfinite(g).all() for g in ours.grads)


def test_mixed_dtypes(backend_device):
    """A bf16 student against an fp32 teacher: fp32 math, each gradient in its logits' dtype."""
    backend, device = backend_device
    student = randn((4, 21), 12, device, torch.bfloat16)
    teacher = randn((4, 21), 13, device, torch.float32)
    s = student.detach().requires_grad_()
    t = teacher.detach().requires_grad_()
    loss = fused_ce.kl_div_with_logits(s, t, backend=backend, reduction="sum")
    loss.backward()
    s64 = student.double().requires_grad_()
    t64 = teacher.double().requires_grad_()
    expected = reference(s64, t64, reduction="sum")
    expected.backward()
    assert loss.dtype == torch.float32 and s.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t.grad.double(), t64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad, s64.grad.bfloat16(), rtol=0.01, atol=1e-3)


def test_non_contiguous(backend_device):
    """Transposed and sliced logits are read through their strides."""
    backend, device = backend_device
    student = randn((23, 6), 14, device).t()
    teacher = randn((6, 46), 15, device)[:, ::2]
    assert not student.is_contiguous() and not teacher.is_contiguous()
    kwargs = {"beta": 0.25, "temperature": 1.5, "reduction": "sum"}
    check(fused_ce.jsd_with_logits, reference, (student, teacher), kwargs, (0, 1), backend)


def test_masked_rows(backend_device):
    """Ignored rows: loss 0 and gradient exactly 0, even when their logits are NaN; a mask and
    the equivalent target give the same result; with every row ignored 'mean' is NaN (0 / 0)
    and the gradient all zeros."""
    backend, device = backend_device
    student = randn((4, 9), 16, device).requires_grad_()
    teacher = randn((4, 9), 17, device)
    with torch.no_grad():
        student[2] = float("nan")
    target = torch.tensor([0, 1, -100, 2], device=device)
    mask = target != -100
    loss = fused_ce.kl_div_with_logits(
        student, teacher, target=target, backend=backend, reduction="none"
    )
    (grad,) = torch.autograd.grad(loss.sum() * 3, student)
    assert loss[2] == 0 and torch.isfinite(loss).all()
    assert torch.equal(grad[2], torch.zeros(9, device=device))
    by_mask = fused_ce.kl_div_with_logits(
        student, teacher, mask=mask, backend=backend, reduction="none"
    )
    assert torch.equal(loss, by_mask)
    nothing = torch.zeros(4, dtype=torch.bool, device=device)
    mean = fused_ce.jsd_with_logits(
        student, teacher, mask=nothing, backend=backend, reduction="mean"
    )
    (grad,) = torch.autograd.grad(mean, student)
    assert mean.isnan() and torch.equal(grad, torch.zeros_like(grad))


def test_strided_mask_and_single_row(backend_device):
    """A mask that is a strided view (every other column of a larger one) selects the rows it
    says; 1-D logits are one row, and 'batchmean' divides by their size(0), as kl_div."""
    backend, device = backend_device
    student = randn((2, 3, 8), 40, device)
    teacher = randn((2, 3, 8), 41, device)
    wide = torch.tensor([[1, 0, 0, 1, 1, 1], [0, 1, 1, 0, 0, 0]], dtype=torch.bool, device=device)
    mask = wide[:, ::2]
    assert not mask.is_contiguous()
    kwargs = {"beta": 0.5, "mask": mask, "reduction": "none"}
    check(fused_ce.jsd_with_logits, reference, (student, teacher), kwargs, (0,), backend)
    row = (student[0, 0], teacher[0, 0])
    check(fused_ce.kl_div_with_logits, reference, row, {"reduction": "batchmean"}, (0,), backend)


def test_empty_batch(backend_device):
    backend, device = backend_device
    student = torch.zeros(0, 5, device=device, requires_grad=True)
    teacher = torch.zeros(0, 5, device=device)
    total = fused_ce.kl_div_with_logits(student, teacher, backend=backend, reduction="sum")
    total.backward()
    assert total.item() == 0 and student.grad.shape == (0, 5)


def test_jsd_limits():
    """The documented convention: beta 0 and 1 are the forward and reverse KL, the limits of
    JSD / beta and JSD / (1 - beta) at the ends."""
    student = randn((3, 12), 18, "cpu", torch.float64)
    teacher = randn((3, 12), 19, "cpu", torch.float64)
    kw = {"reduction": "none", "backend": "torch"}
    forward = fused_ce.kl_div_with_logits(student, teacher, **kw)
    reverse = fused_ce.kl_div_with_logits(student, teacher, direction="reverse", **kw)
    torch.testing.assert_close(fused_ce.jsd_with_logits(student, teacher, beta=0.0, **kw), forward)
    torch.testing.assert_close(fused_ce.jsd_with_logits(student, teacher, beta=1.0, **kw), reverse)
    small = 1e-6
    near_0 = fused_ce.jsd_with_logits(student, teacher, beta=small, **kw) / small
    near_1 = fused_ce.jsd_with_logits(student, teacher, beta=1 - small, **kw) / small
    torch.testing.assert_close(near_0, forward, rtol=1e-4, atol=0)
    torch.testing.assert_close(near_1, reverse, rtol=1e-4, atol=0)


@pytest.mark.parametrize("beta", [None, 0.0, 0.35, 1.0])
def test_gradcheck(backend_device, beta):
    backend, device = backend_device
    student = randn((3, 7), 20, device, torch.float64).requires_grad_()
    teacher = randn((3, 7), 21, device, torch.float64).requires_grad_()
    mask = torch.tensor([True, False, True], device=device)
    if beta is None:

        def loss(s, t):
            return fused_ce.kl_div_with_logits(
                s,
                t,
                direction="reverse",
                temperature=1.7,
                mask=mask,
                reduction="none",
                backend=backend,
            )
    else:

        def loss(s, t):
            return fused_ce.jsd_with_logits(
                s, t, beta=beta, temperature=0.8, mask=mask, reduction="none", backend=backend
            )

    assert torch.autograd.gradcheck(loss, (student, teacher))


def test_double_backward_raises(backend_device):
    backend, device = backend_device
    student = randn((2, 5), 22, device).requires_grad_()
    teacher = randn((2, 5), 23, device)
    loss = fused_ce.kl_div_with_logits(student, teacher, backend=backend)
    (grad,) = torch.autograd.grad(loss, student, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


def test_compile_fullgraph(backend_device):
    backend, device = backend_device
    student = randn((4, 19), 24, device)
    teacher = randn((4, 19), 25, device)
    target = labels((4,), device)

    def loss_fn(s, t):
        kl = fused_ce.kl_div_with_logits(s, t, temperature=2.0, target=target, backend=backend)
        jsd = fused_ce.jsd_with_logits(s, t, beta=0.3, reduction="mean", backend=backend)
        return kl + jsd

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (loss_fn, compiled):
        s = student.clone().requires_grad_()
        t = teacher.clone().requires_grad_()
        loss = fn(s, t)
        loss.backward()
        results.append((loss.detach(), s.grad, t.grad))
    for eager, graph in zip(*results, strict=True):
        assert torch.equal(eager, graph)


def test_opcheck(backend_device):
    backend, device = backend_device
    student = randn((9, 3), 26, device).t().requires_grad_()  # (3, 9), strided
    teacher = randn((3, 9), 27, device).requires_grad_()
    valid = torch.tensor([True, False, True], device=device)
    args = (student, teacher, valid, 1.5, 0.25, backend)
    torch.library.opcheck(distill_forward, args)
    _, saved = distill_forward(*args)
    grad_loss = randn((3,), 28, device)
    torch.library.opcheck(
        distill_backward,
        (
            grad_loss,
            student.detach(),
            teacher.detach(),
            valid,
            saved,
            1.5,
            0.25,
            backend,
            True,
            True,
        ),
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"direction": "sideways"}, "direction"),
        ({"reduction": "avg"}, "reduction"),
        ({"target": torch.zeros(3, dtype=torch.long)}, "target"),
        ({"target": torch.zeros(4)}, "target"),
        ({"mask": torch.ones(4, dtype=torch.long)}, "mask"),
        (
            {"mask": torch.ones(4, dtype=torch.bool), "target": torch.zeros(4, dtype=torch.long)},
            "mask",
        ),
    ],
)
def test_bad_arguments(kwargs, match):
    student = torch.randn(4, 6)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        fused_ce.kl_div_with_logits(student, torch.randn(4, 6), **kwargs)


def test_bad_operands():
    with pytest.raises(ValueError, match="teacher_logits"):
        fused_ce.kl_div_with_logits(torch.randn(4, 6), torch.randn(4, 7))
    with pytest.raises(TypeError, match="student_logits"):
        fused_ce.kl_div_with_logits(torch.zeros(4, 6, dtype=torch.long), torch.randn(4, 6))
    with pytest.raises(ValueError, match="beta"):
        fused_ce.jsd_with_logits(torch.randn(4, 6), torch.randn(4, 6), beta=1.5)
    with pytest.raises(ValueError, match="student_logits"):
        fused_ce.jsd_with_logits(torch.randn(4, 0), torch.randn(4, 0))


FUNCTIONS = [
    fused_ce.kl_div_with_logits,
    fused_ce.jsd_with_logits,
    fused_ce.linear_kl_div,
    fused_ce.linear_jsd,
]
MODULES = [
    fused_ce.nn.KLDivWithLogitsLoss,
    fused_ce.nn.JSDWithLogitsLoss,
    fused_ce.nn.LinearKLDivLoss,
    fused_ce.nn.LinearJSDLoss,
]


@pytest.mark.parametrize("function", FUNCTIONS + MODULES, ids=lambda f: f.__name__)
def test_docstring(function):
    """torch's sections are there and the example runs and prints what it says."""
    doc = function.__doc__
    sections = ("Shape:", "Examples::") + (("Args:", "Returns:") if function in FUNCTIONS else ())
    for section in sections:
        assert f"\n    {section}\n" in doc, section
    torch.manual_seed(0)
    finder = doctest.DocTestFinder()
    (test,) = finder.find(function, globs={"torch": torch, "fused_ce": fused_ce})
    runner = doctest.DocTestRunner()
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_modules_match_the_functions():
    student = randn((2, 3, 11), 30, "cpu")
    teacher = randn((2, 3, 11), 31, "cpu")
    target = labels((2, 3), "cpu")
    kl = fused_ce.nn.KLDivWithLogitsLoss(temperature=2.0, direction="reverse", reduction="mean")
    expected = fused_ce.kl_div_with_logits(
        student, teacher, temperature=2.0, direction="reverse", target=target, reduction="mean"
    )
    assert torch.equal(kl(student, teacher, target), expected)
    jsd = fused_ce.nn.JSDWithLogitsLoss(beta=0.2, reduction="none")
    mask = target != -100
    expected = fused_ce.jsd_with_logits(student, teacher, beta=0.2, mask=mask, reduction="none")
    assert torch.equal(jsd(student, teacher, mask=mask), expected)
    hs, ws = randn((2, 3, 4), 32, "cpu"), randn((11, 4), 33, "cpu")
    ht, wt = randn((2, 3, 6), 34, "cpu"), randn((11, 6), 35, "cpu")
    linear = fused_ce.nn.LinearKLDivLoss(ce_weight=0.3, chunk_size=2)
    expected = fused_ce.linear_kl_div(hs, ws, ht, wt, target=target, ce_weight=0.3, chunk_size=2)
    assert torch.equal(linear(hs, ws, ht, wt, target), expected)
    linear = fused_ce.nn.LinearJSDLoss(beta=0.7, temperature=3.0)
    expected = fused_ce.linear_jsd(hs, ws, ht, wt, beta=0.7, temperature=3.0)
    assert torch.equal(linear(hs, ws, ht, wt), expected)


@pytest.mark.parametrize(
    "module, kwargs, match",
    [
        (fused_ce.nn.KLDivWithLogitsLoss, {"temperature": -2.0}, "temperature"),
        (fused_ce.nn.KLDivWithLogitsLoss, {"direction": "up"}, "direction"),
        (fused_ce.nn.JSDWithLogitsLoss, {"beta": -0.1}, "beta"),
        (fused_ce.nn.JSDWithLogitsLoss, {"reduction": "elementwise_mean"}, "reduction"),
        (fused_ce.nn.LinearKLDivLoss, {"ce_weight": 2.0}, "ce_weight"),
        (fused_ce.nn.LinearJSDLoss, {"chunk_size": -1}, "chunk_size"),
        (fused_ce.nn.KLDivWithLogitsLoss, {"backend": "cuda"}, "backend"),
        (fused_ce.nn.LinearJSDLoss, {"backend": "Native"}, "backend"),
    ],
)
def test_modules_check_options_at_construction(module, kwargs, match):
    with pytest.raises(ValueError, match=match):
        module(**kwargs)


@pytest.mark.parametrize("beta", [None, 0.3])
def test_forward_ad_and_torch_func(backend_device, beta):
    """Forward-mode AD and torch.func run the loss (through its torch-op composite) and give
    the tangent and gradient of the plain formula, in float64."""
    import torch.autograd.forward_ad as fwAD

    backend, device = backend_device
    student = randn((4, 9), 1, device, scale=2.0).double()
    teacher = randn((4, 9), 2, device, scale=2.0).double()
    tangent = randn((4, 9), 3, device).double()
    mask = torch.tensor([True, False, True, True], device=device)
    kwargs = {"temperature": 1.5, "mask": mask}
    if beta is None:
        ours = lambda s: fused_ce.kl_div_with_logits(s, teacher, backend=backend, **kwargs)  # noqa: E731
    else:
        ours = lambda s: fused_ce.jsd_with_logits(s, teacher, beta=beta, backend=backend, **kwargs)  # noqa: E731
    theirs = lambda s: reference(s, teacher, beta=beta, **kwargs)  # noqa: E731
    with fwAD.dual_level():
        out = fwAD.unpack_dual(ours(fwAD.make_dual(student, tangent)))
    _, expected_tangent = torch.func.jvp(theirs, (student,), (tangent,))
    assert out.tangent is not None
    torch.testing.assert_close(out.tangent, expected_tangent)
    torch.testing.assert_close(torch.func.grad(ours)(student), torch.func.grad(theirs)(student))
    batch = torch.stack((student, student.flip(0)))
    torch.testing.assert_close(torch.func.vmap(ours)(batch), torch.func.vmap(theirs)(batch))
