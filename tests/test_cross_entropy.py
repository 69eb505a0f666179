"""softmax_cross_entropy against torch.nn.functional.cross_entropy computed in float64.

Every test runs on each (backend, device) pair of the ``backend_device`` fixture: the torch path
and the Triton kernels (through the interpreter on CPU).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _reference import (
    REDUCTIONS,
    assert_identical,
    check,
    generator,
    positive,
    randn,
)
from conftest import backend_cases, fresh_launch_caches

import fused_ce
from fused_ce.ops.cross_entropy import ce_forward

# 1-D input has its class dim at 0, the others at 1.
SHAPES = {"C": (7,), "NC": (6, 7), "NCHW": (3, 5, 2, 3)}


def class_dim(shape) -> int:
    return 0 if len(shape) == 1 else 1


def make_target(
    shape,
    kind: str,
    device,
    dtype=torch.float32,
    *,
    ignore_index: int | None = None,
    seed: int = 1,
) -> torch.Tensor:
    """Class indices (every third row set to ``ignore_index`` when given) or probabilities."""
    dim = class_dim(shape)
    if kind == "prob":
        logits = torch.randn(shape, generator=generator(seed), dtype=torch.float64) * 2
        return torch.softmax(logits, dim).to(device=device, dtype=dtype)
    batch = shape[:dim] + shape[dim + 1 :]
    target = torch.randint(0, shape[dim], batch, generator=generator(seed))
    if ignore_index is not None:
        target.view(-1)[::3] = ignore_index
    return target.to(device)


def check_ce(backend_device, logits, target, *, seed: int = 0, grad_tolerance=None, **kwargs):
    """Our loss and gradients (input, and the target for probability targets) vs the oracle."""
    backend, _ = backend_device
    wrt = (0, 1) if target.is_floating_point() else (0,)
    return check(
        fused_ce.softmax_cross_entropy,
        F.cross_entropy,
        (logits, target),
        kwargs,
        wrt,
        backend,
        seed,
        grad_tolerance,
        elementwise=True,
    )


def weight_for(logits, weighted: bool):
    """Class weights far from 1 in the logits' dtype, or None."""
    if not weighted:
        return None
    return positive((logits.shape[class_dim(logits.shape)],), 5, logits.device, logits.dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_fp32_matches_oracle(backend_device, shape, kind, weighted, label_smoothing, reduction):
    _, device = backend_device
    logits = randn(shape, 0, device, scale=3.0)
    # Index targets carry ignored rows (default ignore_index) wherever there is more than one row.
    ignore = -100 if kind == "index" and len(shape) > 1 else None
    target = make_target(shape, kind, device, ignore_index=ignore)
    check_ce(
        backend_device,
        logits,
        target,
        weight=weight_for(logits, weighted),
        reduction=reduction,
        label_smoothing=label_smoothing,
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("ignore_index", [0, 4])
def test_ignore_index_may_be_a_valid_class(
    backend_device, ignore_index, label_smoothing, reduction
):
    _, device = backend_device
    logits = randn((9, 5), 0, device)
    target = make_target(logits.shape, "index", device, ignore_index=ignore_index)
    check_ce(
        backend_device,
        logits,
        target,
        weight=weight_for(logits, True),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("n_classes", [1, 2, 3, 7, 1000, 65537])
def test_ragged_class_counts(backend_device, n_classes, kind):
    _, device = backend_device
    n_rows = 2 if n_classes > 1000 else 5
    logits = randn((n_rows, n_classes), 0, device, scale=2.0)
    target = make_target(logits.shape, kind, device, ignore_index=-100 if n_rows > 2 else None)
    check_ce(
        backend_device,
        logits,
        target,
        weight=weight_for(logits, True),
        reduction="none",
        label_smoothing=0.1,
    )


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_confident_rows(backend_device, kind, label_smoothing):
    """Target-class p from 1 - 5e-5 down to 1 - 1e-13 (margins 10..30): losses and gradients
    near 0 stay tight against the oracle, with no NaN from exp/log at the extremes. (The bf16
    trap, p = 0.999 rounded before p - 1, is held elementwise in test_dtypes.)"""
    _, device = backend_device
    logits = randn((6, 11), 0, device)
    target = torch.arange(6, device=device) % 11
    margins = torch.tensor([10.0, 14.0, 18.0, 22.0, 26.0, 30.0], device=device)
    logits[torch.arange(6, device=device), target] += margins
    if kind == "prob":
        target = F.one_hot(target, 11).float() * 0.999 + 0.001 / 11
    check_ce(backend_device, logits, target, reduction="none", label_smoothing=label_smoothing)


def check_large_logits(backend_device, logits, target, **kwargs):
    """Large logits: the loss and each gradient within twice torch's own largest fp32 error
    plus one rounding at the largest value (the rule for fp16/bf16). The backward rebuilds
    p = exp((x - m) - log_s) from the saved row max m and log-sum log_s, so p carries no
    rounding of a large lse."""
    backend, _ = backend_device
    wrt = (0, 1) if target.is_floating_point() else (0,)
    return check(
        fused_ce.softmax_cross_entropy,
        F.cross_entropy,
        (logits, target),
        kwargs,
        wrt,
        backend,
        torch_rule=True,
    )


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_extreme_logits(backend_device, kind, reduction):
    """|logits| up to 1e4: finite, the loss and the gradient within twice torch's fp32 error."""
    _, device = backend_device
    logits = (torch.rand((8, 13), generator=generator(0)) * 2e4 - 1e4).to(device)
    logits[0] = 1e4  # a row of equal huge logits: p = 1/13 from exp(x - lse) at lse ~ 1e4
    logits[1] = -1e4
    logits[2, :3] = 1e4 - torch.tensor([0.0, 0.5, 3.0], device=device)  # a near-tie
    target = make_target(logits.shape, kind, device, ignore_index=-100 if kind == "index" else None)
    ours = check_large_logits(
        backend_device,
        logits,
        target,
        weight=weight_for(logits, True),
        reduction=reduction,
        label_smoothing=0.05,
    )
    assert all(torch.isfinite(value).all() for _, value in ours.outputs())


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_shift_invariance(backend_device, kind):
    """x and x + 100 give the same loss (to fp32 rounding: the forward works relative to the
    row max) and the same gradients to fp32 rounding (the backward too). Logits are multiples
    of 1/64 so that the shift is exact in fp32."""
    _, device = backend_device
    logits = (torch.randint(-256, 256, (6, 9), generator=generator(0)) / 64.0).to(device)
    target = make_target(logits.shape, kind, device, ignore_index=-100 if kind == "index" else None)
    kwargs = dict(weight=weight_for(logits, True), reduction="none", label_smoothing=0.2)
    plain = check_ce(backend_device, logits, target, **kwargs)
    shifted = check_large_logits(backend_device, logits + 100.0, target, **kwargs)
    torch.testing.assert_close(shifted.loss, plain.loss, rtol=1e-6, atol=1e-6)
    for (name, a), (_, b) in zip(plain.grads_named(), shifted.grads_named(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7 * float(a.abs().max()), msg=name)


def use_small_tiles(backend: str, monkeypatch) -> None:
    """Shrink the work units so that tiny shapes take every multi-unit path: several row
    programs, an online softmax over several class blocks and a backward split over class
    blocks (the GPU's path) for the kernels; several row chunks for the torch path."""
    if backend == "triton":
        import fused_ce.launch._common as launch_common
        import fused_ce.launch.cross_entropy as launch_ce

        original_tile = launch_common.tile
        monkeypatch.setattr(launch_common, "MAX_TILE", 8)
        monkeypatch.setattr(launch_ce, "tile", lambda rows, cols: original_tile(rows, cols, 4))
        monkeypatch.setattr(launch_ce, "parallel_slots", lambda tensor: 64)
        fresh_launch_caches(monkeypatch, launch_ce)
    else:
        import fused_ce.torch_impl.cross_entropy as torch_ce

        monkeypatch.setattr(torch_ce, "CHUNK_ELEMENTS", 1)


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("shape", [(7, 11), (3, 11, 5)], ids=["NC", "NCL"])
def test_small_tiles(backend_device, shape, kind, monkeypatch):
    backend, device = backend_device
    use_small_tiles(backend, monkeypatch)
    logits = randn(shape, 0, device, scale=3.0)
    logits[0, 9] = 20.0  # the row max in the last class block
    target = make_target(shape, kind, device, ignore_index=-100)
    check_ce(
        backend_device,
        logits,
        target,
        weight=weight_for(logits, True),
        reduction="none",
        label_smoothing=0.1,
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_all_rows_ignored(backend_device, weighted, label_smoothing, reduction):
    """'mean' over no rows is 0/0 = NaN with an all-zero gradient (torch's answer)."""
    _, device = backend_device
    logits = randn((4, 6), 0, device)
    target = torch.full((4,), -100, device=device)
    ours = check_ce(
        backend_device,
        logits,
        target,
        weight=weight_for(logits, weighted),
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    expected_loss = {"none": torch.zeros(4), "mean": torch.tensor(float("nan")), "sum": 0.0}
    torch.testing.assert_close(
        ours.loss.cpu(), torch.as_tensor(expected_loss[reduction]), equal_nan=True
    )
    assert torch.equal(ours.grads[0], torch.zeros_like(logits))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("shape", [(0, 5), (0, 5, 3), (2, 5, 0)], ids=["N0", "N0-d3", "N2-d0"])
def test_empty_batch(backend_device, shape, kind, reduction):
    """No rows: NaN for 'mean', 0 for 'sum', an empty 'none', empty gradients."""
    _, device = backend_device
    logits = randn(shape, 0, device)
    target = make_target(shape, kind, device)
    ours = check_ce(backend_device, logits, target, reduction=reduction)
    if reduction == "mean":
        assert ours.loss.isnan()
    elif reduction == "sum":
        assert ours.loss.item() == 0.0
    assert ours.grads[0].shape == shape


def _layouts(device) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """name -> (logits, probability target, class-index target), non-contiguous views of
    memory laid out another way."""
    nhwc = randn((2, 3, 4, 5), 0, device)  # (N, H, W, C) memory
    prob_nhwc = torch.softmax(randn((2, 3, 4, 5), 1, device), -1)
    index_nhw = torch.randint(0, 5, (2, 3, 4), generator=generator(2)).to(device)
    wide = randn((6, 14), 3, device)
    prob_wide = torch.softmax(randn((6, 14), 4, device), -1)
    index_wide = torch.randint(0, 7, (12,), generator=generator(5)).to(device)
    class_major = randn((7, 6), 6, device)  # (C, N) memory
    odd = randn((5, 15), 8, device)
    prob_odd = torch.softmax(randn((5, 15), 9, device)[:, :8], -1)
    prob_class_major = torch.softmax(randn((7, 6), 7, device), 0)
    return {
        # NCHW views of NHWC memory: class stride 1, spatial strides C.
        "nchw_from_nhwc": (
            nhwc.permute(0, 3, 1, 2),
            prob_nhwc.permute(0, 3, 1, 2),
            index_nhw,
        ),
        # Every other class: class stride 2; targets every other element.
        "class_stride_2": (wide[:, ::2], prob_wide[:, ::2], index_wide[::2]),
        # Every other row, and a column slice of a wider buffer.
        "row_stride_2": (wide[::2, :7], prob_wide[::2, 7:], index_wide[1::2][:3]),
        # (N, C) read from (C, N) memory: class stride N, row stride 1.
        "transposed": (class_major.t(), prob_class_major.t(), index_wide[:6]),
        # Odd row stride 15, and every pointer one element off 16-byte alignment (int64
        # targets included): Triton specializes on alignment, and such cases have miscompiled.
        "odd_misaligned": (odd[:, 1:14:2], prob_odd[:, 1:8], index_wide[1:6]),
    }


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize(
    "layout", ["nchw_from_nhwc", "class_stride_2", "row_stride_2", "transposed", "odd_misaligned"]
)
def test_non_contiguous_inputs(backend_device, layout, kind):
    """Strided and permuted inputs give the oracle's numbers, and the same numbers as
    contiguous copies: bitwise for the interpreted Triton kernels; to a few ulps where the
    order of the per-row sums may depend on the layout (see ``_LAYOUT_ULPS``)."""
    backend, device = backend_device
    logits, prob, index = _layouts(device)[layout]
    assert not logits.is_contiguous()
    target = prob if kind == "prob" else index
    kwargs = dict(weight=weight_for(logits, True), reduction="none", label_smoothing=0.1)
    strided = check_ce(backend_device, logits, target, **kwargs)
    dense = check_ce(backend_device, logits.contiguous(), target.contiguous(), **kwargs)
    assert_identical(strided, dense, ulps=_LAYOUT_ULPS[backend, device])


# How far results on strided and dense copies of the same logits may differ. The interpreted
# Triton kernels sum each row in one fixed order: bitwise. Compiled Triton specialises on the
# strides (a stride of 1 becomes a constant), so each layout is another compiled kernel, and
# the compiler may spread the logits tile over the threads differently. Seen on an H200
# (Triton 3.6, 2026-12-04): NCHW logits viewed from NHWC memory (class stride 1) gave other
# loss bits than the dense NCHW copy (inner stride 1). Compiling both for sm_90 with Triton
# 3.6 shows why: the strided tile has 8 lanes along the classes, summed by warp shuffles; the
# dense one, whose loads are contiguous along the rows, has 32 lanes along the rows and the
# classes spread over the 4 warps, summed through shared memory: another summation tree
# (Triton 3.9 picks the first layout for both). An fp32 sum of C terms in another order
# differs by up to about 2 C ulps of the terms' scale (C = 5 here): 16 ulps. The torch path
# sums with torch's own logsumexp, the native kernels in one of two row layouts chosen by the
# strides.
_LAYOUT_ULPS = {
    ("triton", "cpu"): 0,
    ("native", "cpu"): 2,
    ("triton", "cuda"): 16,
    ("torch", "cpu"): 2,
    ("torch", "cuda"): 2,
}


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_uint8_targets(backend_device, reduction):
    """Byte targets (ignore_index a valid class) equal int64 targets exactly."""
    _, device = backend_device
    logits = randn((7, 6), 0, device)
    target = make_target(logits.shape, "index", device, ignore_index=2)
    kwargs = dict(weight=weight_for(logits, True), ignore_index=2, reduction=reduction)
    as_byte = check_ce(backend_device, logits, target.to(torch.uint8), **kwargs)
    as_long = check_ce(backend_device, logits, target, **kwargs)
    assert_identical(as_byte, as_long)


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_input_without_grad(backend_device, kind):
    """Logits that do not require grad work; a probability target alone still gets its
    gradient."""
    backend, device = backend_device
    logits = randn((4, 6), 0, device)
    target = make_target(logits.shape, kind, device)
    kwargs = dict(weight=weight_for(logits, True), label_smoothing=0.1)
    assert not fused_ce.softmax_cross_entropy(
        logits, target, backend=backend, **kwargs
    ).requires_grad
    wrt = (1,) if kind == "prob" else ()
    check(fused_ce.softmax_cross_entropy, F.cross_entropy, (logits, target), kwargs, wrt, backend)


LOW_PRECISION_CASES = {
    "plain": dict(),
    "weighted_smoothed": dict(weighted=True, label_smoothing=0.2),
}


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("options", LOW_PRECISION_CASES.values(), ids=LOW_PRECISION_CASES.keys())
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_dtypes(backend_device, dtype, kind, options, reduction):
    """fp16/bf16 within twice torch's own same-dtype error; fp64 tight. Includes a confident
    row (p about 0.999) whose true-class gradient p - 1 must survive the rounding."""
    _, device = backend_device
    logits = randn((8, 12), 0, device, dtype=torch.float64, scale=2.0)
    logits[0, 3] += 10.0  # p close to 1 for class 3
    logits = logits.to(dtype)
    target = make_target(logits.shape, kind, device, dtype, ignore_index=-100)
    if kind == "index":
        target[0] = 3
    options = dict(options)
    weight = weight_for(logits, options.pop("weighted", False))
    check_ce(backend_device, logits, target, weight=weight, reduction=reduction, **options)


@pytest.mark.parametrize(
    ("input_dtype", "target_dtype"),
    [
        (torch.float16, torch.float32),
        (torch.float32, torch.float64),
        (torch.bfloat16, torch.float16),
    ],
    ids=str,
)
def test_mixed_dtype_probability_targets(backend_device, input_dtype, target_dtype):
    """The loss takes the promoted dtype of input and target, as torch's does; each gradient
    keeps its tensor's dtype; values by the rule of the coarser dtype."""
    _, device = backend_device
    logits = randn((5, 6), 0, device, input_dtype, scale=2.0)
    target = make_target(logits.shape, "prob", device, target_dtype)
    check_ce(backend_device, logits, target, reduction="none", label_smoothing=0.1)


def test_negative_label_smoothing_acts_as_none(backend_device):
    _, device = backend_device
    logits = randn((5, 6), 0, device)
    target = make_target(logits.shape, "index", device, ignore_index=-100)
    check_ce(backend_device, logits, target, label_smoothing=-0.3, weight=weight_for(logits, True))


# --- bad inputs -------------------------------------------------------------------------------


def _bad_cases(device):
    x = randn((4, 5), 0, device)
    y = torch.tensor([0, 1, 2, 3], device=device)
    prob = torch.softmax(x, 1)
    return {
        "int32 target": ((x, y.int()), {}, RuntimeError, r"\btarget\b"),
        "target shape": ((x, y[:3]), {}, ValueError, r"\btarget\b"),
        "prob target shape": ((x, prob[:, :4]), {}, ValueError, r"\btarget\b"),
        "reduction": ((x, y), {"reduction": "avg"}, ValueError, r"\breduction\b"),
        "label_smoothing > 1": ((x, y), {"label_smoothing": 1.5}, RuntimeError, "label_smoothing"),
        "weight size": (
            (x, y),
            {"weight": torch.ones(4, device=device)},
            RuntimeError,
            r"\bweight\b",
        ),
        "weight 2-d": (
            (x, y),
            {"weight": torch.ones(1, 5, device=device)},
            RuntimeError,
            r"\bweight\b",
        ),
        "weight requires grad": (
            (x, y),
            {"weight": torch.ones(5, device=device, requires_grad=True)},
            RuntimeError,
            r"\bweight\b",
        ),
        "weight dtype": (
            (x.bfloat16(), y),
            {"weight": torch.ones(5, device=device)},
            RuntimeError,
            r"\bweight\b",
        ),
        "ignore_index with prob target": (
            (x, prob),
            {"ignore_index": 0},
            RuntimeError,
            "ignore_index",
        ),
        "integer input": ((y.view(4, 1).expand(4, 5), y), {}, TypeError, r"\binput\b"),
        "0-d input": ((x[0, 0], y[0]), {}, ValueError, r"\binput\b"),
    }


@pytest.mark.parametrize("case", list(_bad_cases("cpu")))
def test_bad_inputs_raise(backend_device, case):
    backend, device = backend_device
    args, kwargs, error, match = _bad_cases(device)[case]
    with pytest.raises(error, match=match):
        fused_ce.softmax_cross_entropy(*args, backend=backend, **kwargs)


CPU_CASES = [case for case in backend_cases() if case[1] == "cpu"]


@pytest.mark.parametrize("bad_class", [5, 7, -1, -3])
@pytest.mark.parametrize("kind", ["NC", "NCHW"])
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_out_of_range_class_raises(case, kind, bad_class):
    """On CPU ``torch._assert_async`` raises before any kernel runs (on CUDA it is a device-side
    assert, which would poison the process, so these run on CPU only)."""
    backend, device = case
    shape = (4, 5) if kind == "NC" else (2, 5, 2)
    logits = randn(shape, 0, device)
    target = make_target(shape, "index", device)
    target.view(-1)[1] = bad_class
    with pytest.raises(RuntimeError, match=r"\btarget\b.*out of bounds"):
        fused_ce.softmax_cross_entropy(logits, target, backend=backend)


TRITON_CASES = [case for case in backend_cases() if case[0] == "triton"]


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_kernel_never_reads_through_a_bad_target(case):
    """Below the public check, the Triton kernels treat an out-of-range class index like an
    ignored row: no out-of-bounds access, finite statistics, zero loss and zero gradient."""
    _, device = case
    logits = randn((4, 5), 0, device, dtype=torch.float64).requires_grad_()
    target = torch.tensor([1, 5, -7, 10**12], device=device)
    weight = positive((5,), 5, device, torch.float64)
    loss, lse, *_ = ce_forward(
        logits.unsqueeze(-1), target.view(4, 1), weight, -100, 0.1, 1.0, 0.0, False, False, "triton"
    )
    expected = F.cross_entropy(
        logits[:1].detach(), target[:1], weight=weight, reduction="none", label_smoothing=0.1
    )
    torch.testing.assert_close(loss.detach()[:1], expected)
    assert torch.equal(loss.detach()[1:], torch.zeros(3, dtype=torch.float64, device=device))
    torch.testing.assert_close(lse.detach(), torch.logsumexp(logits.detach(), 1))
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert torch.equal(grad[1:], torch.zeros_like(grad[1:]))


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_host_checked_targets_give_the_device_checked_bits(
    backend, dtype, weighted, reduction, z_loss, monkeypatch
):
    """On the CPU in eager mode a scalar loss checks its class indices on the host (one
    aminmax) and, when none is ignored, skips the valid mask and counts the rows on the host;
    loss and gradient must be bit for bit those of the device-side check it replaces."""
    if backend == "native" and not fused_ce.native.available():
        pytest.skip("the native extension is not built")
    from fused_ce import _validation

    n, c = 1000, 11
    logits = randn((n, c), 3, "cpu", dtype=dtype)
    target = torch.arange(n) * 7 % c
    weight = positive((c,), 4, "cpu", dtype) if weighted else None

    def run():
        leaf = logits.detach().requires_grad_()
        loss = fused_ce.softmax_cross_entropy(
            leaf, target, weight, reduction=reduction, z_loss=z_loss, backend=backend
        )
        loss.backward()
        return loss.detach(), leaf.grad

    assert _validation.all_in_range_on_host(target, c, -100)
    assert not _validation.all_in_range_on_host(target, c, 3)  # ignore_index is a class
    assert not _validation.all_in_range_on_host(torch.tensor([0, -100]), c, -100)
    assert not _validation.all_in_range_on_host(torch.tensor([0, c]), c, -100)
    host_loss, host_grad = run()
    monkeypatch.setattr(_validation, "all_in_range_on_host", lambda *args: False)
    device_loss, device_grad = run()
    assert torch.equal(host_loss, device_loss)
    assert torch.equal(host_grad, device_grad)
