"""The fused linear distillation heads (fused_ce.linear_kl_div, fused_ce.linear_jsd) on every
backend, held against the unfused PyTorch formula (the heads' logits, then F.kl_div on
log_softmax, plus F.cross_entropy for the hard-label term) in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_ce
from tests._reference import check, randn
from tests.test_distill import reference as logits_reference

N_ROWS, VOCABULARY, STUDENT_D, TEACHER_D = 7, 13, 5, 9
CHUNK = 3  # rows per chunk: several chunks and a ragged last one


def heads(device, dtype=torch.float32, lead=(N_ROWS,)):
    """Student and teacher heads of different hidden sizes; the student has a bias."""
    return (
        randn((*lead, STUDENT_D), 1, device, dtype),
        randn((VOCABULARY, STUDENT_D), 2, device, dtype, scale=0.7),
        randn((*lead, TEACHER_D), 3, device, dtype),
        randn((VOCABULARY, TEACHER_D), 4, device, dtype, scale=0.7),
        randn((VOCABULARY,), 5, device, dtype),
    )


def labels(lead, device):
    target = torch.randint(0, VOCABULARY, lead, generator=torch.Generator().manual_seed(6))
    target.view(-1)[1] = -100
    return target.to(device)


def ours(hs, ws, ht, wt, bs, target, *, kind, backend, chunk_size=CHUNK, **kwargs):
    function = fused_ce.linear_kl_div if kind == "kl" else fused_ce.linear_jsd
    return function(
        hs,
        ws,
        ht,
        wt,
        student_bias=bs,
        target=target,
        chunk_size=chunk_size,
        backend=backend,
        **kwargs,
    )


def reference(hs, ws, ht, wt, bs, target, *, kind, ce_weight=0.0, reduction="batchmean", **kwargs):
    student = F.linear(hs, ws, bs)
    teacher = F.linear(ht, wt)
    rows = logits_reference(student, teacher, target=target, reduction="none", **kwargs)
    if ce_weight > 0.0:
        ce = F.cross_entropy(student.flatten(0, -2), target.reshape(-1), reduction="none")
        rows = ce_weight * ce.reshape(rows.shape).to(rows.dtype) + (1 - ce_weight) * rows
    if reduction == "none":
        return rows
    if reduction == "batchmean":
        return rows.sum() / hs.shape[0]
    if reduction == "mean":
        return rows.sum() / (target != -100).sum()
    return rows.sum()


CASES = {
    "kl-forward": {"kind": "kl", "temperature": 2.0},
    "kl-reverse": {"kind": "kl", "direction": "reverse"},
    "jsd": {"kind": "jsd", "beta": 0.3, "temperature": 1.5},
    "jsd-beta1": {"kind": "jsd", "beta": 1.0},
    "kl-with-ce": {"kind": "kl", "temperature": 2.0, "ce_weight": 0.4},
    "jsd-with-ce": {"kind": "jsd", "beta": 0.5, "ce_weight": 0.25},
}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch(backend_device, case, reduction):
    """Every operand's gradient (the teacher's too) against the fp64 formula, in fp64 (tight)."""
    backend, device = backend_device
    args = (*heads(device, torch.float64), labels((N_ROWS,), device))
    kwargs = {**CASES[case], "reduction": reduction}
    check(ours, reference, args, kwargs, (0, 1, 2, 3, 4), backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["kl-with-ce", "jsd"])
def test_dtypes(backend_device, case, dtype):
    """fp32 close to the fp64 formula; bf16 within twice torch's own bf16 error; the loss in
    fp32, the gradients in the operands' dtype. Student gradients only (the usual case)."""
    backend, device = backend_device
    args = (*heads(device, dtype), labels((N_ROWS,), device))
    kwargs = {**CASES[case], "reduction": "sum"}
    tolerance = (1e-4, 1e-5) if dtype == torch.float32 else None
    result = check(ours, reference, args, kwargs, (0, 1, 4), backend, grad_tolerance=tolerance)
    assert result.loss.dtype == torch.float32


def test_leading_dims_and_mask(backend_device):
    """(B, S, D) hidden states with a bool mask; 'batchmean' divides by B, as kl_div does."""
    backend, device = backend_device
    lead = (2, 4)
    hs, ws, ht, wt, bs = heads(device, torch.float64, lead)
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]], device=device)

    def ours_masked(hs, ws, ht, wt, **kwargs):
        return fused_ce.linear_kl_div(hs, ws, ht, wt, mask=mask, chunk_size=3, **kwargs)

    def reference_masked(hs, ws, ht, wt, **kwargs):
        return logits_reference(hs @ ws.T, ht @ wt.T, mask=mask, **kwargs)

    for reduction in ("batchmean", "none"):
        check(
            ours_masked,
            reference_masked,
            (hs, ws, ht, wt),
            {"reduction": reduction},
            (0, 1, 2, 3),
            backend,
        )


def test_chunk_size_does_not_change_results(backend_device):
    backend, device = backend_device
    args = (*heads(device), labels((N_ROWS,), device))
    results = []
    for chunk_size in (1, 3, None):
        leaves = [a.detach().requires_grad_() if a.is_floating_point() else a for a in args]
        loss = ours(*leaves, **CASES["jsd-with-ce"], backend=backend, chunk_size=chunk_size)
        loss.backward()
        results.append((loss.detach(), *(leaf.grad for leaf in leaves[:5])))
    for first, other in zip(results[0], results[-1], strict=True):
        torch.testing.assert_close(first, other, rtol=1e-5, atol=1e-6)
    for first, other in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(first, other, rtol=1e-5, atol=1e-6)


def test_backward_twice_and_scaled_upstream(backend_device):
    """The scalar path hands out its forward's gradients times the upstream gradient, on a
    retained graph as often as asked."""
    backend, device = backend_device
    hs, ws, ht, wt, bs = heads(device, torch.float64)
    hs.requires_grad_()
    loss = fused_ce.linear_jsd(hs, ws, ht, wt, beta=0.4, chunk_size=3, backend=backend)
    (once,) = torch.autograd.grad(loss, hs, torch.tensor(1.0, dtype=loss.dtype), retain_graph=True)
    (scaled,) = torch.autograd.grad(loss, hs, torch.tensor(-2.5, dtype=loss.dtype))
    torch.testing.assert_close(scaled, -2.5 * once)
    expected = logits_reference(hs @ ws.T, ht @ wt.T, beta=0.4)
    (reference_grad,) = torch.autograd.grad(expected, hs)
    torch.testing.assert_close(once, reference_grad)


def test_gradcheck(backend_device):
    """Small heads (V 5, hidden sizes 3 and 2): every operand perturbed is two more passes."""
    backend, device = backend_device
    shapes = ((3, 3), (5, 3), (3, 2), (5, 2), (5,))
    hs, ws, ht, wt, bs = (
        randn(shape, seed, device, torch.float64).requires_grad_()
        for seed, shape in enumerate(shapes)
    )
    target = torch.tensor([1, -100, 3], device=device)
    for reduction in ("mean", "none"):

        def loss(hs, ws, ht, wt, bs, reduction=reduction):
            return fused_ce.linear_kl_div(
                hs,
                ws,
                ht,
                wt,
                student_bias=bs,
                target=target,
                ce_weight=0.3,
                temperature=1.3,
                direction="reverse",
                reduction=reduction,
                chunk_size=3,
                backend=backend,
            )

        assert torch.autograd.gradcheck(loss, (hs, ws, ht, wt, bs))


def test_double_backward_raises(backend_device):
    backend, device = backend_device
    hs, ws, ht, wt, _ = heads(device)
    hs.requires_grad_()
    for reduction in ("sum", "none"):
        loss = fused_ce.linear_kl_div(hs, ws, ht, wt, reduction=reduction, backend=backend)
        (grad,) = torch.autograd.grad(loss.sum(), hs, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            grad.sum().backward()


def test_compile_fullgraph(backend_device):
    backend, device = backend_device
    args = heads(device)
    target = labels((N_ROWS,), device)

    def loss_fn(hs, ws, ht, wt, bs):
        scalar = fused_ce.linear_kl_div(
            hs, ws, ht, wt, student_bias=bs, target=target, ce_weight=0.5, backend=backend
        )
        rows = fused_ce.linear_jsd(hs, ws, ht, wt, reduction="none", chunk_size=3, backend=backend)
        return scalar + rows.sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (loss_fn, compiled):
        leaves = [a.clone().requires_grad_() for a in args]
        loss = fn(*leaves)
        loss.backward()
        results.append((loss.detach(), *(leaf.grad for leaf in leaves)))
    for eager, graph in zip(*results, strict=True):
        assert torch.equal(eager, graph)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"ws": torch.randn(VOCABULARY, STUDENT_D + 1)}, "student_weight"),
        ({"wt": torch.randn(VOCABULARY + 1, TEACHER_D)}, "teacher_weight"),
        ({"ht": torch.randn(N_ROWS + 1, TEACHER_D)}, "teacher_hidden"),
        ({"bs": torch.randn(VOCABULARY + 1)}, "student_bias"),
        ({"ws": torch.randn(VOCABULARY, STUDENT_D, dtype=torch.float64)}, "student_weight"),
        ({"ce_weight": 0.5}, "target"),
        ({"ce_weight": 1.5, "target": torch.zeros(N_ROWS, dtype=torch.long)}, "ce_weight"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"ce_weight": 0.5, "target": torch.full((N_ROWS,), VOCABULARY)}, "out of range"),
        ({"temperature": -1.0}, "temperature"),
    ],
)
def test_bad_arguments(change, match):
    operands = dict(zip(("hs", "ws", "ht", "wt", "bs"), heads("cpu"), strict=True))
    options = {k: v for k, v in change.items() if k not in operands}
    operands.update({k: v for k, v in change.items() if k in operands})
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        fused_ce.linear_kl_div(
            operands["hs"],
            operands["ws"],
            operands["ht"],
            operands["wt"],
            student_bias=operands["bs"],
            **options,
        )


def test_opcheck(backend_device):
    """The three custom ops pass torch.library.opcheck (schema, fakes, autograd
    registration), with a bias on the student only and the hard-label term on."""
    from fused_ce.ops.linear_distill import (
        linear_distill_rows,
        linear_distill_rows_backward,
        linear_distill_scalar,
    )

    backend, device = backend_device
    hs, ws, ht, wt, bs = heads(device, torch.float64, (4,))
    for operand in (hs, ws, bs, wt):  # the flags below: the teacher's hidden states need none
        operand.requires_grad_()
    target = torch.tensor([1, -100, 3, 0], device=device)
    valid = target != -100
    operands = (hs, ws, bs, ht, wt, None)
    options = (1.5, 0.25, False, 0.3, -100, 3, backend)
    scale = torch.tensor(0.25, dtype=torch.float64, device=device)
    flags = [True, True, True, False, True, False]
    torch.library.opcheck(linear_distill_scalar, (*operands, target, valid, scale, *options, flags))
    torch.library.opcheck(linear_distill_rows, (*operands, target, valid, *options))
    with pytest.raises(RuntimeError, match="flags"):  # a gradient the forward did not make
        loss, *_ = linear_distill_scalar(
            *operands, target, valid, scale, *options, [False, True, True, False, True, False]
        )
        loss.backward()
    grad_rows = randn((4,), 7, device, torch.float64)
    detached = tuple(t.detach() if t is not None else None for t in operands)
    torch.library.opcheck(
        linear_distill_rows_backward, (grad_rows, *detached, target, valid, *options, flags)
    )


def test_training_curve_matches_torch(backend_device):
    """A student head distilled from a fixed teacher for 15 SGD steps with the fused loss
    follows the same curve as with the unfused torch formula (fp32, both from one start)."""
    backend, device = backend_device
    hs, ws, ht, wt, bs = heads(device)
    target = labels((N_ROWS,), device)
    curves = []
    for fused in (True, False):
        weight = ws.clone().requires_grad_()
        bias = bs.clone().requires_grad_()
        optimizer = torch.optim.SGD([weight, bias], lr=0.5)
        curve = []
        for _ in range(15):
            optimizer.zero_grad()
            if fused:
                loss = fused_ce.linear_kl_div(
                    hs, weight, ht, wt, student_bias=bias, target=target, ce_weight=0.2,
                    temperature=2.0, chunk_size=3, backend=backend,
                )  # fmt: skip
            else:
                kwargs = {"kind": "kl", "ce_weight": 0.2, "temperature": 2.0}
                loss = reference(hs, weight, ht, wt, bias, target, **kwargs)
            loss.backward()
            optimizer.step()
            curve.append(loss.item())
        curves.append(torch.tensor(curve))
    assert curves[0][-1] < 0.8 * curves[0][0]  # it learns
    torch.testing.assert_close(curves[0], curves[1], rtol=1e-4, atol=1e-6)
