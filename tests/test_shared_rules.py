"""The rules that the native library's loss ops apply in C++ (csrc/autograd.cpp) and the other
paths apply in Python, held equal bit for bit: the factor of a cross-entropy 'mean'/'sum'
(``ce_grad_scale`` and ``fused_ce._reduction._grad_scale``) and BCE's (rows, cols) operand
views (``bce_rows_2d`` in both). The C++ rules are exposed as ops of the native library
(``fused_ce_native::ce_grad_scale``, ``bce_rows_2d``) for this comparison; the Python ones
serve CUDA, ``torch.compile`` and every machine without the extension."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fused_ce import native
from fused_ce._common import bce_rows_2d
from fused_ce._reduction import _grad_scale
from fused_ce._validation import check_ce_target, check_ignore_index

pytestmark = pytest.mark.skipif(not native.available(), reason="needs the native extension")


def _python_grad_scale(input, target, weight, ignore_index, mean, label_smoothing):
    """``_grad_scale`` as ``softmax_cross_entropy``'s scalar path calls it."""
    class_dim = 0 if input.dim() == 1 else 1
    n_classes = input.shape[class_dim]
    batch_shape = input.shape[:class_dim] + input.shape[class_dim + 1 :]
    ignore_index = check_ignore_index(ignore_index)
    checked = check_ce_target(
        target,
        input,
        weight,
        ignore_index,
        label_smoothing,
        batch_shape,
        input.shape,
        n_classes,
        all_valid_as_none=True,
        indices_checked_by_op=False,
    )
    n_rows = math.prod(batch_shape) if n_classes or not checked.prob_target else math.nan
    reduction = "mean" if mean else "sum"
    return _grad_scale(reduction, checked, target, weight, n_rows, input)


def _ce_cases():
    """(input, target, weight, ignore_index, label_smoothing) over shapes (1-D, 2-D, NCHW; no
    class), targets (int64, uint8, probabilities; none, some or all ignored, the ignored value
    a valid class too) and class weights (none, positive, some zero, all zero)."""
    gen = torch.Generator().manual_seed(0)
    for dtype, shape, n_classes in itertools.product(
        (torch.float32, torch.float64),
        ("1d", "2d", "nchw"),
        (0, 1, 7),
    ):
        lead = {"1d": (), "2d": (13,), "nchw": (3,)}[shape]
        spatial = (2, 5) if shape == "nchw" else ()
        input_shape = (*lead, n_classes, *spatial)
        input = torch.randn(input_shape, generator=gen, dtype=dtype)
        batch = (*lead, *spatial)
        weights = [None]
        if n_classes:
            positive = torch.rand(n_classes, generator=gen, dtype=dtype) + 0.5
            some_zero = positive.clone()
            some_zero[::2] = 0.0
            weights += [positive, some_zero, torch.zeros(n_classes, dtype=dtype)]
        else:
            weights += [torch.empty(0, dtype=dtype)]
        targets = []
        for index_dtype, ignore_index in ((torch.int64, -100), (torch.uint8, 3), (torch.int64, 0)):
            if n_classes:
                classes = torch.randint(0, n_classes, batch, generator=gen).to(index_dtype)
                some = classes.clone()
                some.view(-1)[::3] = ignore_index
                targets += [(classes, ignore_index), (some, ignore_index)]
            every = torch.full(batch, ignore_index, dtype=torch.int64).to(index_dtype)
            targets.append((every, ignore_index))
        if n_classes:
            probabilities = torch.rand(input_shape, generator=gen, dtype=dtype).softmax(
                0 if shape == "1d" else 1
            )
            targets.append((probabilities, -100))
        for (target, ignore_index), weight, smoothing in itertools.product(
            targets, weights, (0.0, 0.1)
        ):
            yield input, target, weight, ignore_index, smoothing


def test_ce_grad_scale_is_the_python_one():
    compared = 0
    for input, target, weight, ignore_index, smoothing in _ce_cases():
        for mean in (True, False):
            expected = _python_grad_scale(input, target, weight, ignore_index, mean, smoothing)
            got = torch.ops.fused_ce_native.ce_grad_scale(
                input, target, weight, ignore_index, mean, smoothing
            )
            case = (input.shape, target.dtype, weight, ignore_index, mean, smoothing)
            assert got.dtype == expected.dtype and got.shape == expected.shape, case
            # Bits, NaN included: compare the integer views.
            bits = {torch.float32: torch.int32, torch.float64: torch.int64}[got.dtype]
            assert torch.equal(got.view(bits), expected.view(bits)), (case, got, expected)
            compared += 1
    assert compared > 500


def _operand(layout: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A tensor broadcastable to ``shape`` in the given layout."""
    if layout == "dense":
        return torch.randn(shape, generator=gen)
    if layout == "one value":
        return torch.randn((1,) if shape else (), generator=gen)
    if layout == "0-d":
        return torch.randn((), generator=gen)
    if layout == "transposed":
        return torch.randn(shape[::-1], generator=gen).transpose(0, -1)
    if layout == "sliced":
        return torch.randn((*shape[:-1], 2 * shape[-1]), generator=gen)[..., ::2]
    if layout == "per column":
        return torch.randn(shape[-1:], generator=gen)
    if layout == "per row":
        return torch.randn((*shape[:-1], 1), generator=gen)
    assert layout == "expanded column"
    return torch.randn(shape[-1:], generator=gen).expand(shape)


def _bce_cases():
    """(input, target, weight, pos_weight, grad) of many layouts: dense, transposed (strided),
    sliced, broadcast along either dim, one element, 0-d and expanded upstream gradients,
    absent operands."""
    gen = torch.Generator().manual_seed(1)
    for shape in ((4, 6), (2, 3, 5), (7,), (), (5, 1), (1, 9)):
        matrix = len(shape) >= 2
        strided = ["transposed", "sliced"] if matrix else []
        broadcast = ["per column", "per row"] if matrix else []
        for layouts in itertools.product(
            ["dense", *strided],
            ["dense", *strided[:1]],
            [
                None,
                "dense",
                "one value",
                *strided,
                *broadcast,
                *(["expanded column"] if matrix else []),
            ],
            [None, "dense", *broadcast[:1]],
            [None, "0-d", "dense", *(["expanded column"] if matrix else [])],
        ):
            yield [None if layout is None else _operand(layout, shape, gen) for layout in layouts]


def _addressing(view: torch.Tensor) -> list[tuple[int, int | None]]:
    return [
        (n, stride if n > 1 else None) for n, stride in zip(view.shape, view.stride(), strict=True)
    ]


def test_bce_rows_2d_is_the_python_one():
    compared = 0
    for input, target, weight, pos_weight, grad in _bce_cases():
        operands = [input, target, weight, pos_weight, grad]
        for loss_sum in (False, True):
            expected = [
                view
                for view in bce_rows_2d(input.shape, operands, loss_sum=loss_sum)
                if view is not None
            ]
            got = torch.ops.fused_ce_native.bce_rows_2d(
                input, target, weight, pos_weight, grad, loss_sum
            )
            present = [t for t in operands if t is not None]
            assert len(got) == len(expected) == len(present)
            for source, mine, theirs in zip(present, got, expected, strict=True):
                case = (input.shape, [None if t is None else t.stride() for t in operands])
                # The same elements: equal sizes and strides (but of a size-1 dim, which
                # addresses nothing: a (1, C) view of a dense row may carry any).
                assert _addressing(mine) == _addressing(theirs), case
                # The same memory: both views of the operand, or both of a dense copy of it.
                copied = theirs.untyped_storage().data_ptr() != source.untyped_storage().data_ptr()
                assert (
                    mine.untyped_storage().data_ptr() != source.untyped_storage().data_ptr()
                ) == (copied), case
                if not copied:
                    assert mine.storage_offset() == theirs.storage_offset(), case
                assert torch.equal(mine, theirs), case
                compared += 1
    assert compared > 1000
