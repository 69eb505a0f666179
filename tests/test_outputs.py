"""The shared output buffers (``fused_ce._outputs``) and BCE's operand layout rule
(``fused_ce._common.bce_rows_2d``), which every backend uses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _reference import TIGHT, positive, randn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import fused_ce
from fused_ce import native
from fused_ce._common import bce_rows_2d, forward_outputs
from fused_ce._memory import peak_bytes
from fused_ce._outputs import empty_output, gradient_buffers


def _huge_pages_on() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as file:
            modes = file.read()
    except OSError:
        return False
    return "[always]" in modes or "[madvise]" in modes


@pytest.mark.parametrize("shape", [(3, 5), (1024, 1024), (2, 1024, 1025)], ids=str)
def test_empty_output_is_a_plain_contiguous_tensor(shape):
    """Small and large (4 MiB and up: 2 MiB pages from the native library where it is
    loaded) outputs alike: the shape, dtype and contiguity asked for; writable, readable,
    resizable, and freed with the tensor (the allocator's live bytes return to zero)."""
    like = torch.zeros(shape).t() if len(shape) == 2 else torch.zeros(shape)
    out = empty_output(like)
    assert out.shape == like.shape and out.dtype == like.dtype and out.is_contiguous()
    out.copy_(torch.arange(out.numel(), dtype=out.dtype).view(out.shape))
    assert float(out.view(-1)[-1]) == out.numel() - 1
    large = out.numel() * out.element_size() >= 4 << 20
    if large and native.available() and _huge_pages_on():
        assert out.data_ptr() % (2 << 20) == 0  # huge-page aligned: the native mapping
    out.resize_(out.numel() + 7)
    out[-1] = 3.0
    assert float(out[-1]) == 3.0

    def make_and_drop():
        empty_output(like).fill_(1.0)

    assert peak_bytes(make_and_drop) >= like.numel() * like.element_size()


def test_empty_output_under_fake_tensors():
    """The fake kernels of the fused_ce:: ops call the shared helpers on fake tensors."""
    with FakeTensorMode():
        like = torch.empty(1024, 1024)
        out = empty_output(like)
        grads = gradient_buffers(like, like, True, False)
        stats = forward_outputs(7, torch.float32, like.device, True)
    assert isinstance(out, FakeTensor) and out.shape == (1024, 1024)
    assert grads[0].shape == (1024, 1024) and grads[1].shape == (0,)
    assert [tuple(t.shape) for t in stats] == [(7,), (7,), (3, 7), (7,), (7,)]


def test_bce_rows_2d_reads_dense_or_uniform_operands_as_one_row():
    """An (N, 1) problem with a 0-d or expanded upstream gradient is one long row (not N rows
    of one element); a broadcast weight keeps the (rows, cols) view; with a loss sum a
    strided operand is copied dense rather than changing the view."""
    x = torch.randn(6, 1)
    t = torch.rand(6, 1)
    for grad in (torch.tensor(0.5), torch.tensor(0.5).expand(6, 1), torch.ones(6, 1)):
        views = bce_rows_2d(x.shape, (x, t, None, None, grad), loss_sum=False)
        assert [tuple(v.shape) for v in views if v is not None] == [(1, 6)] * 3
    wide = torch.randn(4, 3)
    weight = torch.rand(3)
    views = bce_rows_2d(wide.shape, (wide, wide, weight, None, None), loss_sum=True)
    assert [tuple(v.shape) for v in views if v is not None] == [(4, 3)] * 3
    strided = torch.randn(3, 4).t()
    for loss_sum, expected in ((True, (1, 12)), (False, (4, 3))):
        views = bce_rows_2d(strided.shape, (strided, wide, None, None, None), loss_sum=loss_sum)
        assert tuple(views[0].shape) == expected
        assert torch.equal(views[0].reshape(4, 3), strided)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_strided_operands_sum_to_the_dense_bits(backend_device, reduction):
    """A loss summed from strided (transposed) operands has the bits of the dense problem's,
    on every backend, and it and the gradient match float64 torch; an (N, 1) problem
    likewise. (The gradients are elementwise; torch's own strided and dense kernels may differ
    in the last bit, so only the sum is held to identical bits.)"""
    backend, device = backend_device
    for x, t in (
        (randn((33, 20), 0, device, scale=3.0).t(), torch.rand(33, 20).t().to(device)),
        (randn((40, 1), 1, device, scale=3.0), torch.rand(40, 1).to(device)),
    ):
        # A (C,) pos_weight is broadcast and keeps the (rows, cols) view; one value does not.
        pw = positive((1,), 2, device) if x.shape[-1] == 1 else None
        results = []
        for xs, ts in ((x, t), (x.contiguous(), t.contiguous())):
            leaf = xs.detach().requires_grad_(True)
            loss = fused_ce.sigmoid_binary_cross_entropy(
                leaf, ts, pos_weight=pw, reduction=reduction, backend=backend
            )
            loss.backward()
            results.append((loss.detach(), leaf.grad))
        assert torch.equal(results[0][0], results[1][0])
        x64 = x.double().requires_grad_(True)
        loss64 = F.binary_cross_entropy_with_logits(
            x64,
            t.double(),
            pos_weight=pw.double() if pw is not None else None,
            reduction=reduction,
        )
        loss64.backward()
        rtol, atol = TIGHT[torch.float32]
        torch.testing.assert_close(results[0][0].double(), loss64.detach(), rtol=rtol, atol=atol)
        torch.testing.assert_close(results[0][1].double(), x64.grad, rtol=rtol, atol=atol)


@pytest.mark.skipif(not native.available(), reason="needs the native extension")
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_large_native_bce_gradient_comes_from_the_shared_allocator(reduction):
    """The public 'mean'/'sum' BCE on the native backend (its C++ autograd) hands out a 4 MiB
    gradient mapped by empty_output (2 MiB aligned where huge pages are on), with float64
    torch's values, for the input and the target; a retained graph's second backward (new
    buffers) gives the same."""
    x = randn((1024, 1024), 0, "cpu", scale=3.0).requires_grad_(True)
    t = torch.rand(1024, 1024, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    loss = fused_ce.sigmoid_binary_cross_entropy(x, t, reduction=reduction, backend="native")
    first = torch.autograd.grad(loss, (x, t), retain_graph=True)
    second = torch.autograd.grad(loss, (x, t))
    x64, t64 = x.detach().double().requires_grad_(True), t.detach().double().requires_grad_(True)
    expected = torch.autograd.grad(
        F.binary_cross_entropy_with_logits(x64, t64, reduction=reduction), (x64, t64)
    )
    rtol, atol = TIGHT[torch.float32]
    for grads in (first, second):
        for value, ref in zip(grads, expected, strict=True):
            torch.testing.assert_close(value.double(), ref, rtol=rtol, atol=atol * ref.abs().max())
            if _huge_pages_on():
                assert value.data_ptr() % (2 << 20) == 0


@pytest.mark.skipif(
    not (native.available() and _huge_pages_on()), reason="needs the native huge-page outputs"
)
def test_a_freed_output_mapping_serves_the_next_output_of_its_size():
    """The last freed mapping (up to 64 MiB) is kept for the next output of the same length (a
    training step's gradient), so that one neither faults nor zeroes pages again; another
    length gets a new mapping; outputs alive at once never share memory."""
    like = torch.empty(1024, 1024)
    first = empty_output(like)
    address = first.data_ptr()
    del first
    again = empty_output(like)
    assert again.data_ptr() == address
    other = empty_output(like)  # while `again` lives: a new mapping
    assert other.data_ptr() != address
    again.fill_(1.0)
    other.fill_(2.0)
    assert float(again.sum()) == like.numel() and float(other.sum()) == 2 * like.numel()
    del again, other
    bigger = empty_output(torch.empty(2048, 1024))
    assert bigger.shape == (2048, 1024)
